"""TorchServe as a comparison peer: installs into its own venv (or skips with the reason),
serves the exported model over the Open Inference Protocol and stops cleanly."""

from peer_check import check_peer


def test_torchserve_starts_answers_and_stops(tmp_path):
    check_peer("torchserve", tmp_path)
