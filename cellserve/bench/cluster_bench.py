"""`cellserve bench cluster`: the highest total request rate each system serves with at least
99% of requests within their SLO, on the same number of simulated devices (Nexus's metric).

One *point* is one system at one total rate: for each of `seeds` traces, a fresh deployment
(cluster/systems.py) and the workload's bursty trace at that rate (cluster/workload.py) for
`seconds`; the point's figure is the share of requests arriving after `warmup_s`, pooled over
the traces, that were answered OK within their session's SLO (rejected, dropped, unanswered
and unplaced requests are misses). A trace's bursts depend on its seed, not on the rate, so
every rate of a search meets the same bursts; a seed's bursts can still make its trace
heavier or lighter than the nominal rate over a few seconds, which `realised_rps` shows.

Every search starts at half the highest rate the Nexus plan fits on the devices or, once a
figure for the system is known (an earlier device count of the run, or `start_from`), at that
figure scaled by devices. The search (`search`) brackets the highest passing rate: from a start it multiplies by
`grow` until a rate fails (or divides until one passes), then bisects (geometrically)
`bisections` times; it returns the highest rate that passed and the lowest that failed above
it. The metric need not be monotone in the rate (a system's routing and admission respond to
the load), though the traces are; the bracket is what was measured. With `rates` given
(`--rates`) no search runs: each system is measured at exactly those rates (`at_rates`), to
re-check a bracket or narrow one by hand, and its entry is read from those points the same
way. All figures are simulated and labelled so.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cellserve.cluster import systems as sysmod
from cellserve.cluster.workload import (DEFAULT_SESSIONS, PROFILE_DIR, PROFILE_FILE, Catalogue, load_catalogue,
                                        load_sessions, session_arrivals)

TARGET = 0.99
# Where every system's search starts: this share of the highest rate the Nexus plan fits
# (bursts reach about twice the mean rate, so the plan's own figure fails for all).
START_SHARE = 0.5


@dataclass
class Point:
    rate_rps: float
    slo_attainment: float
    requests: int
    devices_used: int
    wall_s: float
    per_session: dict[str, float] = field(default_factory=dict)
    realised_rps: float = 0.0  # requests counted per counted second and trace: the load the traces carried

    @property
    def passed(self) -> bool:
        return self.slo_attainment >= TARGET


def run_point(system: str, catalogue: Catalogue, devices: int, total_rps: float, seconds: float,
              warmup_s: float = 0.0, options: sysmod.Options | None = None, seeds: int = 1) -> Point:
    """One system at one total rate (see the module's docstring), over `seeds` traces (seeds
    options.seed, options.seed + 1, ...; a fresh deployment each) whose requests are pooled."""
    from cellserve.engine.request import Status

    options = options or sysmod.Options()
    if seeds < 1:
        raise ValueError(f"a point needs at least one trace, got seeds={seeds}")
    slo = catalogue.slo_s
    # a request unanswered past the loosest SLO after the last arrival has missed anyway
    drain_s = max(slo.values())
    met: dict[str, list[int]] = {s.name: [0, 0] for s in catalogue.sessions}
    wall = 0.0
    devices_used = 0
    for k in range(seeds):
        run_options = replace(options, seed=options.seed + k)
        deployment = sysmod.build(system, catalogue, devices, total_rps, run_options)
        trace = session_arrivals(catalogue, total_rps, seconds, run_options.seed)
        t0 = time.perf_counter()
        outcomes = deployment.simulation.run(deployment.arrivals(trace), drain_s=drain_s)
        wall += time.perf_counter() - t0
        devices_used = max(devices_used, deployment.devices_used)
        by_tag = {o.tag: o for o in outcomes}
        for a in trace:
            if a.time_s < warmup_s:
                continue
            o = by_tag.get(a.tag)
            ok = o is not None and o.status is Status.OK and o.finish_s - o.arrival_s <= slo[a.model]
            met[a.model][0] += ok
            met[a.model][1] += 1
    counted = sum(n for _, n in met.values())
    attainment = sum(k for k, _ in met.values()) / counted if counted else 0.0
    return Point(total_rps, attainment, counted, devices_used, wall,
                 {m: (k / n if n else 1.0) for m, (k, n) in met.items()},
                 counted / ((seconds - warmup_s) * seeds))


@dataclass
class SearchResult:
    passed: Point | None  # the highest passing rate found
    failed: Point | None  # the lowest failing rate above it
    points: list[Point]


def search(evaluate, start_rps: float, grow: float = 1.5, bisections: int = 3, max_expand: int = 8) -> SearchResult:
    """Bracket the highest rate at which `evaluate(rate) -> Point` passes (module docstring)."""
    points: list[Point] = []

    def at(rate: float) -> Point:
        p = evaluate(rate)
        points.append(p)
        return p

    lo = hi = None
    p = at(start_rps)
    if p.passed:
        lo = p
        for _ in range(max_expand):
            p = at(lo.rate_rps * grow)
            if not p.passed:
                hi = p
                break
            lo = p
    else:
        hi = p
        for _ in range(max_expand):
            p = at(hi.rate_rps / grow)
            if p.passed:
                lo = p
                break
            hi = p
    if lo is not None and hi is not None:
        for _ in range(bisections):
            p = at(math.sqrt(lo.rate_rps * hi.rate_rps))
            if p.passed:
                lo = p
            else:
                hi = p
    return SearchResult(lo, hi, points)


def at_rates(evaluate, rates: list[float]) -> SearchResult:
    """`evaluate` at each of `rates`, in order, without a search: the highest rate that
    passed, and the lowest that failed above it (None where there is none)."""
    points = [evaluate(rate) for rate in rates]
    passed = [p for p in points if p.passed]
    lo = max(passed, key=lambda p: p.rate_rps) if passed else None
    above = [p for p in points if not p.passed and (lo is None or p.rate_rps > lo.rate_rps)]
    hi = min(above, key=lambda p: p.rate_rps) if above else None
    return SearchResult(lo, hi, points)


@dataclass
class ClusterConfig:
    devices: list[int]
    json_path: Path
    quick: bool = False
    systems: tuple[str, ...] = sysmod.SYSTEMS
    seconds: float | None = None
    warmup_s: float | None = None
    bisections: int | None = None
    seed: int = 0
    seeds: int = 1  # traces per rate (seed, seed + 1, ...), their requests pooled
    start_from: Path | None = None  # a previous report: searches start at its figures, scaled
    profile_dir: Path = PROFILE_DIR  # where the models' MODEL-poisson-profile.json are
    sessions_path: Path | None = None  # a sessions file (cluster/workload.parse_sessions); None: DEFAULT_SESSIONS
    model_repository: Path | None = None  # where models not in the zoo are
    jobs: int = 1  # systems searched at once, each in a process of its own
    rates: tuple[float, ...] | None = None  # total rates to run each system at, instead of a search

    def __post_init__(self) -> None:
        bisections_given = self.bisections is not None
        if self.seconds is None:
            self.seconds = 2.0 if self.quick else 4.0
        if self.warmup_s is None:
            self.warmup_s = 0.5 if self.quick else 1.0
        if self.bisections is None:
            self.bisections = 1 if self.quick else 2
        problems = []
        if not self.devices or any(n < 1 for n in self.devices):
            problems.append(f"--devices must be positive integers, got {self.devices}")
        unknown = [s for s in self.systems if s not in sysmod.SYSTEMS + sysmod.ABLATIONS]
        if unknown:
            problems.append(f"unknown systems {unknown}; choose from {', '.join(sysmod.SYSTEMS + sysmod.ABLATIONS)}")
        if self.jobs < 1:
            problems.append(f"--jobs must be at least 1, got {self.jobs}")
        if self.seeds < 1:
            problems.append(f"--seeds must be at least 1, got {self.seeds}")
        if self.rates is not None:
            if not self.rates or any(not (r > 0 and math.isfinite(r)) for r in self.rates):
                problems.append(f"--rates must be positive numbers, got {list(self.rates)}")
            if self.start_from is not None:
                problems.append("--rates runs no search, so --start-from has nothing to start")
            if bisections_given:
                problems.append("--rates runs no search, so --bisections has nothing to narrow")
        if self.seconds <= self.warmup_s:
            problems.append(f"--seconds ({self.seconds}) must exceed the warm-up ({self.warmup_s})")
        if problems:
            raise ValueError("; ".join(problems))


def catalogue_for(cfg: ClusterConfig) -> Catalogue:
    """The workload's sessions (cfg.sessions_path, else DEFAULT_SESSIONS), their models and
    their profiles from cfg.profile_dir (a ValueError, or a ProfileError, names a missing or
    broken file, field or model)."""
    sessions = load_sessions(cfg.sessions_path) if cfg.sessions_path is not None else DEFAULT_SESSIONS
    return load_catalogue(sessions, cfg.profile_dir, cfg.model_repository)


def run(cfg: ClusterConfig, catalogue: Catalogue | None = None, log=print) -> dict:
    """The whole benchmark; writes cfg.json_path and a PNG beside it; returns the report."""
    catalogue = catalogue or catalogue_for(cfg)
    options = sysmod.Options(seed=cfg.seed)
    report: dict = {"simulated": True, "label": "simulated", "date": time.strftime("%Y-%m-%d"),
                    "target_attainment": TARGET, "seconds": cfg.seconds, "warmup_s": cfg.warmup_s,
                    "seed": cfg.seed, "seeds": cfg.seeds, "rates": list(cfg.rates) if cfg.rates is not None else None,
                    "quick": cfg.quick, "device": _device(catalogue, cfg.profile_dir),
                    "workload": _workload(catalogue),
                    "systems": _systems(options, catalogue), "devices": {}}
    prior = _prior(cfg.start_from)
    for n in cfg.devices:
        planned = sysmod.planned_capacity(catalogue, n, options.nexus_margin)
        log(f"{n} devices: the Nexus plan fits up to {planned:.0f} req/s (simulated)")
        row: dict = {}
        starts = {system: _start(prior, system, n, START_SHARE * planned) for system in cfg.systems}
        for system, entry in _searches(cfg, catalogue, n, starts, log):
            row[system] = entry
            report["devices"][str(n)] = {s: row[s] for s in cfg.systems if s in row}
            _write(report, cfg.json_path)  # what is done survives a run cut short
        row = {s: row[s] for s in cfg.systems}
        best = max((row[s]["max_rate_rps"] for s in row if s in sysmod.SYSTEMS and s != "nexus"), default=0.0)
        if "nexus" in row and best > 0:
            row["nexus"]["vs_best_baseline"] = row["nexus"]["max_rate_rps"] / best
        report["devices"][str(n)] = row
        report.setdefault("nexus_planned_rps", {})[str(n)] = planned
        for system, entry in row.items():
            if entry["max_rate_rps"] > 0:
                prior.setdefault(system, {})[n] = entry["max_rate_rps"]
        log("  " + ", ".join(f"{s} {row[s]['max_rate_rps']:.0f}" for s in row) + " req/s at >= 99% (simulated)")
    _write(report, cfg.json_path)
    plot = cfg.json_path.with_suffix(".png")
    plot_cluster(report, plot)
    log(f"wrote {cfg.json_path} and {plot}")
    return report


def search_system(cfg: ClusterConfig, catalogue: Catalogue, system: str, devices: int, start: float,
                  log=print) -> dict:
    """One system's bracketed search on `devices` devices from `start` req/s (with cfg.rates,
    its points at those rates instead): its report entry."""
    options = sysmod.Options(seed=cfg.seed)
    if cfg.rates is None:
        log(f"  {system}: the search starts at {start:.0f} req/s")

    def evaluate(rate: float) -> Point:
        p = run_point(system, catalogue, devices, rate, cfg.seconds, cfg.warmup_s, options, cfg.seeds)
        log(f"  {system:9s} {rate:9.1f} req/s: {100 * p.slo_attainment:6.2f}% within SLO "
            f"({p.requests} requests, {p.realised_rps:.0f} req/s in the traces, {p.devices_used} devices, "
            f"{p.wall_s:.1f} wall s)")
        return p
    if cfg.rates is not None:
        return _entry(at_rates(evaluate, list(cfg.rates)))
    return _entry(search(evaluate, start, bisections=cfg.bisections))


def _searches(cfg: ClusterConfig, catalogue: Catalogue, devices: int, starts: dict[str, float], log):
    """(system, entry) of every system's search, as each ends: one after another, or with
    cfg.jobs > 1 in that many processes at once (the searches share nothing; each process
    logs its own lines as print does)."""
    if cfg.jobs <= 1 or len(starts) <= 1:
        for system, start in starts.items():
            yield system, search_system(cfg, catalogue, system, devices, start, log)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child of a process that ran OpenMP regions can hang in them
    with ProcessPoolExecutor(min(cfg.jobs, len(starts)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(search_system, cfg, catalogue, system, devices, start): system
                   for system, start in starts.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def _prior(path: Path | None) -> dict[str, dict[int, float]]:
    """system -> device count -> max rate found, from a previous report (or none)."""
    prior: dict[str, dict[int, float]] = {}
    if path is not None:
        for n, row in json.loads(Path(path).read_text())["devices"].items():
            for system, entry in row.items():
                if entry.get("max_rate_rps", 0) > 0:
                    prior.setdefault(system, {})[int(n)] = entry["max_rate_rps"]
    return prior


def _start(prior: dict[str, dict[int, float]], system: str, devices: int, default: float) -> float:
    """Where a search starts: the system's figure at the nearest device count already found,
    scaled by devices (so a search begins near its edge, not deep in overload, where a
    simulation costs the most), else `default`."""
    known = prior.get(system)
    if not known:
        return default
    nearest = min(known, key=lambda k: abs(math.log(k / devices)))
    return known[nearest] * devices / nearest


def _entry(found: SearchResult) -> dict:
    lo, hi = found.passed, found.failed
    return {"max_rate_rps": lo.rate_rps if lo else 0.0,
            "slo_attainment": lo.slo_attainment if lo else (hi.slo_attainment if hi else 0.0),
            "devices_used": lo.devices_used if lo else (hi.devices_used if hi else 0),
            "bracket": {"pass_rps": lo.rate_rps if lo else None, "pass_attainment": lo.slo_attainment if lo else None,
                        "fail_rps": hi.rate_rps if hi else None, "fail_attainment": hi.slo_attainment if hi else None},
            "per_session_at_max": lo.per_session if lo else {},
            "points": [{"rate_rps": p.rate_rps, "slo_attainment": p.slo_attainment, "requests": p.requests,
                        "realised_rps": round(p.realised_rps, 1), "devices_used": p.devices_used,
                        "per_session": {k: round(v, 5) for k, v in p.per_session.items()},
                        "wall_s": round(p.wall_s, 2)} for p in found.points]}


def _device(catalogue: Catalogue, profile_dir: Path) -> dict:
    p = next(iter(catalogue.profiles.values()))
    return {"type": sysmod.DEVICE_TYPE, "profiles": f"{profile_dir}/{PROFILE_FILE.format(model='MODEL')}",
            "machine": p.machine.name, "backend": p.machine.backend, "threads": p.machine.threads,
            "modelled": any(q.modelled for q in catalogue.profiles.values())}


def _workload(catalogue: Catalogue) -> dict:
    from cellserve.cluster import workload as w
    return {"sessions": [asdict(s) for s in catalogue.sessions],
            "arrivals": {"kind": "bursty (two-state MMPP per session)", "burst_factor": w.BURST_FACTOR,
                         "mean_burst_s": w.MEAN_BURST_S, "mean_calm_s": w.MEAN_CALM_S},
            "lengths": "WMT-like (bench/traces.py), mean 25 tokens"}


def _systems(options: sysmod.Options, catalogue: Catalogue) -> dict:
    from cellserve.cluster import ray_serve as r
    static_batch = sysmod.profiled_batch(catalogue, sysmod.STATIC_MAX_BATCH)
    ray_batch = sysmod.profiled_batch(catalogue, r.RAY_MAX_BATCH)
    return {"nexus": "Nexus plan (plan/nexus_pack.py) on cellular engines, least predicted finish, early drop",
            "static": f"devices split by load, padded batch {static_batch} / "
                      f"{sysmod.STATIC_BATCH_WAIT_S * 1e3:g} ms, two-choices routing",
            "clipper": f"devices split by load, padded, AIMD batch (+1, -10%), {sysmod.CLIPPER_BATCH_WAIT_S * 1e3:g} ms "
                       "wait, two-choices routing",
            "static-cellular": "ablation: static's groups (sized by cellular capacity) on nexus's cellular engines, "
                               "two-choices routing",
            "ray-serve": f"autoscaling target {r.RAY_TARGET_ONGOING:g} ongoing/replica between min replicas (load "
                         f"share of {sysmod.RAY_MIN_SHARE:g} of the pool) and max (load share of the pool + 1), delays x "
                         f"{options.ray_time_scale:.4g} (up {r.RAY_UPSCALE_DELAY_S * options.ray_time_scale:g} s, "
                         f"down {r.RAY_DOWNSCALE_DELAY_S * options.ray_time_scale:g} s), power of two on queue "
                         f"length, padded batch {ray_batch} / {r.RAY_BATCH_WAIT_S * 1e3:g} ms"}


def plot_cluster(report: dict, path: Path) -> None:
    """Grouped bars: per device count, each system's highest rate at >= 99% within SLO."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    counts = list(report["devices"])
    systems = [s for s in sysmod.SYSTEMS + sysmod.ABLATIONS if any(s in report["devices"][n] for n in counts)]
    width = 0.8 / max(len(systems), 1)
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(counts))]
        ys = [report["devices"][n].get(system, {}).get("max_rate_rps", 0.0) for n in counts]
        bars = axes.bar(xs, ys, width, label=system)
        axes.bar_label(bars, fmt="%.0f", fontsize="x-small")
    axes.set_xticks(range(len(counts)), [f"{n} devices" for n in counts])
    axes.set_ylabel("max total rate with >= 99% within SLO (req/s)")
    axes.set_title("simulated: Nexus planning vs baselines, bursty multi-model workload")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
