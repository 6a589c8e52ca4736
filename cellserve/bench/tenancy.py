"""`cellserve bench tenancy`: several models on one CPU beside an interfering process (Veltair).

Real, on this machine: one engine serves two or three zoo models, each with its own SLO, under
bursty arrivals (one burst path for all models: their bursts come together), while a burner
process (bench/burner.py) takes a set share of one of the kernels' cores. Three ways of
serving them are compared on the same traces, runs interleaved:

- "today": one engine, every step on all the kernel threads (the engine without
  --kernel-versions), its cell types in turn;
- "versions": the same engine with the thread count of each step chosen by the interference
  measured now, from kernel-versions profiles (executor/versions.py), measured here first or
  given;
- "allocated": one engine per model, each in a process of its own pinned to the cores the
  allocator gives it (cluster/core_allocation.py: how many from the models' profiled steps
  against their SLOs, which by the interference measured per core), re-decided every period.

Load: `load` times the mix's capacity measured here without interference (closed-loop bursts
of each model alone on today's engine, each model offered an equal share of the engine's
time). What counts: requests answered within their model's SLO, of those offered.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellserve.bench.burner import Burner
from cellserve.bench.engine_bench import closed_loop_capacity
from cellserve.bench.engine_runner import Stream, replay_mix
from cellserve.bench.traces import TraceRequest, burst_path, modulated_arrivals, sentence_lengths, sequence_input
from cellserve.plan.json_io import check_output, write_json

SCHEMA_VERSION = 1
ENGINES = ("today", "versions", "allocated")


@dataclass
class TenancyConfig:
    models: tuple[str, ...] = ("gru-256", "lstm-512")
    slo_ms: tuple[float, ...] = (10.0, 25.0)  # one per model
    duties: tuple[float, ...] = (0.0, 0.25, 0.5)  # the burner's share of its core, per condition
    load: float = 0.5
    seconds: float = 20.0
    runs: int = 2  # per engine and duty, interleaved
    burst_factor: float = 4.0
    seed: int = 0
    quick: bool = False
    allocation_period_s: float = 1.0  # the allocated engines' cores decided again this often
    profiles: list[str] = field(default_factory=list)  # kernel-versions profiles; none: measured first
    json: Path | None = None
    plot: Path | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("bench tenancy needs at least one model")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"--models lists a model twice: {list(self.models)}")
        if len(self.slo_ms) != len(self.models):
            raise ValueError(f"--slo-ms gives {len(self.slo_ms)} SLO(s) for {len(self.models)} model(s): one each")
        if any(not x > 0 for x in self.slo_ms):
            raise ValueError(f"--slo-ms must be > 0, got {list(self.slo_ms)}")
        if not self.duties or any(not 0 <= d <= 1 for d in self.duties):
            raise ValueError(f"--duties are shares of a core, 0 to 1, got {list(self.duties)}")
        if not self.load > 0 or not self.seconds > 0 or self.runs < 1 or not self.burst_factor >= 1:
            raise ValueError("--load and --seconds must be > 0, --runs >= 1, --burst-factor >= 1")
        if not self.allocation_period_s > 0:
            raise ValueError(f"--allocation-period must be > 0 seconds, got {self.allocation_period_s}")
        if self.quick:
            self.seconds = min(self.seconds, 8.0)


def run(cfg: TenancyConfig, log=print) -> dict:
    from cellserve.bench.version_profiler import profile_versions
    from cellserve.engine.config import EngineConfig
    from cellserve.engine.engine import Engine
    from cellserve.plan.versions import VersionProfile
    from cellserve.server.repository import load_model

    if cfg.json is not None:
        check_output(cfg.json)
    models = [load_model(name, None) for name in cfg.models]
    inputs = [sequence_input(m) for m in models]
    profile_paths = list(cfg.profiles)
    if not profile_paths:
        folder = (cfg.json.parent if cfg.json else Path("bench-results"))
        stem = cfg.json.stem if cfg.json else "tenancy"
        for m in models:
            log(f"profiling kernel versions of {m.name} (a burner on one core at each level)")
            path = folder / f"{stem}-versions-{m.name}.json"
            profile_versions(m, EngineConfig(), quick=cfg.quick, log=log).to_json(path)
            profile_paths.append(str(path))
    profiles = {p.model: p for p in (VersionProfile.from_json(x) for x in profile_paths)}
    engines = {"today": Engine(models, EngineConfig()),
               "versions": Engine(models, EngineConfig(kernel_versions=profile_paths))}
    cores = tuple(sorted(os.sched_getaffinity(0)))
    with Allocated(models, cfg, profiles, cores) as allocated:
        capacity, capacity_allocated = {}, {}
        for m, seq in zip(models, inputs):
            # every engine gets the same bursts before the runs (warm caches and allocator, costs
            # learnt from the same work); today's engine's second burst is the capacity
            for engine in engines.values():
                closed_loop_capacity(engine, m.name, seq.name, 0, cfg.seed + 1, n=100, inputs=seq.sampler())
            allocated.warm(m.name, cfg.seed + 1, n=100)
            measured = {k: closed_loop_capacity(e, m.name, seq.name, 0, cfg.seed, n=150 if cfg.quick else 300,
                                                inputs=seq.sampler())
                        for k, e in engines.items()}
            capacity_allocated[m.name] = allocated.warm(m.name, cfg.seed, n=150 if cfg.quick else 300)
            capacity[m.name] = measured["today"]
        rates = {m.name: cfg.load * capacity[m.name] / len(models) for m in models}
        log("capacity alone (req/s): " + ", ".join(f"{k} {v:.0f}" for k, v in capacity.items())
            + f"; offered at load {cfg.load}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
        streams = _streams(cfg, models, inputs, rates)
        core = cores[-1]
        conditions = []
        for duty in cfg.duties:
            results = {e: [] for e in ENGINES}
            for r in range(cfg.runs):
                order = ENGINES if r % 2 == 0 else ENGINES[::-1]
                for name in order:
                    with Burner(core, duty):
                        if name == "allocated":
                            t0 = time.perf_counter()
                            outcomes, extra = allocated.replay(streams)
                            wall = time.perf_counter() - t0
                        else:
                            engine = engines[name]
                            before = _version_counts(engine)
                            t0 = time.perf_counter()
                            outcomes = replay_mix(engine, streams)
                            wall = time.perf_counter() - t0
                            extra = _versions_record(engine, before)
                    results[name].append(_run_record(cfg, streams, outcomes, wall, extra))
                    log(f"duty {duty:.2f} {name:9s} run {r + 1}: " + _line(results[name][-1]))
            conditions.append({"duty": duty, "engines": results, "summary": _summary(results)})
    report = {"schema_version": SCHEMA_VERSION, "benchmark": "tenancy", "measured": True,
              "config": {**asdict(cfg), "json": str(cfg.json) if cfg.json else None,
                         "plot": str(cfg.plot) if cfg.plot else None},
              "burner_core": core, "capacity_rps": capacity, "allocated_capacity_rps": capacity_allocated,
              "offered_rps": rates,
              "profiles": profile_paths, "levels_profiled": {k: list(p.levels) for k, p in profiles.items()},
              "conditions": conditions}
    if cfg.json is not None:
        write_json(report, cfg.json)
    if cfg.plot is not None:
        plot(report, cfg.plot)
    return report


class Allocated:
    """The "allocated" way of serving: one engine process per model (cluster/core_workers.py),
    their cores decided by the allocator (cluster/core_allocation.py) from the models'
    kernel-versions profiles, the rates counted from the trace as requests enter, and the
    load measured per core. `with Allocated(...) as a:` the workers live for the block."""

    def __init__(self, models, cfg: TenancyConfig, profiles: dict, cores: tuple[int, ...]):
        from cellserve.bench.tenancy_sim import panels_of, tenants_from_profiles

        missing = [m.name for m in models if m.name not in profiles]
        if missing:
            raise ValueError(f"the allocated engines need a kernel-versions profile of every model; none for {missing}")
        panels = {}
        for m in models:
            panels.update(panels_of(m, profiles[m.name]))
        self.tenants = tenants_from_profiles(tuple(zip(cfg.models, cfg.slo_ms)), profiles, panels)
        self.models, self.cores, self.period_s = [m.name for m in models], cores, cfg.allocation_period_s
        self.workers: list = []

    def __enter__(self) -> "Allocated":
        from cellserve.cluster.core_allocation import decide
        from cellserve.cluster.core_workers import CoreWorker, WorkerSpec

        first = decide(self.tenants, [0.0] * len(self.tenants), {c: 0.0 for c in self.cores})
        try:
            for name, cores in zip(self.models, first):
                self.workers.append(CoreWorker(WorkerSpec(name, (name,), cores)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for w in self.workers:
            w.close()
        self.workers = []

    def warm(self, model: str, seed: int, n: int) -> float:
        return self.workers[self.models.index(model)].capacity(model, seed, n)

    def replay(self, streams: list[Stream]) -> tuple[list, dict]:
        """Serve the streams, each on its model's worker, from one start; the outcomes per
        stream and what the allocator decided meanwhile."""
        from cellserve.cluster.core_allocation import CoreAllocator

        arrivals = [np.array(sorted(r.arrival_s for r in s.trace)) for s in streams]
        start = [None]

        def rates(now: float, period: float) -> list[float]:
            if start[0] is None:
                return [0.0] * len(arrivals)
            t = now - start[0]
            return [float(np.searchsorted(a, t, "right") - np.searchsorted(a, t - period, "right")) / period
                    for a in arrivals]

        allocator = CoreAllocator(self.workers, self.tenants, self.cores, rates, self.period_s)
        allocator.start()
        try:
            time.sleep(self.period_s * 1.2)  # the first decision, from the load measured meanwhile
            at_start = [w.cores for w in self.workers]
            start[0] = time.perf_counter() + 0.2
            for w, s in zip(self.workers, streams):
                w.start_replay([s], start[0])
            results = [w.replay_result() for w in self.workers]
        finally:
            allocator.stop()
        decisions = [d for d in allocator.decisions if d.at >= start[0]]
        extra = {"allocation": {"cores_at_start": {m: list(c) for m, c in zip(self.models, at_start)},
                                "cores_at_end": {m: list(w.cores) for m, w in zip(self.models, self.workers)},
                                "moves": sum(len(d.moved) for d in decisions),
                                "repins_applied": sum(r["repins"] for r in results),
                                "decisions": [d.to_dict() for d in allocator.decisions]}}
        return [r["outcomes"][0] for r in results], extra


def _streams(cfg: TenancyConfig, models, inputs, rates) -> list[Stream]:
    """Every model's trace on one burst path (their bursts come together), drawn from the seed."""
    rng = np.random.default_rng(cfg.seed)
    edges, multipliers = burst_path(rng, cfg.seconds, cfg.burst_factor, mean_burst_s=1.0, mean_calm_s=3.0)
    streams = []
    for m, seq, slo in zip(models, inputs, cfg.slo_ms):
        arrivals = modulated_arrivals(rng, rates[m.name], edges, multipliers)
        lengths = sentence_lengths(rng, len(arrivals))
        trace = [TraceRequest(i, float(a), seq.draw(rng, int(n))) for i, (a, n) in enumerate(zip(arrivals, lengths))]
        streams.append(Stream(m.name, seq.name, trace, slo / 1e3))
    return streams


