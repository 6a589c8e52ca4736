import pytest

from peer_check import check_peer


@pytest.mark.slow  # starts the in-repo unbatched server (ONNX Runtime): no peer to install
def test_unbatched_starts_answers_and_stops(tmp_path):
    check_peer("unbatched", tmp_path)
