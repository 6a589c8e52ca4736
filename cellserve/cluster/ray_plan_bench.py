"""The plan's predicted goodput against the measured one, through Ray (issue 16, "How good").

    python -m cellserve.cluster.ray_plan_bench --json docs/results/ray/plan-goodput.json [--quick]

1. Profiles: `cellserve profile --model M --threads 1` of each model of the mix (one kernel
   thread: a worker's device is one core), read from `--profiles DIR` (DIR/M.json) where there,
   else measured on this machine and written there.
2. Plan (predicted, modelled by the planner): Nexus for `--devices` devices of one core and the
   mix (ray_plan_capacity.BENCH_SESSIONS: SLOs 50-200 ms, rates 1:4:1), at the highest total
   rate whose plan leaves nothing unserved (bisection). Its goodput is what its devices carry.
3. Serve (measured): `cellserve serve --ray --plan PLAN.json` (one worker of one CPU per
   device, a local Ray), then open-loop Poisson traffic of the three models at once through the
   HTTP frontend (ray_plan_load.py, bench/loadgen's client), deadlines = SLOs, at a ramp of total
   rates around the predicted one. The plan served has its rates (the rate gates) scaled to the
   top of the ramp, so the ramp finds what the layout serves rather than where the gates shed.
   With `--calibrate` the planner's inputs are first corrected by a calibration run: the
   uncorrected plan served at CALIBRATION_FACTOR x its own prediction, its CPU per request
   measured (`corrections_from`); the ramp then serves the corrected plan on a fresh server.
4. Report: JSON {"predicted_goodput_rps", "measured_max_goodput_rps",
   "measured_max_rate_99_rps", "error", "rates": [...], "plan", "served_plan", "profiles",
   "sessions", "machine", "loadavg", "command"}, a PNG beside it, and a table saying of every
   figure whether it is predicted or measured. `error` = measured max goodput / predicted - 1
   (negative: the plan promised more than was served within SLO).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cellserve.cluster import ray_plan_capacity as cap

# from far below the prediction: on this shared 2-core machine the ramp must find where SLOs hold
FULL_FACTORS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5)
QUICK_FACTORS = (0.05, 0.1, 0.2, 0.4, 1.0)
TARGET_ATTAINMENT = 0.99
# --calibrate measures the corrections serving the uncorrected plan at this factor of its own
# prediction: past what two shared cores serve, so the workers run the large batches of the
# ramp's top (their CPU per request falls with load), as the hand calibration of 2026-12-02 did
# at its runs' rates of the most goodput.
CALIBRATION_FACTOR = 1.0
# Past the planned factors the ramp goes on in steps of EXTEND_STEP while its last rate gave
# more goodput than any before it (the layout's maximum not yet passed), up to MAX_FACTOR.
EXTEND_STEP = 1.25
MAX_FACTOR = 3.0


def next_factor(rows: list[dict], planned: tuple[float, ...], extend: bool = True) -> float | None:
    """The ramp's next factor of the prediction: the planned ones in turn; then, with
    `extend`, the last one x EXTEND_STEP while the last rate gave more goodput than every
    rate before it and that stays within MAX_FACTOR; None when the ramp is done."""
    if len(rows) < len(planned):
        return planned[len(rows)]
    if not extend or not rows or any(r["goodput_rps"] >= rows[-1]["goodput_rps"] for r in rows[:-1]):
        return None
    factor = round(rows[-1]["factor"] * EXTEND_STEP, 4)
    return factor if factor <= MAX_FACTOR else None


def load_or_profile(models: list[str], directory: Path, max_batch: int, quick: bool, log=print) -> dict:
    """Each model's one-thread profile, from DIRECTORY/MODEL.json or measured here (and written)."""
    from cellserve.plan.profile import ModelProfile

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for m in models:
        path = directory / f"{m}.json"
        if not path.exists():
            log(f"profiling {m} (one thread) -> {path}")
            cmd = [sys.executable, "-m", "cellserve.cli", "profile", "--model", m, "--threads", "1",
                   "--max-batch", str(max_batch), "--json", str(path)] + (["--quick"] if quick else [])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out[m] = ModelProfile.from_json(path)
    return out


