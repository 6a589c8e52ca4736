"""`cellserve serve --kernel-versions` (docs/tenancy.md): a real server answers with versions on
and says in its metrics what it measured and ran; profiles it cannot use stop the start with an
error naming them (exit 2)."""

from __future__ import annotations

import os
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from serverproc import serve_here, start_server
from zoo_reference import token_reference

from cellserve.plan.versions import VersionProfile

CELL_TYPE = "gru-256/rnn.GRU+rnn.GRU_1"  # gru-256's two layers, stepped as one stack


def write_profile(path, model: str = "gru-256", cell_type: str = CELL_TYPE) -> str:
    """A profile for this machine's thread count (made up: serving only reads it)."""
    n = len(os.sched_getaffinity(0))
    versions = [f"openmp-{k}" for k in range(1, n + 1)] + ([f"elastic-{n}"] if n > 1 else [])
    rows = tuple((50e-6, 64 * 50e-6) for _ in range(2))
    table = {v: {"steady": rows, "pause": rows} for v in versions}
    VersionProfile(model=model, backend="fused", cores=n, versions=tuple(versions), batches=(1, 64),
                   duties=(0.0, 1.0), levels=(0.0, 0.6), step_s={cell_type: table}).to_json(path)
    return str(path)


def serve_in_process(capsys, monkeypatch, *args: str):
    return serve_here(capsys, monkeypatch, "--model", "gru-256", "--http-port", "0", "--grpc-port", "-1",
                      "--metrics-port", "-1", *args)


def test_a_profile_of_a_model_not_served_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    done = serve_in_process(capsys, monkeypatch, "--kernel-versions",
                            write_profile(tmp_path / "v.json", "lstm-512", "lstm-512/x"))
    assert done.returncode == 2
    assert "--kernel-versions" in done.stderr and "'lstm-512'" in done.stderr


def test_versions_on_another_backend_exit_2_naming_it(tmp_path, capsys, monkeypatch):
    done = serve_in_process(capsys, monkeypatch, "--backend", "onednn", "--kernel-versions",
                            write_profile(tmp_path / "v.json"))
    assert done.returncode == 2
    assert "runs the onednn step" in done.stderr


def test_a_file_that_is_no_profile_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    path = tmp_path / "v.json"
    path.write_text("[1, 2]")
    done = serve_in_process(capsys, monkeypatch, "--kernel-versions", str(path))
    assert done.returncode == 2
    assert "a kernel-versions profile is a JSON object" in done.stderr


@pytest.mark.slow  # a `cellserve serve` process
def test_a_server_with_versions_answers_and_reports_them(tmp_path):
    server = start_server("--model", "gru-256", "--kernel-versions", write_profile(tmp_path / "v.json"))
    try:
        client = httpclient.InferenceServerClient(server.http)
        rng = np.random.default_rng(0)
        for n in (3, 17, 40):
            tokens = rng.integers(0, 10000, size=(1, n)).astype(np.int64)
            x = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
            x.set_data_from_numpy(tokens)
            got = client.infer("gru-256", [x]).as_numpy("probabilities")
            np.testing.assert_allclose(got, token_reference("gru-256", tokens)["probabilities"], atol=1e-5)
        text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=30).read().decode()
        assert 'cellserve_interference_cores{executor="default"}' in text
        assert "cellserve_kernel_version_switches_total" in text
        steps = [line for line in text.splitlines() if line.startswith("cellserve_kernel_version_steps_total{")]
        assert steps and all('cell_type="gru-256:1/rnn.GRU+rnn.GRU_1"' in line for line in steps), steps
    finally:
        assert server.stop() == 0
