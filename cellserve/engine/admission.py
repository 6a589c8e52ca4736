"""Admission and the drop check: what the engine prices a request at, and what it does with
the price (a mixin of Engine, which holds the state these methods read: the cost model, the
load committed to each cell type, the runs in flight, the per-step overhead).

A request is priced at its rounds times the cost of a round at the load committed to every
cell type with its own lanes added (cost_model.py), plus the engine's own time per batch off
the device, stretched by the share of its time the engine spends admitting arrivals (both
learnt here, _learn_overhead). With admission on, one that would miss its deadline
is refused at once; with drop_late, an admitted one that no longer can is dropped (_drop_late).
"""

from __future__ import annotations

import math
import os
import statistics
from operator import attrgetter
from pathlib import Path

import numpy as np

from cellserve.engine.beam import decode_width
from cellserve.engine.cost_model import MAX_ADMITTING_SHARE, PREDICTION_BOUND
from cellserve.engine.request import Request, Status
from cellserve.engine.runs import _Run
from cellserve.engine.validation import validate_inputs, validate_request
from cellserve.executor.batch import StepBatch
from cellserve.errors import InvalidInput, UnknownModel
from cellserve.graph.model import Model

_DROP_CHECK_S = 0.01  # the drop check's usual gap (see _drop_late)
MAX_DROP_CHECK_SHARE = 0.1  # of the engine's time the drop check may take
# With every run far from late, the next check comes after this share of the least spare
# time among them, but no later than MAX_DROP_CHECK_GAP_S (see _drop_late).
DROP_CHECK_SPARE_SHARE = 0.5
MAX_DROP_CHECK_GAP_S = 0.1
# An idle engine that has run no step for this long admits one request its estimates would
# refuse, to measure them again (see _admit).
PROBE_AFTER_S = 5.0
# The per-step overhead is the median of this many spells, each ending at 50 ms of busy time
# or SPELL_SPAN_S of wall time, whichever comes first (see _learn_overhead).
OVERHEAD_SPELLS = 9
SPELL_BUSY_S = 0.05
SPELL_SPAN_S = 0.25
_urgency = attrgetter("urgency")


def _urgency_class(priority: int, has_deadline: bool) -> tuple[int, bool]:
    """Where a request's lanes stand in the policy's urgency order (priority, then deadline,
    none last), as far as admission tells apart: a class greater than another is less urgent."""
    return (priority, not has_deadline)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _drop_check_gap(spare: float) -> float:
    """How long after now the drop check may wait for a run with `spare` seconds spare."""
    return max(_DROP_CHECK_S, DROP_CHECK_SPARE_SHARE * spare)


