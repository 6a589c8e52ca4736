"""`cellserve bench tenancy-sim`: many models sharing a large CPU, in virtual time (simulated).

What is modelled (say so wherever a figure is shown): a CPU of `cores` cores that nothing else
uses; each tenant's blocks (cell types) step as cellular batching steps them (every lane of a
block advances one token per step, up to `max_batch` lanes, lanes join and leave between steps);
a step of a block on c cores takes the time plan/tenancy.py models from the block's 1- and
2-thread steps measured by `cellserve profile-versions` (Amdahl's law fitted per batch size,
extrapolated past two threads); nothing else costs time (no Python between steps, no cache or
memory-bandwidth contention between units). A request past its deadline is dropped at its next
step (as the engine's drop check does) and counts as missed.

Policies:
- "round-robin": today's engine on the whole CPU: one unit, every block in turn, each step on
  all the cores (as many as the block has panels);
- "model-wise": each tenant its own unit, cores per tenant from plan/tenancy.py's allocator;
- "layer-block" (Veltair): each block its own unit, cores per block from the same allocator;
both re-allocated every `period_s` from the arrival rates measured over the last periods.
Arrivals: each tenant its own burst path (bursts 4x the calm rate), so load moves between them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellserve.bench.traces import burst_path, modulated_arrivals, sentence_lengths
from cellserve.plan.json_io import check_output, write_json
from cellserve.plan.tenancy import Block, Tenant, Unit, allocate, capacity_rps, units_of
from cellserve.plan.versions import VersionProfile

SCHEMA_VERSION = 1
POLICIES = ("round-robin", "model-wise", "layer-block")
RATE_SMOOTHING = 0.5  # weight of the last period's measured rate in the allocator's estimate


@dataclass
class SimTenancyConfig:
    tenants: tuple[tuple[str, float], ...]  # (model, SLO in ms) per tenant; a model may appear more than once
    cores: int = 32
    load: float = 0.6
    seconds: float = 20.0
    period_s: float = 1.0
    max_batch: int = 64
    burst_factor: float = 4.0
    seed: int = 0
    json: Path | None = None

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("bench tenancy-sim needs at least one tenant (MODEL:SLO_MS)")
        if any(not slo > 0 for _, slo in self.tenants):
            raise ValueError("every tenant's SLO must be > 0 ms")
        if self.cores < 1 or not self.load > 0 or not self.seconds > 0 or not self.period_s > 0:
            raise ValueError("--cores >= 1, and --load, --seconds and --period must be > 0")
        if self.max_batch < 1 or not self.burst_factor >= 1:
            raise ValueError("--max-batch >= 1 and --burst-factor >= 1")


def panels_of(model, profile: VersionProfile) -> dict[str, int]:
    """Per cell type of `profile`, the panels of hidden units of its widest layer (the most
    threads its fused step can use), from the model served stacked or not, as profiled."""
    from cellserve.graph.model import GraphDecoder, RecurrentLayer, layers_of
    from cellserve.graph.stacking import stack_layers
    from cellserve.kernels.cell import PANEL_UNITS

    for served in (stack_layers(model), model):
        panels = {}
        for step in served.recurrent_steps():
            if isinstance(step, GraphDecoder):
                continue
            n = max(-(-layer.hidden // PANEL_UNITS[layer.kind]) for layer in layers_of(step))
            directions = len(step.directions) if isinstance(step, RecurrentLayer) else 0
            names = [f"{step.name}/{d}" for d in range(directions)] if directions else [step.name]
            panels.update({f"{profile.model}/{name}": n for name in names})
        if set(profile.step_s) <= set(panels):
            return panels
    raise ValueError(f"the profile of {profile.model!r} names cell types {sorted(profile.step_s)} that the model "
                     "has neither stacked nor unstacked")


def tenants_from_profiles(tenants_slo: tuple[tuple[str, float], ...], profiles: dict[str, VersionProfile],
                          panels: dict[str, int]) -> list[Tenant]:
    """Each tenant's blocks, given (model, SLO in ms) per tenant, from its model's
    kernel-versions profile: the steady step times of openmp-1 and openmp-2 with no
    interference (the profile's first level). `panels`: per cell type, how many panels of
    hidden units it has (the most threads a step can use)."""
    tenants = []
    mean_tokens = float(np.mean(sentence_lengths(np.random.default_rng(12345), 100_000)))
    for i, (model, slo_ms) in enumerate(tenants_slo):
        p = profiles.get(model)
        if p is None:
            raise ValueError(f"tenant {model!r} has no kernel-versions profile (give --profile for it)")
        if "openmp-1" not in p.versions or "openmp-2" not in p.versions:
            raise ValueError(f"the profile of {model!r} lacks openmp-1 or openmp-2: profile it on two threads")
        blocks = tuple(Block(ct, p.batches, by_version["openmp-1"]["steady"][0], by_version["openmp-2"]["steady"][0],
                             panels.get(ct, 1024))
                       for ct, by_version in p.step_s.items())
        tenants.append(Tenant(f"{model}#{i}", blocks, slo_ms / 1e3, mean_tokens))
    return tenants


@dataclass
class _Lane:
    tenant: int
    arrival: float
    deadline: float
    tokens: int
    block: int = 0
    left: int = 0


@dataclass
class _Unit:
    members: list[tuple[int, int]]  # (tenant, block) it steps, in turn
    cores: int
    queues: dict[tuple[int, int], deque] = field(default_factory=dict)
    turn: int = 0
    busy: bool = False
    batch: list = field(default_factory=list)
    steps: int = 0
    busy_s: float = 0.0


def simulate(tenants: list[Tenant], policy: str, cores: int, arrivals: list[np.ndarray], lengths: list[np.ndarray],
             mean_rates: list[float], period_s: float, max_batch: int) -> dict:
    """Run one policy over the given arrivals (seconds) and lengths (tokens) per tenant."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy == "round-robin":
        members = [(i, k) for i, t in enumerate(tenants) for k in range(len(t.blocks))]
        units = [_Unit(members, cores)]
        allocated: list[Unit] = []
    else:
        allocated = units_of(tenants, "model" if policy == "model-wise" else "block")
        given = allocate(tenants, allocated, mean_rates, cores)
        units = [_Unit([(u.tenant, k) for k in u.blocks], c) for u, c in zip(allocated, given)]
    where = {m: u for u in units for m in u.members}
    for u in units:
        u.queues = {m: deque() for m in u.members}
    events: list = []
    seq = itertools.count()
    for i, (times, lens) in enumerate(zip(arrivals, lengths)):
        for t, n in zip(times, lens):
            heapq.heappush(events, (float(t), next(seq), "arrive", (i, int(n))))
    horizon = max((float(a[-1]) for a in arrivals if len(a)), default=0.0)
    if allocated:
        heapq.heappush(events, (period_s, next(seq), "period", None))
    per_tenant = [{"offered": 0, "within_slo": 0, "late": 0, "dropped": 0} for _ in tenants]
    counted = [0] * len(tenants)  # arrivals in the current period
    rates = list(mean_rates)
    history = []
    costs: dict[tuple, float] = {}  # (member, batch, cores) -> modelled step seconds

    def start(u: _Unit, now: float) -> None:
        """Step the next of the unit's blocks that has lanes, taking lanes from the front of
        its queue and dropping those past their deadline on the way (a lane further back is
        dropped when it comes to the front: it runs no step before, so nothing differs)."""
        for j in range(len(u.members)):
            m = u.members[(u.turn + j) % len(u.members)]
            q = u.queues[m]
            batch = u.batch
            while q and len(batch) < max_batch:
                lane = q.popleft()
                if lane.deadline <= now:
                    per_tenant[lane.tenant]["dropped"] += 1
                else:
                    batch.append(lane)
            if batch:
                u.turn = (u.turn + j + 1) % len(u.members)
                key = (m, len(batch), u.cores)
                duration = costs.get(key)
                if duration is None:
                    duration = costs[key] = tenants[m[0]].blocks[m[1]].step_s(len(batch), u.cores)
                u.busy, u.steps, u.busy_s = True, u.steps + 1, u.busy_s + duration
                heapq.heappush(events, (now + duration, next(seq), "done", (u, m)))
                return
        u.busy = False

    def enqueue(lane: _Lane, now: float) -> None:
        lane.left = lane.tokens
        u = where[(lane.tenant, lane.block)]
        u.queues[(lane.tenant, lane.block)].append(lane)
        if not u.busy:
            start(u, now)

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            i, n = data
            per_tenant[i]["offered"] += 1
            counted[i] += 1
            enqueue(_Lane(i, now, now + tenants[i].slo_s, n), now)
        elif kind == "done":
            u, m = data
            moved = []
            for lane in u.batch:
                lane.left -= 1
                if lane.left > 0:
                    moved.append(lane)
                elif lane.block + 1 < len(tenants[lane.tenant].blocks):
                    lane.block += 1
                    enqueue(lane, now)
                else:
                    latency = now - lane.arrival
                    per_tenant[lane.tenant]["within_slo" if latency <= tenants[lane.tenant].slo_s else "late"] += 1
            u.queues[m].extendleft(reversed(moved))  # lanes still in the block keep their place at the front
            u.batch = []
            start(u, now)
        elif kind == "period":
            measured = [c / period_s for c in counted]
            rates = [r + RATE_SMOOTHING * (x - r) for r, x in zip(rates, measured)]
            counted = [0] * len(tenants)
            given = allocate(tenants, allocated, rates, cores)
            for u, c in zip(units, given):
                u.cores = c
            history.append([int(c) for c in given])
            if now + period_s <= horizon:
                heapq.heappush(events, (now + period_s, next(seq), "period", None))
    offered = sum(t["offered"] for t in per_tenant)
    good = sum(t["within_slo"] for t in per_tenant)
    return {"policy": policy, "offered": offered, "within_slo": good, "share": good / offered if offered else 0.0,
            "tenants": {t.name: r for t, r in zip(tenants, per_tenant)},
            "units": [{"members": [f"{tenants[i].name}/{tenants[i].blocks[k].name}" for i, k in u.members],
                       "steps": u.steps, "busy_s": u.busy_s,
                       "mean_cores": (float(np.mean([h[j] for h in history])) if history else u.cores)}
                      for j, u in enumerate(units)]}


def run(config: SimTenancyConfig, profiles: dict[str, VersionProfile], panels: dict[str, int], log=print) -> dict:
    if config.json is not None:
        check_output(config.json)
    tenants = tenants_from_profiles(config.tenants, profiles, panels)
    capacity = capacity_rps(tenants, config.cores)
    rate = config.load * capacity / len(tenants)
    rng = np.random.default_rng(config.seed)
    arrivals, lengths = [], []
    for _ in tenants:  # each tenant its own bursts: load moves between them
        edges, multipliers = burst_path(rng, config.seconds, config.burst_factor, mean_burst_s=2.0, mean_calm_s=6.0)
        times = modulated_arrivals(rng, rate, edges, multipliers)
        arrivals.append(times)
        lengths.append(sentence_lengths(rng, len(times)))
    results = []
    for policy in POLICIES:
        r = simulate(tenants, policy, config.cores, arrivals, lengths, [rate] * len(tenants), config.period_s,
                     config.max_batch)
        log(f"{policy:12s} (simulated): {r['within_slo']}/{r['offered']} within SLO ({r['share']:.1%})")
        results.append(r)
    today = results[0]["within_slo"]
    report = {"schema_version": SCHEMA_VERSION, "benchmark": "tenancy-sim", "simulated": True,
              "modelled": "step time on c cores by Amdahl's law fitted to the profiles' 1- and 2-thread steps "
                          "(extrapolated past 2); no cost between steps; no contention between units",
              "config": {**asdict(config), "json": str(config.json) if config.json else None},
              "capacity_rps": capacity, "rate_per_tenant_rps": rate,
              "policies": results,
              "over_round_robin": {r["policy"]: (r["within_slo"] / today if today else None) for r in results}}
    if config.json is not None:
        write_json(report, config.json)
    return report


def table(report: dict) -> str:
    tenants = list(report["policies"][0]["tenants"])
    lines = ["| policy (simulated) | within SLO | over round-robin | " + " | ".join(tenants) + " |",
             "|---|---:|---:|" + "---:|" * len(tenants)]
    for r in report["policies"]:
        ratio = report["over_round_robin"][r["policy"]]
        cells = [f"{t['within_slo']}/{t['offered']}" for t in r["tenants"].values()]
        lines.append(f"| {r['policy']} | {r['within_slo']}/{r['offered']} ({r['share']:.1%}) | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
