"""`python -m cellserve.cluster.ray_plan_bench`: the planning part on the committed one-thread
profiles (fast, no Ray), the measured figures of a ramp, the flags' checks, and (slow) the whole
command end to end on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellserve.cluster import ray_plan_bench as bench
from cellserve.cluster import ray_plan_capacity as cap
from cellserve.plan.nexus import Session, Workload
from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_io import parse_plan

PROFILES = Path(__file__).resolve().parents[2] / "docs" / "results" / "ray" / "profiles-1thread"


@pytest.fixture(scope="module")
def profiles():
    models = [s.model for s in cap.BENCH_SESSIONS]
    assert all((PROFILES / f"{m}.json").exists() for m in models)  # committed: nothing is measured here
    return bench.load_or_profile(models, PROFILES, 32, quick=True, log=lambda *_: None)


@pytest.fixture(scope="module")
def report(profiles):
    return bench.planning(profiles, cap.BENCH_SESSIONS, 2)


def test_the_prediction_is_what_the_plans_sessions_sum_to(report):
    plan = parse_plan(report["plan"])  # the JSON form round-trips
    assert plan == report["_plan"]
    carried = sum(a["rate_rps"] for d in report["plan"]["devices"] for a in d["sessions"])
    assert report["predicted_goodput_rps"] == pytest.approx(carried)
    assert report["predicted_goodput_rps"] == pytest.approx(report["planned_total_rps"])  # nothing unserved
    assert report["plan"]["unserved"] == [] and report["plan"]["devices_used"] <= 2
    assert set(report) >= {"predicted_goodput_rps", "plan", "sessions", "nexus_profiles", "mean_tokens"}
    json.dumps({k: v for k, v in report.items() if k != "_plan"})  # plain data


def test_the_plan_is_feasible_and_a_little_more_rate_is_not_served(profiles, report):
    nexus = cap.nexus_profiles(profiles)
    total = report["planned_total_rps"]
    rates = cap.session_rates(cap.BENCH_SESSIONS, total)
    workload = Workload(cap.DEVICE_TYPE, 2, tuple(Session(s.model, s.model, s.slo_ms, rates[s.model])
                                                  for s in cap.BENCH_SESSIONS))
    assert check_plan(report["_plan"], nexus, workload) == []
    assert cap.plan_at(total * 1.01, nexus, cap.BENCH_SESSIONS, 2).unserved  # the bisection found the edge


def test_corrections_for_shared_cores_lower_the_prediction_as_the_model_says(profiles, report):
    none = bench.planning(profiles, cap.BENCH_SESSIONS, 2, shared=cap.SharedCores(2.0))
    assert none["predicted_goodput_rps"] == pytest.approx(report["predicted_goodput_rps"])
    worker = bench.planning(profiles, cap.BENCH_SESSIONS, 2, shared=cap.SharedCores(2.0, worker_ms=0.5))
    both = bench.planning(profiles, cap.BENCH_SESSIONS, 2, shared=cap.SharedCores(2.0, frontend_ms=0.5, worker_ms=0.5))
    assert both["predicted_goodput_rps"] < worker["predicted_goodput_rps"] < report["predicted_goodput_rps"]
    assert both["uncorrected_predicted_goodput_rps"] == pytest.approx(report["predicted_goodput_rps"])
    # the share recorded is what is left at the predicted rate: cores less the frontend's CPU
    share = both["corrections"]["core_share"]
    assert share == pytest.approx((2.0 - both["planned_total_rps"] * 0.5e-3) / 2)
    # l(b) of a corrected device: (l(b) + b * worker_ms) / share, at every batch derived
    plain = dict(cap.nexus_profiles(profiles).device_types[cap.DEVICE_TYPE].models["lstm-512"].latency.points)
    fixed = cap.nexus_profiles(profiles, worker_ms=0.5, core_share=share).device_types[cap.DEVICE_TYPE]
    points = dict(fixed.models["lstm-512"].latency.points)
    assert set(points) == set(plain)
    for b, ms in plain.items():
        assert points[b] == pytest.approx((ms + 0.5 * b) / share)


def test_the_served_plan_scales_only_the_rates(report):
    plan = report["_plan"]
    served = cap.scaled(plan, 1.25)
    assert cap.planned_goodput(served) == pytest.approx(1.25 * cap.planned_goodput(plan))
    assert [[a.model for a in d.sessions] for d in served.devices] == [[a.model for a in d.sessions]
                                                                       for d in plan.devices]


def test_the_measured_figures_of_a_ramp():
    rows = [{"offered_rps": 50.0, "goodput_rps": 50.0, "attainment": 1.0},
            {"offered_rps": 100.0, "goodput_rps": 99.2, "attainment": 0.992},
            {"offered_rps": 200.0, "goodput_rps": 150.0, "attainment": 0.75}]
    out = bench.results({"predicted_goodput_rps": 120.0}, rows)
    assert out["measured_max_goodput_rps"] == 150.0
    assert out["measured_max_rate_99_rps"] == 100.0 and out["measured_goodput_at_rate_99_rps"] == 99.2
    assert out["error"] == pytest.approx(150.0 / 120.0 - 1)
    assert bench.results({"predicted_goodput_rps": 120.0}, rows[2:])["measured_max_rate_99_rps"] is None


def test_the_ramp_goes_on_past_its_planned_rates_while_goodput_still_rises():
    planned = (0.5, 1.0)
    rows = []

    def ramp(goodput_at):  # the factors a ramp offers, the goodput at each given by goodput_at
        rows.clear()
        while (f := bench.next_factor(rows, planned)) is not None:
            rows.append({"factor": f, "goodput_rps": goodput_at(f)})
        return [r["factor"] for r in rows]

    assert ramp(lambda f: 100 * min(f, 1.0) - 5 * (f > 1)) == [0.5, 1.0, 1.25]  # the maximum was passed at 1.0
    peak = lambda f: 100 * f if f <= 1.6 else 160 - 100 * (f - 1.6)  # noqa: E731
    assert ramp(peak) == [0.5, 1.0, 1.25, 1.5625, 1.9531]  # still rising at 1.56, not at 1.95
    assert ramp(lambda f: 100 * min(f, 1.0)) == [0.5, 1.0, 1.25]  # a plateau is not a rise
    assert ramp(lambda f: 100 * f) == [0.5, 1.0, 1.25, 1.5625, 1.9531, 2.4414]  # rising throughout: stops at MAX_FACTOR
    assert bench.MAX_FACTOR < 2.4414 * bench.EXTEND_STEP
    rows[:] = [{"factor": 0.5, "goodput_rps": 50.0}, {"factor": 1.0, "goodput_rps": 90.0}]
    assert bench.next_factor(rows, planned, extend=False) is None  # the calibration: only what it asks for


def _calibration_row(answered: int, requests: int = 1000, wall_s: float = 10.0) -> dict:
    """A measured rate as `measure` gives it: 1.2 worker cores, driver 0.3, generator 0.1, daemons 0.05."""
    cores = {"driver": 0.3, "workers": 1.2, "ray_daemons": 0.05, "generator": 0.1}
    return {"offered_rps": requests / wall_s,
            "cpu": {"wall_s": wall_s, "cores": cores,
                    "cpu_ms_per_request": {k: 1e3 * v * wall_s / requests for k, v in cores.items()},
                    "worker_ms_per_answered": 1e3 * 1.2 * wall_s / answered if answered else None}}


def test_calibration_takes_the_frontends_cpu_per_offered_and_the_workers_beyond_the_plan_per_answered():
    shared = bench.corrections_from(_calibration_row(answered=600), device_ms_per_request=1.5, cores=2.0)
    assert shared.frontend_ms == pytest.approx(1e3 * (0.3 + 0.1 + 0.05) * 10.0 / 1000)  # 4.5 ms over 1,000 offered
    assert shared.worker_ms == pytest.approx(1e3 * 1.2 * 10.0 / 600 - 1.5)  # 20 ms over 600 answered, less 1.5
    assert shared.cores == 2.0
    # a worker measured cheaper than the plan's device time is not credited
    assert bench.corrections_from(_calibration_row(answered=600), device_ms_per_request=50.0, cores=2.0).worker_ms == 0.0
    with pytest.raises(ValueError, match="answered nothing"):
        bench.corrections_from(_calibration_row(answered=0), device_ms_per_request=1.5, cores=2.0)


@pytest.mark.parametrize("flags, message", [(["--devices", "0"], "--devices must be > 0, got 0"),
                                            (["--seconds", "-1"], "--seconds must be > 0, got -1.0"),
                                            (["--worker-ms", "-0.5"], "--worker-ms must be >= 0, got -0.5"),
                                            (["--calibrate", "--frontend-ms", "0.5"],
                                             "--calibrate measures --worker-ms and --frontend-ms")])
def test_bad_flags_exit_2_naming_them(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--json", str(tmp_path / "x.json"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_calibrated_end_to_end_on_a_local_ray(tmp_path):
    pytest.importorskip("ray")
    path = tmp_path / "plan-goodput.json"
    assert bench.main(["--json", str(path), "--quick", "--seconds", "2", "--profiles", str(PROFILES),
                       "--calibrate"]) == 0
    out = json.loads(path.read_text())
    factors = [r["factor"] for r in out["rates"]]
    assert factors[:len(bench.QUICK_FACTORS)] == list(bench.QUICK_FACTORS)
    for k in range(len(bench.QUICK_FACTORS), len(factors)):  # past the planned rates only while goodput rose
        assert all(r["goodput_rps"] < out["rates"][k - 1]["goodput_rps"] for r in out["rates"][:k - 1])
        assert factors[k] == pytest.approx(factors[k - 1] * bench.EXTEND_STEP, abs=1e-3)
        assert factors[k] <= bench.MAX_FACTOR
    # calibrated: the uncorrected plan served first, its measured CPU the corrections planned with
    calibration = out["calibration"]
    assert calibration["row"]["factor"] == bench.CALIBRATION_FACTOR and calibration["row"]["requests"] > 0
    assert out["corrections"]["worker_ms"] == calibration["worker_ms"] >= 0
    assert out["corrections"]["frontend_ms"] == calibration["frontend_ms"] > 0
    assert out["uncorrected_predicted_goodput_rps"] == pytest.approx(calibration["predicted_goodput_rps"])
    assert out["predicted_goodput_rps"] < calibration["predicted_goodput_rps"]
    for key in ("predicted_goodput_rps", "measured_max_goodput_rps", "error", "rates", "plan", "machine"):
        assert key in out
    assert out["measured_max_goodput_rps"] == max(r["goodput_rps"] for r in out["rates"])
    for r in out["rates"]:  # every request offered has an outcome, per model and in all
        assert r["requests"] == sum(sum(m["counts"].values()) for m in r["models"].values()) > 0
    assert path.with_suffix(".png").stat().st_size > 0


def _wait_for(condition, what: str, limit_s: float = 60.0):
    """Poll until `condition()` is truthy (its value is returned); a generous limit, so that a
    loaded machine only makes the test slower."""
    import time

    end = time.monotonic() + limit_s
    while not (value := condition()):
        assert time.monotonic() < end, f"waited {limit_s} s for {what}"
        time.sleep(0.01)
    return value


def test_the_cpu_meter_splits_a_process_tree(tmp_path):
    """A driver process whose child is named like a Ray worker and spins: its CPU is the
    workers', not the driver's, and every group and the machine's busy time are counted."""
    import subprocess
    import sys
    import time

    from cellserve.cluster import ray_plan_cpu
    from cellserve.cluster.ray_plan_cpu import CpuMeter

    spin = "while True: pass\n"
    driver = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {spin!r}, 'EngineWorker'])\n"
                               "time.sleep(3600)\n"])
    try:
        def worker_pid():
            tree = ray_plan_cpu._tree(driver.pid)
            return next((pid for pid, (group, _) in tree.items() if group == "workers"), None)

        worker = _wait_for(worker_pid, "the spinning child to start")
        meter = CpuMeter(driver.pid)
        spun = ray_plan_cpu._stat(worker)[1]
        end = time.process_time() + 0.2
        while time.process_time() < end:  # the generator's share: this process
            pass
        _wait_for(lambda: ray_plan_cpu._stat(worker)[1] - spun >= 0.3, "the child to spin 0.3 CPU s")
        out = meter.stop(requests=10)
    finally:
        subprocess.run(["pkill", "-P", str(driver.pid)], check=False)  # the spinner: its child, by parent id
        driver.kill()
        driver.wait()
    cores = out["cores"]
    assert set(cores) >= {"driver", "workers", "ray_daemons", "generator"}
    assert cores["workers"] > 0 and cores["workers"] > cores["driver"]
    assert cores["generator"] > 0
    assert out["cpu_ms_per_request"]["workers"] == pytest.approx(1e3 * cores["workers"] * out["wall_s"] / 10)
