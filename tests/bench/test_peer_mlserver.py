import pytest

from peer_check import check_peer

pytestmark = [pytest.mark.peers, pytest.mark.slow]  # installs and starts a peer server: tens of seconds


def test_mlserver_starts_answers_and_stops(tmp_path):
    check_peer("mlserver", tmp_path)
