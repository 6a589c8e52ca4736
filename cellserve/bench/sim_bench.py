"""`cellserve bench sim`: is the simulator right? The real engine and the simulated one on
the same traces at the same rates.

It profiles the model on this machine (bench/profiler.py) and writes the profile next to the
JSON (PATH's stem + "-profile.json"; the report's "profile" names it and summarises it), then
for each policy (cellular, padded, none) ramps the real engine past its capacity as `bench
engine` does (ramp.py) and, at every rate the real ramp offers, simulates one engine with that
profile on the same trace.
Errors are relative, |sim - real| / real: of the max goodput over the ramp, and the largest
over the rates up to 80% of the policy's real capacity for p50 and p99 (past capacity, latency
is a queue's length, which no model of service times predicts to a few percent).

Each real rate runs `repeats` times back to back on the same trace (default 2); the report's
real figures are the runs' mean, and each policy's `real_spread` says how far the real runs
stood from that mean (goodput: the runs' max goodputs, and the widest at any one rate of the
ramp; p50 and p99: the largest over the same rates as the errors). That is the floor under
every error: a machine whose own runs disagree by 30% cannot check a model to 10%. `capacity_rps` is the real engine's closed-loop capacity
(cellular, a burst) before the ramps and after them: how far the machine itself moved
between the profile and the last real run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellserve import heap
from cellserve.bench.engine_runner import replay
from cellserve.bench.plots import plot_p99_vs_load
from cellserve.bench.profiler import model_trace, profile_model
from cellserve.bench.ramp import RampPlan, RampSearch
from cellserve.bench.results import json_safe, meets_slo, summarize
from cellserve.bench.traces import request_builder, sequence_name
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.graph.model import Model
from cellserve.server.repository import load_model  # also imported from here by docs/results' scripts
from cellserve.sim.run import simulate_replay

POLICIES = ("cellular", "padded", "none")
CAPACITY_SHARE = 0.8  # p50 and p99 errors count at rates up to this share of the real capacity
_SETTLE_S = 0.3  # between real runs: thread pools spin for a while after their last task


@dataclass
class SimBenchConfig:
    model: str = "lstm-512"
    model_repository: Path | None = None
    slo_ms: float = 200.0
    bursty: bool = False
    quick: bool = False
    seed: int = 0
    max_batch: int = 64
    json_path: Path = Path("bench-results/sim.json")
    plot_path: Path | None = None
    repeats: int = 2  # real runs per rate (see the module docstring)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")

    @property
    def run_seconds(self) -> float:
        return 2.0 if self.quick else 5.0


def policy_config(policy: str, max_batch: int) -> EngineConfig:
    """Each policy as `bench engine` runs it: cellular refuses and drops what cannot make its
    deadline; the baselines serve everything in arrival order (padded: batches of 8, 5 ms wait)."""
    if policy.startswith("cellular"):
        return EngineConfig(policy=policy, max_batch=max_batch)
    if policy == "padded":
        return EngineConfig(policy="padded", max_batch=8, batch_timeout_s=0.005, admission=False, drop_late=False)
    return EngineConfig(policy=policy, admission=False, drop_late=False)


def relative_error(sim: float, real: float) -> float | None:
    if real is None or sim is None or not (math.isfinite(real) and math.isfinite(sim)) or real == 0:
        return None
    return abs(sim - real) / real


def run(cfg: SimBenchConfig, log=print) -> dict:
    model = load_model(cfg.model, cfg.model_repository)
    log(f"profiling {model.name} on this machine ({'quick' if cfg.quick else 'full'})")
    profile = profile_model(model, EngineConfig(max_batch=cfg.max_batch), quick=cfg.quick,
                            seed=cfg.seed, log=log, deadline_s=cfg.slo_ms / 1e3)
    profile_path = cfg.json_path.with_name(cfg.json_path.stem + "-profile.json")
    profile.to_json(profile_path)
    capacity = _capacity(model, cfg)
    log(f"real closed-loop capacity (cellular): {capacity:.0f} req/s")
    slo_s = cfg.slo_ms / 1e3
    plan = RampPlan(start_rps=round(capacity * 0.1, 1), factor=1.5 if cfg.quick else 1.25,
                    refine_steps=2 if cfg.quick else 3, max_rps=round(capacity * 3, 1), tries=1)
    engines = {p: Engine([model], policy_config(p, cfg.max_batch)) for p in POLICIES}
    input_name = sequence_name(model)
    heap.settle()  # the real runs as the server runs (see heap.py)
    searches = {p: RampSearch(plan, lambda s: meets_slo(s, cfg.slo_ms)) for p in POLICIES}
    rows: dict[str, list[dict]] = {p: [] for p in POLICIES}
    speed: dict[str, tuple[float, float]] = {}
    with tqdm(desc="bench sim", unit="rate") as bar:
        while pending := [(p, s) for p, s in searches.items() if s.next_rate() is not None]:
            for policy, search in pending:
                rate = search.next_rate()
                bar.set_postfix_str(f"{policy} @ {rate:.0f} req/s")
                trace = model_trace(model, cfg.seed, rate, cfg.run_seconds, cfg.bursty)
                timeout = slo_s if policy.startswith("cellular") else None
                runs = []
                for _ in range(cfg.repeats):
                    time.sleep(_SETTLE_S)
                    runs.append(summarize(replay(engines[policy], model.name, input_name, trace, policy,
                                                 rate, timeout), slo_s))
                real = pooled(runs)
                simulated = simulate_replay(model, profile, replace(policy_config(policy, cfg.max_batch),
                                                                    pin_threads=False),
                                            trace, policy, rate, timeout, seed=cfg.seed)
                sim = summarize(simulated.stats, slo_s)
                search.record(real)
                rows[policy].append({"rate_rps": rate, "real": _figures(real), "sim": _figures(sim),
                                     "real_runs": [_figures(r) for r in runs],
                                     "real_passed": meets_slo(real, cfg.slo_ms), "sim_passed": meets_slo(sim, cfg.slo_ms),
                                     "sim_speedup": simulated.speedup})
                if policy not in speed or rate >= speed[policy][0]:
                    speed[policy] = (rate, simulated.speedup)
                bar.update()
    report = {"model": model.name, "simulated_and_real": True, "slo_ms": cfg.slo_ms,
              "arrivals": "bursty" if cfg.bursty else "poisson", "quick": cfg.quick,
              "profile": {"path": str(profile_path), **profile.summary()},  # the whole profile is at path
              "sim_speedup": speed.get("cellular", (0, None))[1],
              # the machine's own drift over the run: the same closed-loop burst before and after
              "capacity_rps": {"before": capacity, "after": _capacity(model, cfg)},
              "policies": {p: _errors(rows[p], searches[p].result(), cfg.slo_ms) for p in POLICIES}}
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    plot = cfg.plot_path or cfg.json_path.with_suffix(".png")
    lines = {}
    for p in POLICIES:
        ordered = sorted(rows[p], key=lambda r: r["rate_rps"])
        lines[f"{p} real"] = [(r["rate_rps"], r["real"]["p99_ms"]) for r in ordered]
        lines[f"{p} simulated"] = [(r["rate_rps"], r["sim"]["p99_ms"]) for r in ordered]
    plot_p99_vs_load(lines, cfg.slo_ms, plot, f"{model.name}: real and simulated engine "
                                              f"({report['arrivals']}, SLO {cfg.slo_ms:g} ms)")
    log(table(report))
    log(f"wrote {cfg.json_path}, {profile_path} and {plot}")
    return report


def _capacity(model: Model, cfg: SimBenchConfig) -> float:
    from cellserve.engine.request import Request
    engine = Engine([model], replace(policy_config("cellular", cfg.max_batch), admission=False, drop_late=False))
    best = 0.0
    inputs = request_builder(model)
    for i in range(2):  # the first burst warms caches and thread pools
        burst = model_trace(model, cfg.seed + 11 + i, 1.0, 1.0, min_requests=300)
        t0 = time.perf_counter()
        for item in burst:
            engine.submit(Request(model.name, inputs(item.sequence)))
        engine.run_until_idle(timeout_s=600)
        best = max(best, len(burst) / (time.perf_counter() - t0))
    return best


def pooled(runs: list[dict]) -> dict:
    """One summary of repeated runs of one rate: rates, latencies and the engine's figures
    averaged, requests and counts summed (so that meets_slo judges them all)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key in ("requests", "slo_misses"):
            out[key] = sum(r[key] for r in runs)
        elif key == "counts":
            out[key] = {status: sum(r[key][status] for r in runs) for status in value}
        elif isinstance(value, float):
            out[key] = float(np.mean([r[key] for r in runs]))
    return out


