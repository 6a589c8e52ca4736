"""Partitioned execution measured on this machine (issue 17, "How good", real part):

1. `bilstm-tagger`, its two directions on two single-core executors (a layer's forward
   direction on cpu0, its backward on cpu1, plain ops on cpu0) against one executor with
   two threads (the engine's default);
2. `seq2seq-reverse`, encoder (and plain ops) on cpu0 and decoder on cpu1, against one
   executor with two threads.

Each system serves open-loop Poisson traces in-process (bench/engine_runner.py's `replay`,
requests carrying the SLO as their deadline; the cellular policy, admission and drops on):
light-load p50/p99 at LIGHT_RPS, and max goodput under the SLO (50 ms) by the engine
benchmark's ramp (bench/ramp.py: a run passes when its p99 is within the SLO and 95% of its
requests are answered within it), the systems taking turns run by run so that a drifting
machine slows all alike. bilstm-tagger's requests are one sentence of WMT-like length (mean
25 tokens, bench/traces.py); seq2seq-reverse's one string of 1-12 random digits.

Run: `python -m cellserve.bench.placement_bench --json PATH [--quick]` (or `run(...)`); it
writes JSON and prints a table. The machine's load average is recorded with the figures:
on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from cellserve.bench.engine_runner import replay
from cellserve.bench.ramp import RampPlan, RampSearch
from cellserve.bench.results import meets_slo, summarize
from cellserve.bench.traces import TraceRequest, poisson_arrivals, trace_at_rate
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.executor.kernel import KernelExecutor
from cellserve.graph import zoo
from cellserve.graph.zoo.seq2seq import encode_digits

SLO_MS = 50.0
LIGHT_RPS = 10.0
_SETTLE_S = 0.3


def _two_groups() -> dict[str, KernelExecutor]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("placement_bench: needs at least 2 cores for two single-core executors")
    return {"cpu0": KernelExecutor("cpu", name="cpu0", cores=[cores[0]]),
            "cpu1": KernelExecutor("cpu", name="cpu1", cores=[cores[1]])}


def systems(model_name: str) -> dict[str, Engine]:
    """The engines compared for one model: `one-executor` and `split`."""
    model = zoo.load(model_name)
    config = EngineConfig(policy="cellular")
    if model_name == "seq2seq-reverse":
        placement = {"seq2seq-reverse/decoder": "cpu1"}  # the rest on cpu0, the first executor
    else:
        placement = {t: "cpu1" for t in model.cell_types() if t.endswith("/1")}  # backward directions
    return {"one-executor": Engine([model], config),
            "split": Engine([model], config, executors=_two_groups(), placement=placement)}


def digit_trace(seed: int, rate: float, seconds: float, min_requests: int = 40) -> list[TraceRequest]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(round(rate * 1000))]))
    n = max(min_requests, int(rate * seconds))
    arrivals = poisson_arrivals(rng, rate, n)
    return [TraceRequest(i, float(arrivals[i]), np.array(encode_digits("".join(
        map(str, rng.integers(0, 10, int(rng.integers(1, 13)))))), np.int64)) for i in range(n)]


def measure(model_name: str, quick: bool = False, seed: int = 0, log=print) -> dict:
    engines = systems(model_name)
    model = next(iter(engines.values())).models[model_name]
    input_name = model.inputs[0].name
    seconds = 3.0 if quick else 8.0
    slo_s = SLO_MS / 1e3

    def trace(rate: float) -> list[TraceRequest]:
        if model_name == "seq2seq-reverse":
            return digit_trace(seed, rate, seconds)
        return trace_at_rate(seed, rate, seconds, model.semantics[input_name].vocab or 2)

    def run(name: str, rate: float) -> dict:
        time.sleep(_SETTLE_S)
        stats = replay(engines[name], model_name, input_name, trace(rate), name, rate, slo_s)
        summary = summarize(stats, slo_s)
        summary["transfers"] = engines[name].stats.transfer_count
        return summary

    light = {name: run(name, LIGHT_RPS) for name in engines}
    for name, s in light.items():
        log(f"{model_name} {name}: light load {LIGHT_RPS:g} req/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms")
    plan = RampPlan(start_rps=50.0, factor=1.5 if quick else 1.25, refine_steps=2 if quick else 3)
    searches = {name: RampSearch(plan, lambda s: meets_slo(s, SLO_MS)) for name in engines}
    while pending := [(n, s) for n, s in searches.items() if s.next_rate() is not None]:
        for name, search in pending:  # one run each in turn
            rate = search.next_rate()
            summary = run(name, rate)
            log(f"{model_name} {name} @ {rate:g} req/s: goodput {summary['goodput_rps']:.0f} req/s, "
                f"p99 {summary['p99_ms']:.1f} ms")
            search.record(summary)
    out = {}
    for name, search in searches.items():
        result = search.result()
        out[name] = {"light": _light(light[name]), "max_goodput_rps": result.bracket.max_goodput_rps,
                     "bracket": result.bracket.to_dict(),
                     "points": [{"rate_rps": p.rate_rps, "goodput_rps": p.goodput_rps, "passed": p.passed}
                                for p in result.points]}
    for engine in engines.values():
        engine.close()
    return out


def _light(s: dict) -> dict:
    return {k: s.get(k) for k in ("p50_ms", "p99_ms", "goodput_rps", "requests", "slo_misses", "transfers")}


def run(json_path: str | Path | None = None, quick: bool = False, models=("bilstm-tagger", "seq2seq-reverse"),
        log=print) -> dict:
    report = {"slo_ms": SLO_MS, "light_rps": LIGHT_RPS, "quick": quick, "cores": sorted(os.sched_getaffinity(0)),
              "load_average_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}}
    for name in models:
        report["models"][name] = measure(name, quick, log=log)
    report["load_average_after"] = os.getloadavg()
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(table(report))
    return report


def table(report: dict) -> str:
    rows = ["| model | system | light p50 ms | light p99 ms | max goodput req/s (SLO 50 ms) |", "|---|---|---:|---:|---:|"]
    for model, systems_ in report["models"].items():
        for name, r in systems_.items():
            rows.append(f"| {model} | {name} | {r['light']['p50_ms']:.2f} | {r['light']['p99_ms']:.2f} | "
                        f"{r['max_goodput_rps']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellserve.bench.placement_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench-results/placement.json"))
    parser.add_argument("--quick", action="store_true", help="shorter runs, a coarser ramp")
    parser.add_argument("--models", default="bilstm-tagger,seq2seq-reverse")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ("bilstm-tagger", "seq2seq-reverse")]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)}: this benchmark splits bilstm-tagger and seq2seq-reverse")
    run(args.json, args.quick, models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
