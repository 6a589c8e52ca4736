from peer_check import check_peer


def test_unbatched_starts_answers_and_stops(tmp_path):
    check_peer("unbatched", tmp_path)
