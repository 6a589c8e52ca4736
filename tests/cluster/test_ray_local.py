"""`cellserve serve --ray` with no address (a local Ray started for the server, gone after it),
a plan's rate limit shed with 429 before anything queues, and the message without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
import tritonclient.http as httpclient  # noqa: E402
from serverproc import scrape, start_server  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.slow
def test_without_ray_installed_it_says_how_to_install_it(tmp_path):
    (tmp_path / "ray").mkdir()  # a package named ray that cannot be imported: Ray as if not installed
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = serve("--ray", "--model", "gru-256", env=env)
    assert done.returncode == 1
    assert "--ray needs Ray, which is not installed here: pip install cellserve[ray]" in done.stderr


@pytest.mark.slow
def test_a_plan_file_that_does_not_fit_exits_2_naming_the_field(tmp_path):
    pytest.importorskip("ray")
    plan = {"devices_used": 1, "devices": [{"id": 0, "device_type": "cpu", "duty_cycle_ms": 40, "occupancy": 0.5,
            "sessions": [{"id": "a", "model": "lstm-512", "slo_ms": 100, "batch": 4, "rate_rps": 10}]}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    done = serve("--ray", "--plan", str(path), "--model", "gru-256")
    assert done.returncode == 2
    assert f"plan file '{path}': devices[0].sessions[0].model is 'lstm-512', which this server does not serve" \
        in done.stderr
    path.write_text('{"devices": []}')
    done = serve("--ray", "--plan", str(path), "--model", "gru-256")
    assert done.returncode == 2 and "devices_used" in done.stderr


@pytest.mark.slow
def test_a_local_ray_serves_a_plan_and_sheds_what_it_cannot_serve(tmp_path):
    pytest.importorskip("ray")
    plan = {"devices_used": 1, "devices": [{"id": 0, "device_type": "cpu", "duty_cycle_ms": 40, "occupancy": 0.5,
            "sessions": [{"id": "a", "model": "gru-256", "slo_ms": 100, "batch": 1, "rate_rps": 5}]}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    server = start_server("--ray", "--plan", str(path), "--model", "gru-256", "--model", "lstm-512", timeout=240)
    try:
        assert any("cellserve: ray: worker w0" in line and line.endswith(": gru-256") for line in server.lines)
        tokens = np.arange(1, 9, dtype=np.int64)[None, :]
        tensor = httpclient.InferInput("tokens", [1, 8], "INT64")
        tensor.set_data_from_numpy(tokens)
        codes = []
        with httpclient.InferenceServerClient(server.http) as client:
            for _ in range(12):  # at once: the plan's 5 requests/s with a burst of 0.5 (one request)
                try:
                    client.infer("gru-256", [tensor])
                    codes.append("200")
                except InferenceServerException as exc:
                    codes.append(exc.status())
                    assert "over the rate the plan serves (5 requests/s)" in exc.message()
            with pytest.raises(InferenceServerException) as err:
                client.infer("lstm-512", [tensor])
            assert err.value.status() == "429"
            assert "the plan serves no rate of model 'lstm-512' (the plan places it on no device)" \
                in err.value.message()
        assert codes[0] == "200" and "429" in codes and set(codes) <= {"200", "429"}
        text = scrape(server)
        assert 'cellserve_cluster_shed_total{model="gru-256",reason="plan"}' in text
        assert 'cellserve_cluster_shed_total{model="lstm-512",reason="unplanned"} 1.0' in text
    finally:
        assert server.stop() == 0
    assert "cellserve: stopped" in server.output()
