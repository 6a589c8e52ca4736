"""BATCH's predictions against the real engine's `padded` policy, measured on this machine
(a part of `cellserve bench plan`: run(quick) -> dict, table(results) -> str).

What a user of `cellserve plan batching` would do: measure the service time of a batch of n
(n requests of `TOKENS` tokens sent at once to an idle engine whose padded cohorts hold n: the
median over several tries of the last answer's latency), write it as SERVICE, and predict the
mean batch and p95 latency of the padded policy (max_batch B, batch_timeout_s T) under Poisson
arrivals, with the single-server model (plan/batching_queue.py) and the at-once model
(plan/batching.py). Then replay Poisson traces on the engine (open loop, bench/engine_runner)
and compare: the mean batch is the engine's lanes per cell step (every cohort steps the same
`TOKENS` times, unpadded: one length), the p95 over answered requests from their scheduled
arrival. Every figure here is measured or predicted from measurements; the machine's noise is
in both.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import numpy as np

from cellserve.bench.engine_runner import replay
from cellserve.bench.traces import TraceRequest, poisson_arrivals, token_input
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.graph import zoo
from cellserve.plan.batching import Service, evaluate
from cellserve.plan.batching_bench import points_within, relative_error
from cellserve.plan.batching_map import BatchingError, Map
from cellserve.plan.batching_queue import evaluate_single_server

MODEL = "gru-256"
TOKENS = 16
SIZES = (1, 2, 4, 8, 16)


def _engine(model, B: int, timeout_ms: float) -> Engine:
    return Engine([model], EngineConfig(policy="padded", max_batch=B, batch_timeout_s=timeout_ms / 1e3,
                                        admission=False, drop_late=False, device="cpu"))


def _trace(times_s, vocab: int, rng) -> list[TraceRequest]:
    return [TraceRequest(i, float(t), rng.integers(1, vocab, size=TOKENS).astype(np.int64))
            for i, t in enumerate(times_s)]


def _service_ms(model, input_name: str, vocab: int, tries: int) -> dict[int, float]:
    """Per n in SIZES, the median over `tries` of a cohort of n sent at once to an idle engine:
    its last answer's latency. (An idle engine's first steps are slower, and a busy one also
    admits arrivals between steps: docs/batching.md says what that does to the predictions.)"""
    rng = np.random.default_rng(0)
    out = {}
    for n in SIZES:
        engine = _engine(model, n, 0.0)
        samples = []
        for k in range(tries + 1):  # the first warms the engine
            run = replay(engine, model.name, input_name, _trace([0.0] * n, vocab, rng), "padded", 0.0, None)
            if k:
                samples.append(max(o.finish_s - o.arrival_s for o in run.outcomes) * 1e3)
        out[n] = statistics.median(samples)
    return out


def run(quick: bool) -> dict:
    t0 = time.perf_counter()
    model = zoo.load(MODEL)
    input_name, vocab, _ = token_input(model)
    service_ms = _service_ms(model, input_name, vocab, tries=5 if quick else 15)
    service = Service(tuple(service_ms.items()))
    points = [(8, 2.0)] if quick else [(4, 2.0), (8, 2.0), (8, 10.0), (16, 5.0)]
    loads = [0.5] if quick else [0.3, 0.6]
    seconds = 4.0 if quick else 10.0
    rows = []
    for B, T in points:
        capacity = 1000.0 * B / service.ms(B)  # requests a second full batches of B serve
        for load in loads:
            rate = load * capacity
            rng = np.random.default_rng(B * 100 + int(T * 10) + int(load * 10))
            times = poisson_arrivals(rng, rate, int(rate * seconds))
            engine = _engine(model, B, T)
            replay(engine, model.name, input_name, _trace(times[: max(20, len(times) // 20)], vocab, rng),
                   "padded", rate, None)  # warm at this rate
            stats = replay(engine, model.name, input_name, _trace(times, vocab, rng), "padded", rate, None)
            answered = [o for o in stats.outcomes if o.finish_s is not None and o.status == "ok"]
            latency = np.array([(o.finish_s - o.arrival_s) * 1e3 for o in answered])
            row = {"max_batch": B, "timeout_ms": T, "load": load, "rate_rps": rate, "requests": len(times),
                   "answered": len(answered), "measured_mean_batch": stats.batch_size_sum / max(stats.cell_steps, 1),
                   "measured_p95_ms": float(np.quantile(latency, 0.95, method="inverted_cdf"))}
            for name, fn in (("single-server", evaluate_single_server), ("at-once", evaluate)):
                try:
                    ev = fn(Map.poisson(rate), service, B, T, 95.0)
                except BatchingError as exc:
                    row[f"{name}_refused"] = str(exc)
                    continue
                row[f"{name}_mean_batch"] = ev.mean_batch
                row[f"{name}_p95_ms"] = ev.latency_percentile_ms
                row[f"{name}_mean_batch_error"] = relative_error(ev.mean_batch, row["measured_mean_batch"])
                row[f"{name}_p95_error"] = relative_error(ev.latency_percentile_ms, row["measured_p95_ms"])
            rows.append(row)
    within = {name: points_within(rows, name) for name in ("single-server", "at-once")}
    return {"benchmark": "plan batching, measured", "measured": True, "quick": quick, "model": MODEL,
            "tokens": TOKENS, "service_ms": {str(n): ms for n, ms in service_ms.items()}, "seconds": seconds,
            "rows": rows, "points": len(rows), "points_within_5pct": within, "wall_s": time.perf_counter() - t0,
            "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cores": os.cpu_count(),
            "load_average": list(os.getloadavg())}


def table(results: dict) -> str:
    lines = [f"{results['model']}, {results['tokens']} tokens a request; service measured (ms): "
             + ", ".join(f"{n}: {ms:.3f}" for n, ms in results["service_ms"].items()), "",
             "| B | T ms | load | req/s | mean batch: measured / single-server / at-once | "
             "p95 ms: measured / single-server / at-once |", "|---:|---:|---:|---:|---|---|"]

    def cell(r, name, what, fmt):
        return fmt.format(r[f"{name}_{what}"]) if f"{name}_{what}" in r else "refused"

    for r in results["rows"]:
        lines.append(f"| {r['max_batch']} | {r['timeout_ms']:g} | {r['load']:.1f} | {r['rate_rps']:.0f} | "
                     f"{r['measured_mean_batch']:.3f} / {cell(r, 'single-server', 'mean_batch', '{:.3f}')} / "
                     f"{cell(r, 'at-once', 'mean_batch', '{:.3f}')} | {r['measured_p95_ms']:.2f} / "
                     f"{cell(r, 'single-server', 'p95_ms', '{:.2f}')} / {cell(r, 'at-once', 'p95_ms', '{:.2f}')} |")
    w, n = results["points_within_5pct"], results["points"]
    lines += ["", f"Within 5% of the measured mean batch and p95: single-server model {w['single-server']}/{n}, "
              f"at-once model {w['at-once']}/{n}. Measured on this machine (load average "
              f"{results['load_average'][0]:.2f}); the predictions are modelled from the measured service times."]
    return "\n".join(lines)
