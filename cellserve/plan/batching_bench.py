"""The analytic batcher's benchmark: predicted mean batch and p95 latency against simulations,
over a grid of (B, T) and two arrival processes (Poisson, and a bursty 2-state MMPP of the same
mean rate). For `cellserve bench plan` (assembled by the lead): `run(quick)` -> dict,
`table(results)` -> str.

The references, both discrete-event simulations (plan/batching_des.py) on the same arrivals:
- "at-once": the model's own assumption (every batch served the moment it is dispatched);
  the prediction should agree within sampling error;
- "queue": one server, as cellserve's `padded` policy dispatches (engine/scheduler.py:
  a cohort forms only when the previous one is done, at max_batch waiting or batch_timeout_s
  after the oldest). Where a batch's service ends before the next timer, the two agree; the
  gap grows with load. This is the padded policy's dispatch rule modelled, not the engine
  run: the engine in the simulator (cellserve/sim) adds per-step host costs and padding to
  the longest lane, which this benchmark does not include.
The service times are synthetic (SERVICE below), shaped like lstm-512's padded batches on this
project's VM; all figures are simulated or modelled and say so.
"""

from __future__ import annotations

import datetime
import platform
import time

import numpy as np

from cellserve.plan.batching import Service, evaluate
from cellserve.plan.batching_des import sample_arrivals, simulate
from cellserve.plan.batching_map import Map

SERVICE = Service(((1, 4.0), (8, 9.0), (16, 14.0)))


def arrival_processes(rate_rps: float) -> dict[str, Map]:
    """Poisson, and an MMPP2 of the same mean rate: bursts at 4x the mean a fifth of the time."""
    hi, lo = 4.0 * rate_rps, 0.25 * rate_rps  # 0.2 * 4 + 0.8 * 0.25 = 1
    r1, r2 = 20.0, 5.0  # leave the burst after 50 ms on average, enter it every 200 ms
    return {"poisson": Map.poisson(rate_rps),
            "bursty": Map.of([[-(r1 + hi), r1], [r2, -(r2 + lo)]], [[hi, 0.0], [0.0, lo]])}


def _rel(pred: float, ref: float) -> float:
    return abs(pred - ref) / ref if ref else float("inf")


def run(quick: bool) -> dict:
    rates = [100.0] if quick else [50.0, 100.0, 200.0]
    grid = [(2, 2.0), (8, 10.0), (16, 40.0)] if quick else [(B, T) for B in (2, 8, 16) for T in (2.0, 10.0, 40.0)]
    requests = 50_000 if quick else 200_000
    rows = []
    t0 = time.perf_counter()
    for rate in rates:
        for name, arrivals in arrival_processes(rate).items():
            times = sample_arrivals(arrivals, requests, np.random.default_rng(int(rate) * 7 + len(name)))
            for B, T in grid:
                a = time.perf_counter()
                ev = evaluate(arrivals, SERVICE, B, T, 95.0)
                solve_s = time.perf_counter() - a
                row = {"arrivals": name, "rate_rps": rate, "max_batch": B, "timeout_ms": T,
                       "predicted_mean_batch": ev.mean_batch, "predicted_p95_ms": ev.latency_percentile_ms,
                       "solve_s": solve_s}
                for mode in ("at-once", "queue"):
                    sim = simulate(times, SERVICE, B, T, mode)
                    row[f"{mode}_mean_batch"] = sim.mean_batch
                    row[f"{mode}_p95_ms"] = sim.percentile_ms(95.0)
                    row[f"{mode}_mean_batch_error"] = _rel(ev.mean_batch, sim.mean_batch)
                    row[f"{mode}_p95_error"] = _rel(ev.latency_percentile_ms, sim.percentile_ms(95.0))
                row["utilisation"] = rate / 1000.0 * ev.device_ms_per_request
                rows.append(row)
    worst = {f"{mode}_{what}": max(r[f"{mode}_{what}"] for r in rows)
             for mode in ("at-once", "queue") for what in ("mean_batch_error", "p95_error")}
    within = {mode: sum(r[f"{mode}_mean_batch_error"] <= 0.05 and r[f"{mode}_p95_error"] <= 0.05 for r in rows)
              for mode in ("at-once", "queue")}
    return {"benchmark": "plan batching", "simulated": True, "quick": quick, "requests_per_point": requests,
            "service_ms": dict((str(b), ms) for b, ms in SERVICE.points), "rows": rows, "worst": worst,
            "points_within_5pct": within, "points": len(rows), "wall_s": time.perf_counter() - t0,
            "date": datetime.date.today().isoformat(), "machine": platform.platform()}


def table(results: dict) -> str:
    head = ("| arrivals | req/s | B | T ms | util | mean batch: pred / at-once / queue | "
            "p95 ms: pred / at-once / queue |")
    lines = [head, "|---|---:|---:|---:|---:|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['arrivals']} | {r['rate_rps']:g} | {r['max_batch']} | {r['timeout_ms']:g} | "
                     f"{r['utilisation']:.2f} | {r['predicted_mean_batch']:.3f} / {r['at-once_mean_batch']:.3f} / "
                     f"{r['queue_mean_batch']:.3f} | {r['predicted_p95_ms']:.2f} / {r['at-once_p95_ms']:.2f} / "
                     f"{r['queue_p95_ms']:.2f} |")
    w, n = results["worst"], results["points"]
    lines.append("")
    lines.append(f"Worst relative error, prediction vs at-once simulation: mean batch {w['at-once_mean_batch_error']:.1%}, "
                 f"p95 {w['at-once_p95_error']:.1%} ({results['points_within_5pct']['at-once']}/{n} points within 5%); "
                 f"vs the padded policy's single-server rule: mean batch {w['queue_mean_batch_error']:.1%}, "
                 f"p95 {w['queue_p95_error']:.1%} ({results['points_within_5pct']['queue']}/{n} within 5%). Simulated.")
    return "\n".join(lines)