def planning(profiles: dict, sessions: tuple[cap.BenchSession, ...], devices: int, margin: float = 1.0,
             shared: cap.SharedCores | None = None) -> dict:
    """The planning part (no Ray): the plan at the highest rate it fits, and its prediction.
    `planned_device_ms_per_request`: the device time the plan spends per request (its devices'
    occupancies, in ms per second, over the rate they carry): what a worker's core would
    spend per request if the latency model held. With `shared` the planner's inputs are
    corrected for what the profile misses (cap.SharedCores); the uncorrected prediction is
    kept beside it as `uncorrected_predicted_goodput_rps`."""
    from cellserve.plan.nexus_io import plan_to_dict, profiles_to_dict

    nexus = cap.nexus_profiles(profiles, margin)
    total, plan = cap.capacity(nexus, sessions, devices)
    extra = {}
    if shared is not None:
        extra = {"uncorrected_predicted_goodput_rps": cap.planned_goodput(plan), "corrections": asdict(shared)}
        total, plan = cap.capacity(lambda rate: cap.nexus_profiles(profiles, margin, shared.worker_ms,
                                                                   shared.share(rate, devices)), sessions, devices)
        extra["corrections"]["core_share"] = shared.share(total, devices)
        nexus = cap.nexus_profiles(profiles, margin, shared.worker_ms, shared.share(total, devices))
    predicted = cap.planned_goodput(plan)
    return {"predicted_goodput_rps": predicted, "planned_total_rps": total, "margin": margin, **extra,
            "planned_device_ms_per_request": 1e3 * sum(d.occupancy for d in plan.devices) / predicted,
            "devices": devices, "device_type": cap.DEVICE_TYPE,
            "sessions": [asdict(s) for s in sessions],
            "mean_tokens": {m: cap.mean_tokens(m) for m in profiles},
            "nexus_profiles": profiles_to_dict(nexus), "plan": plan_to_dict(plan), "_plan": plan}


def _machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "gpu": None}


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def measure(plan_path: Path, models: list[str], rates_of, slos: dict, factors, predicted: float,
            seconds: float, log=print, extend: bool = False) -> list[dict]:
    """Serve the plan on a local Ray and offer each factor x predicted in turn (measured);
    with `extend`, further factors while goodput still rises (next_factor)."""
    from cellserve.cluster.ray_plan_cpu import CpuMeter
    from cellserve.cluster.ray_plan_load import run_mix
    from cellserve.server.launch import ServerProcess

    args = ["--ray", "--plan", str(plan_path), "--ray-cpus-per-worker", "1"]
    for m in models:
        args += ["--model", m]
    server = ServerProcess(*args)
    rows = []
    try:
        run_mix(server.http, rates_of(predicted * factors[0] / 2), slos, 3.0, seed=1)  # warm-up, dropped
        planned = tuple(factors)
        while (f := next_factor(rows, planned, extend)) is not None:
            meter = CpuMeter(server.proc.pid)
            row = run_mix(server.http, rates_of(predicted * f), slos, seconds)
            row["cpu"] = meter.stop(row["requests"])
            answered = sum(m["counts"]["ok"] for m in row["models"].values())
            row["cpu"]["worker_ms_per_answered"] = (1e3 * row["cpu"]["cores"]["workers"] * row["cpu"]["wall_s"] / answered
                                                    if answered else None)
            row["factor"] = f
            rows.append(row)
            log(f"  {f:>4g} x: offered {row['offered_rps']:7.1f} r/s, goodput {row['goodput_rps']:7.1f} r/s, "
                f"within SLO {100 * row['attainment']:5.1f}%")
    finally:
        server.stop()
    return rows


def corrections_from(row: dict, device_ms_per_request: float, cores: float) -> cap.SharedCores:
    """The planner's corrections from one measured rate (`measure`'s row): `frontend_ms`, the
    CPU the driver, the generator and Ray's daemons spent per offered request; `worker_ms`, the
    workers' CPU per answered request beyond the plan's device time per request (not below 0:
    a worker cheaper than its profile is not credited)."""
    per_request = row["cpu"]["cpu_ms_per_request"]
    worker = row["cpu"].get("worker_ms_per_answered")
    if not per_request or worker is None:
        raise ValueError(f"the calibration run at {row.get('offered_rps', 0):.1f} req/s answered nothing: "
                         f"no CPU per request to correct the plan with")
    frontend = per_request["driver"] + per_request["generator"] + per_request["ray_daemons"]
    return cap.SharedCores(cores, frontend, max(0.0, worker - device_ms_per_request))