def machine_memory_bytes() -> int:
    """This machine's memory, or the process's cgroup limit where that is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


class Admission:
    """Engine's admission, pricing and drop check (see the module docstring)."""

    def _admit(self, request: Request, now: float) -> None:
        if request.trace is not None:
            request.trace.stamp("ENGINE_ADMIT")  # the hand-off and wake-up end
        if request.cancelled:
            self._respond_early(request, Status.CANCELLED, "cancelled: the client went away")
            return
        model = self.models.get(request.model)
        if model is None:
            self._respond_early(request, Status.INVALID, f"{UnknownModel.__name__}: unknown model {request.model!r}")
            return
        try:
            validate_request(model, request)
            inputs = validate_inputs(model, request.inputs)
            width = decode_width(model, request)
            self._check_beam_executors(model, request, width)
        except InvalidInput as exc:
            self._respond_early(request, Status.INVALID, str(exc))
            return
        if len(self._runs) >= self.config.max_active:
            self._respond_early(request, Status.REJECTED, f"queue full: {len(self._runs)} requests in flight",
                                congestion=True)
            return
        length, batch = self._request_length(model, inputs), model.batch_size(inputs)
        lane_bytes = batch * length * self._lane_bytes_per_token[model.name]
        if lane_bytes + self._lane_bytes_held > self.lane_memory_limit:
            self._refuse_for_memory(request, batch, length, lane_bytes)
            return
        if request.timeout_s is not None and not request.timeout_s > 0:
            self._respond_early(request, Status.INVALID, f"timeout must be > 0 seconds, got {request.timeout_s}")
            return
        timeout = request.timeout_s if request.timeout_s is not None else self.config.default_timeout_s
        deadline = request.arrival + timeout if timeout is not None else math.inf
        rounds_plan = self._rounds_plan(model, inputs, length)
        predicted, probe = None, False
        if self.config.admission and deadline < math.inf:
            predicted = self._predicted_latency(model, rounds_plan, batch, width,
                                                _urgency_class(request.priority, True))
            # Headroom: requests admitted later slow this one down too. An idle engine whose
            # estimates no step has confirmed lately admits whatever has time left, to measure:
            # refusing on an estimate it cannot check would keep it from ever learning better
            # (the server still answers 504 when the request does miss its deadline).
            if predicted > self.config.admission_headroom * (deadline - now):
                unconfirmed = not self._runs and now - self._last_step > PROBE_AFTER_S
                if not unconfirmed or deadline <= now:
                    alone = self._alone_latency(model, rounds_plan, batch, width)
                    left = max(deadline - now, 0.0)
                    headroom = self.config.admission_headroom
                    self._respond_early(request, Status.REJECTED,
                                        f"predicted finish in {predicted * 1e3:.1f} ms misses the deadline "
                                        f"({left * 1e3:.1f} ms left" + (
                                            f"; admission keeps {1 - headroom:.0%} of it spare for requests "
                                            f"admitted later: --admission-headroom {headroom:g})"
                                            if headroom < 1 and predicted <= left else ")"),
                                        congestion=alone <= headroom * (deadline - now))
                    return
                probe = True
        run = _Run(request, model, {**model.constants, **inputs}, deadline, rounds_plan, batch, width=width,
                   probe=probe, priced_s=predicted, lane_bytes=lane_bytes)
        self._commit(run, +1)
        self._lane_bytes_held += lane_bytes
        run.admitted = now
        if deadline < math.inf and not probe:  # the drop check comes before it could turn late unseen
            spare = deadline - now - predicted if predicted is not None else 0.0  # unpriced: the usual gap
            self._next_drop_check = min(self._next_drop_check, now + _drop_check_gap(spare))
        if request.trace is not None:
            request.trace.stamp("COMPUTE_START")
        self._runs[request.request_id] = run
        self._advance(run)

    def _refuse_for_memory(self, request: Request, batch: int, length: int, lane_bytes: int) -> None:
        """A request whose lanes would take the engine's lane storage past its limit: INVALID
        when it needs more than all of it (it never fits), else REJECTED (it fits once the
        requests in flight leave): the arenas only grow, and a request too large for the
        machine would fail every request of its model, or the process."""
        limit = self.lane_memory_limit
        need = f"needs {_size(lane_bytes)} of lane storage ({batch} sequence(s) of {length} steps)"
        if lane_bytes > limit:
            self._respond_early(request, Status.INVALID, f"{need}, more than the engine holds for all requests "
                                f"({_size(limit)}, --max-lane-memory): send fewer or shorter sequences")
        else:
            self._respond_early(request, Status.REJECTED, f"{need}; the requests in flight hold "
                                f"{_size(self._lane_bytes_held)} of the engine's {_size(limit)} (--max-lane-memory)",
                                congestion=True)

    def predicted_latency(self, request: Request) -> float:
        """Seconds this engine would now take to run `request` (a router's question; the
        request is not checked: an invalid one gets a rough figure). Infinite for a model
        the engine does not serve."""
        model = self.models.get(request.model)
        if model is None:
            return math.inf
        try:
            width = decode_width(model, request)
        except InvalidInput:
            width = 1
        return self._predicted_latency(model, self._rounds_plan(model, request.inputs), model.batch_size(request.inputs),
                                       width, _urgency_class(request.priority, request.timeout_s is not None
                                                             or self.config.default_timeout_s is not None))

    def _lanes(self, model: Model, batch: int, width: int) -> dict[str, int]:
        """The lanes a request of `batch` rows adds to each of the model's cell types: a beam
        row's `width` hypotheses each in a lane of the decoder's type, one per row elsewhere."""
        return {t: batch * width if t in self._decoders else batch for t in self._model_types[model.name]}

    def _predicted_latency(self, model: Model, rounds_plan: list[int], batch: int, width: int = 1,
                           urgency: tuple[int, bool] | None = None) -> float:
        """Rounds of the request's program, each priced at the load committed to the engine
        with the request's lanes added (see cost_model.py).

        With `urgency` (the request's _urgency_class) and a policy that steps the most urgent
        lanes first, the lanes committed by less urgent requests (a lower priority, or no
        deadline against one) count only as far as they fill a batch: each turn steps up to
        a batch of a cell type's most urgent lanes, so lanes behind the request's own never
        take its place, but they do make the batch it steps in a full one."""
        own = self._lanes(model, batch, width)
        load = self._committed.copy()
        for t, n in own.items():
            load[t] += n
        if urgency is not None and self.policy.urgent_first:
            behind = [lanes for cls, lanes in self._committed_by_class.items() if cls > urgency]
            if behind:
                cap = self.policy.max_batch
                for t, n in load.items():
                    if n > cap:  # within a batch every lane steps each turn, behind or not
                        load[t] = max(n - sum(lanes.get(t, 0) for lanes in behind), cap)
        return sum(rounds_plan) * self._round_time(load, shared=bool(self._runs))

    def _round_time(self, load: dict[str, int], shared: bool) -> float:
        """A round of `load` as admission and the drop check price it (CostModel.priced_round,
        with the overhead and admitting share learnt here)."""
        return self.costs.priced_round(load, shared, self.step_overhead_s, self.admitting_share)

    def _alone_latency(self, model: Model, rounds_plan: list[int], batch: int, width: int = 1) -> float:
        """Seconds the request would take on an idle engine, at the fastest steps seen."""
        return sum(rounds_plan) * self._round_time(self._lanes(model, batch, width), shared=False)

    @staticmethod
    def _request_length(model: Model, inputs: dict) -> int:
        """A request's time steps: its longest input along that input's time axis (at least 1)."""
        length = 1
        for name, sem in model.semantics.items():
            if sem.time_axis is not None:
                x = inputs.get(name)
                shape = x.shape if type(x) is np.ndarray else np.shape(x)
                if sem.time_axis < len(shape):
                    length = max(length, shape[sem.time_axis])
        return length

    def _rounds_plan(self, model: Model, inputs: dict, length: int | None = None) -> list[int]:
        """Rounds of each recurrent step of a request (`length`: its _request_length, if known)."""
        length = self._request_length(model, inputs) if length is None else length
        # a decoder's rounds: the steps its lanes have taken at this length (output_length.py)
        return [length if dec is None else
                self._output_lengths[dec].steps(length, self._decoders[dec].max_tokens(length) + 1)
                for dec in self._step_decoders[model.name]]

    def _commit(self, run: _Run, sign: int, layers: slice | None = None) -> None:
        """Add (+1) or take back (-1) a run's lanes in the cell types of its layers (a beam
        row's hypotheses each a lane of its decoder's type), in all and in its urgency class."""
        by_class = self._committed_by_class.setdefault(_urgency_class(run.request.priority, run.deadline < math.inf),
                                                       {})
        for types in self._layer_types[run.model.name][layers or slice(run.layer, None)]:
            for t in types:
                n = sign * (run.batch * run.width if t in self._decoders else run.batch)
                self._committed[t] += n
                by_class[t] = by_class.get(t, 0) + n

    def _rounds_left(self, run: _Run) -> int:
        """Rounds until `run` ends: its current step's longest lane, then its later steps."""
        plan, layer = run.rounds_plan, run.layer
        if layer >= len(plan):
            return 0
        lane_of = self.policy.lane
        longest = None
        for lane_id in run.lanes:
            lane = lane_of(lane_id)
            if lane is not None:
                # a decoder lane past its priced steps (output_length.py prices the usual length) has one left at least
                left = (lane.length or plan[layer]) - lane.step
                if longest is None or left > longest:
                    longest = left
        if longest is None:  # no lane running (yet): the step's planned rounds
            return run.rounds_after[layer] + plan[layer]
        return run.rounds_after[layer] + max(longest, 1)

    def _drop_late(self, now: float) -> None:
        """Drop admitted requests that can no longer finish in time: their work is wasted.
        Priced at the lanes running now (admission prices the committed load: a request is
        refused on the slow estimate but dropped only on the fast one), within the same bound
        as admission; a request admitted to measure (see _admit) is never dropped: it runs. A
        run alone in the engine is priced at the fastest steps measured, as admission prices
        one on an idle engine.

        When a cell type has more lanes than a batch holds and the policy runs the most
        urgent first, a request waits in its own cell type only for the lanes at least as
        urgent as its own (in the others, for a batch per turn): pricing every lane would
        drop an urgent request that is in fact served every turn.

        When the next check comes: after _DROP_CHECK_S, or later when every run priced had
        spare time: after DROP_CHECK_SPARE_SHARE of the least (at most MAX_DROP_CHECK_GAP_S).
        A run with s seconds spare has at least s before its deadline, so it is checked again
        while it can still be dropped before then (unless the share binds); a run admitted
        meanwhile brings the check forward the same way (_admit, by its own spare time as
        admission priced it)."""
        started = self.clock.now()
        spare = 0.0
        try:
            spare = self._find_late(now)
        finally:
            # A check walks every run in flight, so under a backlog it took a large share of the
            # engine's time, the capacity the backlog needed to drain (docs/performance.md,
            # "Decoders"): checks come no closer than MAX_DROP_CHECK_SHARE of its time allows.
            took = self.clock.now() - started
            self._next_drop_check = now + max(min(_drop_check_gap(spare), MAX_DROP_CHECK_GAP_S),
                                              took / MAX_DROP_CHECK_SHARE)

    def _find_late(self, now: float) -> float:
        """Drop the runs that can no longer make their deadlines; return the least spare time
        among the runs priced when none was late (inf: none priced; 0.0: some were late)."""
        lanes = {t: self.policy.lanes_of(t) for t in self._placed}
        runs = [r for r in self._runs.values() if r.deadline < math.inf and not r.probe]
        if not runs:
            return math.inf
        late, spare = self._late(runs, lanes, now, shared=len(self._runs) > 1)
        if len(late) > 1:
            late = self._fewest_to_drop(runs, lanes, now, late)
        self.stats.runs_checked += len(runs)
        self._default.engine_work(runs_checked=len(runs))
        for run, needed in late:
            self._finish_run(run, Status.DROPPED,
                             f"dropped: can no longer finish before its deadline (predicted to need "
                             f"{needed * 1e3:.1f} ms more, {max(run.deadline - now, 0.0) * 1e3:.1f} ms left)")
        return 0.0 if late else spare

    def _late(self, runs: list[_Run], lanes: dict[str, int], now: float,
              shared: bool) -> tuple[list[tuple[_Run, float]], float]:
        """The runs among `runs` that would miss their deadlines with `lanes` running, with
        the seconds each still needs; and the least spare time of the others (inf: none)."""
        if not shared or not self.policy.urgent_first or all(n <= self.policy.max_batch for n in lanes.values()):
            round_s = self._round_time(lanes, shared)
            late, finish = [], math.inf  # finish: the earliest of the others' deadlines less their need
            for r in runs:
                needed = self._rounds_left(r) * round_s
                if now + needed > r.deadline:
                    late.append((r, needed))
                elif r.deadline - needed < finish:
                    finish = r.deadline - needed
            return late, finish - now
        return self._late_in_urgency_order(runs, lanes, now)

    def _fewest_to_drop(self, runs: list[_Run], lanes: dict[str, int], now: float,
                        late: list[tuple[_Run, float]]) -> list[tuple[_Run, float]]:
        """Of the late runs, the least urgent ones whose dropping lets every other run make
        its deadline: the fewest such, found by bisection (dropping more only lightens the
        rounds of the rest). A burst admitted together, all late together, would otherwise
        be dropped whole where most of it could still be served once the rest leave the
        batch. Never more than the late runs: those on time stay."""
        order = sorted(late, key=lambda item: item[0].urgency, reverse=True)  # least urgent first
        lo, hi = 1, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            dropped = {id(run) for run, _ in order[:mid]}
            kept = [r for r in runs if id(r) not in dropped]
            fewer = dict(lanes)
            for run, _ in order[:mid]:
                for ref in run.lanes.values():
                    if ref.cell_type in fewer:
                        fewer[ref.cell_type] -= 1
            if self._late(kept, fewer, now, shared=len(self._runs) - mid > 1)[0]:
                lo = mid + 1
            else:
                hi = mid
        return order[:lo]

    def _late_in_urgency_order(self, runs: list[_Run], lanes: dict[str, int],
                               now: float) -> tuple[list[tuple[_Run, float]], float]:
        """The runs that would miss their deadlines, with the seconds each still needs, and the
        least spare time of the others (as _late), each
        priced at a round of the lanes at least as urgent as its own (at least a full batch per
        cell type: every type's batch runs each turn), as _round_time prices that load when shared.
        Priced for every run at once, in arrays: the check walks every run in flight, and
        pricing each load apart was most of its cost. The arithmetic is round_time's, term for
        term, so the figures are the same."""
        order = sorted(runs, key=_urgency)
        types = list(lanes)
        column = {t: j for j, t in enumerate(types)}
        cells, left = [], []  # a lane's cell of `added` (run's row, its type's column); rounds per run
        rounds_left = self._rounds_left
        width = len(types)
        for i, run in enumerate(order):
            base = i * width
            for ref in run.lanes.values():
                cells.append(base + column[ref.cell_type])
            left.append(rounds_left(run))
        added = np.bincount(cells, minlength=len(order) * width).reshape(len(order), width)
        cap = self.policy.max_batch
        load = np.maximum(np.cumsum(added, axis=0), [min(lanes[t], cap) for t in types])
        if self.costs.group_of is not None:  # a round is its busiest executor's: priced whole
            round_s = np.array([self._round_time(dict(zip(types, map(int, row))), True) for row in load])
        else:
            full, rest = np.divmod(load, cap)
            mean = np.zeros(len(order))
            best = np.zeros(len(order))
            table = np.zeros(cap + 1)  # batch size -> step time (0 lanes: 0.0, as round_time adds nothing)
            for j, t in enumerate(types):  # in round_time's order, so the same sums
                cost = self.costs.costs.get(t)
                if cost is None:
                    continue
                sizes = np.unique(rest[:, j]).tolist() + [cap]
                for total, fastest in ((mean, False), (best, True)):
                    table[sizes] = [cost(b, fastest) if b else 0.0 for b in sizes]
                    total += full[:, j] * table[cap] + table[rest[:, j]]
            batches = (-(-load // cap)).sum(axis=1)
            stretch = 1.0 - min(self.admitting_share, MAX_ADMITTING_SHARE)
            round_s = (np.minimum(mean, PREDICTION_BOUND * best) + self.step_overhead_s * batches) / stretch
        deadlines = np.array([run.deadline for run in order])
        needed = np.array(left) * round_s
        is_late = now + needed > deadlines
        spare = deadlines[~is_late] - needed[~is_late]
        return ([(order[i], float(needed[i])) for i in np.flatnonzero(is_late)],
                float(spare.min()) - now if len(spare) else math.inf)

    def _learn_overhead(self, elapsed: float, batch: StepBatch, steps: int, admitting: float = 0.0,
                        now: float | None = None) -> None:
        """Fold one executed batch (`elapsed` seconds from its start to its update at `now`, the
        clock's reading unless given, for `steps` steps, of which `admitting` went to
        admitting arrivals before it ran) into the
        current spell: what its steps took beyond the cost model's price, and the time spent
        admitting. Once the spell holds SPELL_BUSY_S of busy time, or SPELL_SPAN_S of wall
        time has passed since its first batch, its excess per step and its share of admitting
        join the last OVERHEAD_SPELLS, and the per-step overhead and the admitting share
        become their medians. Measured against the model's price, not the device's time, so
        that the price plus the overhead is what a step took, whatever the model's table lags.

        The wall-time end is what lets the figures follow the load: the excess is mostly the
        lanes' starts and finishes spread over the steps, so it grows with the arrivals per
        step, and spells of busy time alone took seconds each at light load, pricing it for
        seconds at what a burst before it had cost."""
        cost = self.costs.costs.get(batch.cell_type)
        if steps <= 0 or cost is None:
            return
        if now is None:
            now = self.clock.now()
        if self._busy_steps == 0:
            self._spell_started = now - elapsed
        self._busy_elapsed += elapsed
        self._busy_admitting += admitting
        self._busy_excess += max(elapsed - admitting - steps * cost(batch.size), 0.0)
        self._busy_steps += steps
        if self._busy_elapsed > SPELL_BUSY_S or now - self._spell_started > SPELL_SPAN_S:
            self._overhead_spells.append(self._busy_excess / self._busy_steps)
            self.step_overhead_s = statistics.median(self._overhead_spells)
            busy = self._busy_elapsed
            self._admitting_spells.append(self._busy_admitting / busy if busy > 0 else 0.0)
            self.admitting_share = statistics.median(self._admitting_spells)
            self._busy_elapsed = self._busy_excess = self._busy_admitting = 0.0
            self._busy_steps = 0
