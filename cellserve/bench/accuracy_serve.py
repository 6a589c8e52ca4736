"""`cellserve bench accuracy-serve`: accuracy scaling against its baselines on this machine.

Three runs of one bursty trace against `cellserve serve --ray` with the same workers: the
family served by accuracy scaling (`--accuracy-scaling --model reverse`: Proteus), by its most
accurate variant alone (`--model reverse-h128`: Clipper-HA) and by its fastest alone
(`--model reverse-h16`: Clipper-HT). Per run: SLO violations (requests answered late, after
the SLO counted from their scheduled send at the client, or not answered 200: refused 429,
dropped 504, 503, or no answer) and the effective accuracy (the rows-weighted mean accuracy,
from graph/zoo/families.py, of the variants that answered 200) with its drop below the most
accurate variant's. The issue's goals: at least 2x fewer violations than highest-only and at
least 2x less accuracy drop than lowest-only.

The trace: a two-state Markov-modulated Poisson process (bench/traces.bursty_arrivals; bursts
4x the calm rate, mean sojourns 4 s of burst, 8 s of calm) of requests of `rows_per_request`
typical rows each (ray_accuracy_profile.typical_rows). Its rates come from the capacities
the first run's workers measured (the first plan's log line): the burst rate is `burst` x
what all the workers carry hosting the most accurate variant, so bursts need a faster one.
The other two runs replay the same trace, request for request.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILY = "reverse"
BURST_FACTOR, MEAN_BURST_S, MEAN_CALM_S = 4.0, 4.0, 8.0


@dataclass(frozen=True)
class AccuracyServeConfig:
    seconds: float = 60.0
    slo_ms: float = 40.0
    replan_every_s: float = 2.0
    workers: int = 2
    rows_per_request: int = 32
    burst: float = 1.5  # the burst rate over what every worker hosting the most accurate variant carries
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        for name in ("seconds", "slo_ms", "replan_every_s", "burst"):
            if not getattr(self, name) > 0:
                out.append(f"--{name.replace('_s', '').replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("workers", "rows_per_request"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return out


SYSTEMS = {"accuracy-scaling": ["--accuracy-scaling", "--model", FAMILY],
           "highest-only": ["--accuracy-scaling", "--model", "reverse-h128"],
           "lowest-only": ["--accuracy-scaling", "--model", "reverse-h16"]}


def summarise(outcomes, slo_ms: float, accuracy: dict[str, float]) -> dict:
    """A run's figures (module docstring), counted in requests; accuracy weighted by rows."""
    slo_s = slo_ms / 1e3
    ok = [o for o in outcomes if o.status == 200]
    late = sum(1 for o in ok if o.latency_s > slo_s)
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    answered: dict[str, int] = {}
    for o in ok:
        answered[o.variant] = answered.get(o.variant, 0) + o.rows
    rows_ok = sum(answered.values())
    effective = sum(accuracy[v] * n for v, n in answered.items()) / rows_ok if rows_ok else 0.0
    violations = late + len(outcomes) - len(ok)
    latencies = sorted(o.latency_s for o in ok)
    return {"requests": len(outcomes), "ok": len(ok), "late": late, "by_status": by_status,
            "violations": violations, "violation_ratio": violations / len(outcomes) if outcomes else 0.0,
            "rows_answered_by": answered, "effective_accuracy": effective,
            "accuracy_drop": max(accuracy.values()) - effective if rows_ok else None,
            "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None}


def trace_times(capacity: dict[str, float], cfg: AccuracyServeConfig) -> tuple[list[float], dict]:
    """Send times (s) of the trace's requests, and its description."""
    import numpy as np

    from cellserve.bench.traces import bursty_arrivals

    burst_rows = cfg.burst * cfg.workers * capacity["reverse-h128"]
    calm_rows = burst_rows / BURST_FACTOR
    p_burst = MEAN_BURST_S / (MEAN_BURST_S + MEAN_CALM_S)
    mean_rows = calm_rows * (1 + p_burst * (BURST_FACTOR - 1))
    rate = mean_rows / cfg.rows_per_request
    rng = np.random.default_rng(cfg.seed)
    times = bursty_arrivals(rng, rate, max(1, int(rate * cfg.seconds * 1.5)), BURST_FACTOR, MEAN_BURST_S, MEAN_CALM_S)
    times = [float(t) for t in times if t < cfg.seconds]
    return times, {"requests": len(times), "rows_per_request": cfg.rows_per_request, "seconds": cfg.seconds,
                   "mean_rows_per_s": mean_rows, "calm_rows_per_s": calm_rows, "burst_rows_per_s": burst_rows,
                   "burst_factor": BURST_FACTOR, "mean_burst_s": MEAN_BURST_S, "mean_calm_s": MEAN_CALM_S,
                   "seed": cfg.seed}


def run_one(system: str, cfg: AccuracyServeConfig, rows, times: list[float] | None, log=print):
    """One server, one trace (made from this run's capacities when `times` is None):
    (outcomes, plan lines, capacities, times)."""
    from cellserve.bench.accuracy_client import FamilyClient, ServerProcess

    server = ServerProcess(["--ray", "--ray-workers", str(cfg.workers), *SYSTEMS[system], "--slo-ms",
                            f"{cfg.slo_ms:g}", "--replan-every", f"{cfg.replan_every_s:g}"])
    try:
        deadline = time.monotonic() + 60
        while not server.plans():
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise RuntimeError(f"{system}: no first plan:\n" + "\n".join(server.lines[-30:]))
            time.sleep(0.1)
        capacity = server.plans()[0].capacity_rps
        if times is None:
            times = trace_times(capacity, cfg)[0]
        log(f"{system}: capacities per worker {capacity}; {len(times)} requests over {cfg.seconds:g} s")
        client = FamilyClient(server.address, FAMILY, "digits", rows, cfg.rows_per_request)
        outcomes = asyncio.run(client.run_schedule(times))
        return outcomes, server.plans(), capacity, times
    finally:
        server.stop()


def run(cfg: AccuracyServeConfig, log=print) -> dict:
    from cellserve.cluster.ray_accuracy_profile import typical_rows
    from cellserve.graph.zoo import families

    accuracy = {v.name: v.accuracy for v in families.FAMILIES[FAMILY].variants}
    length, rows = typical_rows(families.load("reverse-h16"), 256, seed=cfg.seed)
    report = {"config": asdict(cfg), "typical_length": length, "runs": {}}
    times = None
    for system in SYSTEMS:
        outcomes, plans, capacity, times_used = run_one(system, cfg, rows, times, log)
        if times is None:
            times, report["trace"] = times_used, trace_times(capacity, cfg)[1]
            report["capacities_rps_per_worker"] = capacity
        stats = summarise(outcomes, cfg.slo_ms, accuracy)
        placements = [p.placement for p in plans]
        stats["plans"] = len(plans)
        stats["switches"] = sum(1 for a, b in zip(placements, placements[1:]) for w in b if a.get(w) != b[w])
        stats["peak_planned_rows_per_s"] = max((p.demand_rps.get(FAMILY, 0.0) for p in plans), default=0.0)
        report["runs"][system] = stats
        log(f"{system}: {table_row(system, stats)}")
    runs = report["runs"]
    ours, high, low = runs["accuracy-scaling"], runs["highest-only"], runs["lowest-only"]
    # a ratio over zero is None (JSON has no infinity); the goal is then met if the other side is above zero
    v_ratio = high["violations"] / ours["violations"] if ours["violations"] else None
    d_ours, d_low = ours["accuracy_drop"], low["accuracy_drop"]
    d_ratio = d_low / d_ours if d_ours and d_low is not None else None
    report["goals"] = {"violations_vs_highest_only": v_ratio, "accuracy_drop_vs_lowest_only": d_ratio,
                       "fewer_violations_met": v_ratio >= 2.0 if v_ratio is not None else high["violations"] > 0,
                       "less_drop_met": d_ratio >= 2.0 if d_ratio is not None else d_ours == 0 and bool(d_low)}
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return report


def table_row(system: str, s: dict) -> str:
    drop = "-" if s["accuracy_drop"] is None else f"{s['accuracy_drop']:.4f}"
    return (f"| {system} | {s['requests']:,} | {s['violations']:,} | {100 * s['violation_ratio']:.1f}% | "
            f"{s['late']:,} | {s['effective_accuracy']:.4f} | {drop} | {s['switches']} |")


def table(report: dict) -> str:
    lines = ["| system | requests | violations | ratio | of them late 200s | effective accuracy | accuracy drop "
             "| switches |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [table_row(name, s) for name, s in report["runs"].items()]
    g = report["goals"]
    def ratio(x):
        return "n/a (a zero below)" if x is None else f"{x:.2f}x"
    lines.append(f"violations: highest-only / accuracy-scaling = {ratio(g['violations_vs_highest_only'])} "
                 f"(goal >= 2: {g['fewer_violations_met']}); accuracy drop: lowest-only / accuracy-scaling = "
                 f"{ratio(g['accuracy_drop_vs_lowest_only'])} (goal >= 2: {g['less_drop_met']})")
    return "\n".join(lines)


def add_parser(bench_sub) -> None:
    """`cellserve bench accuracy-serve`'s flags (imports nothing heavy: --help stays fast)."""
    d = AccuracyServeConfig()
    p = bench_sub.add_parser("accuracy-serve", help="serve --ray --accuracy-scaling against highest- and "
                                                    "lowest-accuracy-only on one bursty trace",
                             description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seconds", type=float, default=d.seconds, help=f"length of the trace (default: {d.seconds:g})")
    p.add_argument("--slo-ms", type=float, default=d.slo_ms, help=f"the family's SLO (default: {d.slo_ms:g})")
    p.add_argument("--replan-every", type=float, default=d.replan_every_s,
                   help=f"accuracy scaling's period in seconds (default: {d.replan_every_s:g})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"Ray workers (default: {d.workers})")
    p.add_argument("--rows-per-request", type=int, default=d.rows_per_request,
                   help=f"typical rows in each request (default: {d.rows_per_request})")
    p.add_argument("--burst", type=float, default=d.burst,
                   help="burst rate over what every worker hosting the most accurate variant carries "
                        f"(default: {d.burst:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", type=Path, required=True, help="where to write the report")
    p.set_defaults(run=_main)


def _main(args, parser) -> int:
    cfg = AccuracyServeConfig(args.seconds, args.slo_ms, args.replan_every, args.workers, args.rows_per_request,
                              args.burst, args.seed)
    problems = cfg.problems()
    if problems:
        parser.error("; ".join(problems))  # exit 2, naming the flag and the value
    report = run(cfg)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(table(report))
    print(f"wrote {args.json}")
    return 0