def _version_counts(engine) -> dict:
    v = engine.executors[next(iter(engine.executors))].versions
    if v is None:
        return {}
    return {"switches": v.switches, "steps": {f"{ct}@{t}": n for (ct, t), n in v.steps.items()}}


def _run_record(cfg, streams, outcomes, wall, extra: dict) -> dict:
    per_model = {}
    for s, slo, outs in zip(streams, cfg.slo_ms, outcomes):
        lat = np.array([o.finish_s - o.arrival_s for o in outs if o.status == "ok"])
        good = int(np.sum(lat <= slo / 1e3)) if lat.size else 0
        per_model[s.model] = {"offered": len(outs), "within_slo": good,
                              "ok": int(lat.size), "refused": sum(o.status == "rejected" for o in outs),
                              "dropped": sum(o.status == "dropped" for o in outs),
                              "errors": sum(o.status == "error" for o in outs),
                              "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
                              "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else None}
    return {"wall_s": wall, "models": per_model,
            "offered": sum(m["offered"] for m in per_model.values()),
            "within_slo": sum(m["within_slo"] for m in per_model.values()), **extra}


def _versions_record(engine, before: dict) -> dict:
    """What the version chooser did in a run (nothing for an engine without versions)."""
    after = _version_counts(engine)
    if not after:
        return {}
    versions = engine.executors[next(iter(engine.executors))].versions
    steps = {k: n - before["steps"].get(k, 0) for k, n in after["steps"].items()}
    return {"versions": {"switches": after["switches"] - before["switches"],
                         "steps": {k: n for k, n in steps.items() if n},
                         "interference_cores_at_end": versions.meter.level}}


def _summary(results: dict) -> dict:
    out = {}
    for name, runs in results.items():
        offered = sum(r["offered"] for r in runs)
        good = sum(r["within_slo"] for r in runs)
        out[name] = {"offered": offered, "within_slo": good, "share": good / offered if offered else 0.0}
    today = out["today"]["within_slo"]
    for name in ENGINES[1:]:
        out[f"{name}_over_today"] = out[name]["within_slo"] / today if today else None
    return out


def _line(record: dict) -> str:
    parts = [f"{record['within_slo']}/{record['offered']} within SLO"]
    for name, m in record["models"].items():
        p99 = f"{m['p99_ms']:.0f}" if m["p99_ms"] is not None else "-"
        parts.append(f"{name} {m['within_slo']}/{m['offered']} p99 {p99} ms")
    if "versions" in record:
        parts.append(f"switches {record['versions']['switches']}")
    if "allocation" in record:
        a = record["allocation"]
        parts.append(f"cores {a['cores_at_start']} -> {a['cores_at_end']}, {a['moves']} moves")
    return "; ".join(parts)


def table(report: dict) -> str:
    models = report["config"]["models"]
    head = "| burner | engine | within SLO | " + " | ".join(f"{m} within SLO (p99 ms)" for m in models) + " |"
    lines = [head, "|" + "---|" * (3 + len(models))]
    for c in report["conditions"]:
        for name in ENGINES:
            runs = c["engines"][name]
            s = c["summary"][name]
            cells = []
            for m in models:
                good = sum(r["models"][m]["within_slo"] for r in runs)
                offered = sum(r["models"][m]["offered"] for r in runs)
                p99s = [r["models"][m]["p99_ms"] for r in runs if r["models"][m]["p99_ms"] is not None]
                cells.append(f"{good}/{offered} ({'/'.join(f'{x:.0f}' for x in p99s) or '-'})")
            lines.append(f"| {c['duty']:.2f} of a core | {name} | {s['within_slo']}/{s['offered']} "
                         f"({s['share']:.1%}) | " + " | ".join(cells) + " |")
        for name in ENGINES[1:]:
            ratio = c["summary"].get(f"{name}_over_today")
            lines.append(f"| {c['duty']:.2f} of a core | {name} / today | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |" + " |" * len(models))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duties = [c["duty"] for c in report["conditions"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(ENGINES)
    x = np.arange(len(duties))
    for i, name in enumerate(ENGINES):
        ax.bar(x + (i - (len(ENGINES) - 1) / 2) * width, [c["summary"][name]["share"] * 100 for c in report["conditions"]], width,
               label=name)
    ax.set_xticks(x, [f"{d:.2f}" for d in duties])
    ax.set_xlabel("burner's share of one core")
    ax.set_ylabel("requests within their SLO (%)")
    ax.set_title("Measured: " + ", ".join(f"{m} ({s:g} ms)" for m, s in
                                         zip(report["config"]["models"], report["config"]["slo_ms"])), fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
