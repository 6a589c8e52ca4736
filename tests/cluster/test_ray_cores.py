"""`cellserve serve --ray --core-allocation V.json ...` (cluster/ray_cores.py): the profiles and
settings it refuses, by name, before anything starts; and (slow) a local Ray whose two workers,
one per model, are each pinned to a core of their own and answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cellserve.cluster.ray_cores import CoreAllocationError, read_profiles, tenants_of
from cellserve.config import ConfigError
from cellserve.plan.versions import VersionProfile
from cellserve.server.settings import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
import tritonclient.http as httpclient  # noqa: E402
from serverproc import scrape, start_server  # noqa: E402

CORES = sorted(os.sched_getaffinity(0))
CELL_TYPES = {"gru-256": "gru-256/rnn.GRU+rnn.GRU_1", "lstm-512": "lstm-512/rnn.LSTM+rnn.LSTM_1"}


def _profile(path: Path, model: str, versions=("openmp-1", "openmp-2", "elastic-2"), per=100e-6) -> str:
    """A kernel-versions profile of `model`'s stack (made up: the allocator only reads it)."""
    rows = tuple((per, per * 64) for _ in range(2))  # two levels, batches 1 and 64
    table = {v: {"steady": rows, "pause": rows} for v in versions}
    VersionProfile(model=model, backend="fused", cores=2, versions=tuple(versions), batches=(1, 64),
                   duties=(0.0, 1.0), levels=(0.0, 0.6), step_s={CELL_TYPES[model]: table}).to_json(path)
    return str(path)


def test_profiles_that_do_not_fit_the_models_are_refused_by_name(tmp_path):
    gru, lstm = _profile(tmp_path / "g.json", "gru-256"), _profile(tmp_path / "l.json", "lstm-512")
    assert set(read_profiles([gru, lstm], ["gru-256", "lstm-512"])) == {"gru-256", "lstm-512"}
    with pytest.raises(CoreAllocationError, match="none for lstm-512"):
        read_profiles([gru], ["gru-256", "lstm-512"])
    with pytest.raises(CoreAllocationError, match="a profile of 'lstm-512', which this server does not serve"):
        read_profiles([gru, lstm], ["gru-256"])
    with pytest.raises(CoreAllocationError, match="a second profile of 'gru-256'"):
        read_profiles([gru, gru], ["gru-256"])
    one = _profile(tmp_path / "one.json", "gru-256", versions=("openmp-1",))
    with pytest.raises(CoreAllocationError, match="needs the steps of openmp-1 and openmp-2"):
        read_profiles([one], ["gru-256"])


def test_a_model_without_an_slo_is_refused_by_name(tmp_path):
    from cellserve.server.repository import load_zoo

    profiles = read_profiles([_profile(tmp_path / "g.json", "gru-256")], ["gru-256"])
    with pytest.raises(CoreAllocationError,
                       match=r"--core-allocation plans each model by its SLO; models \['gru-256'\] have none"):
        tenants_of(load_zoo(["gru-256"], None), ["gru-256"], profiles)
    (tenant,) = tenants_of(load_zoo(["gru-256"], 20.0), ["gru-256"], profiles)
    assert tenant.slo_s == pytest.approx(0.02)


@pytest.mark.parametrize("kw, says", [
    ({}, "needs a local Ray"),
    ({"ray_address": "auto"}, "needs a local Ray"),
    ({"ray_address": "local", "ray_workers": 2}, "cannot be combined with ray_workers"),
    ({"ray_address": "local", "ray_cpus_per_worker": 2}, "cannot be combined with ray_cpus_per_worker"),
])
def test_settings_it_cannot_be_combined_with_are_refused(kw, says):
    with pytest.raises(ConfigError, match=says):
        ServerSettings(core_allocation=["v.json"], **kw)


def _serve(*args):
    return subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_the_server_exits_2_before_ray_starts_on_a_profile_that_does_not_fit(tmp_path):
    pytest.importorskip("ray")
    gru = _profile(tmp_path / "g.json", "gru-256")
    done = _serve("--ray", "--core-allocation", gru, "--model", "gru-256", "--model", "lstm-512", "--slo-ms", "50")
    assert done.returncode == 2
    assert "none for lstm-512" in done.stderr  # (a model without an SLO: tenants_of's test above)


def _affinity(pid: int) -> set[str]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out |= {line.split(":")[1].strip() for line in f if line.startswith("Cpus_allowed_list")}
        except FileNotFoundError:  # a thread that just ended
            pass
    return out


@pytest.mark.slow
@pytest.mark.skipif(len(CORES) < 2, reason="two workers, a core each")
def test_each_model_gets_a_worker_on_a_core_of_its_own(tmp_path):
    pytest.importorskip("ray")
    # lstm-512's steps priced five times gru-256's: it is the tighter, and takes the first core
    gru, lstm = _profile(tmp_path / "g.json", "gru-256"), _profile(tmp_path / "l.json", "lstm-512", per=500e-6)
    server = start_server("--ray", "--core-allocation", gru, "--core-allocation", lstm, "--model", "gru-256",
                          "--model", "lstm-512", "--slo-ms", "50", timeout=240)
    try:
        pids = {}
        for line in server.lines:
            found = re.match(r"cellserve: ray: worker (w\d) \(node \w+\), pid (\d+): (\S+)$", line)
            if found:
                pids[found.group(3)] = int(found.group(2))
        assert set(pids) == {"gru-256", "lstm-512"}, server.output()
        assert f"cellserve: cores: w0 (gru-256) on {CORES[1]}, w1 (lstm-512) on {CORES[0]}" in server.lines \
            or f"cellserve: cores: w0 (lstm-512) on {CORES[0]}, w1 (gru-256) on {CORES[1]}" in server.lines, \
            server.output()
        # every thread of each worker's process on one core, a core each (which one may have changed
        # since the first decision: Ray's own daemons, this test and the driver are load on the cores)
        # (a move in progress shows both on one core for a moment: the condition is waited for)
        def one_core_each() -> bool:
            lstm_core, gru_core = _affinity(pids["lstm-512"]), _affinity(pids["gru-256"])
            return len(lstm_core) == len(gru_core) == 1 and lstm_core | gru_core == {str(CORES[0]), str(CORES[1])}

        deadline = time.monotonic() + 30
        while not one_core_each() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert one_core_each(), (_affinity(pids["lstm-512"]), _affinity(pids["gru-256"]))
        tokens = np.arange(1, 9, dtype=np.int64)[None, :]
        tensor = httpclient.InferInput("tokens", [1, 8], "INT64")
        tensor.set_data_from_numpy(tokens)
        with httpclient.InferenceServerClient(server.http) as client:
            for model in ("gru-256", "lstm-512"):
                assert client.infer(model, [tensor]).as_numpy(client.get_model_metadata(model)["outputs"][0]["name"]) \
                    is not None
        text = scrape(server)
        for worker in ("w0", "w1"):
            assert re.search(rf'cellserve_worker_cores{{node="\w+",worker="{worker}"}} 1.0', text), text
        assert f'cellserve_core_others_load{{core="{CORES[0]}"}}' in text
        assert "cellserve_core_allocation_moves_total" in text
    finally:
        assert server.stop() == 0
    assert "cellserve: stopped" in server.output()
