"""The analytic batcher's benchmark: predicted mean batch and p95 latency against simulations,
over a grid of (B, T) and two arrival processes (Poisson, and a bursty 2-state MMPP of the same
mean rate). For `cellserve bench plan` (assembled by the lead): `run(quick)` -> dict,
`table(results)` -> str.

The references, both discrete-event simulations (plan/batching_des.py) on the same arrivals:
- "at-once": the model's own assumption (every batch served the moment it is dispatched);
  the prediction should agree within sampling error;
- "queue": one server, as cellserve's `padded` policy dispatches (engine/scheduler.py:
  a cohort forms only when the previous one is done, at max_batch waiting or batch_timeout_s
  after the oldest). Where a batch's service ends before the next timer, the at-once model
  agrees with it; the gap grows with load. The single-server model (plan/batching_queue.py)
  is held to this one. This is the padded policy's dispatch rule modelled, not the engine
  run: the engine in the simulator (cellserve/sim) adds per-step host costs and padding to
  the longest lane, which this benchmark does not include.
The service times are synthetic (SERVICE below), shaped like lstm-512's padded batches on this
project's VM; all figures are simulated or modelled and say so.
"""

from __future__ import annotations

import datetime
import math
import platform
import time

import numpy as np

from cellserve.plan.batching import Service, evaluate
from cellserve.plan.batching_des import sample_arrivals, simulate
from cellserve.plan.batching_map import BatchingError, Map
from cellserve.plan.batching_queue import evaluate_single_server

SERVICE = Service(((1, 4.0), (8, 9.0), (16, 14.0)))


def arrival_processes(rate_rps: float) -> dict[str, Map]:
    """Poisson, and an MMPP2 of the same mean rate: bursts at 4x the mean a fifth of the time."""
    hi, lo = 4.0 * rate_rps, 0.25 * rate_rps  # 0.2 * 4 + 0.8 * 0.25 = 1
    r1, r2 = 20.0, 5.0  # leave the burst after 50 ms on average, enter it every 200 ms
    return {"poisson": Map.poisson(rate_rps),
            "bursty": Map.of([[-(r1 + hi), r1], [r2, -(r2 + lo)]], [[hi, 0.0], [0.0, lo]])}


def relative_error(pred: float, ref: float) -> float:
    return abs(pred - ref) / ref if ref else float("inf")


def points_within(rows: list[dict], key: str, bound: float = 0.05) -> int:
    """Rows whose `key`_mean_batch_error and `key`_p95_error are both at most `bound` (a row
    without them, a point refused, is not within)."""
    return sum(r.get(f"{key}_mean_batch_error", math.inf) <= bound and r.get(f"{key}_p95_error", math.inf) <= bound
               for r in rows)


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
                    row[f"{mode}_mean_batch_error"] = relative_error(ev.mean_batch, sim.mean_batch)
                    row[f"{mode}_p95_error"] = relative_error(ev.latency_percentile_ms, sim.percentile_ms(95.0))
                row["utilisation"] = rate / 1000.0 * ev.device_ms_per_request
                a = time.perf_counter()
                try:
                    one = evaluate_single_server(arrivals, SERVICE, B, T, 95.0)
                except BatchingError as exc:  # too close to overload for its grid: said, not hidden
                    row["single-server_refused"] = str(exc)
                else:
                    row["single-server_mean_batch"] = one.mean_batch
                    row["single-server_p95_ms"] = one.latency_percentile_ms
                    row["single-server_mean_batch_error"] = relative_error(one.mean_batch, row["queue_mean_batch"])
                    row["single-server_p95_error"] = relative_error(one.latency_percentile_ms, row["queue_p95_ms"])
                row["single-server_solve_s"] = time.perf_counter() - a
                rows.append(row)
    # "at-once" and "queue": the at-once model against each simulation; "single-server": that model
    # against the queue simulation (absent on the points it refused)
    keys = ("at-once", "queue", "single-server")
    worst = {f"{key}_{what}": max((r[f"{key}_{what}"] for r in rows if f"{key}_{what}" in r), default=None)
             for key in keys for what in ("mean_batch_error", "p95_error")}
    within = {key: points_within(rows, key) for key in keys}
    refused = sum("single-server_refused" in r for r in rows)
    return {"benchmark": "plan batching", "simulated": True, "quick": quick, "requests_per_point": requests,
            "single_server_refused": refused,
            "service_ms": dict((str(b), ms) for b, ms in SERVICE.points), "rows": rows, "worst": worst,
            "points_within_5pct": within, "points": len(rows), "wall_s": time.perf_counter() - t0,
            "date": datetime.date.today().isoformat(), "machine": platform.platform()}


def table(results: dict) -> str:
    head = ("| arrivals | req/s | B | T ms | util | mean batch: at-once pred / sim, single-server pred / sim | "
            "p95 ms: at-once pred / sim, single-server pred / sim |")
    lines = [head, "|---|---:|---:|---:|---:|---|---|"]
    for r in results["rows"]:
        one_b = f"{r['single-server_mean_batch']:.3f}" if "single-server_mean_batch" in r else "refused"
        one_p = f"{r['single-server_p95_ms']:.2f}" if "single-server_p95_ms" in r else "refused"
        lines.append(f"| {r['arrivals']} | {r['rate_rps']:g} | {r['max_batch']} | {r['timeout_ms']:g} | "
                     f"{r['utilisation']:.2f} | {r['predicted_mean_batch']:.3f} / {r['at-once_mean_batch']:.3f}, "
                     f"{one_b} / {r['queue_mean_batch']:.3f} | "
                     f"{r['predicted_p95_ms']:.2f} / {r['at-once_p95_ms']:.2f}, "
                     f"{one_p} / {r['queue_p95_ms']:.2f} |")
    w, n, within = results["worst"], results["points"], results["points_within_5pct"]

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    lines.append("")
    lines.append(f"Worst relative error, at-once model vs at-once simulation: mean batch "
                 f"{pct(w['at-once_mean_batch_error'])}, p95 {pct(w['at-once_p95_error'])} ({within['at-once']}/{n} "
                 f"points within 5%); at-once model vs the padded policy's single-server rule: mean batch "
                 f"{pct(w['queue_mean_batch_error'])}, p95 {pct(w['queue_p95_error'])} ({within['queue']}/{n}); "
                 f"single-server model vs that rule: mean batch {pct(w['single-server_mean_batch_error'])}, p95 "
                 f"{pct(w['single-server_p95_error'])} ({within['single-server']}/{n} within 5%, "
                 f"{results['single_server_refused']} refused as too close to overload). Simulated and modelled.")
    return "\n".join(lines)
