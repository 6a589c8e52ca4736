"""The Triton peer: installs (or skips with the reason), serves the exported model through
its Python backend and answers as ONNX Runtime does."""

import pytest

from peer_check import check_peer

pytestmark = [pytest.mark.peers, pytest.mark.slow]  # installs and starts a peer server: tens of seconds


def test_triton_peer_answers_like_onnx_runtime(tmp_path):
    check_peer("triton", tmp_path)
