"""`cellserve bench server`: what the protocol costs. The same open-loop traces go to the
engine in-process and, through HTTP with tritonclient on loopback, to a `cellserve serve`
process running the same engine; the report puts their p50/p99 and goodput side by side.

Each side ramps on its own (`ramp.py`, the plan of `bench engine`) from a tenth of the engine's
closed-loop capacity, the two taking turns, and each max goodput carries its bracket.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellserve.bench.engine_bench import (FULL_FACTOR, LIGHT_FRACTION, MAX_RATE_FRACTION, QUICK_FACTOR,
                                          REFINE_STEPS, closed_loop_capacity, cpu_count, ramp_runs)
from cellserve.bench.engine_runner import replay
from cellserve.bench.loadgen import RequestFormat, open_loop
from cellserve.bench.plots import plot_p99_vs_load
from cellserve.bench.ramp import Bracket, RampPlan, RampResult, RampSearch, footnotes
from cellserve.bench.results import RunStats, meets_slo, span_s, summarize
from cellserve.bench.decoder_workload import workload
from cellserve.bench.traces import make_trace, sequence_input, trace_at_rate
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.server.launch import ServerProcess, serve_model_args
from cellserve.server.repository import load_model

_SETTLE_S = 0.3


@dataclass
class ServerBenchConfig:
    model: str = "lstm-512"
    model_repository: Path | None = None  # None: a zoo model
    slo_ms: float = 200.0
    quick: bool = False
    seed: int = 0
    max_batch: int = 64
    json_path: Path = Path("bench-results/server.json")
    plot_path: Path | None = None
    repeats: int | None = None  # runs at a failing rate before it counts as failed (2); any pass passes
    seconds_per_run: float | None = None
    ramp_factor: float | None = None  # None: by quick
    refine_steps: int = REFINE_STEPS

    @property
    def run_seconds(self) -> float:
        return self.seconds_per_run or (2.0 if self.quick else 4.0)

    @property
    def runs_per_point(self) -> int:
        return self.repeats or 2

    def plan(self, capacity_rps: float) -> RampPlan:
        return RampPlan(start_rps=round(capacity_rps * LIGHT_FRACTION, 1),
                        factor=self.ramp_factor or (QUICK_FACTOR if self.quick else FULL_FACTOR),
                        refine_steps=self.refine_steps, max_rps=round(capacity_rps * MAX_RATE_FRACTION, 1),
                        tries=self.runs_per_point)


def run(cfg: ServerBenchConfig, log=print) -> dict:
    model = load_model(cfg.model, cfg.model_repository)
    seq = sequence_input(model)
    inputs = workload(model, 1).inputs or seq.sampler()  # an encoder-decoder's task inputs, as bench engine's
    slo_s = cfg.slo_ms / 1e3
    engine = Engine([model], EngineConfig(policy="cellular", max_batch=cfg.max_batch))
    capacity = max(closed_loop_capacity(engine, model.name, seq.name, 0, cfg.seed + i, inputs=inputs)
                   for i in range(3))
    log(f"engine capacity estimate (closed loop): {capacity:.0f} req/s")
    plan = cfg.plan(capacity)
    traces: dict[float, list] = {}

    def trace(rate: float) -> list:
        if rate not in traces:
            traces[rate] = trace_at_rate(cfg.seed, rate, cfg.run_seconds, 0, inputs=inputs)
        return traces[rate]

    server = ServerProcess(*serve_model_args(cfg.model, cfg.model_repository), "--grpc-port", "-1",
                           "--metrics-port", "-1", "--max-batch", str(cfg.max_batch))
    fmt = RequestFormat(seq.name, deadline_ms=cfg.slo_ms, time_major=seq.time_major, states=seq.states)
    try:
        _warm_up(server.http, cfg.model, replace(fmt, deadline_ms=None), inputs)
        sides = {
            "engine": lambda trace, rate: replay(engine, model.name, seq.name, trace, "engine", rate, slo_s),
            "server": lambda trace, rate: _server_run(server.http, cfg.model, fmt, trace, rate),
        }
        searches = {side: RampSearch(plan, lambda s: meets_slo(s, cfg.slo_ms)) for side in sides}
        with tqdm(desc="bench server", unit="run") as bar:
            while pending := [(side, s) for side, s in searches.items() if s.next_rate() is not None]:
                for side, search in pending:  # one run each in turn
                    rate = search.next_rate()
                    bar.set_postfix_str(f"{side} @ {rate:.0f} req/s")
                    time.sleep(_SETTLE_S)
                    search.record(summarize(sides[side](trace(rate), rate), slo_s))
                    bar.update()
    finally:
        server.stop()
    report = _report(cfg, capacity, plan, {side: s.result() for side, s in searches.items()})
    _write(cfg, report)
    return report


def _server_run(address: str, model: str, fmt: RequestFormat, trace, rate: float) -> RunStats:
    outcomes = open_loop(address, model, trace, fmt=fmt).outcomes
    return RunStats(policy="server", rate_rps=rate, duration_s=span_s(outcomes), outcomes=outcomes)


def _warm_up(address: str, model: str, fmt: RequestFormat, inputs) -> None:
    trace = make_trace(np.random.default_rng(99), 200.0, 100, 0, inputs=inputs)
    open_loop(address, model, trace, fmt=fmt)


def _report(cfg: ServerBenchConfig, capacity: float, plan: RampPlan, results: dict[str, RampResult]) -> dict:
    sides = {}
    for side, result in results.items():
        runs = ramp_runs(result)
        sides[side] = {"max_goodput_rps": result.bracket.max_goodput_rps, **result.bracket.to_dict(),
                       "light_load_p50_ms": runs[0]["p50_ms"], "light_load_p99_ms": runs[0]["p99_ms"],
                       "runs": runs}
    engine, server = sides["engine"], sides["server"]
    return {
        "model": cfg.model, "model_repository": str(cfg.model_repository) if cfg.model_repository else None,
        "slo_ms": cfg.slo_ms, "quick": cfg.quick, "runs_per_point": cfg.runs_per_point,
        "machine": {"cpus": cpu_count()}, "capacity_estimate_rps": capacity,
        "rates_rps": sorted({r for result in results.values() for r in result.rates_rps}), "ramp": plan.to_dict(),
        "engine": engine, "server": server,
        "light_load_p50_added_ms": server["light_load_p50_ms"] - engine["light_load_p50_ms"],
        "goodput_ratio": (server["max_goodput_rps"] / engine["max_goodput_rps"]
                          if engine["max_goodput_rps"] else math.nan),
        # a ratio of two measured maxima; with either a bound, so is the ratio
        "goodput_ratio_bracketed": engine["bracketed"] and server["bracketed"],
    }


def _write(cfg: ServerBenchConfig, report: dict) -> None:
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(report, indent=2, default=float))
    rows = {side: [(r["rate_rps"], r["p99_ms"]) for r in report[side]["runs"]] for side in ("engine", "server")}
    plot_p99_vs_load(rows, cfg.slo_ms, cfg.plot_path or cfg.json_path.with_suffix(".png"),
                     f"{cfg.model}: engine in-process vs HTTP server ({cpu_count()} cores)")


def table(report: dict) -> str:
    lines = [f"{report['model']}, SLO {report['slo_ms']:.0f} ms",
             f"{'':<7} {'max goodput':>13} {'capacity in':>12} {'light p50':>10} {'light p99':>10}"]
    brackets = {side: Bracket.from_dict(report[side]) for side in ("engine", "server")}
    for side, b in brackets.items():
        d = report[side]
        lines.append(f"{side:<7} {b.figure():>13} {b.describe() + ' r/s':>12} "
                     f"{d['light_load_p50_ms']:>7.2f} ms {d['light_load_p99_ms']:>7.2f} ms")
    ratio = f"{100 * report['goodput_ratio']:.0f}%"
    if not report.get("goodput_ratio_bracketed", True):
        ratio += " (not bracketed: a max goodput above is a bound, so is this)"
    lines.append(f"HTTP adds {report['light_load_p50_added_ms']:.2f} ms at light load (p50); the server "
                 f"keeps {ratio} of the engine's max goodput")
    return "\n".join(lines + footnotes(brackets.values()))