def _spread(values: list[float]) -> float | None:
    """How far the furthest of repeated figures stands from their mean, relative to it."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2 or not np.mean(values):
        return None
    mean = float(np.mean(values))
    return max(abs(v - mean) for v in values) / mean


def _figures(summary: dict) -> dict:
    return {k: summary[k] for k in ("goodput_rps", "p50_ms", "p99_ms", "throughput_rps", "mean_batch", "counts")}


def _errors(rows: list[dict], real_ramp, slo_ms: float) -> dict:
    real_bracket = real_ramp.bracket
    sim_max = max((r["sim"]["goodput_rps"] for r in rows), default=0.0)
    capacity = real_bracket.max_goodput_rps
    light = [r for r in rows if r["rate_rps"] <= CAPACITY_SHARE * capacity]

    def worst(key: str) -> float | None:
        errors = [relative_error(r["sim"][key], r["real"][key]) for r in light]
        errors = [e for e in errors if e is not None]
        return max(errors) if errors else None

    def widest(key: str) -> float | None:
        spreads = [_spread([run[key] for run in r["real_runs"]]) for r in light]
        spreads = [x for x in spreads if x is not None]
        return max(spreads) if spreads else None

    # the runs' maxima can agree while one run collapsed at a rate the other held (a queue
    # with no refusals that fell behind): the widest spread of goodput at any one rate shows it
    at_a_rate = max((x for x in (_spread([run["goodput_rps"] for run in r["real_runs"]]) for r in rows)
                     if x is not None), default=None)
    repeats = min((len(r["real_runs"]) for r in rows), default=0)
    best = [max(r["real_runs"][i]["goodput_rps"] for r in rows) for i in range(repeats)]

    return {"rates": sorted(rows, key=lambda r: r["rate_rps"]),
            "real_max_goodput_rps": capacity, "sim_max_goodput_rps": sim_max,
            "real_bracket": real_bracket.to_dict(),
            "max_goodput_error": relative_error(sim_max, capacity),
            "p50_error": worst("p50_ms"), "p99_error": worst("p99_ms"),
            "real_spread": {"max_goodput": _spread(best), "goodput_at_a_rate": at_a_rate,
                            "p50": widest("p50_ms"), "p99": widest("p99_ms")},
            "rates_compared_for_latency": [r["rate_rps"] for r in light]}


def table(report: dict) -> str:
    def pct(x):
        return "   -" if x is None else f"{100 * x:4.0f}%"

    lines = [f"{report['model']} ({report['arrivals']}, SLO {report['slo_ms']:g} ms): real engine against the "
             f"simulated one (simulated figures from a profile of this machine)",
             f"{'policy':10} {'real max goodput':>17} {'sim max goodput':>16} {'error':>6} {'p50 err':>8} {'p99 err':>8}"
             f"   real runs apart: {'goodput':>7} {'at a rate':>9} {'p50':>5} {'p99':>5}"]
    notes = []
    for p, r in report["policies"].items():
        spread = r.get("real_spread", {})
        bracket = r.get("real_bracket", {})
        mark = " "
        if bracket.get("capacity_below_start"):
            mark = "!"
            notes.append(f"! {p}: the real engine missed the SLO at the ramp's first rate: its max goodput and the "
                         "errors against it are not a capacity")
        elif bracket and not bracket.get("bracketed"):
            mark = "+"
            notes.append(f"+ {p}: no real rate past capacity was tried (the ramp's top still met the SLO): its "
                         "max goodput is a lower bound")
        lines.append(f"{p:10} {r['real_max_goodput_rps']:12.0f}{mark}r/s {r['sim_max_goodput_rps']:12.0f} r/s "
                     f"{pct(r['max_goodput_error']):>6} {pct(r['p50_error']):>8} {pct(r['p99_error']):>8}"
                     f"{'':19}{pct(spread.get('max_goodput')):>7} {pct(spread.get('goodput_at_a_rate')):>9} "
                     f"{pct(spread.get('p50')):>5} {pct(spread.get('p99')):>5}")
    lines += notes
    lines.append(f"simulated seconds per wall second at cellular's highest rate: {report['sim_speedup']:.1f}"
                 if report["sim_speedup"] else "")
    drift = report.get("capacity_rps")
    if drift:
        lines.append(f"the machine over the run: real closed-loop capacity {drift['before']:.0f} req/s before the "
                     f"ramps, {drift['after']:.0f} after ({drift['after'] / drift['before'] - 1:+.0%})")
    return "\n".join(lines)
