"""How requests run: the step loop, and the engine's models, placement and books.

`Engine.step()` is schedule -> execute -> update: admit what arrived and ask the policy for
a batch; run it on the executor its cell type is placed on; advance its lanes and hand the
finished ones back to their requests, which run their plain ops and start their next
recurrent step or respond. The engine decides and keeps the books; executors (real kernels,
or the simulator's priced costs) only run what they are given, so the same engine runs in
production and in virtual time. Time comes only from the injected clock.

Admission and the drop check (admission.py), each request's walk through its model (walk.py),
the decoders' lanes (decoding.py) and executors running at once (concurrent.py) are mixins of
Engine; runs.py holds the records they share.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import logging
import math
import threading
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np

from cellserve.engine.admission import OVERHEAD_SPELLS, Admission, machine_memory_bytes
from cellserve.engine.clock import Clock, MonotonicClock
from cellserve.engine.concurrent import ConcurrentSteps
from cellserve.engine.config import EngineConfig
from cellserve.engine.cost_model import CostModel
from cellserve.engine.decoding import Decoding
from cellserve.engine.output_length import OutputLength
from cellserve.engine.placement import plain_ops_key
from cellserve.engine.request import Request, Response, Status
from cellserve.engine.runs import _Run, _Work
from cellserve.engine.scheduler import Lane, make_policy
from cellserve.engine.walk import ModelWalk
from cellserve.errors import NotOnThisExecutor
from cellserve.executor.base import LONE_LANE_CHUNK, CellTypeSpec, Executor, StepResult
from cellserve.executor.batch import StepBatch
from cellserve.graph.model import (DenseNode, GraphDecoder, LayerStack, Model, RecurrentLayer, plain_group_key,
                                   plain_groups)
from cellserve.graph.stacking import stack_layers

log = logging.getLogger(__name__)

DEFAULT_EXECUTOR = "default"


@dataclass
class EngineStats:
    cell_steps: int = 0
    batch_size_sum: int = 0
    executed_flops: float = 0.0
    busy_s: float = 0.0  # device seconds of cell steps
    overhead_s: deque = field(default_factory=lambda: deque(maxlen=100_000))  # per step: time not on a device
    # per step: (time not on a device, batch size, lanes started, lanes finished, requests taken
    # in, runs the drop check priced); what a profile's HostProfile is fitted to (bench/profiler.py)
    step_records: deque = field(default_factory=lambda: deque(maxlen=100_000))
    steps_by_type: dict[str, int] = field(default_factory=dict)  # batched executions per cell type
    lanes_by_type: dict[str, int] = field(default_factory=dict)  # lane-steps per cell type
    # per wake-up of an idle engine: how long its first request waited for the step to begin
    wake_delays: deque = field(default_factory=lambda: deque(maxlen=100_000))
    lanes_started: int = 0
    lanes_finished: int = 0
    requests_taken: int = 0  # taken in from the inbox: admitted, refused or answered at once
    runs_checked: int = 0  # runs the drop checks priced, summed over the checks
    requests_answered: int = 0
    # per request answered OK that admission priced: its latency from admission to answer over
    # the price (below 1: priced too high, so admission refused too early)
    price_ratios: deque = field(default_factory=lambda: deque(maxlen=1000))
    # tensors that crossed from one executor to another (see Engine._note_reads):
    # (from executor, to executor) -> [transfers, bytes]
    transfers: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    @property
    def transfer_count(self) -> int:
        return sum(n for n, _ in self.transfers.values())

    @property
    def transfer_bytes(self) -> int:
        return sum(b for _, b in self.transfers.values())


class Engine(Admission, ModelWalk, Decoding, ConcurrentSteps):
    """One engine: many models, one step loop, cell types placed on executors.

    `executors` maps names to executors (default: one real executor for `config.device`
    named "default"); `placement` maps a cell type (see Model.cell_types), a model's plain
    ops (`plain_ops_key(model)`) or one group of them (`plain_group_key(model, k)`, before
    the model's key) to an executor's name; what it leaves out runs on the first executor.

    `concurrent`: run the executors at once, each on its own worker thread (engine/
    concurrent.py); None (the default) does so when there are several executors and each
    can (`Executor.concurrent`). With one executor, the loop runs every batch itself.

    Invariant: every submitted request gets exactly one Response (ok, invalid, rejected,
    dropped or error), through `_respond`, and a failure in one request's work never
    touches another's lanes.
    """

    def __init__(self, models: list[Model], config: EngineConfig | None = None, clock: Clock | None = None,
                 executors: dict[str, Executor] | None = None, placement: dict[str, str] | None = None,
                 concurrent: bool | None = None):
        self.config = config or EngineConfig()
        self.clock = clock or MonotonicClock()
        if executors is None:
            from cellserve.executor.kernel import executor_for  # real kernels only when none are given
            executors = {DEFAULT_EXECUTOR: executor_for(self.config.device, self.config.backend)}
        if not executors:
            raise ValueError("an engine needs at least one executor")
        self.executors = dict(executors)
        self.placement = dict(placement or {})
        unknown = sorted(set(self.placement.values()) - set(self.executors))
        if unknown:
            raise ValueError(f"placement names executors {unknown} that are not among {sorted(self.executors)}")
        self._default = next(iter(self.executors.values()))
        self.models: dict[str, Model] = {}
        self._placed: dict[str, Executor] = {}  # cell type -> executor
        # model -> per program position of a plain op: (its group's executor, the group's ops from
        # there on, the position after the group); None at a recurrent step
        self._plain: dict[str, list[tuple[Executor, tuple[DenseNode, ...], int] | None]] = {}
        self._group_keys: set[str] = set()  # placement keys of every plain-op group
        self._layer_types: dict[str, list[list[str]]] = {}  # model -> cell types of each recurrent step
        self._model_types: dict[str, list[str]] = {}  # model -> its cell types (Model.cell_types)
        self._step_decoders: dict[str, list[str | None]] = {}  # model -> per recurrent step, its decoder's cell type
        self._output_lengths: dict[str, OutputLength] = {}  # decoder cell type -> its lanes' steps, learnt
        self._decoders: dict[str, GraphDecoder] = {}  # cell type -> its decoder
        self._committed: dict[str, int] = {}  # cell type -> lanes of admitted requests yet to leave it
        # the same by urgency class (admission.py _urgency_class): class -> cell type -> lanes
        self._committed_by_class: dict[tuple[int, bool], dict[str, int]] = {}
        # lane storage: per model, the bytes a sequence's lanes hold per token (admission.py _admit)
        self._lane_bytes_per_token: dict[str, int] = {}
        self._lane_bytes_held = 0  # by the requests in flight
        self.lane_memory_limit = (int(self.config.max_lane_memory_mb * 2**20) if self.config.max_lane_memory_mb
                                  else machine_memory_bytes() // 4)
        for model in models:
            self._add_model(model)
        cell_types = {t for types in self._layer_types.values() for layer in types for t in layer}
        stray = sorted(k for k in self.placement if k not in cell_types and k not in self._group_keys
                       and k not in {plain_ops_key(m) for m in self.models})
        if stray:
            raise ValueError(f"placement names {stray}, which are neither cell types nor plain-op groups "
                             f"of the models served")
        order = {name: m.cell_types() for name, m in self.models.items()}
        self.policy = make_policy(self.config.policy, order, self.config.max_batch, self.config.batch_timeout_s)
        self.costs = CostModel(self.policy.max_batch)
        self.stats = EngineStats()
        self._inbox: deque[Request] = deque()
        self._cancels: deque[Request] = deque()  # Engine.cancel's, taken at the next step
        self._calls: deque[tuple] = deque()  # between_steps' (fn, future), run at the next step
        self._wake = threading.Event()
        # Set by submit, read by a lone lane's run between its steps (GIL released): a
        # request that arrives then joins after the step in progress, not after the whole run.
        self._arrived = np.zeros(1, np.int64)
        self._beam_lanes_moved = False  # a beam row's lanes changed in the last step (see _record_tokens)
        self._runs: dict[int, _Run] = {}
        self._first_step: list[_Run] = []  # traced runs whose first step is yet to start (docs/tracing.md)
        self._lane_ids = itertools.count(1)
        self._next_drop_check = 0.0
        self._stopping = threading.Event()  # serve_forever's stop: set, a stable batch is not run again
        self._last_step = -math.inf  # clock time of the last batch executed
        self._device_s = 0.0  # device seconds inside the current step (stats: the rest is overhead)
        # Seconds per step beyond the cost model's price: projections' Python, plain ops'
        # dispatch, admission, bookkeeping, waiting for the GIL. Learnt over spells of 50 ms
        # of busy time or 0.25 s of wall time (admission.py _learn_overhead); admission adds
        # it to every batch of a priced round (CostModel.priced_round). A per-step cost, not a
        # factor on kernel time: learnt at small batches (mostly Python), a factor overstated
        # large batches' steps several times over.
        # The median of the last spells' figures: one spell holding a collector pass or a
        # convoy on the GIL must not price every request that arrives in the next second.
        self.step_overhead_s = 0.0
        self._overhead_spells: deque[float] = deque(maxlen=OVERHEAD_SPELLS)
        self._busy_elapsed = self._busy_excess = self._busy_admitting = 0.0
        self._busy_steps = 0
        self._spell_started = 0.0  # clock time the current spell's first batch started
        # The share of the engine's busy time spent admitting arrivals (and refusing them, and
        # the drop check), learnt over the same spells: the steps of a request's life advance
        # only in the rest. Kept apart from the per-step overhead: counted per step, the work
        # of refusing a flood landed on the few steps still running and priced every round
        # of the next request at it, so that refusals bred refusals.
        self.admitting_share = 0.0
        self._admitting_spells: deque[float] = deque(maxlen=OVERHEAD_SPELLS)
        self._multi = len(self.executors) > 1  # track the tensors crossing executors
        self._init_concurrency(concurrent)
        if self.config.kernel_versions:
            self._use_versions()
        if self.config.profile:
            self._seed_costs()

    # ---- models and placement ----

    def _add_model(self, model: Model) -> None:
        if "/" in model.name or not model.name:
            raise ValueError(f"model name {model.name!r} must be non-empty and contain no '/'")
        if model.name in self.models:  # two models of one name: requests could reach only one
            raise ValueError(f"model {model.name!r} is already served; give each model its own name")
        if self.config.stack_layers:
            model = stack_layers(model)
        self.models[model.name] = model
        model_plain = self._executor_for(plain_ops_key(model.name))
        self._plain[model.name] = plain = [None] * len(model.program)
        for k, pcs in enumerate(plain_groups(model)):
            key = plain_group_key(model.name, k)
            self._group_keys.add(key)
            name = self.placement.get(key)
            executor = model_plain if name is None else self.executors[name]
            nodes = tuple(model.program[pc] for pc in pcs)
            for i, pc in enumerate(pcs):
                plain[pc] = (executor, nodes[i:], pcs[-1] + 1)
        if plain_ops_key(model.name) in model.cell_types():
            raise ValueError(f"model {model.name!r} has a cell type named {plain_ops_key(model.name)!r}, "
                             "the name of its plain ops")
        self._model_types[model.name] = model.cell_types()
        self._lane_bytes_per_token[model.name] = sum(s.lane_bytes_per_token() for s in model.recurrent_steps())
        types = iter(self._model_types[model.name])
        self._layer_types[model.name] = []
        steps = model.recurrent_steps()
        self._step_decoders[model.name] = []
        for step in steps:
            directions = len(step.directions) if isinstance(step, RecurrentLayer) else 1
            layer = [next(types) for _ in range(directions)]
            for d, cell_type in enumerate(layer):
                executor = self._executor_for(cell_type)
                executor.add_cell_type(CellTypeSpec(cell_type, step, d))
                self._placed[cell_type] = executor
                self._committed[cell_type] = 0
                if isinstance(step, GraphDecoder):
                    self._decoders[cell_type] = step
                    self._output_lengths.setdefault(cell_type, OutputLength())  # kept, as costs are
            self._layer_types[model.name].append(layer)
            self._step_decoders[model.name].append(layer[0] if isinstance(step, GraphDecoder) else None)

    def _use_versions(self) -> None:
        """--kernel-versions: the profiles handed to the one executor (executor/versions.py);
        VersionProfileError (a ValueError) naming the file or the mismatch."""
        from cellserve.plan.versions import VersionProfile, VersionProfileError, profiles_model

        try:
            profiles = [VersionProfile.from_json(path) for path in self.config.kernel_versions]
        except VersionProfileError as exc:
            raise VersionProfileError(f"--kernel-versions: {exc}") from None
        strays = sorted({p.model for p in profiles if not any(profiles_model(p.model, m) for m in self.models)})
        if strays:  # a profile that switches nothing is a mistake, not a default
            raise VersionProfileError(f"--kernel-versions: a profile of model(s) {strays}, which this engine does "
                                      f"not serve (it serves {sorted(self.models)})")
        if len(self.executors) > 1:
            raise VersionProfileError("--kernel-versions: kernel versions need one executor; a placement runs "
                                      + ", ".join(sorted(self.executors)))
        try:
            self._default.use_versions(profiles)
        except NotOnThisExecutor as exc:
            raise VersionProfileError(f"--kernel-versions: {exc}") from None

    def _executor_for(self, key: str) -> Executor:
        name = self.placement.get(key)
        return self._default if name is None else self.executors[name]

    def _seed_costs(self) -> None:
        """Step costs of every power-of-two batch (and the cap) before the first request, so
        that admission can price work from the start: a bucket first measured under load
        would start from whatever that one step took."""
        cap = self.policy.max_batch
        sizes = sorted({min(2 ** k, cap) for k in range(cap.bit_length())} | {cap})
        for cell_type, executor in self._placed.items():
            for b, seconds in executor.startup_costs(cell_type, sizes).items():
                self.costs.observe(cell_type, b, seconds)

    # ---- models added and removed while serving (cluster/ray_worker.py applies plans) ----

    def add_model(self, model: Model, like: str | None = None) -> None:
        """Serve one more model. Call it from the thread that steps the engine, between steps
        (serve_forever stopped, or before it runs): nothing here is safe against a step in
        progress. One executor only (the Ray workers' engines): with several, where the new
        cell types go and which run at once was decided at construction. Its cell types' step
        costs are measured now (with `config.profile`) unless a table for them is kept from
        an earlier `remove_model`, or `like` names a model served now whose cell types match
        this one's one for one in kind and shape (a reload of it): their learnt tables are
        copied, for the measuring runs on the stepping thread and holds up every model."""
        if len(self.executors) > 1:
            raise ValueError("add_model needs an engine with one executor; this one has "
                             + ", ".join(sorted(self.executors)))
        self._add_model(model)
        types = self._model_types[model.name]
        if hasattr(self.policy, "cell_order"):  # padded policies run a cohort's cell types in order
            self.policy.cell_order[model.name] = list(types)
        self._types_on = {self._default: frozenset(self._placed)}
        if self.config.profile:
            cap = self.policy.max_batch
            sizes = sorted({min(2 ** k, cap) for k in range(cap.bit_length())} | {cap})
            alike = self._alike_types(like, model.name) if like in self.models else {}
            for cell_type in types:
                if cell_type in self.costs.costs:
                    continue
                if alike.get(cell_type) in self.costs.costs:
                    self.costs.costs[cell_type] = copy.deepcopy(self.costs.costs[alike[cell_type]])
                    continue
                for b, seconds in self._placed[cell_type].startup_costs(cell_type, sizes).items():
                    self.costs.observe(cell_type, b, seconds)

    def _alike_types(self, old: str, new: str) -> dict[str, str]:
        """New cell type -> the old model's cell type of the same place, kind and shape; empty
        unless every one matches (a reload that changed the model's shape is measured anew)."""
        shapes = [_shape_of(s) for s in self.models[new].recurrent_steps()]
        if None in shapes or shapes != [_shape_of(s) for s in self.models[old].recurrent_steps()]:
            return {}
        old_types, new_types = self._model_types[old], self._model_types[new]
        return dict(zip(new_types, old_types)) if len(old_types) == len(new_types) else {}

    def remove_model(self, name: str, forget_costs: bool = False) -> None:
        """Stop serving a model with no request queued or in flight (ValueError otherwise:
        drain first), from the stepping thread as add_model. Its kernels are released; its
        learnt step costs are kept (a model added again starts from them) unless
        `forget_costs` (a model that will not come back under this name)."""
        if name not in self.models:
            raise ValueError(f"model {name!r} is not served")
        busy = sum(r.request.model == name for r in self._runs.values()) + sum(r.model == name for r in self._inbox)
        if busy:
            raise ValueError(f"model {name!r} has {busy} requests queued or in flight: drain it first")
        del self.models[name]
        self._plain.pop(name, None)
        ops = plain_group_key(name, 0).rsplit("/", 1)[0] + "/"  # "<model>/ops/": its groups' keys
        self._group_keys = {k for k in self._group_keys if not k.startswith(ops)}
        self._step_decoders.pop(name, None)
        self._layer_types.pop(name, None)
        for cell_type in self._model_types.pop(name, ()):
            executor = self._placed.pop(cell_type, None)
            self._committed.pop(cell_type, None)
            for lanes in self._committed_by_class.values():
                lanes.pop(cell_type, None)
            self._decoders.pop(cell_type, None)
            if forget_costs:
                self.costs.costs.pop(cell_type, None)
            if executor is not None:
                executor.remove_cell_type(cell_type)
        if hasattr(self.policy, "cell_order"):
            self.policy.cell_order.pop(name, None)
        self._types_on = {self._default: frozenset(self._placed)}

    # ---- the outside: submit from any thread ----

    def submit(self, request: Request) -> None:
        if request.arrival is None:
            request.arrival = self.clock.now()
        self._inbox.append(request)
        self._arrived[0] = 1
        for flag in self._stop_flags:  # concurrent executors' lone runs stop for it too
            flag[0] = 1
        self._wake.set()

    def between_steps(self, fn) -> concurrent.futures.Future:
        """Run fn() on the stepping thread before the next step, from any thread (what
        add_model and remove_model need); the future holds its result or its exception. A
        future cancelled before its turn is not run (one running cannot be cancelled)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.append((fn, future))
        self._wake.set()
        return future

    def cancel(self, request: Request) -> None:
        """Cancel a submitted request, from any thread (its client went away). At the next
        step its lanes are released and it is answered CANCELLED, unless it was answered
        already (then nothing happens); one not yet admitted is answered CANCELLED there."""
        request.cancelled = True
        self._cancels.append(request)
        self._arrived[0] = 1  # a lone lane's run stops after its step in progress
        for flag in self._stop_flags:
            flag[0] = 1
        self._wake.set()

    @property
    def active_requests(self) -> int:
        return len(self._runs)

    @property
    def queued_requests(self) -> int:
        return len(self._inbox)

    def idle(self) -> bool:
        return not self._inbox and not self._runs

    @property
    def cell_types(self) -> list[str]:
        """Every cell type of the models served, each placed on one executor."""
        return list(self._placed)

    def memory_bytes(self) -> dict[str, int]:
        """Weight bytes per executor."""
        return {name: ex.memory_bytes() for name, ex in self.executors.items()}

    # ---- the loop ----

    def step(self) -> bool:
        """One iteration: schedule -> execute -> update. Returns whether a batch ran."""
        work = self._schedule()
        if work is None:
            return False
        while work is not None:
            result = self._execute(work)
            work = self._update(work, result)
        return True

    def _schedule(self) -> _Work | None:
        """Admit the requests that arrived, drop those that can no longer make it, and ask
        the policy for the next batch (None: nothing to run)."""
        now = self.clock.now()
        self._device_s = 0.0
        s = self.stats
        counts = (s.lanes_started, s.lanes_finished, s.requests_taken, s.runs_checked)
        self._take_arrivals(now)
        admitted = self.clock.now()
        batch = self.policy.next_batch(now)
        if batch is None:
            return None
        work = _Work(batch, np.array(batch.slots, np.int64), np.array(batch.rows, np.int64),
                     np.array(batch.strides, np.int64), now, *counts)
        work.lone_steps = self._lone_steps(batch)
        work.admitting_s = admitted - now
        return work

    def _take_arrivals(self, now: float) -> None:
        """Admit the requests waiting now, and drop what can no longer make it when due."""
        if self._inbox and not self._runs:
            self.stats.wake_delays.append(max(now - self._inbox[0].arrival, 0.0))
        while self._calls:  # between_steps': models added or removed while serving
            fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before its turn: not run
            try:
                result = fn()
            except Exception as exc:  # the caller's to report
                future.set_exception(exc)
            else:
                future.set_result(result)
        while self._cancels:  # a cancelled request's lanes go before anything else runs
            run = self._runs.get(self._cancels.popleft().request_id)
            if run is not None:
                self._finish_run(run, Status.CANCELLED, "cancelled: the client went away")
        self._arrived[0] = 0  # before taking the inbox: a later submit sets it again
        # Only the requests already here: those that arrive meanwhile wait for the next step.
        # Under a flood (the frontend holding the GIL while each admission waits for it) an
        # open-ended drain admitted for seconds and never stepped, and every request missed.
        taken = len(self._inbox)
        for _ in range(taken):
            request = self._inbox.popleft()
            try:
                self._admit(request, now)
            except Exception as exc:  # a bug on one request's path must not stop the loop
                log.exception("admitting request %s failed", request.request_id)
                self._fail_request(request, f"internal error admitting the request: {type(exc).__name__}: {exc}")
        if taken:
            self.stats.requests_taken += taken
            self._default.engine_work(requests_taken=taken)
        if self._inbox:
            self._arrived[0] = 1  # a lone lane runs one step before they are admitted
        if self.config.drop_late and now >= self._next_drop_check:
            self._drop_late(now)

    def _execute(self, work: _Work) -> StepResult | None:
        """Run the batch on its executor. On failure, answer its requests with an error
        (the engine goes on) and return None."""
        batch = work.batch
        if self._first_step:  # empty unless a traced request waits for its first step
            self._stamp_first_steps(batch)
        try:
            result = self._placed[batch.cell_type].execute(batch, work.slots, work.rows, work.lone_steps,
                                                           self._arrived)
        except Exception as exc:  # the kernel failed: fail this batch's requests, not the engine
            log.exception("cell step of %s failed", batch.cell_type)
            self._fail_batch(batch, f"internal error in cell {batch.cell_type}: {type(exc).__name__}: {exc}")
            return None
        self._account(work, result)
        return result

    def _stamp_first_steps(self, batch: StepBatch) -> None:
        """FIRST_STEP_START of the traced runs with a lane in this batch (runs only while some
        traced run waits for its first step, so untraced work never pays for it)."""
        ids = set(batch.lane_ids)
        waiting = []
        for run in self._first_step:
            if run.responded:
                continue
            if ids.isdisjoint(run.lanes):
                waiting.append(run)
            else:
                run.request.trace.stamp("FIRST_STEP_START")
        self._first_step = waiting

    def _account(self, work: _Work, result: StepResult) -> None:
        """What an executed batch teaches the cost model, and the counts it adds to."""
        batch = work.batch
        self._device_s += result.busy_s
        self._last_step = work.started
        if result.steps:
            self.costs.observe(batch.cell_type, batch.size, result.busy_s / result.steps)
        s = self.stats
        s.cell_steps += result.steps
        s.batch_size_sum += batch.size * result.steps
        s.steps_by_type[batch.cell_type] = s.steps_by_type.get(batch.cell_type, 0) + result.steps
        s.lanes_by_type[batch.cell_type] = s.lanes_by_type.get(batch.cell_type, 0) + batch.size * result.steps
        s.executed_flops += result.flops
        s.busy_s += result.busy_s

    def _update(self, work: _Work, result: StepResult | None) -> _Work | None:
        """Advance the batch's lanes and hand finished ones back to their requests. Returns
        the batch to run again at once (a stable policy's next batch, while no lane
        finished, nothing arrived and no drop check is due), else None."""
        if result is None:
            return None
        batch = work.batch
        finished = self._complete(work, result)
        now = self.clock.now()
        overhead = max(now - work.started - self._device_s, 0.0)
        s = self.stats
        s.overhead_s.append(overhead)
        s.step_records.append((overhead, batch.size, s.lanes_started - work.lanes_started,
                               s.lanes_finished - work.lanes_finished, s.requests_taken - work.requests_taken,
                               s.runs_checked - work.runs_checked))
        self._learn_overhead(now - work.started, batch, result.steps, work.admitting_s, now)
        if finished or self._beam_lanes_moved or self._inbox or self._arrived[0] or not self.policy.stable or (
                self.config.drop_late and now >= self._next_drop_check) or self._stopping.is_set():
            return None
        work.rows += work.strides * result.steps
        work.started, self._device_s, work.admitting_s = now, 0.0, 0.0
        work.lanes_started, work.lanes_finished = s.lanes_started, s.lanes_finished
        work.requests_taken, work.runs_checked = s.requests_taken, s.runs_checked
        work.lone_steps = self._lone_steps(batch)
        return work

    def _complete(self, work: _Work, result: StepResult) -> list[Lane]:
        """Advance the batch's lanes; hand the finished ones back to their requests."""
        batch = work.batch
        ended = (self._record_tokens(batch, result.tokens, result.candidates) if result.tokens is not None
                 else frozenset())
        finished = self.policy.complete(batch, ended, result.steps)
        for lane in finished:
            self._lane_finished(lane)
        return finished

    def _lone_steps(self, batch: StepBatch) -> int:
        """How many steps each lane of a small batch may run alone, one lane after the other,
        in one execute (up to LONE_LANE_CHUNK); 0 when the batch takes the batched step.
        Small means up to the executor's `lone_lanes` for the cell type. A decoder's lane runs
        alone only by itself, greedy and not streaming (a streamed token goes out as it is
        made), for at most the tokens it has left."""
        if batch.size > self._placed[batch.cell_type].lone_lanes(batch.cell_type):
            return 0
        steps = LONE_LANE_CHUNK
        for lane_id in batch.lane_ids:
            lane = self.policy.lane(lane_id)
            if lane is None:
                return 0
            if lane.length is None:
                return self._lone_decoder_steps(batch, lane)
            steps = min(steps, lane.length - lane.step)
        return steps

    def _lone_decoder_steps(self, batch: StepBatch, lane: Lane) -> int:
        run = self._runs.get(lane.request_id)
        if batch.size != 1 or run is None or run.request.on_tokens is not None:
            return 0
        ref = run.lanes[lane.lane_id]
        if ref.beam is not None:
            return 0
        return min(LONE_LANE_CHUNK, ref.max_tokens - len(ref.tokens))

    def wake_at(self, now: float) -> float | None:
        """When an engine with nothing to run should step again though nothing arrives (a
        padded batch's timeout), or None."""
        return self.policy.wake_at(now)

    def run_until_idle(self, timeout_s: float = 60.0) -> None:
        """Step until every submitted request has responded (for tests and scripts). Waits
        for batch timeouts on the clock (`clock.sleep`); raises TimeoutError after
        `timeout_s` of clock time, or at once when nothing can run and nothing will wake."""
        if self._concurrent:
            return self._run_until_idle_concurrent(timeout_s)
        end = self.clock.now() + timeout_s
        while not self.idle():
            if self.clock.now() > end:
                raise TimeoutError(f"engine did not drain within {timeout_s} s")
            if self.step():
                continue
            self._sleep_until_wake()

    def _sleep_until_wake(self) -> None:
        """Nothing ran: sleep on the clock until the policy's next wake-up (at most 10 ms);
        raise when requests are in flight and nothing will ever wake (run_until_idle's rule)."""
        now = self.clock.now()
        wake = self.policy.wake_at(now)
        if wake is None:
            if self.idle() or self._inbox:
                return
            raise RuntimeError(f"engine stuck: {len(self._runs)} requests in flight and no batch to run")
        self.clock.sleep(max(0.0, min(wake - now, 0.01)))

    @contextmanager
    def kernel_threads_pinned(self, log_cores: bool = False):
        """This thread and its OpenMP workers pinned as serve_forever pins them (with
        `pin_threads`), for the block; their cores given back after it. For work run on this
        thread before serving (a model's warm-up), so that it runs as it will while serving."""
        with ExitStack() as pins:
            if not self._concurrent:  # executors running at once pin their own worker threads
                for executor in self.executors.values():
                    pinned = pins.enter_context(executor.pinned(self.config.pin_threads))
                    if pinned and log_cores:
                        log.info("kernel threads of executor %s pinned to cores %s", executor.name, pinned)
            yield

    def serve_forever(self, stop: threading.Event) -> None:
        """The worker loop of a server: step while there is work, wait when there is none.

        Run it in the process's main thread, and submit from others: libgomp (torch's OpenMP,
        which the CPU kernels use) cuts its spin-waiting when more OpenMP threads exist than
        cores, and a second thread that runs parallel regions makes that so (an empty
        parallel region is far slower from another thread; see docs/performance.md).

        Start the threads that submit (front ends) before: with `pin_threads`, this thread
        and its OpenMP workers are pinned to one core each while the loop runs (see
        kernels/affinity.py), and threads started from here would inherit its core. With
        executors running at once, each pins its own worker thread instead (concurrent.py)."""
        if self._concurrent:
            return self._serve_forever_concurrent(stop)
        with self.kernel_threads_pinned(log_cores=True):
            self._stopping = stop  # a stable batch run again and again gives way to it (_update)
            while not stop.is_set():
                if self.step():
                    continue
                now = self.clock.now()
                wake = self.policy.wake_at(now)
                self._wake.wait(timeout=0.05 if wake is None else max(0.0, min(wake - now, 0.05)))
                self._wake.clear()

    def abort_all(self, reason: str) -> None:
        """Answer every queued and in-flight request with an error (call from the worker
        thread, or after it stopped): nothing is left unanswered when the engine goes away."""
        while self._inbox:
            self._respond_early(self._inbox.popleft(), Status.ERROR, reason)
        for run in list(self._runs.values()):
            self._finish_run(run, Status.ERROR, reason)

    # ---- responses ----

    def _finish_run(self, run: _Run, status: Status, reason: str = "", outputs: dict | None = None) -> None:
        for lane_id, ref in run.lanes.items():
            self.policy.remove(lane_id)
            if self._busy and ref.executor in self._busy:  # its batch may hold the lane: free it after
                self._defer(ref.executor, ref.executor.release_lane, ref.cell_type, ref.storage)
            else:
                ref.executor.release_lane(ref.cell_type, ref.storage)
        run.lanes.clear()
        if self._runs.pop(run.request.request_id, None) is not None:
            self._commit(run, -1)
            self._lane_bytes_held -= run.lane_bytes
        if run.responded:
            raise RuntimeError(f"request {run.request.request_id} answered twice")
        run.responded = True
        if status is Status.OK and run.priced_s:
            self.stats.price_ratios.append((self.clock.now() - run.admitted) / run.priced_s)
        self._respond(run.request, Response(run.request.request_id, status, outputs or {}, reason,
                                            run.request.arrival, self.clock.now(), run.admitted,
                                            run.state if status is Status.OK else {},
                                            congestion=status is Status.DROPPED))

    def _fail_request(self, request: Request, reason: str) -> None:
        run = self._runs.get(request.request_id)
        if run is not None and not run.responded:
            self._finish_run(run, Status.ERROR, reason)
        elif run is None:
            self._respond_early(request, Status.ERROR, reason)

    def _fail_batch(self, batch: StepBatch, reason: str) -> None:
        request_ids = {lane.request_id for lane in map(self.policy.lane, batch.lane_ids) if lane is not None}
        for request_id in request_ids:
            run = self._runs.get(request_id)
            if run is not None:
                self._finish_run(run, Status.ERROR, reason)

    def _respond_early(self, request: Request, status: Status, reason: str, congestion: bool = False) -> None:
        """Answer a request that never ran (refused or invalid at admission)."""
        self._respond(request, Response(request.request_id, status, {}, reason, request.arrival, self.clock.now(),
                                        congestion=congestion))

    def _respond(self, request: Request, response: Response) -> None:
        """The one place a request is answered. Every path that takes a request out of the
        inbox or out of `_runs` ends here exactly once: admission answers the requests it
        refuses, `_finish_run` the ones that ran (and raises if a run were answered twice)."""
        self.stats.requests_answered += 1
        if request.trace is not None:
            request.trace.stamp("COMPUTE_END")
        if request.on_done is not None:
            try:
                request.on_done(response)
            except Exception:  # a client's callback must not stop the engine
                log.exception("on_done callback of request %s failed", request.request_id)


def _shape_of(step) -> tuple | None:
    """What a recurrent step's cost depends on: its layers' kinds and sizes (None for a
    decoder, whose cost its graph sets: never taken as alike)."""
    if isinstance(step, LayerStack):
        return tuple(_shape_of(layer) for layer in step.layers)
    if isinstance(step, RecurrentLayer):
        return (step.kind, step.hidden, step.input_size, len(step.directions), step.token_table is not None)
    return None
