from peer_check import check_peer


def test_ray_serve_starts_answers_and_stops(tmp_path):
    check_peer("ray-serve", tmp_path)
