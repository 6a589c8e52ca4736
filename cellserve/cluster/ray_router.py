"""Which engine worker gets a request: the driver's view of its Ray workers (`serve --ray`).

Pure Python, no Ray: the driver feeds it what the workers report and what it sends them.

Contract:
- A worker is *live* until `mark_dead`; a dead worker is never picked again (it does not
  come back: a restarted actor would be a new worker).
- `pick(model, rounds, lanes)` returns the live worker serving `model` whose predicted finish
  for the request is the least (ties: fewest requests outstanding, then the lowest id), or
  None when no live worker serves it. A sequence's first chunk goes to the worker keeping
  the fewest sequences first (`WorkerState.sequences`, kept by the driver), its predicted
  finish breaking ties: an idle sequence adds no load, so load alone would stack them.
- The prediction is the engine's own (Engine._predicted_latency): the request's rounds, each
  priced by the worker's cost model (its step-cost tables, reported by the worker and
  refreshed by the driver's poller) at the load the driver has outstanding on that worker
  plus this request's lanes. The driver sees every request it sends, so it knows that load
  without asking: routing costs no extra hop. A worker with nothing outstanding is priced at
  its fastest steps, a busy one at its moving averages (bounded) plus its per-batch overhead,
  by the engine's own rule (CostModel.priced_round).
- `started`/`finished` bracket each call to a worker: they keep the outstanding load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cellserve.engine.cost_model import CostModel, StepCost


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once its engine is up (plain data: crosses Ray as it is)."""

    worker_id: str  # "w0", "w1", ...: the `worker` label of its metrics
    node_id: str  # the Ray node it runs on: the `node` label
    models: tuple[str, ...]  # client-facing model names it serves
    cell_types: dict[str, list[str]]  # model -> the engine's cell types of it (after stacking)
    extra_rounds: dict[str, list[int]]  # model -> per recurrent step, 1 for a decoder's end step
    max_batch: int  # the engine's batch cap per cell type
    pid: int = 0


@dataclass
class WorkerState:
    """The driver's view of one worker. `handle` is whatever the driver calls (a Ray actor)."""

    info: WorkerInfo
    handle: object = None
    alive: bool = True
    death: str = ""  # why it is dead
    outstanding: int = 0  # requests sent, not answered
    by_model: dict[str, int] = field(default_factory=dict)  # model -> of those, its requests (drains wait on it)
    load: dict[str, int] = field(default_factory=dict)  # cell type -> lanes outstanding
    costs: CostModel | None = None
    step_overhead_s: float = 0.0  # seconds per batch beyond the cost model's price (the engine's own)
    admitting_share: float = 0.0  # share of the engine's time spent admitting (stretches a priced round)
    snapshot: dict = field(default_factory=dict)  # the last poll (metrics)
    sequences: int = 0  # sequences whose state the driver keeps here

    @property
    def id(self) -> str:
        return self.info.worker_id

    def describe(self) -> str:
        return f"worker {self.id} (node {self.info.node_id[:12]})"


def cost_snapshot(costs: CostModel) -> dict:
    """A worker's step-cost tables as plain data: {"tables": {cell type: {"mean": {bucket: s},
    "best": ...}}, "group_of": the cell types' executor groups, or None}.

    Reads StepCost's tables directly: the engine keeps them private and exports nothing, and
    the router must price exactly as the engine does (cost_model_from is the inverse)."""
    group_of = getattr(costs, "group_of", None)
    # list(): a copy taken at once (the engine thread may add a model's tables meanwhile)
    return {"tables": {t: {"mean": dict(c._mean), "best": dict(c._best)} for t, c in list(costs.costs.items())},
            "group_of": None if group_of is None else dict(group_of)}


def cost_model_from(snapshot: dict, max_batch: int) -> CostModel:
    """The inverse of cost_snapshot: a CostModel that prices as the worker's did when it reported."""
    model = CostModel(max_batch)
    if snapshot.get("group_of") is not None:  # executors that run at once (engine/cost_model.py)
        model.group_of = dict(snapshot["group_of"])
    for cell_type, tables in snapshot["tables"].items():
        cost = StepCost()
        cost._mean = {int(b): float(s) for b, s in tables["mean"].items()}
        cost._best = {int(b): float(s) for b, s in tables["best"].items()}
        cost._buckets = sorted(cost._mean)
        model.costs[cell_type] = cost
    return model


