"""A small discrete-event simulation of accuracy scaling: devices that batch by Proteus's rule,
a controller that re-plans every period on measured demand, requests routed by weighted
random choice. Everything in it is modelled (virtual time, latencies from the problem's
latency profiles); no model runs.

Devices: each runs the variant the current plan gives it, one batch at a time, a batch of b
taking the profile's l(b) exactly; allowed batch sizes are the profiled ones up to the
variant's capacity batch (the best under half the SLO). A device told to host another variant
finishes the batch it runs, then loads the new one for `switch_s` (modelled), during which it
runs nothing; requests queued on it for a family it no longer hosts are routed again by the
new plan. A request is *on time* when its batch finishes by its deadline (arrival + its
family's SLO); it *violates* the SLO when it finishes late, is dropped by the batching rule,
or arrives while the plan routes nothing of its family.

Why not cellserve's simulator (sim/): it runs real cellular engines with profiled cell steps,
while Proteus's devices run whole batches of one variant by the rule above; and plan/ must not
import the engine. A server-side evaluation (`serve --accuracy-scaling`) would run this
controller over sim/'s engines, one engine per device, with a router that asks the
controller (sim/router.py's interface).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, field

from cellserve.plan.accuracy import AccuracyProblem
from cellserve.plan.accuracy_batching import decide_batch
from cellserve.plan.accuracy_control import PERIOD_S, AccuracyController, Planner

_DONE, _WAKE, _READY, _TICK = 0, 1, 2, 3


def mmpp_trace(base_rps: dict[str, float], duration_s: float, seed: int, burst: float = 2.0,
               mean_calm_s: float = 60.0, mean_burst_s: float = 30.0) -> list[tuple[float, str]]:
    """Arrivals (time, family), sorted: per family an independent two-state Markov-modulated
    Poisson process, at `base_rps` when calm and `burst` x that in a burst, each state held
    for an exponential time (means `mean_calm_s`, `mean_burst_s`); every family starts calm."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    for family, rate in base_rps.items():
        t, bursting = 0.0, False
        while t < duration_s:
            end = min(duration_s, t + rng.expovariate(1.0 / (mean_burst_s if bursting else mean_calm_s)))
            r = rate * (burst if bursting else 1.0)
            if r > 0:
                t = t + rng.expovariate(r)
                while t < end:
                    out.append((t, family))
                    t += rng.expovariate(r)
            t, bursting = end, not bursting
    out.sort()
    return out


@dataclass
class _Device:
    id: str
    type: str
    variant: str | None = None
    pending: str | None | bool = False  # False: no switch pending; else the variant to load
    latency: dict[int, float] = field(default_factory=dict)  # allowed batch -> seconds
    queue: deque = field(default_factory=deque)  # (deadline, family)
    busy: bool = False
    ready_at: float = 0.0
    token: int = 0
    running: list = field(default_factory=list)


@dataclass
class SimResult:
    """What one simulated run measured. Accuracies are over requests answered on time;
    `accuracy_drop` is the mean, over those, of (the family's best accuracy - the accuracy
    that served it)."""

    system: str
    requests: int = 0
    on_time: int = 0
    late: int = 0
    dropped: int = 0
    unroutable: int = 0
    accuracy_sum: float = 0.0
    drop_sum: float = 0.0
    plans: int = 0
    switches: int = 0
    plan_s: float = 0.0  # wall time spent planning

    @property
    def violations(self) -> int:
        return self.late + self.dropped + self.unroutable

    def to_dict(self) -> dict:
        n = max(self.on_time, 1)
        return {"system": self.system, "requests": self.requests, "on_time": self.on_time, "late": self.late,
                "dropped": self.dropped, "unroutable": self.unroutable, "violations": self.violations,
                "violation_ratio": self.violations / max(self.requests, 1),
                "effective_accuracy": self.accuracy_sum / n, "accuracy_drop": self.drop_sum / n,
                "plans": self.plans, "switches": self.switches, "plan_s_total": self.plan_s}


def _latency(problem: AccuracyProblem, device_type: str, variant: str | None) -> dict[int, float]:
    if variant is None:
        return {}
    best = problem.capacity_batch(device_type, variant)
    points = problem.latency_ms.get(device_type, {}).get(variant)
    if best is None or points is None:
        raise ValueError(f"the simulation needs a latency profile of {variant!r} on {device_type!r} "
                         "with a batch under half its family's SLO")
    return {b: ms / 1000.0 for b, ms in points.points if b <= best[0]}


