"""Which cell invocations run next. No tensors here: a policy sees lanes and emits a
`StepBatch` of plain ints; the executor turns it into a kernel call.

A *lane* is one sequence's path through one cell type (one direction of one recurrent layer,
or a decoder). Its invocations form a chain, so a lane is ready exactly when it is not in the
batch being run: once the single worker finishes a batch, every active lane is ready.

Policies:
- `cellular` (BatchMaker): any lanes of one cell type, at any step positions, from any
  requests; lanes join and leave between steps; no padding. Cell types take turns (round
  robin), so every lane advances once per round and each type's batch holds all its lanes;
  when a type has more than `max_batch`, the most urgent run (priority, then earliest
  deadline, then arrival).
- `cellular-edf`: the same, but always the cell type holding the most urgent lane. Measured
  against `cellular` it makes small batches: the oldest request's next layer runs alone.
- `padded` (what TF Serving and TorchServe do): gather up to `max_batch` requests or wait
  `batch_timeout_s` after the oldest, then run that cohort through the whole model, each
  cell type for as many steps as its longest lane; lanes that finished early keep occupying
  their place in the batch (the padding) until the cohort moves on.
- `none`: `padded` with a batch of one and no wait: each request alone, start to finish.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from itertools import islice
from dataclasses import dataclass, field
from operator import attrgetter

from cellserve.executor.batch import StepBatch

SCRATCH = 0  # slot and row reserved in every kernel for padding lanes


@dataclass(eq=False)
class Lane:
    lane_id: int
    request_id: int
    cell_type: str
    length: int | None  # None: runs until the kernel reports an end (a decoder)
    deadline: float  # absolute clock time; math.inf if none
    priority: int  # lower runs first, as in Triton
    arrival: float
    slot: int = SCRATCH  # kernel storage, opaque here
    row: int = SCRATCH  # input/output row of the next step
    stride: int = 1  # row advance per step: +1 forward, -1 reverse, 0 for a decoder's memory
    step: int = 0
    key: tuple = ()  # urgency, smallest first: (priority, deadline, arrival, lane id)

    def __post_init__(self) -> None:
        self.key = (self.priority, self.deadline, self.arrival, self.lane_id)


_slot, _row, _stride = attrgetter("slot"), attrgetter("row"), attrgetter("stride")
_key, _id = attrgetter("key"), attrgetter("lane_id")


@dataclass
class _TypeQueue:
    """One cell type's lanes, their urgency order kept cheaply: the dict holds them in the
    order added, which is urgency order for every lane not in `_late` (each was added with a
    key above every such lane before it: the usual case, requests of one SLO arriving in
    turn); `_late` holds those added out of order (a beam's rows, added after its request's
    first step; a more urgent priority), which are merged in when a batch is chosen, and put
    back in order once they are many."""

    lanes: dict[int, Lane] = field(default_factory=dict)
    _min: tuple | None = None  # cached most urgent key; None when it must be recomputed
    _late: dict[int, Lane] = field(default_factory=dict)
    _last: tuple = ()  # the largest key of the lanes in order

    def add(self, lane: Lane) -> None:
        self.lanes[lane.lane_id] = lane
        if self._min is not None and lane.key < self._min:
            self._min = lane.key
        if lane.key < self._last:
            self._late[lane.lane_id] = lane
        else:
            self._last = lane.key

    def remove(self, lane: Lane) -> None:
        del self.lanes[lane.lane_id]
        self._late.pop(lane.lane_id, None)
        if self._min is not None and lane.key <= self._min:
            self._min = None
        if not self.lanes:
            self._last = ()

    def most_urgent(self) -> tuple:
        if self._min is None:
            self._min = min(map(_key, self.lanes.values()))
        return self._min

    def most_urgent_lanes(self, n: int) -> list[Lane]:
        """The n most urgent lanes, most urgent first."""
        if len(self.lanes) <= n:
            return list(self.lanes.values())
        late = self._late
        if not late:
            return list(islice(self.lanes.values(), n))
        if len(late) > max(n, len(self.lanes) // 8):  # many out of order: sort them all, once
            self.lanes = dict(sorted(self.lanes.items(), key=lambda item: item[1].key))
            self._late, self._last = {}, next(reversed(self.lanes.values())).key
            return list(islice(self.lanes.values(), n))
        in_order = islice((lane for lane in self.lanes.values() if lane.lane_id not in late), n)
        return heapq.nsmallest(n, [*in_order, *late.values()], key=_key)


class Policy(ABC):
    """Common lane bookkeeping; subclasses decide what runs next."""

    name = "base"
    # Each turn of a cell type runs its most urgent lanes (up to max_batch): a lane waits
    # only for lanes at least as urgent as it
    urgent_first = False

    def __init__(self, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._types: dict[str, _TypeQueue] = {}
        self._lanes: dict[int, Lane] = {}

    def add(self, lane: Lane) -> None:
        q = self._types.get(lane.cell_type)
        if q is None:
            q = self._types[lane.cell_type] = _TypeQueue()
        q.add(lane)
        self._lanes[lane.lane_id] = lane

    def remove(self, lane_id: int) -> None:
        lane = self._lanes.pop(lane_id, None)
        if lane is not None:
            self._types[lane.cell_type].remove(lane)

    def lane(self, lane_id: int) -> Lane | None:
        return self._lanes.get(lane_id)

    def lanes_of(self, cell_type: str) -> int:
        q = self._types.get(cell_type)
        return len(q.lanes) if q else 0

    def has_work(self) -> bool:
        return bool(self._lanes)

    def wake_at(self, now: float) -> float | None:
        """When an idle worker should look again even if nothing arrives (batch timeouts)."""
        return None

    @property
    def stable(self) -> bool:
        """Whether the last batch is also the next one while no lane finishes or arrives."""
        return False

    @abstractmethod
    def next_batch(self, now: float, only: frozenset[str] | None = None) -> StepBatch | None:
        """The batch to run now, or None when nothing is ready. `only`: the cell types the
        batch may be of (an idle executor's, when several run at once; None: any)."""

    def complete(self, batch: StepBatch, ended: frozenset[int] = frozenset(), steps: int = 1) -> list[Lane]:
        """Advance the lanes of a batch that ran `steps` steps; return those that finished
        (and remove them). `ended` names open-ended lanes whose kernel reported their end."""
        done = []
        lanes = self._lanes
        for lane_id in batch.lane_ids:
            lane = lanes.get(lane_id)
            if lane is None:
                continue  # padding, or removed while running
            lane.step += steps
            lane.row += lane.stride * steps
            if lane.step == lane.length or lane_id in ended:
                done.append(lane)
        for lane in done:
            self._finish(lane)
        return done

    def _finish(self, lane: Lane) -> None:
        self.remove(lane.lane_id)

    @staticmethod
    def _batch(cell_type: str, lanes: list[Lane]) -> StepBatch:
        return StepBatch(cell_type, tuple(map(_id, lanes)), tuple(map(_slot, lanes)), tuple(map(_row, lanes)),
                         tuple(map(_stride, lanes)))


class CellularPolicy(Policy):
    """Cell types with lanes take turns; each turn runs up to `max_batch` of the type's most
    urgent lanes."""

    name = "cellular"
    urgent_first = True

    def __init__(self, max_batch: int = 64):
        super().__init__(max_batch)
        self._turn = 0

    @property
    def stable(self) -> bool:
        return sum(1 for q in self._types.values() if q.lanes) == 1

    def next_batch(self, now: float, only: frozenset[str] | None = None) -> StepBatch | None:
        cell_type = self._choose_type(only)
        if cell_type is None:
            return None
        return self._batch(cell_type, self._types[cell_type].most_urgent_lanes(self.max_batch))

    def _choose_type(self, only: frozenset[str] | None = None) -> str | None:
        # One turn pointer for every executor: each choice moves it past the type chosen, so
        # no type of an executor waits more than one turn of that executor's other types.
        types = list(self._types)
        for i in range(len(types)):
            cell_type = types[(self._turn + i) % len(types)]
            if self._types[cell_type].lanes and (only is None or cell_type in only):
                self._turn = (self._turn + i + 1) % len(types)
                return cell_type
        return None


class EarliestDeadlineTypePolicy(CellularPolicy):
    """`cellular-edf`: always the cell type holding the most urgent lane."""

    name = "cellular-edf"

    @property
    def stable(self) -> bool:
        return True  # keys never change, so the same type stays the most urgent

    def _choose_type(self, only: frozenset[str] | None = None) -> str | None:
        best_type, best_key = None, None
        for cell_type, q in self._types.items():
            if q.lanes and (only is None or cell_type in only):
                k = q.most_urgent()
                if best_key is None or k < best_key:
                    best_type, best_key = cell_type, k
        return best_type


class PaddedPolicy(Policy):
    """Cohorts of whole requests, padded to their longest lane (see the module docstring).

    `cell_order` maps each model name to its cell types in program order: a cohort runs them
    one after another."""

    name = "padded"

    def __init__(self, cell_order: dict[str, list[str]], max_batch: int = 8, batch_timeout_s: float = 0.005):
        super().__init__(max_batch)
        self.cell_order, self.batch_timeout_s = cell_order, batch_timeout_s
        self._waiting: dict[int, tuple[float, str]] = {}  # request id -> (arrival, model)
        self._cohort: set[int] = set()
        self._model = ""
        self._type_index = 0
        self._width = 0  # lanes of the current cell type in the cohort, padding included
        self._padding = 0  # finished lanes still occupying a place

    def add(self, lane: Lane) -> None:
        super().add(lane)
        if lane.request_id not in self._cohort and lane.request_id not in self._waiting:
            self._waiting[lane.request_id] = (lane.arrival, lane.cell_type.split("/", 1)[0])

    def remove(self, lane_id: int) -> None:
        lane = self._lanes.get(lane_id)
        super().remove(lane_id)
        if lane is not None and not any(l.request_id == lane.request_id for l in self._lanes.values()):
            self._waiting.pop(lane.request_id, None)

    def wake_at(self, now: float) -> float | None:
        if self._cohort or not self._waiting:
            return None
        return min(a for a, _ in self._waiting.values()) + self.batch_timeout_s

    def next_batch(self, now: float, only: frozenset[str] | None = None) -> StepBatch | None:
        if not self._cohort and not self._form_cohort(now):
            return None
        order = self.cell_order[self._model]
        while self._type_index < len(order):
            cell_type = order[self._type_index]
            live = [l for l in self._types.get(cell_type, _TypeQueue()).lanes.values() if l.request_id in self._cohort]
            if live:
                if only is not None and cell_type not in only:
                    return None  # the cohort's cell type is another executor's: it runs there
                self._width = max(self._width, len(live) + self._padding)
                batch = self._batch(cell_type, live)
                pad = self._width - len(live)
                return StepBatch(cell_type, batch.lane_ids + (-1,) * pad, batch.slots + (SCRATCH,) * pad,
                                 batch.rows + (SCRATCH,) * pad, batch.strides + (0,) * pad)
            self._type_index += 1
            self._width = self._padding = 0
        self._cohort.clear()
        return self.next_batch(now, only) if self._waiting else None

    @property
    def stable(self) -> bool:
        return True  # a cohort runs one cell type until its longest lane ends

    def complete(self, batch: StepBatch, ended: frozenset[int] = frozenset(), steps: int = 1) -> list[Lane]:
        done = super().complete(batch, ended, steps)
        self._padding += len(done)
        return done

    def _form_cohort(self, now: float) -> bool:
        if not self._waiting:
            return False
        oldest = min(self._waiting.items(), key=lambda kv: kv[1][0])
        model = oldest[1][1]
        members = sorted((a, rid) for rid, (a, m) in self._waiting.items() if m == model)
        if len(members) < self.max_batch and now < oldest[1][0] + self.batch_timeout_s:
            return False
        self._cohort = {rid for _, rid in members[: self.max_batch]}
        for rid in self._cohort:
            del self._waiting[rid]
        self._model, self._type_index, self._width, self._padding = model, 0, 0, 0
        return True


def make_policy(name: str, cell_order: dict[str, list[str]], max_batch: int | None = None,
                batch_timeout_s: float = 0.005) -> Policy:
    if name == "cellular":
        return CellularPolicy(max_batch or 64)
    if name == "cellular-edf":
        return EarliestDeadlineTypePolicy(max_batch or 64)
    if name == "padded":
        return PaddedPolicy(cell_order, max_batch or 8, batch_timeout_s)
    if name == "none":
        return PaddedPolicy(cell_order, 1, 0.0)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


POLICIES = ("cellular", "cellular-edf", "padded", "none")

