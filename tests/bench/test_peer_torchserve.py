"""TorchServe as a comparison peer: installs into its own venv (or skips with the reason),
serves the exported model over the Open Inference Protocol and stops cleanly."""

import pytest

from peer_check import check_peer

pytestmark = [pytest.mark.peers, pytest.mark.slow]  # installs and starts a peer server: tens of seconds


def test_torchserve_starts_answers_and_stops(tmp_path):
    check_peer("torchserve", tmp_path)
