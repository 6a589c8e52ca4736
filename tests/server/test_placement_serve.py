"""`cellserve serve --placement`: a plan file (or auto) served by real executors in a real
server process; plans that cannot be served exit 2 with an error naming what is wrong (one such
refusal in a real process, the others in this process through cli.main: serverproc.serve_here)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from serverproc import serve_here, start_server
from zoo_reference import digits, reversed_texts, token_reference

TAGGER = ["bilstm-tagger/rnn.LSTM/0", "bilstm-tagger/rnn.LSTM/1", "bilstm-tagger/rnn.LSTM_1/0",
          "bilstm-tagger/rnn.LSTM_1/1", "bilstm-tagger/ops/0", "bilstm-tagger/ops/1", "bilstm-tagger/ops/2",
          "bilstm-tagger/input", "bilstm-tagger/output"]


def write_plan(path, assignment: dict[str, str]) -> str:
    devices = sorted(set(assignment.values()))
    path.write_text(json.dumps({"assignment": assignment,
                                "order": {d: [n for n, v in assignment.items() if v == d] for d in devices},
                                "makespan_ms": 1.0, "memory_mb": {d: 0.0 for d in devices},
                                "solver": "milp", "gap": 0.0}))
    return str(path)


def split() -> dict[str, str]:
    return {n: "cpu1" if n.endswith("/1") else "cpu0" for n in TAGGER}


def serve(*args: str, models: tuple[str, ...] = ("--model", "bilstm-tagger")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", *models,
                           "--http-port", "0", "--grpc-port", "-1", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=300)


def serve_in_process(capsys, monkeypatch, *args: str,
                     models: tuple[str, ...] = ("--model", "bilstm-tagger")) -> subprocess.CompletedProcess:
    """`serve` as above, in this process (it fails before binding a port)."""
    return serve_here(capsys, monkeypatch, *models, "--http-port", "0", "--grpc-port", "-1", "--metrics-port", "-1",
                      *args)


@pytest.mark.slow  # a `cellserve serve` process: seconds of imports
def test_a_plan_naming_an_unknown_node_exits_2_naming_it(tmp_path):
    plan = write_plan(tmp_path / "p.json", {**split(), "bilstm-tagger/rnn.LSTM_9/0": "cpu0"})
    done = serve("--placement", plan)
    assert done.returncode == 2, done.stderr
    assert "'bilstm-tagger/rnn.LSTM_9/0'" in done.stderr and "p.json" in done.stderr


def test_a_plan_naming_an_unknown_device_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    plan = write_plan(tmp_path / "p.json", {**split(), "bilstm-tagger/ops/2": "npu"})
    done = serve_in_process(capsys, monkeypatch, "--placement", plan)
    assert done.returncode == 2, done.stderr
    assert "device 'npu'" in done.stderr


def test_a_plan_file_that_cannot_be_read_exits_2_before_any_model_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "p.json").write_text("{not json")
    done = serve_in_process(capsys, monkeypatch, "--placement", str(tmp_path / "p.json"),
                            models=("--model-repository", str(tmp_path / "nowhere")))
    assert done.returncode == 2 and "is not JSON" in done.stderr  # not the repository's error: read first
    done = serve_in_process(capsys, monkeypatch, "--placement", "auto", "--placement-cores", "gpu=0")
    assert done.returncode == 2 and "must be cpuN=CORES" in done.stderr


def _infer(client, tokens: np.ndarray) -> dict[str, np.ndarray]:
    x = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
    x.set_data_from_numpy(tokens, binary_data=True)
    result = client.infer("bilstm-tagger", [x])
    return {n: result.as_numpy(n) for n in ("tag_probabilities", "tags")}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plan", "auto"])
def test_a_served_partition_answers_as_the_model_does(tmp_path, how):
    placement = write_plan(tmp_path / "p.json", split()) if how == "plan" else "auto"
    server = start_server("--model", "bilstm-tagger", "--model", "seq2seq-reverse", "--placement", placement)
    try:
        assert "cellserve: placement" in server.output() and "cpu1" in server.output()
        rng = np.random.default_rng(0)
        inputs = [rng.integers(1, 5000, (1, int(n))).astype(np.int64) for n in rng.integers(1, 50, 40)]

        def one(tokens):
            with httpclient.InferenceServerClient(server.http, network_timeout=120) as client:
                return _infer(client, tokens)

        with ThreadPoolExecutor(8) as pool:  # at once: they share the executors' batches
            answers = list(pool.map(one, inputs))
        for tokens, got in zip(inputs, answers):
            want = token_reference("bilstm-tagger", tokens)
            np.testing.assert_allclose(got["tag_probabilities"], want["tag_probabilities"], rtol=1e-4, atol=1e-5)
        # the model the plan leaves out is served too, on the first executor
        with httpclient.InferenceServerClient(server.http, network_timeout=120) as client:
            x = httpclient.InferInput("digits", [1, 5], "INT64")
            x.set_data_from_numpy(digits(["12345"]), binary_data=True)
            out = client.infer("seq2seq-reverse", [x]).as_numpy("reversed")
        assert reversed_texts(out) == ["54321"]
    finally:
        assert server.stop() == 0
