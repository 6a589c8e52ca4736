"""Running simulations: one engine on a benchmark trace (what `bench sim` compares with the
real engine), and `cellserve simulate`: many engines behind a router, at given rates or at a
share of their capacity. Every figure written here is simulated and says so."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cellserve.bench.plots import plot_p99_vs_load
from cellserve.bench.results import RequestOutcome, RunStats, json_safe, span_s, summarize
from cellserve.bench.traces import MIN_REQUESTS, TraceRequest, request_builder
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import EngineStats
from cellserve.graph.model import Model
from cellserve.plan.json_io import check_output, write_json
from cellserve.plan.profile import ModelProfile, ProfileError
from cellserve.sim.loop import STEP_SAMPLES, SimArrival, SimOutcome, Simulation
from cellserve.sim.parallel import ParallelSimulation
from cellserve.sim.router import make_router
from cellserve.sim.trace import SimTrace

SIMULATED = "simulated"


def arrivals(trace: list[TraceRequest], model: Model, timeout_s: float | None,
             start_s: float = 0.0, first_tag: int | None = None) -> list[SimArrival]:
    """The trace's requests to `model`, each one sequence in its sequence input (with the
    model's state inputs beside it, bench/traces.request_builder), tagged
    by their request ids or, with `first_tag`, by numbers counting up from it."""
    inputs = request_builder(model)
    return [SimArrival(start_s + r.arrival_s, model.name, inputs(r.sequence), timeout_s, 0,
                       r.request_id if first_tag is None else first_tag + i) for i, r in enumerate(trace)]


def run_stats(outcomes: list[SimOutcome], stats: list[EngineStats], policy: str, rate_rps: float,
              start_s: float = 0.0) -> RunStats:
    """The benchmark's record of a simulated run (times relative to `start_s`)."""
    records = [RequestOutcome(o.tag, o.arrival_s - start_s, o.finish_s - start_s, RequestOutcome.status_of(o.status), o.reason)
               for o in outcomes]
    return RunStats(policy=policy, rate_rps=rate_rps, duration_s=span_s(records), outcomes=records,
                    executed_flops=sum(s.executed_flops for s in stats), busy_s=sum(s.busy_s for s in stats),
                    cell_steps=sum(s.cell_steps for s in stats), batch_size_sum=sum(s.batch_size_sum for s in stats),
                    overhead_us_per_step=[x * 1e6 for s in stats for x in s.overhead_s])


