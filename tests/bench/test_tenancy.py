"""`cellserve bench tenancy` and `cellserve profile-versions` (issue 19, Veltair): their
settings are checked by name, the report's table adds up, and (slow) both commands run for
real and write what the docs say; the burner takes its core."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from cellserve.bench.burner import Burner
from cellserve.bench.tenancy import TenancyConfig, _summary, table
from cellserve.plan.versions import VersionProfile

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("kw, says", [
    ({"models": ()}, "at least one model"),
    ({"models": ("gru-256", "gru-256"), "slo_ms": (1.0, 2.0)}, "lists a model twice"),
    ({"slo_ms": (10.0,)}, "gives 1 SLO(s) for 2 model(s)"),
    ({"slo_ms": (10.0, -1.0)}, "--slo-ms must be > 0"),
    ({"duties": (0.0, 1.5)}, "shares of a core, 0 to 1"),
    ({"runs": 0}, "--runs >= 1"),
])
def test_bad_settings_are_refused_by_name(kw, says):
    with pytest.raises(ValueError, match=None) as err:
        TenancyConfig(**kw)
    assert says in str(err.value)


def _run(offered, good, model_good):
    return {"offered": offered, "within_slo": good,
            "models": {"a": {"offered": offered, "within_slo": model_good, "p99_ms": 9.0}}}


def test_the_summary_and_table_count_every_run():
    engines = {"today": [_run(100, 50, 50), _run(100, 60, 60)], "versions": [_run(100, 80, 80), _run(100, 85, 85)],
               "allocated": [_run(100, 90, 90), _run(100, 98, 98)]}
    summary = _summary(engines)
    assert summary["today"] == {"offered": 200, "within_slo": 110, "share": 0.55}
    assert summary["versions_over_today"] == pytest.approx(165 / 110)
    assert summary["allocated_over_today"] == pytest.approx(188 / 110)
    report = {"config": {"models": ["a"], "slo_ms": [10.0]},
              "conditions": [{"duty": 0.5, "engines": engines, "summary": summary}]}
    text = table(report)
    assert "| 0.50 of a core | versions | 165/200 (82.5%) | 165/200 (9/9) |" in text
    assert "| 0.50 of a core | versions / today | 1.50x |" in text
    assert "| 0.50 of a core | allocated / today | 1.71x |" in text


def test_the_cli_refuses_mismatched_slos_before_measuring_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "tenancy", "--models", "gru-256",
                             "--slo-ms", "10,20", "--json", str(tmp_path / "t.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gives 2 SLO(s) for 1 model(s)" in result.stderr
    assert not (tmp_path / "t.json").exists()


def test_a_burner_duty_outside_a_core_is_refused():
    with pytest.raises(ValueError, match="share of a core, 0 to 1"):
        Burner(0, 1.5)


@pytest.mark.slow
def test_a_burner_takes_its_core():
    """A burner spinning without pause runs pinned to its core and spends CPU there: it gets
    0.3 s of it (a busy machine only delays that; the minute allowed is the real thing's margin)."""
    with Burner(CORES[-1], 1.0) as burner:
        pid = burner._process.pid
        assert os.sched_getaffinity(pid) == {CORES[-1]}
        ticks = os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + 60
        while _cpu_ticks(pid) < 0.3 * ticks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cpu_ticks(pid) >= 0.3 * ticks


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.slow
@pytest.mark.skipif(len(CORES) < 2, reason="the commands need two cores")
def test_profile_versions_then_bench_tenancy_run_for_real(tmp_path):
    profile = tmp_path / "v.json"
    cli = [sys.executable, "-m", "cellserve.cli"]
    done = subprocess.run(cli + ["profile-versions", "--model", "gru-256", "--quick", "--max-batch", "2",
                                 "--duties", "0,0.5", "--json", str(profile)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    p = VersionProfile.from_json(profile)
    assert p.versions == ("openmp-1", "openmp-2", "elastic-2") and p.batches == (1, 2) and len(p.levels) == 2
    out = tmp_path / "t.json"
    done = subprocess.run(cli + ["bench", "tenancy", "--models", "gru-256", "--slo-ms", "50", "--duties", "0,0.5",
                                 "--runs", "1", "--seconds", "2", "--load", "0.3", "--profile", str(profile),
                                 "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [c["duty"] for c in report["conditions"]] == [0.0, 0.5]
    assert report["allocated_capacity_rps"]["gru-256"] > 0
    for c in report["conditions"]:
        today, versions, allocated = (c["engines"][e][0] for e in ("today", "versions", "allocated"))
        assert today["offered"] == versions["offered"] == allocated["offered"] > 0  # the same trace for all
        for run in (versions, allocated):
            m = run["models"]["gru-256"]
            # every request accounted for
            assert m["ok"] + m["refused"] + m["dropped"] + m["errors"] == m["offered"]
        assert "switches" in versions["versions"]
        # one model: the allocator gives it every core
        assert allocated["allocation"]["cores_at_start"] == {"gru-256": CORES}
    assert out.with_suffix(".png").exists()


def _gru_profile(path):
    """A kernel-versions profile of gru-256's stack (made up, as the simulation only reads it)."""
    rows = lambda per: tuple((per, per * 64) for _ in range(2))  # noqa: E731 - two levels, batches 1 and 64
    table = {v: {"steady": rows(per), "pause": rows(per)}
             for v, per in {"openmp-1": 100e-6, "openmp-2": 60e-6, "elastic-2": 60e-6}.items()}
    VersionProfile(model="gru-256", backend="fused", cores=2, versions=tuple(table), batches=(1, 64),
                   duties=(0.0, 1.0), levels=(0.0, 0.6), step_s={"gru-256/rnn.GRU+rnn.GRU_1": table}).to_json(path)


def test_bench_tenancy_sim_writes_simulated_results(tmp_path):
    _gru_profile(tmp_path / "v.json")
    out = tmp_path / "sim.json"
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "tenancy-sim", "--profile",
                           str(tmp_path / "v.json"), "--tenants", "gru-256:10,gru-256:40", "--cores", "4",
                           "--seconds", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "simulated" in done.stdout
    report = json.loads(out.read_text())
    assert report["simulated"] is True and "Amdahl" in report["modelled"]
    assert [r["policy"] for r in report["policies"]] == ["round-robin", "model-wise", "layer-block"]
    for r in report["policies"]:
        assert r["offered"] == report["policies"][0]["offered"] > 0  # one set of arrivals for every policy
        for t in r["tenants"].values():
            assert t["within_slo"] + t["late"] + t["dropped"] == t["offered"]  # every request accounted for


@pytest.mark.parametrize("args, says", [
    (["--tenants", "gru-256"], "tenants are MODEL:SLO_MS"),
    (["--tenants", "lstm-512:10"], "tenant 'lstm-512' has no kernel-versions profile"),
    (["--tenants", "gru-256:10", "--cores", "0"], "argument --cores: must be > 0"),
])
def test_bench_tenancy_sim_refuses_bad_input_by_name(tmp_path, args, says):
    _gru_profile(tmp_path / "v.json")
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "tenancy-sim", "--profile",
                           str(tmp_path / "v.json"), "--json", str(tmp_path / "s.json"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert says in done.stderr


@pytest.mark.slow
def test_a_burner_ends_with_the_process_that_started_it():
    """A benchmark killed mid-run leaves no burner spinning on its core."""
    code = ("import os; from cellserve.bench.burner import Burner; b = Burner(0, 0.5).__enter__(); "
            "print(b._process.pid, flush=True); input(); os._exit(0)")
    starter = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(starter.stdout.readline())
    exited = os.pidfd_open(pid)  # readable once the burner has exited
    try:
        starter.communicate("\n", timeout=60)  # the starter dies without stopping its burner
        assert select.select([exited], [], [], 60)[0] == [exited], "the burner outlived the process that started it"
    finally:
        os.close(exited)
