"""`cellserve bench server`: what the protocol costs. The same open-loop traces go to the
engine in-process and, through HTTP with tritonclient on loopback, to a `cellserve serve`
process running the same engine; the report puts their p50/p99 and goodput side by side.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellserve.bench.engine_bench import closed_loop_capacity, cpu_count
from cellserve.bench.engine_runner import replay
from cellserve.bench.loadgen import RequestFormat, open_loop
from cellserve.bench.plots import plot_p99_vs_load
from cellserve.bench.results import RunStats, span_s, summarize
from cellserve.bench.traces import make_trace
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.graph import zoo
from cellserve.server.launch import ServerProcess

LOAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3)
QUICK_LOAD_FRACTIONS = (0.1, 0.5, 0.85, 1.15)
_SETTLE_S = 0.3


@dataclass
class ServerBenchConfig:
    model: str = "lstm-512"
    slo_ms: float = 200.0
    quick: bool = False
    seed: int = 0
    max_batch: int = 64
    json_path: Path = Path("bench-results/server.json")
    plot_path: Path | None = None
    repeats: int | None = None  # runs per rate and side, the best kept; 1 quick, 2 full
    seconds_per_run: float | None = None

    @property
    def run_seconds(self) -> float:
        return self.seconds_per_run or (2.0 if self.quick else 4.0)

    @property
    def runs_per_point(self) -> int:
        return self.repeats or (1 if self.quick else 2)


def run(cfg: ServerBenchConfig, log=print) -> dict:
    model = zoo.load(cfg.model)
    input_name = model.inputs[0].name
    vocab = model.semantics[input_name].vocab or 2
    slo_s = cfg.slo_ms / 1e3
    engine = Engine([model], EngineConfig(policy="cellular", max_batch=cfg.max_batch))
    capacity = max(closed_loop_capacity(engine, model.name, input_name, vocab, cfg.seed + i) for i in range(3))
    log(f"engine capacity estimate (closed loop): {capacity:.0f} req/s")
    rates = [round(capacity * f, 1) for f in (QUICK_LOAD_FRACTIONS if cfg.quick else LOAD_FRACTIONS)]
    seeds = np.random.SeedSequence(cfg.seed).spawn(len(rates))
    traces = {rate: make_trace(np.random.default_rng(s), rate, max(40, int(rate * cfg.run_seconds)), vocab)
              for rate, s in zip(rates, seeds)}
    server = ServerProcess("--model", cfg.model, "--grpc-port", "-1", "--metrics-port", "-1",
                           "--max-batch", str(cfg.max_batch))
    try:
        _warm_up(server.http, cfg.model, input_name, vocab)
        sides = {
            "engine": lambda trace, rate: replay(engine, model.name, input_name, trace, "engine", rate, slo_s),
            "server": lambda trace, rate: _server_run(server.http, cfg.model, input_name, trace, rate, cfg.slo_ms),
        }
        results: dict[str, list[dict]] = {side: [] for side in sides}
        with tqdm(total=len(rates) * len(sides), desc="bench server", unit="run") as bar:
            for rate in rates:
                for side, runner in sides.items():
                    bar.set_postfix_str(f"{side} @ {rate:.0f} req/s")
                    tries = []
                    for _ in range(cfg.runs_per_point):
                        time.sleep(_SETTLE_S)
                        tries.append(summarize(runner(traces[rate], rate), slo_s))
                    results[side].append(max(tries, key=lambda t: t["goodput_rps"]))
                    bar.update()
    finally:
        server.stop()
    report = _report(cfg, capacity, rates, results)
    _write(cfg, report)
    return report


def _server_run(address: str, model: str, input_name: str, trace, rate: float, slo_ms: float) -> RunStats:
    outcomes = open_loop(address, model, trace, fmt=RequestFormat(input_name, deadline_ms=slo_ms)).outcomes
    return RunStats(policy="server", rate_rps=rate, duration_s=span_s(outcomes), outcomes=outcomes)


def _warm_up(address: str, model: str, input_name: str, vocab: int) -> None:
    trace = make_trace(np.random.default_rng(99), 200.0, 100, vocab)
    open_loop(address, model, trace, fmt=RequestFormat(input_name))


def _report(cfg: ServerBenchConfig, capacity: float, rates: list[float], results: dict) -> dict:
    sides = {}
    for side, runs in results.items():
        sides[side] = {"max_goodput_rps": max(r["goodput_rps"] for r in runs),
                       "light_load_p50_ms": runs[0]["p50_ms"], "light_load_p99_ms": runs[0]["p99_ms"],
                       "runs": runs}
    engine, server = sides["engine"], sides["server"]
    return {
        "model": cfg.model, "slo_ms": cfg.slo_ms, "quick": cfg.quick, "runs_per_point": cfg.runs_per_point,
        "machine": {"cpus": cpu_count()}, "capacity_estimate_rps": capacity, "rates_rps": rates,
        "engine": engine, "server": server,
        "light_load_p50_added_ms": server["light_load_p50_ms"] - engine["light_load_p50_ms"],
        "goodput_ratio": (server["max_goodput_rps"] / engine["max_goodput_rps"]
                          if engine["max_goodput_rps"] else math.nan),
    }


def _write(cfg: ServerBenchConfig, report: dict) -> None:
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(report, indent=2, default=float))
    rows = {side: [(r["rate_rps"], r["p99_ms"]) for r in report[side]["runs"]] for side in ("engine", "server")}
    plot_p99_vs_load(rows, cfg.slo_ms, cfg.plot_path or cfg.json_path.with_suffix(".png"),
                     f"{cfg.model}: engine in-process vs HTTP server ({cpu_count()} cores)")


def table(report: dict) -> str:
    lines = [f"{report['model']}, SLO {report['slo_ms']:.0f} ms",
             f"{'':<7} {'max goodput':>12} {'light p50':>10} {'light p99':>10}"]
    for side in ("engine", "server"):
        d = report[side]
        lines.append(f"{side:<7} {d['max_goodput_rps']:>8.0f} r/s {d['light_load_p50_ms']:>7.2f} ms "
                     f"{d['light_load_p99_ms']:>7.2f} ms")
    lines.append(f"HTTP adds {report['light_load_p50_added_ms']:.2f} ms at light load (p50); the server "
                 f"keeps {100 * report['goodput_ratio']:.0f}% of the engine's max goodput")
    return "\n".join(lines)