@dataclass
class ReplayResult:
    stats: RunStats
    virtual_s: float
    wall_s: float

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall second."""
        return self.virtual_s / self.wall_s if self.wall_s > 0 else float("inf")


def simulate_replay(model: Model, profile: ModelProfile, config: EngineConfig, trace: list[TraceRequest],
                    policy: str, rate_rps: float, timeout_s: float | None, seed: int = 0,
                    drain_s: float = 30.0) -> ReplayResult:
    """`trace` on one simulated engine, as bench/engine_runner.replay serves it on a real one."""
    sim = Simulation(seed=seed)
    engine = sim.add_engine([model], {model.name: profile}, config).engine
    t0 = time.perf_counter()
    outcomes = sim.run(arrivals(trace, model, timeout_s), drain_s=drain_s)
    wall = time.perf_counter() - t0
    virtual = max((o.finish_s for o in outcomes), default=0.0) - min((o.arrival_s for o in outcomes), default=0.0)
    return ReplayResult(run_stats(outcomes, [engine.stats], policy, rate_rps), virtual, wall)


# ---- cellserve simulate ----

@dataclass
class SimulateConfig:
    profiles: list[Path]
    engines: int = 1
    router: str = "least-finish"
    policy: str = "cellular"
    max_batch: int | None = None
    slo_ms: float = 200.0
    rates: list[float] | None = None  # total offered rates, requests/s
    load: float | None = None  # or: shares of the engines' simulated capacity
    seconds: float = 10.0
    bursty: bool = False
    seed: int = 0
    workers: int = 1  # processes the engines run in (sim/parallel.py); the outcomes are the same
    model_repository: Path | None = None
    json_path: Path = Path("bench-results/simulate.json")
    plot_path: Path | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.profiles:
            problems.append("--profile: give at least one")
        if self.engines < 1:
            problems.append(f"--engines must be >= 1, got {self.engines}")
        if self.workers < 1:
            problems.append(f"--workers must be >= 1, got {self.workers}")
        if (self.rates is None) == (self.load is None):
            problems.append("give exactly one of --rates and --load")
        def bad(x: float) -> bool:  # NaN and infinity too: a rate or a span must be a real number
            return not 0 < x < math.inf

        if self.rates is not None and any(map(bad, self.rates)):
            problems.append(f"--rates must be finite numbers > 0, got {self.rates}")
        for flag, value in (("--load", self.load), ("--seconds", self.seconds), ("--slo-ms", self.slo_ms)):
            if value is not None and bad(value):
                problems.append(f"{flag} must be a finite number > 0, got {value}")
        if problems:
            raise ValueError("; ".join(problems))


def load_models(profiles: list[ModelProfile], repository: Path | None) -> list[Model]:
    """The models the profiles were made of: from the zoo by name, else from the repository."""
    from cellserve.graph import zoo
    models, by_name = [], {}
    if repository is not None:
        from cellserve.server.repository import load_repository
        # a profile names a repository model as `cellserve profile --model NAME` did: by its
        # client-facing name (the engine's is NAME:VERSION)
        by_name = {s.name: s.model for s in load_repository(repository)}
    for p in profiles:
        if p.model in by_name:
            model = by_name[p.model]
            model.name = p.model
            models.append(model)
        elif p.model in zoo.names():
            models.append(zoo.load(p.model))
        else:
            raise ProfileError(f"profile.model {p.model!r} is neither a zoo model nor in the model repository "
                               f"({'none given' if repository is None else str(repository)})")
    return models


def simulate(cfg: SimulateConfig, log=print) -> dict:
    from cellserve.bench.profiler import model_trace

    for path in (cfg.json_path, cfg.plot_path or cfg.json_path.with_suffix(".png")):
        check_output(path)  # now, not after the run
    profiles = [ModelProfile.from_json(p) for p in cfg.profiles]
    for profile in profiles:
        suspect = profile.suspect()
        if suspect:
            log(f"warning: profile of {profile.model!r}: {len(suspect)} figure(s) look like the machine's noise, "
                f"not the model's cost: {suspect[0]}" + (" ..." if len(suspect) > 1 else ""))
    names = [p.model for p in profiles]
    if len(set(names)) != len(names):
        raise ProfileError(f"two profiles of one model: {names}")
    models = load_models(profiles, cfg.model_repository)
    by_name = {p.model: p for p in profiles}
    engine_config = EngineConfig(policy=cfg.policy, max_batch=cfg.max_batch, profile=True,
                                 stack_layers=profiles[0].stack_layers, pin_threads=False)
    make_router(cfg.router)  # an unknown router fails before any work
    workers = min(cfg.workers, cfg.engines)
    samples = min(STEP_SAMPLES, max(1_000, 1_000_000 // cfg.engines))  # a million steps' samples in all, at most

    def build() -> Simulation | ParallelSimulation:
        if workers > 1:
            sim = ParallelSimulation(make_router(cfg.router), seed=cfg.seed, workers=workers, step_samples=samples)
        else:
            sim = Simulation(make_router(cfg.router), seed=cfg.seed, step_samples=samples)
        for i in range(cfg.engines):
            sim.add_engine(models, by_name, engine_config, name=f"engine-{i}")
        return sim

    if cfg.rates is not None:
        rates = list(cfg.rates)
        capacity = None
    else:
        capacity = cfg.engines * _one_engine_capacity(models, by_name, engine_config, cfg.seed, model_trace)
        rates = [round(cfg.load * capacity, 1)]
        log(f"simulated capacity of {cfg.engines} engine(s): {capacity:.0f} req/s; offering {rates[0]:.0f} req/s")
    runs = []
    for rate in rates:
        parts: list[SimTrace] = []  # per model, in columns as it is drawn: a long run's arrivals are millions
        for i, model in enumerate(models):  # each model an equal share of the rate
            share = model_trace(model, cfg.seed + i, rate / len(models), cfg.seconds, cfg.bursty)
            parts.append(SimTrace(arrivals(share, model, cfg.slo_ms / 1e3, first_tag=sum(map(len, parts)))))
            del share
        trace = SimTrace.concat(parts)
        del parts
        if rate / len(models) * cfg.seconds < MIN_REQUESTS:
            log(f"note: {rate:g} req/s over --seconds {cfg.seconds:g} is fewer than {MIN_REQUESTS} requests "
                f"per model; each model's trace holds {MIN_REQUESTS} at that rate, so the run spans longer")
        sim = build()
        t0 = time.perf_counter()
        outcomes = sim.run(trace)
        wall = time.perf_counter() - t0
        stats = run_stats(outcomes, sim.engine_stats, cfg.policy, rate)
        summary = summarize(stats, cfg.slo_ms / 1e3)
        per_model = {m.name: summarize(run_stats([o for o in outcomes if o.model == m.name], [], cfg.policy, rate),
                                       cfg.slo_ms / 1e3) for m in models}
        virtual = sim.stats.virtual_s
        # what the trace offered (its arrivals over their span): a short or bursty trace's differs
        # from the rate asked for, and goodput is over the span from first arrival to last answer
        span = float(trace.time_s[-1] - trace.time_s[0]) if len(trace) > 1 else 0.0
        realised = len(trace) / span if span > 0 else None
        runs.append({**summary, "realised_rps": realised, "per_model": per_model, "wall_s": wall, "virtual_s": virtual,
                     "sim_speedup": virtual / wall if wall else None, "events": sim.stats.events,
                     "engine_steps": sim.stats.engine_steps,
                     "workers": sim.worker_stats if workers > 1 else None})
        log(f"{rate:8.0f} req/s offered (simulated), the trace's arrivals "
            f"{'-' if realised is None else f'{realised:.0f}'} req/s: goodput {summary['goodput_rps']:.0f} req/s, "
            f"p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms; {virtual:.1f} simulated s "
            f"in {wall:.1f} wall s" + (f" ({workers} worker processes)" if workers > 1 else ""))
    report = {"simulated": True, "label": SIMULATED, "engines": cfg.engines, "workers": workers, "router": cfg.router,
              "policy": cfg.policy, "slo_ms": cfg.slo_ms, "arrivals": "bursty" if cfg.bursty else "poisson",
              "seconds": cfg.seconds, "capacity_rps": capacity, "load": cfg.load,
              "profiles": [{"model": p.model, "machine": p.machine.name, "backend": p.machine.backend,
                            "modelled": p.modelled} for p in profiles],
              "runs": runs}
    write_json(json_safe(report), cfg.json_path)
    plot = cfg.plot_path or cfg.json_path.with_suffix(".png")
    plot_p99_vs_load({f"{cfg.policy} (simulated)": [(r["rate_rps"], r["p99_ms"]) for r in runs]}, cfg.slo_ms, plot,
                     f"simulated: {cfg.engines} engine(s), {', '.join(names)}, router {cfg.router}")
    log(f"wrote {cfg.json_path} and {plot}")
    return report


def _one_engine_capacity(models, profiles, config, seed, model_trace) -> float:
    """Requests per second one simulated engine serves when a burst of the mix arrives at
    once with no deadlines (as bench engine's closed-loop estimate)."""
    sim = Simulation(seed=seed)
    sim.add_engine(models, profiles, config)
    burst = []
    for i, model in enumerate(models):
        share = model_trace(model, seed + 100 + i, 1.0, 1.0, min_requests=max(50, 300 // len(models)))
        burst += [replace(a, time_s=0.0, tag=len(burst) + j)
                  for j, a in enumerate(arrivals(share, model, None))]
    outcomes = sim.run(burst, drain_s=3600.0)
    makespan = max(o.finish_s for o in outcomes)
    return len(outcomes) / makespan if makespan > 0 else float("inf")
