"""A pipeline plan's data plane, simulated: PPipe's reservation-based adaptive batching run
over Poisson arrivals in virtual time, so that a plan's throughput can be checked against
what its devices sustain within the SLO (docs/pipelines.md, "The data plane").

Each model has one queue in front of its pipelines (the plan gives pipelines their own
devices, so models never meet). Whenever a request arrives or a timer set below fires, the
data plane looks at the queue's head:

1. **An offer per pipeline**: a batch of b reserves, stage by stage, the device of that stage
   that frees first, each stage starting once the previous one ended and the hand-over
   (link latency + b x out_mb x ms_per_mb) is done; the offer's completion is when its last
   stage ends. The pipeline chosen is the one whose offer at its planned batch waits least
   for its devices (the earliest completion breaks ties).
2. **A head seen for the first time** must fit a batch of at least `shrink` (95%) of the
   planned one within its deadline; else it is dropped (answered as a miss). Once it passed,
   it takes the largest batch, down to 1, that completes by its deadline (none: dropped).
3. **Enough queued** for that batch: the batch is dispatched (its reservations kept) and
   every request in it completes at the offer's completion, within its deadline by
   construction. **Too few**: the plane waits for more, until the moment a batch one larger
   than the queue would miss the head's deadline (a timer), unless arrivals fill it first.

Latencies at a batch the profile does not give (a shrunk batch) are interpolated linearly
between the nearest batches it gives (at the smallest and largest, theirs). Transfers are
pure delays: no link is shared or reserved (the planner's model; PPipe's simulator also
reserves each server's uplink and downlink). Every figure here is **simulated**.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cellserve.plan.pipeline import (Block, Link, ModelBlocks, ModelPlan, Pipeline, PipelineError, PipelinePlan,
                                     transfer_ms)

SHRINK = 0.95  # PPipe's: a batch may shrink to 95% of the planned one before the head is dropped
TARGET = 0.99  # the attainment a plan's throughput is held to
_TICK_MS = 1e-6  # a timer fires this long after the moment it waits for, so that the moment has passed


@dataclass(frozen=True)
class ModelRun:
    """One model's simulated run: requests offered (arriving after the warm-up), answered
    within the SLO, dropped; their latencies; the mean batch dispatched. Simulated figures."""

    rate_rps: float
    offered: int
    served: int
    dropped: int
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float
    latencies_ms: tuple[float, ...] = field(default=(), repr=False)  # the served ones', in dispatch order

    @property
    def attainment(self) -> float:
        return self.served / self.offered if self.offered else 1.0

    def to_dict(self, seconds: float) -> dict:
        return {"rate_rps": self.rate_rps, "offered": self.offered, "served": self.served, "dropped": self.dropped,
                "attainment": self.attainment, "goodput_rps": self.served / seconds if seconds > 0 else 0.0,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "mean_batch": self.mean_batch}


def block_ms(block: Block, device_type: str, batch: int) -> float:
    """A block's latency at any batch: the profile's, else linear between its neighbours."""
    table = block.latency_ms.get(device_type)
    if not table:
        raise PipelineError(f"a block has no latencies on device type {device_type!r}")
    if batch in table:
        return table[batch]
    sizes = sorted(table)
    i = bisect.bisect_left(sizes, batch)
    if i == 0:
        return table[sizes[0]]
    if i == len(sizes):
        return table[sizes[-1]]
    lo, hi = sizes[i - 1], sizes[i]
    return table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)


class _Pipe:
    """One pipeline's devices (per stage, when each is next free) and its costs by batch."""

    def __init__(self, model: ModelBlocks, pipeline: Pipeline, link: Link):
        self.batch = pipeline.batch
        self.free = [[0.0] * stage.devices for stage in pipeline.stages]
        self._stages = pipeline.stages
        self._model, self._link = model, link
        self._costs: dict[int, list[tuple[float, float]]] = {}
        # tracked batches (ReservationPlane.observe): seq -> per stage [device, ready, end, ms, before]
        self.outstanding: dict[int, list[list]] = {}

    def costs(self, batch: int) -> list[tuple[float, float]]:
        """Per stage (hand-over before it, its latency) at `batch`, in ms."""
        found = self._costs.get(batch)
        if found is None:
            found = []
            for i, stage in enumerate(self._stages):
                before = transfer_ms(self._model, self._stages[i - 1].last, batch, self._link) if i else 0.0
                ms = sum(block_ms(b, stage.device_type, batch) for b in self._model.blocks[stage.first:stage.last + 1])
                found.append((before, ms))
            self._costs[batch] = found
        return found

    def offer(self, batch: int, now: float) -> tuple[float, float, list[tuple[int, float, float]]]:
        """(completion, time spent waiting for devices, [(device, ready, end)] per stage: when
        the batch could start there and when it is predicted to end)."""
        t, work, taken = now, 0.0, []
        for free, (before, ms) in zip(self.free, self.costs(batch)):
            t += before
            device = min(range(len(free)), key=free.__getitem__)
            ready = t
            t = max(t, free[device]) + ms
            work += before + ms
            taken.append((device, ready, t))
        return t, t - now - work, taken

    def keep(self, taken: list[tuple[int, float, float]], batch: int, seq: int | None = None) -> None:
        for free, (device, _, end) in zip(self.free, taken):
            free[device] = end
        if seq is not None:  # tracked: its reservations can be moved once a batch's real ends are known
            self.outstanding[seq] = [[device, ready, end, ms, before] for (device, ready, end), (before, ms)
                                     in zip(taken, self.costs(batch))]

    def observe(self, seq: int, ends: tuple[float, ...]) -> None:
        """Batch `seq` ended on its devices at `ends` (per stage): the reservations still
        outstanding are moved as they now follow (each device runs its batches in the order
        sent, each taking its predicted time, a stage starting once the previous one ended
        and handed over), and each device's free time with them."""
        done = self.outstanding.pop(seq, None)
        if done is None:
            return
        device_end = {(k, entry[0]): end for k, (entry, end) in enumerate(zip(done, ends))}
        for later, stages in self.outstanding.items():  # in the order sent
            if later < seq:  # sent before it: ran before it on any device they share
                continue
            previous = None
            for k, entry in enumerate(stages):
                device, ready, _, ms, before = entry
                if previous is not None:
                    ready = previous + before
                start = max(ready, device_end.get((k, device), ready))
                entry[1], entry[2] = ready, start + ms
                device_end[(k, device)] = previous = entry[2]
        for (k, device), end in device_end.items():
            self.free[k][device] = end