def results(report: dict, rows: list[dict]) -> dict:
    """The measured figures of a ramp, next to the prediction."""
    ok = [r for r in rows if r["attainment"] >= TARGET_ATTAINMENT]
    best = max((r["goodput_rps"] for r in rows), default=0.0)
    predicted = report["predicted_goodput_rps"]
    # The plan assumes `devices` whole cores for the workers; what the machine left them at the
    # rate of the most goodput (cores less the driver, generator, Ray's daemons and other work,
    # measured) scales the prediction: modelled from measured CPU shares, an explanation only.
    top = max(rows, key=lambda r: r["goodput_rps"], default=None)
    free = None
    if top is not None and "cpu" in top and "other" in top["cpu"]["cores"]:
        c = top["cpu"]["cores"]
        free = top["cpu"]["machine_cores"] - sum(v for k, v in c.items() if k != "workers")
    devices = report.get("devices", 2)
    cost = top["cpu"].get("worker_ms_per_answered") if top is not None and "cpu" in top else None
    return {"worker_cores_free_at_max": free,
            "predicted_on_free_cores_rps": None if free is None else predicted * min(1.0, free / devices),
            # the same free cores at the workers' measured CPU per answered request
            "worker_ms_per_answered_at_max": cost,
            "free_cores_over_measured_cost_rps": None if free is None or not cost else 1e3 * free / cost,
            "measured_max_goodput_rps": best,
            "measured_max_rate_99_rps": max((r["offered_rps"] for r in ok), default=None),
            "measured_goodput_at_rate_99_rps": max((r["goodput_rps"] for r in ok), default=None),
            "error": best / predicted - 1.0 if predicted else None, "rates": rows}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(out: dict) -> str:
    lines = [f"predicted (modelled by the planner): {out['predicted_goodput_rps']:.1f} req/s on "
             f"{out['devices']} devices of one core",
             f"{'factor':>6} {'offered':>9} {'goodput':>9} {'in SLO':>7} " +
             " ".join(f"{m[:14]:>14}" for m in out["plan_models"]) + f" {'cores: workers':>14} {'driver':>6} {'other':>6}",
             f"{'':>6} {'(r/s)':>9} {'measured':>9} {'meas.':>7} " +
             " ".join(f"{'p99 ms meas.':>14}" for _ in out["plan_models"]) + f" {'meas.':>14} {'meas.':>6} {'meas.':>6}"]
    for r in out["rates"]:
        p99 = [r["models"][m]["p99_ms"] for m in out["plan_models"]]
        lines.append(f"{r['factor']:>6g} {r['offered_rps']:>9.1f} {r['goodput_rps']:>9.1f} "
                     f"{100 * r['attainment']:>6.1f}% " + " ".join(
                         f"{x:>14.1f}" if x is not None else f"{'-':>14}" for x in p99)
                     + f" {_num(r['cpu']['cores'].get('workers')):>14} {_num(r['cpu']['cores'].get('driver')):>6}"
                     f" {_num(r['cpu']['cores'].get('other')):>6}")
    rate99 = out["measured_max_rate_99_rps"]
    lines.append(f"measured max goodput: {out['measured_max_goodput_rps']:.1f} req/s; highest rate with >= 99% "
                 f"within SLO (measured): {'none' if rate99 is None else f'{rate99:.1f} req/s'}; "
                 f"error vs predicted: {100 * out['error']:+.1f}%")
    if out.get("predicted_on_free_cores_rps") is not None:
        lines.append(f"cores the workers had free at that rate (measured): {out['worker_cores_free_at_max']:.2f} of "
                     f"{out['devices']} planned; the prediction scaled to them (modelled): "
                     f"{out['predicted_on_free_cores_rps']:.1f} req/s")
    if out.get("free_cores_over_measured_cost_rps") is not None:
        lines.append(f"workers' CPU per answered request there (measured): {out['worker_ms_per_answered_at_max']:.2f} ms, "
                     f"the plan's device time per request (modelled): {out['planned_device_ms_per_request']:.2f} ms; "
                     f"free cores / measured cost: {out['free_cores_over_measured_cost_rps']:.1f} req/s")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    offered = [r["offered_rps"] for r in out["rates"]]
    axes.plot(offered, [r["goodput_rps"] for r in out["rates"]], marker="o", label="goodput (measured)")
    axes.plot(offered, offered, color="grey", linestyle=":", linewidth=1, label="offered")
    axes.axhline(out["predicted_goodput_rps"], color="black", linestyle="--", linewidth=1,
                 label=f"plan's predicted goodput {out['predicted_goodput_rps']:.0f} r/s")
    axes.set_xlabel("offered load, three models (requests/s)")
    axes.set_ylabel("answered within SLO (requests/s)")
    axes.set_title(f"Nexus plan on {out['devices']} Ray workers of one core")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    from cellserve.plan.nexus_io import plan_to_dict, write_json

    p = argparse.ArgumentParser(prog="python -m cellserve.cluster.ray_plan_bench",
                                description="A Nexus plan's predicted goodput against the goodput measured "
                                            "serving it on Ray (2 workers of one core, 3 zoo models).")
    p.add_argument("--json", type=Path, required=True, help="where to write the figures (a PNG beside it)")
    p.add_argument("--quick", action="store_true", help="5 rates of 5 s instead of 11 of 10 s")
    p.add_argument("--profiles", type=Path, default=None, metavar="DIR",
                   help="one-thread profiles DIR/MODEL.json, measured and written there when missing "
                        "(default: a folder beside --json)")
    p.add_argument("--devices", type=int, default=2, help="devices (Ray workers of one CPU) to plan for (default 2)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per rate (default 10, quick 5)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch profiled (default 32)")
    p.add_argument("--margin", type=float, default=1.0,
                   help="scale the planner's l(b) by this (Nexus's code plans with 1.15; default 1)")
    p.add_argument("--worker-ms", type=float, default=None, metavar="MS",
                   help="correction: CPU a worker spends per request beyond its engine's profile (measured)")
    p.add_argument("--frontend-ms", type=float, default=None, metavar="MS",
                   help="correction: CPU per request of the driver, generator and Ray's daemons on the "
                        "workers' cores (measured); the workers share what is left of --cores")
    p.add_argument("--cores", type=float, default=None, help="cores of the machine (default: all, with --frontend-ms)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure --worker-ms and --frontend-ms first: serve the uncorrected plan at "
                        f"{CALIBRATION_FACTOR:g} x its prediction for --seconds and take its CPU per request")
    args = p.parse_args(argv)
    for flag, value in (("--devices", args.devices), ("--max-batch", args.max_batch), ("--seconds", args.seconds),
                        ("--margin", args.margin), ("--cores", args.cores)):
        if value is not None and not value > 0:
            p.error(f"{flag} must be > 0, got {value}")
    for flag, value in (("--worker-ms", args.worker_ms), ("--frontend-ms", args.frontend_ms)):
        if value is not None and not value >= 0:
            p.error(f"{flag} must be >= 0, got {value}")
    if args.calibrate and (args.worker_ms is not None or args.frontend_ms is not None):
        p.error("--calibrate measures --worker-ms and --frontend-ms: give either, not both")
    cores = args.cores or float(os.cpu_count() or 1)
    shared = None
    if args.worker_ms is not None or args.frontend_ms is not None:
        shared = cap.SharedCores(cores, args.frontend_ms or 0.0, args.worker_ms or 0.0)
    if args.profiles is not None and args.profiles.exists() and not args.profiles.is_dir():
        p.error(f"--profiles must be a folder, got the file '{args.profiles}'")
    start, load_start = time.time(), _loadavg()
    sessions = cap.BENCH_SESSIONS
    models = [s.model for s in sessions]
    profile_dir = args.profiles or args.json.parent / "profiles-1thread"
    profiles = load_or_profile(models, profile_dir, args.max_batch, args.quick)
    factors = QUICK_FACTORS if args.quick else FULL_FACTORS
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    slos = {s.model: s.slo_ms for s in sessions}
    rates_of = lambda total: cap.session_rates(sessions, total)  # noqa: E731
    args.json.parent.mkdir(parents=True, exist_ok=True)
    calibration = {}
    if args.calibrate:
        first = planning(profiles, sessions, args.devices, args.margin)
        first_path = args.json.with_name(args.json.stem + ".calibration-plan.json")
        write_json(plan_to_dict(cap.scaled(first.pop("_plan"), max(factors))), first_path)
        print(f"calibrating: the uncorrected plan (predicted {first['predicted_goodput_rps']:.1f} req/s) "
              f"at {CALIBRATION_FACTOR:g} x")
        row, = measure(first_path, models, rates_of, slos, (CALIBRATION_FACTOR,), first["predicted_goodput_rps"],
                       seconds)
        shared = corrections_from(row, first["planned_device_ms_per_request"], cores)
        calibration = {"calibration": {"factor": CALIBRATION_FACTOR, "plan": first["plan"],
                                       "predicted_goodput_rps": first["predicted_goodput_rps"],
                                       "planned_device_ms_per_request": first["planned_device_ms_per_request"],
                                       "worker_ms": shared.worker_ms, "frontend_ms": shared.frontend_ms, "row": row}}
        print(f"calibrated (measured): worker_ms {shared.worker_ms:.2f}, frontend_ms {shared.frontend_ms:.2f}")
    report = planning(profiles, sessions, args.devices, args.margin, shared)
    plan = report.pop("_plan")
    served = cap.scaled(plan, MAX_FACTOR)  # the gates as wide as the ramp may go
    plan_path = args.json.with_suffix(".plan.json")
    write_json(plan_to_dict(served), plan_path)
    print(f"plan (predicted): {report['predicted_goodput_rps']:.1f} req/s; serving {plan_path} (gates x{MAX_FACTOR:g})")
    rows = measure(plan_path, models, rates_of, slos, factors, report["predicted_goodput_rps"], seconds, extend=True)
    out = {**report, **calibration, "served_plan": plan_to_dict(served), "served_plan_rate_scale": MAX_FACTOR,
           "plan_models": models, **results(report, rows),
           "profiles_dir": str(profile_dir), "machine": _machine(),
           "loadavg": {"start": load_start, "end": _loadavg()}, "wall_s": time.time() - start,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
           "command": "python -m cellserve.cluster.ray_plan_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "figures": "predicted_* and plan: modelled by the planner; measured_*, error and rates: measured"}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.json.with_suffix(".png"))
    print(table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
