"""Open-loop traffic of several models at once through one OIP frontend, for
`python -m cellserve.cluster.ray_plan_bench`: each model's Poisson trace runs on bench/loadgen's
`run_open_loop` (the same lean HTTP client `cellserve bench load` uses), all of them
concurrently on one event loop, every request with its session's SLO as its deadline.

Contracts:
- `traces(...)`: per model, `seconds` of Poisson arrivals at its rate, WMT-like lengths cut to
  the model's max_sequence_length, token ids in its vocabulary; drawn from (seed, model index,
  rate) alone, so a rate always offers the same requests.
- `run_mix(...)`: one summary of a rate: per model and in all, requests, answered within SLO
  (status ok and latency from the scheduled arrival <= SLO), rejected (429), dropped (504),
  errors, p50/p99 of answered requests; goodput = within-SLO answers per second of the run's
  span (first arrival to last answer); `attainment` = within SLO / requests. Measured.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from functools import lru_cache

import numpy as np

from cellserve.bench.loadgen import RequestFormat, run_open_loop
from cellserve.bench.results import RunStats, json_safe, span_s, summarize
from cellserve.bench.traces import make_trace


@lru_cache(maxsize=None)  # a zoo load builds the model: never on the event loop while streams run
def _model_input(model: str) -> tuple[str, int]:
    from cellserve.graph import zoo

    m = zoo.load(model)
    name = m.inputs[0].name
    return name, int(m.semantics[name].vocab)


def traces(rates: dict[str, float], seconds: float, seed: int = 0) -> dict[str, list]:
    from cellserve.cluster.ray_plan_capacity import max_length

    out = {}
    for i, (model, rate) in enumerate(sorted(rates.items())):
        _, vocab = _model_input(model)
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, int(round(rate * 1000))]))
        trace = make_trace(rng, rate, max(5, int(rate * seconds)), vocab)
        out[model] = [replace(r, sequence=r.sequence[: max_length(model)]) for r in trace]
    return out


def _summary(outcomes: list, slo_ms: float) -> dict:
    """One model's row: bench.results.summarize's figures, with the requests within the SLO
    and their share (attainment) beside them."""
    s = json_safe(summarize(RunStats("ray", 0.0, span_s(outcomes), outcomes), slo_ms / 1e3))
    within = s["requests"] - s["slo_misses"]
    row = {"requests": s["requests"], "within_slo": within, "counts": s["counts"], "goodput_rps": s["goodput_rps"],
           "attainment": within / s["requests"] if s["requests"] else 0.0, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}
    errors = [o.reason for o in outcomes if o.status == "error"]
    if errors:
        row["first_error"] = errors[0]
    return row


async def _run_all(address: str, by_model: dict[str, list], slos_ms: dict[str, float],
                   client_timeout_s: float) -> dict:
    async def one(model: str):
        fmt = RequestFormat(input_name=_model_input(model)[0], deadline_ms=slos_ms[model])
        return await run_open_loop(address, model, by_model[model], fmt=fmt, protocol="http",
                                   client_timeout_s=client_timeout_s)

    runs = await asyncio.gather(*(one(m) for m in by_model))
    return dict(zip(by_model, runs))


def run_mix(address: str, rates: dict[str, float], slos_ms: dict[str, float], seconds: float, seed: int = 0,
            client_timeout_s: float = 30.0) -> dict:
    """Offer every model its rate for `seconds` at once through `address` (host:port)."""
    by_model = traces(rates, seconds, seed)
    try:
        import uvloop
        runs = uvloop.run(_run_all(address, by_model, slos_ms, client_timeout_s))
    except ImportError:
        runs = asyncio.run(_run_all(address, by_model, slos_ms, client_timeout_s))
    models = {m: {"offered_rps": rates[m], "slo_ms": slos_ms[m], **_summary(r.outcomes, slos_ms[m])}
              for m, r in runs.items()}
    every = [o for r in runs.values() for o in r.outcomes]
    # a run's span covers every model: the streams start together (one event loop)
    span = span_s(every)
    within = sum(row["within_slo"] for row in models.values())
    lag = [x for r in runs.values() for x in r.send_lag_s]
    return {"offered_rps": sum(rates.values()), "requests": len(every), "within_slo": within,
            "goodput_rps": within / span if span > 0 else 0.0,
            "attainment": within / len(every) if every else 0.0,
            "send_lag_p99_ms": float(np.percentile(lag, 99) * 1e3) if lag else 0.0, "models": models}