class ReservationPlane:
    """PPipe's reservation-based adaptive batching for one model's queue, as the module's
    docstring states it, on whatever clock the caller keeps (virtual here, a real one in
    cluster/pipeline_real.py): `arrive` queues a request, `look(now, send, drop)` dispatches
    what the rules allow at `now` and returns when to look again though nothing arrives
    (None: not until the next arrival). Times are in ms.

    `send(dispatch)` gets each batch as it goes; `drop(arrival, item)` each request dropped.
    A dispatch's devices are reserved until its predicted stage ends (PPipe's reservations are
    its profile's). With `track`, `observe(dispatch, ends)` says when a batch really ended on
    each stage, and the reservations made after it move to follow: a stage running late no
    longer takes batches it cannot finish in time (their heads are dropped instead of served
    late), and one running early frees its device sooner. The simulator's batches end as
    predicted, so it does not track."""

    def __init__(self, model: ModelBlocks, plan: ModelPlan, link: Link, shrink: float = SHRINK,
                 track: bool = False):
        if not plan.pipelines:
            raise PipelineError("the model's plan has no pipeline")
        self.pipes = [_Pipe(model, p, link) for p in plan.pipelines]
        self.slo_ms, self.shrink = model.slo_ms, shrink
        self.queue: deque[tuple[float, object]] = deque()  # (arrival, item), in order
        self._taken = 0  # requests that have left the queue: the head is request number `_taken`
        self._track, self._seq = track, 0
        self._passed_head = -1  # the number of the head that passed its first look

    def arrive(self, arrival_ms: float, item: object = None) -> None:
        if self.queue and arrival_ms < self.queue[-1][0]:
            raise PipelineError(f"arrivals must come in order: {arrival_ms} after {self.queue[-1][0]}")
        self.queue.append((arrival_ms, item))

    def look(self, now: float, send, drop) -> float | None:
        """Dispatch until the queue is empty or waits; the next look's time, if any."""
        queue = self.queue
        while queue:
            deadline = queue[0][0] + self.slo_ms
            index, pipe = min(enumerate(self.pipes), key=lambda ip: _rank(ip[1].offer(ip[1].batch, now)))
            if self._passed_head != self._taken:
                low = max(1, math.ceil(self.shrink * pipe.batch - 1e-9))
                if not _largest(pipe, now, deadline, low):
                    self._drop(drop)
                    continue
                self._passed_head = self._taken
            batch = _largest(pipe, now, deadline, 1)
            if not batch:
                self._drop(drop)
                continue
            if len(queue) >= batch:
                self._send(index, batch, now, send)
                continue
            # Too few queued: wait until a batch one larger than the queue would miss the head's
            # deadline. Its completion, as a function of when it starts, is max(t + work, what
            # the devices' reservations impose), so that moment is the deadline less its work.
            work = sum(before + ms for before, ms in pipe.costs(len(queue) + 1))
            if deadline - work > now:
                return deadline - work + _TICK_MS
            # That moment has passed (a latency table that falls with the batch: one more row
            # costs more than the batch planned): waiting gains nothing, send what is queued
            batch = next((b for b in range(len(queue), 0, -1) if pipe.offer(b, now)[0] <= deadline), 0)
            if not batch:
                self._drop(drop)
                continue
            self._send(index, batch, now, send)
        return None

    def observe(self, dispatch: Dispatch, ends_ms: tuple[float, ...]) -> None:
        """A tracked batch's real end on each stage (ms, this plane's clock)."""
        if not self._track:
            raise PipelineError("observe needs a plane made with track=True")
        if len(ends_ms) != len(dispatch.devices):
            raise PipelineError(f"a batch of {len(dispatch.devices)} stages observed with {len(ends_ms)} ends")
        self.pipes[dispatch.pipeline].observe(dispatch.seq, tuple(ends_ms))

    def _drop(self, drop) -> None:
        self._taken += 1
        drop(*self.queue.popleft())

    def _send(self, index: int, batch: int, now: float, send) -> None:
        pipe = self.pipes[index]
        completion, _, reserved = pipe.offer(batch, now)
        seq, self._seq = self._seq, self._seq + 1
        pipe.keep(reserved, batch, seq if self._track else None)
        rows = [self.queue.popleft() for _ in range(batch)]
        self._taken += batch
        send(Dispatch(index, tuple(device for device, _, _ in reserved), tuple(a for a, _ in rows),
                      tuple(item for _, item in rows), now, completion, seq))


