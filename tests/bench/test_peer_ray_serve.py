import pytest

from peer_check import check_peer

pytestmark = [pytest.mark.peers, pytest.mark.slow]  # installs and starts a peer server: tens of seconds


def test_ray_serve_starts_answers_and_stops(tmp_path):
    check_peer("ray-serve", tmp_path)
