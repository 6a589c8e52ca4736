from peer_check import check_peer


def test_mlserver_starts_answers_and_stops(tmp_path):
    check_peer("mlserver", tmp_path)