class Router:
    def __init__(self, workers: list[WorkerState]):
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids repeat: {ids}")
        self.workers = {w.id: w for w in workers}
        self._serving: dict[str, list[WorkerState]] = {}
        for w in workers:
            for model in w.info.models:
                self._serving.setdefault(model, []).append(w)

    def set_routes(self, routes: dict[str, set[str]]) -> None:
        """Which models each worker (by id) takes new requests of, from now on (a new plan).
        A sequence's chunks still go where its state is; a model leaving a worker is not
        unloaded here (ray_replan.Drains)."""
        serving: dict[str, list[WorkerState]] = {}
        for w in self.workers.values():
            for model in sorted(routes.get(w.id, ())):
                serving.setdefault(model, []).append(w)
        self._serving = serving

    def routes(self) -> dict[str, set[str]]:
        """Worker id -> the models it takes new requests of."""
        out: dict[str, set[str]] = {w: set() for w in self.workers}
        for model, ws in self._serving.items():
            for w in ws:
                out[w.id].add(model)
        return out

    def serving(self, model: str, live_only: bool = True) -> list[WorkerState]:
        return [w for w in self._serving.get(model, []) if w.alive or not live_only]

    def live(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.alive]

    def update_costs(self, worker: WorkerState, snapshot: dict, step_overhead_s: float,
                     admitting_share: float = 0.0) -> None:
        worker.costs = cost_model_from(snapshot, worker.info.max_batch)
        worker.step_overhead_s = max(float(step_overhead_s), 0.0)
        worker.admitting_share = min(max(float(admitting_share), 0.0), 1.0)

    def predict(self, worker: WorkerState, model: str, rounds: int, lanes: int) -> float:
        """Seconds `worker` would take to run a request of `rounds` rounds and `lanes` lanes
        of `model`, at the load outstanding there (0.0 until it reported its costs)."""
        if worker.costs is None:
            return 0.0
        load = dict(worker.load)
        for t in worker.info.cell_types.get(model, ()):
            load[t] = load.get(t, 0) + lanes
        return rounds * worker.costs.priced_round(load, worker.outstanding > 0, worker.step_overhead_s,
                                                  worker.admitting_share)

    def pick(self, model: str, rounds: int, lanes: int, exclude: tuple[str, ...] = (),
             by_sequences: bool = False) -> tuple[WorkerState, float] | None:
        """The live worker serving `model` (not in `exclude`) with the least predicted finish,
        and that prediction in seconds; None when there is none. `by_sequences` (a sequence's
        first chunk): the one keeping the fewest sequences first, the finish breaking ties, so
        that sequences, idle between chunks and so invisible in the load, spread over workers."""
        best: tuple | None = None
        chosen = None
        for w in self._serving.get(model, ()):
            if not w.alive or w.id in exclude:
                continue
            key = (w.sequences if by_sequences else 0, self.predict(w, model, rounds, lanes), w.outstanding, w.id)
            if best is None or key < best:
                best, chosen = key, w
        return None if chosen is None else (chosen, best[1])

    def rounds(self, worker: WorkerState, model: str, length: int) -> int:
        """Rounds a request whose longest input has `length` steps takes on `worker`'s engine:
        each recurrent step `length`, a decoder's one more (its end step). The engine itself
        prices a decoder at its lanes' learnt output length (engine/output_length.py); the
        router does not have that yet."""
        extra = worker.info.extra_rounds.get(model, [0])
        return sum(length + e for e in extra)

    def started(self, worker: WorkerState, model: str, lanes: int) -> None:
        worker.outstanding += 1
        worker.by_model[model] = worker.by_model.get(model, 0) + 1
        for t in worker.info.cell_types.get(model, ()):
            worker.load[t] = worker.load.get(t, 0) + lanes

    def finished(self, worker: WorkerState, model: str, lanes: int) -> None:
        worker.outstanding -= 1
        worker.by_model[model] -= 1
        for t in worker.info.cell_types.get(model, ()):
            worker.load[t] = worker.load.get(t, 0) - lanes

    def mark_dead(self, worker: WorkerState, why: str) -> bool:
        """Take `worker` out of routing; True the first time (the caller reports it once)."""
        if not worker.alive:
            return False
        worker.alive, worker.death = False, why
        return True


def time_length(model, inputs: dict) -> int:
    """The longest time axis among a request's inputs (1 without one): what the engine counts
    rounds from (Engine._rounds_plan). `model` is the graph Model (its input semantics)."""
    length = 1
    for name, sem in model.semantics.items():
        if sem.time_axis is not None:
            x = inputs.get(name)
            shape = getattr(x, "shape", None)
            if shape is not None and sem.time_axis < len(shape):
                length = max(length, int(shape[sem.time_axis]))
    return length


class RateGate:
    """A token bucket: the rate a plan serves for one model. `admit(now)` spends a token or
    says no. Capacity is what arrives at the planned rate over `burst_s` (at least one
    request): a burst that drains within the model's SLO, no more, may queue."""

    def __init__(self, rate_rps: float, burst_s: float):
        if not rate_rps > 0 or not burst_s > 0:
            raise ValueError(f"a rate gate needs rate_rps > 0 and burst_s > 0, got {rate_rps}, {burst_s}")
        self.rate = rate_rps
        self.capacity = max(1.0, rate_rps * burst_s)
        self.tokens = self.capacity
        self.last = -math.inf

    def admit(self, now: float) -> bool:
        if self.last > -math.inf:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