def simulate(problem: AccuracyProblem, trace: list[tuple[float, str]], planner: Planner, system: str,
             seed: int = 0, period_s: float = PERIOD_S, switch_s: float = 0.5,
             estimate: str = "peak") -> SimResult:
    """Run `trace` (sorted (time, family)) through devices planned by `planner`; the first plan
    is made on the problem's own demand at time 0, the next every `period_s` on measured
    demand (`estimate`: the controller's "peak" or "mean"), until the trace's last arrival;
    then the queues drain."""
    now = [0.0]
    res = SimResult(system)
    slo = {n: f.slo_ms / 1000.0 for n, f in problem.families.items()}
    acc = {v.name: v.accuracy for f in problem.families.values() for v in f.variants}
    fam_of = {v.name: f.name for f in problem.families.values() for v in f.variants}
    best = {n: f.best().accuracy for n, f in problem.families.items()}

    def timed_planner(p, prev):
        t0 = time.perf_counter()
        try:
            return planner(p, prev)
        finally:
            res.plan_s += time.perf_counter() - t0

    ctl = AccuracyController(problem, timed_planner, lambda: now[0], random.Random(seed), period_s, estimate)
    devs = {d.id: _Device(d.id, d.type) for d in problem.devices}
    for d in devs.values():
        d.variant = ctl.plan.placement.get(d.id)
        d.latency = _latency(problem, d.type, d.variant)
    events: list = []
    seq = 0

    def push(t: float, kind: int, dev: str = "", token: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, dev, token))

    def enqueue(deadline: float, family: str) -> None:
        target = ctl.route(family)
        if target is None:
            res.unroutable += 1
            return
        d = devs[target]
        d.queue.append((deadline, family))
        try_run(d)

    def try_run(d: _Device) -> None:
        t = now[0]
        if d.busy or t < d.ready_at or d.variant is None or not d.queue:
            return
        decision = decide_batch(t, _Head(d.queue), d.latency)
        for _ in range(decision.drop):
            d.queue.popleft()
            res.dropped += 1
        d.token += 1
        if decision.run:
            d.running = [d.queue.popleft() for _ in range(decision.run)]
            d.busy = True
            push(t + d.latency[decision.batch], _DONE, d.id)
        elif decision.wake_at is not None:
            push(decision.wake_at, _WAKE, d.id, d.token)

    def switch(d: _Device) -> None:
        new, d.pending = d.pending, False
        d.variant, d.latency = new, _latency(problem, d.type, new)
        d.ready_at = now[0] + switch_s
        res.switches += 1
        keep = [x for x in d.queue if new is not None and fam_of[new] == x[1]]
        moved = [x for x in d.queue if not (new is not None and fam_of[new] == x[1])]
        d.queue = deque(keep)
        for deadline, family in moved:
            enqueue(deadline, family)
        push(d.ready_at, _READY, d.id)

    def apply_plan() -> None:
        for d in devs.values():
            new = ctl.plan.placement.get(d.id)
            target = d.pending if d.pending is not False else d.variant
            if new != target:
                d.pending = new if new != d.variant else False
                if d.pending is not False and not d.busy:
                    switch(d)

    last = trace[-1][0] if trace else 0.0
    k = 1
    while k * period_s <= last:
        push(k * period_s, _TICK)
        k += 1
    i = 0
    while i < len(trace) or events:
        if events and (i >= len(trace) or events[0][0] <= trace[i][0]):
            t, _, kind, dev, token = heapq.heappop(events)
            now[0] = t
            if kind == _TICK:
                if ctl.tick() is not None:
                    apply_plan()
                continue
            d = devs[dev]
            if kind == _DONE:
                for deadline, family in d.running:
                    if t <= deadline + 1e-9:
                        res.on_time += 1
                        res.accuracy_sum += acc[d.variant]
                        res.drop_sum += best[family] - acc[d.variant]
                    else:
                        res.late += 1
                d.running, d.busy = [], False
                if d.pending is not False:
                    switch(d)
            elif kind == _WAKE and token != d.token:
                continue
            try_run(d)
        else:
            t, family = trace[i]
            i += 1
            now[0] = t
            res.requests += 1
            ctl.observe(family)
            enqueue(t + slo[family], family)
    res.plans = ctl.plans
    return res


class _Head:
    """A queue's deadlines as a sequence without copying it: decide_batch reads only the first
    few (the drops and the head) and the length."""

    def __init__(self, queue: deque) -> None:
        self._q = queue

    def __len__(self) -> int:
        return len(self._q)

    def __getitem__(self, i: int) -> float:
        return self._q[i][0]