@dataclass(frozen=True)
class Dispatch:
    """A batch leaving the queue: its pipeline (index in the model's plan), the device taken
    at each stage, its requests' arrivals and items, when it left, when its last stage is
    predicted to end (ms), and its number in the plane's order of dispatch."""

    pipeline: int
    devices: tuple[int, ...]
    arrivals: tuple[float, ...]
    items: tuple
    sent_ms: float
    completion_ms: float
    seq: int = 0


def simulate_model(model: ModelBlocks, plan: ModelPlan, link: Link, rate_rps: float, seconds: float,
                   warmup_s: float = 0.0, seed: int = 0, shrink: float = SHRINK,
                   arrivals_ms: list[float] | None = None) -> ModelRun:
    """Poisson arrivals at `rate_rps` for `seconds` (or the given `arrivals_ms`, ascending)
    through the model's pipelines (see the module's docstring); requests arriving before
    `warmup_s` run but are not counted. The run goes on past `seconds` until every request
    is answered."""
    if rate_rps <= 0 or seconds <= 0:
        raise PipelineError(f"rate ({rate_rps}) and seconds ({seconds}) must be positive")
    plane = ReservationPlane(model, plan, link, shrink)
    arrivals = poisson_ms(rate_rps, seconds * 1000.0, seed) if arrivals_ms is None else list(arrivals_ms)
    latencies: list[float] = []
    dropped = counted_batches = counted_rows = 0
    warm_ms = warmup_s * 1000.0

    def drop(arrival: float, _item) -> None:
        nonlocal dropped
        if arrival >= warm_ms:
            dropped += 1

    def send(d: Dispatch) -> None:
        nonlocal counted_batches, counted_rows
        if d.arrivals[0] >= warm_ms:
            counted_batches += 1
            counted_rows += len(d.arrivals)
        latencies.extend(d.completion_ms - a for a in d.arrivals if a >= warm_ms)

    timer: float | None = None  # when the plane looks again though nothing arrives
    for arrival in arrivals:
        while timer is not None and timer <= arrival:
            timer = plane.look(timer, send, drop)
        plane.arrive(arrival)
        timer = plane.look(arrival, send, drop)
    while plane.queue:
        if timer is None:
            raise AssertionError("the data plane stopped with requests queued and no timer")  # a bug here
        timer = plane.look(timer, send, drop)
    offered = sum(1 for a in arrivals if a >= warm_ms)
    lat = np.array(latencies)
    return ModelRun(rate_rps, offered, len(latencies), dropped,
                    float(np.percentile(lat, 50)) if len(lat) else None,
                    float(np.percentile(lat, 99)) if len(lat) else None,
                    counted_rows / counted_batches if counted_batches else 0.0, tuple(latencies))


def _rank(offer: tuple) -> tuple[float, float]:
    completion, waiting, _ = offer
    return waiting, completion


