"""`cellserve bench load` as a user runs it: its flag errors through cli.main, and a real
sweep against the server it starts on a repository model whose requests are feature rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cellserve import cli
from feature_model import export_frames, export_stateful


@pytest.mark.parametrize("args, message", [
    (["--features", "0x3"],
     "--features must be a feature row's shape, positive sizes joined by x (80, 4x20), got '0x3'"),
    (["--features", "eighty"], "--features must be a feature row's shape"),
    (["--features", "80", "--pad-to-buckets"],
     "--pad-to-buckets pads token ids; it cannot be combined with --features"),
    (["--url", "localhost:1", "--model-repository", "repo"],
     "--model-repository is for the server this command starts"),
    (["--model", "nope"], "model 'nope' is not a zoo model"),
])
def test_bench_load_refuses_bad_flags_naming_them(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "load", *args, "--json", str(tmp_path / "load.json")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _load_served(repo, model: str) -> dict:
    """`bench load` on `model` of `repo`, the server started by it, 20 req/s for a second:
    its report, every request answered."""
    out = repo.parent / "load.json"
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "load", "--model", model,
                           "--model-repository", str(repo), "--rates", "20", "--seconds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(out.read_text())
    (row,) = report["rates"]
    assert row["requests"] > 0 and row["counts"]["ok"] == row["requests"], row
    return report


@pytest.mark.slow  # starts a server and loads it for a second
def test_bench_load_drives_a_feature_model_it_serves_from_a_repository(tmp_path):
    """Started on a repository, bench load sends the model's own input: float rows in its
    layout ([time, 1, 6] here), not token ids."""
    export_frames(tmp_path / "repo" / "frames" / "1" / "model.onnx")
    report = _load_served(tmp_path / "repo", "frames")
    assert report["request_format"]["input_name"] == "features" and report["request_format"]["time_major"]
    assert report["sweep"]["features"] == [6]


@pytest.mark.slow  # starts a server and loads it for a second
def test_bench_load_fills_in_a_streaming_models_state_inputs(tmp_path):
    """A model whose initial states and lengths are inputs gets them beside its rows (zeros,
    the sequence's length) over HTTP."""
    export_stateful(tmp_path / "repo" / "stateful" / "1" / "model.onnx")
    report = _load_served(tmp_path / "repo", "stateful")
    assert [s["name"] for s in report["request_format"]["states"]] == ["lengths", "h0", "c0"]
