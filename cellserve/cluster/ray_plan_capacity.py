"""The planning half of `python -m cellserve.cluster.ray_plan_bench`: what a Nexus plan says
two one-core devices serve of a three-model mix (no Ray, no server: pure planning).

Contracts:
- `BENCH_SESSIONS`: the mix, one session per zoo model (its SLO and its share of the total
  rate). Every request of a session carries the session's SLO as its deadline.
- `mean_tokens(model)`: the mean request length the load generator offers that model (the
  traces' WMT-like lengths cut to the model's max_sequence_length), which the latency model
  is derived at, so the plan prices the requests the benchmark sends.
- `nexus_profiles(profiles)`: each model's l(b) on a device of one core, from its `cellserve
  profile` (run with one kernel thread) by `cellular_latency` at `mean_tokens`, as the cluster's
  planner derives it.
- `capacity(...)`: the highest total rate (within `tolerance`, by bisection on the planner
  alone) whose plan fits `devices` with nothing under `unserved`, and that plan. The plan's
  predicted goodput is what its devices carry: the sum of its assignments' rates
  (`planned_goodput`), equal to that total rate since nothing is unserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from cellserve.plan.nexus import DeviceProfiles, LatencyProfile, ModelEntry, Plan, Profiles, Session, Workload
from cellserve.plan.profile import ModelProfile

DEVICE_TYPE = "cpu-1core"  # one Ray worker: a bundle of one CPU, one kernel thread


@dataclass(frozen=True)
class BenchSession:
    model: str  # a zoo model
    slo_ms: float
    weight: float  # its share of the total rate (relative)


# lstm-512 carries most of the rate (the costliest per request); a tight gru and a loose decoder.
BENCH_SESSIONS: tuple[BenchSession, ...] = (
    BenchSession("gru-256", 50.0, 1.0),
    BenchSession("lstm-512", 100.0, 4.0),
    BenchSession("seq2seq-reverse", 200.0, 1.0),
)


def session_rates(sessions: tuple[BenchSession, ...], total_rps: float) -> dict[str, float]:
    """Each session's rate (by model) when the total is `total_rps`, shared by weight."""
    weight = sum(s.weight for s in sessions)
    return {s.model: total_rps * s.weight / weight for s in sessions}


@lru_cache(maxsize=None)
def max_length(model: str) -> int:
    from cellserve.graph import zoo

    return zoo.load(model).max_sequence_length


@lru_cache(maxsize=None)
def mean_tokens(model: str, samples: int = 20000) -> float:
    """The mean length of the requests the benchmark offers `model` (a fixed sample of the
    traces' length distribution, cut as the traces are)."""
    from cellserve.bench.traces import sentence_lengths

    lengths = sentence_lengths(np.random.default_rng(0), samples)
    return float(np.minimum(lengths, max_length(model)).mean())


def nexus_profiles(profiles: dict[str, ModelProfile], margin: float = 1.0, worker_ms: float = 0.0,
                   core_share: float = 1.0) -> Profiles:
    """Nexus latency profiles (batch -> ms) of each model on a one-core device. Corrections
    (all off by default): `worker_ms`, CPU a worker spends per request beyond the engine's
    profile (its data plane, measured), adds b * worker_ms to l(b); `core_share`, the part of
    a core the worker gets, divides l(b) (a worker on half a core takes twice as long)."""
    from cellserve.plan.nexus_cellular import cellular_latency

    if not (worker_ms >= 0 and 0 < core_share <= 1):
        raise ValueError(f"worker_ms must be >= 0 and core_share in (0, 1], got {worker_ms}, {core_share}")
    entries = {}
    for m, p in profiles.items():
        base = cellular_latency(p, mean_tokens(m), margin=margin)
        entries[m] = ModelEntry(base if worker_ms == 0 and core_share == 1 else
                                LatencyProfile(tuple((b, (ms + b * worker_ms) / core_share) for b, ms in base.points)))
    return Profiles({DEVICE_TYPE: DeviceProfiles(entries)})


@dataclass(frozen=True)
class SharedCores:
    """The devices' cores are shared with the serving path outside the workers (the driver,
    the load generator, Ray's daemons): `frontend_ms` of CPU per request, measured, on a
    machine of `cores` cores. At a total rate R the workers share what is left, each
    min(1, (cores - R * frontend_ms / 1000) / devices) of a core; `worker_ms` as in
    nexus_profiles."""

    cores: float
    frontend_ms: float = 0.0
    worker_ms: float = 0.0

    def share(self, total_rps: float, devices: int) -> float:
        return min(1.0, (self.cores - total_rps * self.frontend_ms / 1e3) / devices)


def plan_at(total_rps: float, profiles: Profiles, sessions: tuple[BenchSession, ...], devices: int) -> Plan:
    from cellserve.plan.nexus_pack import plan

    rates = session_rates(sessions, total_rps)
    workload = Workload(DEVICE_TYPE, devices, tuple(Session(s.model, s.model, s.slo_ms, rates[s.model])
                                                   for s in sessions))
    return plan(workload, profiles)


def planned_goodput(plan: Plan) -> float:
    """What the plan's devices carry, requests/s: the sum of every assignment's rate."""
    return sum(a.rate_rps for d in plan.devices for a in d.sessions)


def capacity(profiles, sessions: tuple[BenchSession, ...], devices: int,
             tolerance: float = 0.002) -> tuple[float, Plan]:
    """The highest total rate whose plan leaves nothing unserved on `devices`, and its plan.
    `profiles`: Profiles, or a function of the total rate giving them (when the devices'
    share of a core depends on the rate: SharedCores); either way the plan's rate must fit."""
    at = profiles if callable(profiles) else (lambda _rate: profiles)

    def fits(rate: float) -> Plan | None:
        try:
            p = plan_at(rate, at(rate), sessions, devices)
        except ValueError:  # no share of a core left at this rate
            return None
        return None if p.unserved else p

    lo, hi = 1.0, 2.0
    best = fits(lo)
    if best is None:
        raise ValueError(f"{devices} device(s) cannot serve even 1 request/s of this mix")
    while (p := fits(hi)) is not None:
        lo, hi, best = hi, hi * 2, p
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        p = fits(mid)
        if p is None:
            hi = mid
        else:
            lo, best = mid, p
    return lo, best


def scaled(plan: Plan, factor: float) -> Plan:
    """The same devices and sessions with every assignment's rate times `factor`: what the
    benchmark serves so that the server's rate gates (ray_plan.from_plan) shed nothing below
    factor x the planned rate, and the ramp measures the layout's capacity, not the gates'."""
    return replace(plan, devices=tuple(replace(d, sessions=tuple(replace(a, rate_rps=a.rate_rps * factor)
                                                                   for a in d.sessions))
                                       for d in plan.devices))