def _largest(pipe: _Pipe, now: float, deadline: float, low: int) -> int:
    """The largest batch in [low, planned] whose offer completes by `deadline`, 0 if none;
    found by bisection, so on a profile whose latency does not grow with the batch it may
    find a smaller one than a scan would."""
    high = pipe.batch
    if pipe.offer(high, now)[0] <= deadline:
        return high
    if low >= high or pipe.offer(low, now)[0] > deadline:
        return 0
    while high - low > 1:  # offer(low) meets the deadline, offer(high) does not
        mid = (low + high) // 2
        if pipe.offer(mid, now)[0] <= deadline:
            low = mid
        else:
            high = mid
    return low


def poisson_ms(rate_rps: float, span_ms: float, seed: int) -> list[float]:
    """Poisson arrival times (ms, ascending) at `rate_rps` over [0, span_ms), one seed."""
    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    while True:
        gaps = np.cumsum(rng.exponential(1000.0 / rate_rps, size=max(16, int(rate_rps * span_ms / 1000.0))))
        chunk = t + gaps
        times.extend(chunk[chunk < span_ms].tolist())
        if chunk[-1] >= span_ms:
            return times
        t = float(chunk[-1])


def simulate_plan(plan: PipelinePlan, blocks, pools, load: float, seconds: float, warmup_s: float = 0.0,
                  seed: int = 0, shrink: float = SHRINK) -> dict[str, ModelRun]:
    """Every model of the plan at `load` x its planned throughput (simulated)."""
    if load <= 0:
        raise PipelineError(f"load must be positive, got {load}")
    return {name: simulate_model(blocks.models[name], mp, pools.link, load * mp.throughput_rps, seconds, warmup_s,
                                 seed, shrink)
            for name, mp in sorted(plan.models.items()) if mp.throughput_rps > 0}


@dataclass(frozen=True)
class Sustained:
    """The highest load factor (x the plan's throughput) found to meet the target, its run,
    and where the search stopped: "found" (bisected to within a step), "above" (even the
    highest load tried met it: a lower bound) or "below" (even the lowest missed: `load` is
    that lowest, an upper bound, and `run` its failing run)."""

    load: float
    run: ModelRun
    bound: str = "found"


def sustained_load(model: ModelBlocks, plan: ModelPlan, link: Link, seconds: float, warmup_s: float = 0.0,
                   seed: int = 0, target: float = TARGET, shrink: float = SHRINK, low: float = 0.25,
                   high: float = 2.0, steps: int = 10) -> Sustained:
    """The highest load factor at which the simulated model answers at least `target` of its
    requests within the SLO, by bisection between `low` and `high` (one seed: deterministic)."""
    def run(x: float) -> ModelRun:
        return simulate_model(model, plan, link, x * plan.throughput_rps, seconds, warmup_s, seed, shrink)

    best = run(low)
    if best.attainment < target:
        return Sustained(low, best, "below")
    top = run(high)
    if top.attainment >= target:
        return Sustained(high, top, "above")
    for _ in range(steps):
        mid = (low + high) / 2
        attempt = run(mid)
        if attempt.attainment >= target:
            low, best = mid, attempt
        else:
            high = mid
    return Sustained(low, best)


def simulation_report(plan: PipelinePlan, blocks, pools, load: float | None, seconds: float, warmup_s: float,
                      seed: int, target: float = TARGET, steps: int = 10) -> dict:
    """`cellserve plan pipeline-sim`'s JSON (and `bench plan`'s data plane): per model its
    planned throughput and, at `load` (or at the highest load meeting `target`, searched in
    `steps` bisections), its simulated run."""
    models = {}
    for name, mp in sorted(plan.models.items()):
        if mp.throughput_rps <= 0 or not mp.pipelines:  # nothing to offer it
            models[name] = {"planned_rps": mp.throughput_rps, "note": "the plan gives it no pipeline"}
            continue
        model = blocks.models[name]
        if load is None:
            found = sustained_load(model, mp, pools.link, seconds, warmup_s, seed, target, steps=steps)
            run = found.run
            entry = {"sustained_load": found.load, "sustained_rps": found.load * mp.throughput_rps,
                     "search": found.bound}
        else:
            run = simulate_model(model, mp, pools.link, load * mp.throughput_rps, seconds, warmup_s, seed)
            entry = {}
        models[name] = {"planned_rps": mp.throughput_rps, "slo_ms": model.slo_ms, **entry,
                        "run": run.to_dict(seconds - warmup_s)}
    return {"schema_version": 1, "simulated": True, "load": load, "target_attainment": target, "seconds": seconds,
            "warmup_s": warmup_s, "seed": seed, "shrink": SHRINK, "models": models}
