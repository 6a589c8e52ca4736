"""`cellserve serve --ray --core-allocation V.json ...`: each model served by a Ray worker of
its own, on cores the allocator (cluster/core_allocation.py) gives it and moves as load and
interference move (Veltair's cores shared by models, behind the server's frontends).

The driver, on a local Ray (the workers' processes are on this machine, whose /proc the
meter reads): one worker per served model; every period the allocator reads each model's
arrival rate (RayCore's RateMeter, counted as requests enter, before any shedding) and the
load others put on each core, and moves the workers whose cores changed
(EngineWorker.repin: between two of its engine's steps). Each model's tenant (its blocks'
step times at one and two threads) comes from its kernel-versions profile; its SLO is its
slo_ms (--slo-ms for zoo models).
"""

from __future__ import annotations

import os
import time

from cellserve.cluster.core_allocation import PERIOD_S, CoreAllocator, Decision, decide
from cellserve.plan.versions import VersionProfile

_REPIN_TIMEOUT_S = 30.0  # a repin waits for the worker's engine to finish the step in progress


class CoreAllocationError(ValueError):
    """--core-allocation's profiles do not fit the models served (which, and why, named)."""


def read_profiles(paths: list[str], models: list[str]) -> dict[str, VersionProfile]:
    """Each served model's kernel-versions profile; CoreAllocationError (VersionProfileError
    for a file that is no profile) naming what does not fit."""
    profiles: dict[str, VersionProfile] = {}
    for path in paths:
        p = VersionProfile.from_json(path)
        if p.model not in models:
            raise CoreAllocationError(f"--core-allocation {path}: a profile of {p.model!r}, which this server does "
                                      f"not serve (it serves {', '.join(sorted(models))})")
        if p.model in profiles:
            raise CoreAllocationError(f"--core-allocation {path}: a second profile of {p.model!r}")
        if "openmp-1" not in p.versions or "openmp-2" not in p.versions:
            raise CoreAllocationError(f"--core-allocation {path}: the allocator needs the steps of openmp-1 and "
                                      "openmp-2 (profile-versions on two threads or more)")
        profiles[p.model] = p
    missing = sorted(set(models) - set(profiles))
    if missing:
        raise CoreAllocationError(f"--core-allocation needs a kernel-versions profile of every model served; none "
                                  f"for {', '.join(missing)} (cellserve profile-versions --model M --json V.json)")
    return profiles


def tenants_of(served, models: list[str], profiles: dict[str, VersionProfile]):
    """The allocator's tenants, one per model in `models`' order: blocks from the profiles,
    SLOs from the models' slo_ms (CoreAllocationError naming models without one)."""
    from cellserve.bench.tenancy_sim import panels_of, tenants_from_profiles
    from cellserve.cluster.ray_replan import slos_ms

    try:
        graphs, slo_ms = slos_ms(served, "--core-allocation")
    except ValueError as exc:
        raise CoreAllocationError(str(exc)) from None
    panels = {}
    for m in models:
        panels.update(panels_of(graphs[m], profiles[m]))
    return tenants_from_profiles(tuple((m, slo_ms[m]) for m in models), profiles, panels)


class RayWorkerCores:
    """One Ray worker as the allocator sees it: its process, its cores, a way to move it. A
    dead worker is not moved (it keeps the cores it had, which the allocator then counts as
    taken until the worker's models are served elsewhere: a dead worker stays dead)."""

    def __init__(self, state, ray, cores: tuple[int, ...] = ()):
        self.state, self.ray, self.cores = state, ray, tuple(cores)

    @property
    def pid(self) -> int:
        return self.state.info.pid

    def repin(self, cores: tuple[int, ...]) -> None:
        if not self.state.alive:
            return
        self.cores = tuple(self.ray.get(self.state.handle.repin.remote(tuple(cores)), timeout=_REPIN_TIMEOUT_S))


def start_allocation(cluster, core, served, profiles: dict[str, VersionProfile], log=print,
                     period_s: float = PERIOD_S) -> CoreAllocator:
    """Place every worker (one per model) on its first cores, then keep the allocator running;
    `core.meter` counts arrivals per model from now. Returns the running allocator (`stop` it)."""
    from cellserve.cluster.ray_replan import RateMeter

    models = [w.info.models[0] for w in cluster.workers]
    tenants = tenants_of(served, models, profiles)
    cores = tuple(sorted(os.sched_getaffinity(0)))
    workers = [RayWorkerCores(w, cluster.ray) for w in cluster.workers]
    for w, c in zip(workers, decide(tenants, [0.0] * len(tenants), {c: 0.0 for c in cores})):
        w.repin(c)
    core.meter = RateMeter(period_s, time.monotonic())

    def rates(_now: float, _period: float) -> list[float]:
        # folded here, on the allocator's thread, while the frontends' loop counts arrivals:
        # an arrival counted as a window closes may fall in either window (a rate, not a tally)
        core.meter.fold(time.monotonic())
        measured = core.meter.rates()
        return [measured.get(m, 0.0) for m in models]

    def said(decision: Decision) -> None:
        if decision.moved:
            log("cellserve: cores: " + describe(cluster.workers, workers)
                + " (others' load per core: " + ", ".join(f"{c}: {x:.2f}" for c, x in decision.others.items()) + ")")

    log("cellserve: cores: " + describe(cluster.workers, workers))
    allocator = CoreAllocator(workers, tenants, cores, rates, period_s, on_decision=said,
                              on_error=lambda why: log(f"cellserve: cores: a period failed, the next tries again: {why}"))
    allocator.start()
    return allocator


def describe(states, workers: list[RayWorkerCores]) -> str:
    return ", ".join(f"{s.info.worker_id} ({s.info.models[0]}) on {','.join(map(str, w.cores))}"
                     for s, w in zip(states, workers))
