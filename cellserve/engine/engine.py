"""How requests run: admission, the step loop, and each request's walk through its model.

`Engine.step()` is the whole loop body: admit what arrived, ask the policy for a batch,
execute it on its kernel, and hand finished lanes back to their requests, which run their
plain ops and start their next recurrent layer or respond. The policy reads time only from
the injected clock and never runs a kernel; the engine is the only caller of kernels.

Invariant: every submitted request gets exactly one Response (ok, invalid, rejected,
dropped or error), and a failure in one request's work never touches another's lanes.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
import numpy as np
import torch

from cellserve.engine.clock import Clock, MonotonicClock
from cellserve.engine.config import EngineConfig
from cellserve.engine.cost_model import CostModel
from cellserve.engine.request import Request, Response, Status
from cellserve.engine.scheduler import Lane, StepBatch, make_policy
from cellserve.engine.validation import validate_inputs
from cellserve.errors import CellserveError, InvalidInput, UnknownModel
from cellserve.graph import dense_ops
from cellserve.graph.model import AttentionDecoder, DenseNode, LayerStack, Model, RecurrentLayer
from cellserve.graph.stacking import stack_layers
from cellserve.kernels import affinity
from cellserve.kernels.cell import CellKernel, LaneStorage
from cellserve.kernels.decoder import DecoderKernel
from cellserve.kernels.stack import StackKernel


log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    cell_steps: int = 0
    batch_size_sum: int = 0
    executed_flops: float = 0.0
    busy_s: float = 0.0
    overhead_s: deque = field(default_factory=lambda: deque(maxlen=100_000))
    steps_by_type: dict[str, int] = field(default_factory=dict)  # batched executions per cell type
    lanes_by_type: dict[str, int] = field(default_factory=dict)  # lane-steps per cell type


@dataclass(eq=False)
class _LaneRef:
    """Where one of a request's lanes lives, and where its results go."""

    kernel: CellKernel | StackKernel | DecoderKernel
    storage: LaneStorage
    direction: int
    batch_index: int
    tokens: list[int] | None = None  # a decoder lane's output so far


@dataclass(eq=False)
class _Run:
    """A request in flight: its tensors, where it is in the program, its running lanes."""

    request: Request
    model: Model
    env: dict
    deadline: float
    rounds_plan: list[int]  # expected steps of each recurrent step of the program
    batch: int  # sequences in the request: lanes per cell type
    pc: int = 0
    layer: int = 0  # recurrent steps of the program completed
    lanes: dict[int, _LaneRef] = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # of the current recurrent step: per layer name, or per decoder row
    state: dict = field(default_factory=dict)  # final (h, c) per layer, when the request asks
    admitted: float | None = None
    responded: bool = False


_DROP_CHECK_S = 0.01
# Steps a lone lane runs per call of its kernel's run_lane; an arrival stops the call early
# (see _arrived), so this bounds only how long deadlines go unchecked (64 x ~80 us at lstm-512).
LONE_LANE_CHUNK = 64


def _layers(step: RecurrentLayer | LayerStack) -> list[RecurrentLayer]:
    return step.layers if isinstance(step, LayerStack) else [step]


class Engine:
    def __init__(self, models: list[Model], config: EngineConfig | None = None, clock: Clock | None = None):
        self.config = config or EngineConfig()
        self.clock = clock or MonotonicClock()
        self.device = torch.device(self.config.device)
        self.models = {}
        self.kernels: dict[str, CellKernel | StackKernel | DecoderKernel] = {}
        self._step_spec: dict[str, RecurrentLayer | LayerStack | AttentionDecoder] = {}
        self._layer_types: dict[str, list[list[str]]] = {}  # model -> cell types of each recurrent step
        self._committed: dict[str, int] = {}  # cell type -> lanes of admitted requests yet to leave it
        for model in models:
            self._add_model(model)
        order = {name: m.cell_types() for name, m in self.models.items()}
        self.policy = make_policy(self.config.policy, order, self.config.max_batch, self.config.batch_timeout_s)
        self.costs = CostModel(self.policy.max_batch)
        self.stats = EngineStats()
        self._inbox: deque[Request] = deque()
        self._wake = threading.Event()
        # Set by submit, read by a lone lane's run_lane between its steps (GIL released): a
        # request that arrives then joins after the step in progress, not after the whole run.
        self._arrived = np.zeros(1, np.int64)
        self._runs: dict[int, _Run] = {}
        self._lane_ids = itertools.count(1)
        self._next_drop_check = 0.0
        self._compute_s = 0.0
        # Wall time of busy steps over the modelled time of their kernels: what projections,
        # plain ops, admission and bookkeeping add on top of the cell steps (>= 1).
        self.overhead_factor = 1.0
        self._busy_wall = self._busy_modelled = 0.0
        if self.config.profile:
            self._profile()

    # ---- models and kernels ----

    def _add_model(self, model: Model) -> None:
        if "/" in model.name or not model.name:
            raise ValueError(f"model name {model.name!r} must be non-empty and contain no '/'")
        if self.config.stack_layers:
            model = stack_layers(model)
        self.models[model.name] = model
        types = iter(model.cell_types())
        self._layer_types[model.name] = []
        for step in model.recurrent_steps():
            if isinstance(step, RecurrentLayer):
                layer = [next(types) for _ in step.directions]
                for cell_type, w in zip(layer, step.directions):
                    self.kernels[cell_type] = CellKernel(step.kind, step.hidden, w, self.device,
                                                         step.token_table, self.config.backend)
            elif isinstance(step, LayerStack):
                layer = [next(types)]
                self.kernels[layer[0]] = StackKernel(step, self.device, self.config.backend)
            else:
                layer = [next(types)]
                self.kernels[layer[0]] = DecoderKernel(step, self.device)
            for cell_type in layer:
                self._step_spec[cell_type] = step
                self._committed[cell_type] = 0
            self._layer_types[model.name].append(layer)

    def _profile(self) -> None:
        """Time each cell type at a few batch sizes on dummy lanes, so that admission has
        step costs before the first real request."""
        for cell_type, kernel in self.kernels.items():
            spec = self._step_spec[cell_type]
            # every power-of-two bucket: a bucket first measured under load would start from
            # whatever that one step took
            sizes = {min(2 ** k, self.policy.max_batch) for k in range(self.policy.max_batch.bit_length())}
            for b in sorted(sizes | {self.policy.max_batch}):
                storages = [self._dummy_lane(kernel, spec) for _ in range(b)]
                slots = np.array([s.slot for s in storages], np.int64)
                rows = np.array([s.base for s in storages], np.int64)
                samples = []
                for _ in range(3):  # the median: the first run of a size is often a cold one
                    t0 = time.perf_counter()
                    kernel.step(slots, rows) if isinstance(kernel, DecoderKernel) else kernel.step(slots, rows, rows)
                    samples.append(time.perf_counter() - t0)
                self.costs.observe(cell_type, b, sorted(samples)[1])
                for s in storages:
                    kernel.release(s)

    @staticmethod
    def _dummy_lane(kernel, spec) -> LaneStorage:
        if isinstance(kernel, DecoderKernel):
            h = np.zeros(spec.hidden, np.float32)
            return kernel.start(np.zeros((8, spec.hidden), np.float32), h, h)
        x = np.zeros(4, np.int64) if spec.token_table is not None else np.zeros((4, spec.input_size), np.float32)
        return kernel.start(x)

    # ---- the outside: submit from any thread ----

    def submit(self, request: Request) -> None:
        if request.arrival is None:
            request.arrival = self.clock.now()
        self._inbox.append(request)
        self._arrived[0] = 1
        self._wake.set()

    @property
    def active_requests(self) -> int:
        return len(self._runs)

    def idle(self) -> bool:
        return not self._inbox and not self._runs

    # ---- the loop ----

    def step(self) -> bool:
        """One iteration: admit arrivals, run one batch, hand results back. Returns whether a
        batch ran."""
        t_start = self.clock.now()
        self._compute_s = 0.0
        self._arrived[0] = 0  # before taking the inbox: a later submit sets it again
        # Only the requests already here: those that arrive meanwhile wait for the next step.
        # Under a flood (the frontend holding the GIL while each admission waits for it) an
        # open-ended drain admitted for seconds and never stepped, and every request missed.
        for _ in range(len(self._inbox)):
            request = self._inbox.popleft()
            try:
                self._admit(request, t_start)
            except Exception as exc:  # a bug on one request's path must not stop the loop
                log.exception("admitting request %s failed", request.request_id)
                self._fail_request(request, f"internal error admitting the request: {type(exc).__name__}: {exc}")
        if self._inbox:
            self._arrived[0] = 1  # a lone lane runs one step before they are admitted
        if self.config.drop_late and t_start >= self._next_drop_check:
            self._drop_late(t_start)
        batch = self.policy.next_batch(t_start)
        if batch is None:
            return False
        slots = np.array(batch.slots, np.int64)
        rows = np.array(batch.rows, np.int64)
        strides = np.array(batch.strides, np.int64)
        while True:
            try:
                ended, steps = self._execute(batch, slots, rows, self._lone_steps(batch))
            except Exception as exc:  # the kernel failed: fail this batch's requests, not the engine
                log.exception("cell step of %s failed", batch.cell_type)
                self._fail_batch(batch, f"internal error in cell {batch.cell_type}: {type(exc).__name__}: {exc}")
                return True
            finished = self.policy.complete(batch, ended, steps)
            for lane in finished:
                self._lane_finished(lane)
            now = self.clock.now()
            self.stats.overhead_s.append(max(now - t_start - self._compute_s, 0.0))
            self._learn_overhead(now - t_start, batch, steps)
            # While no lane finished and nothing arrived, a stable policy's next batch is this
            # one again (see StepBatch): run it without asking.
            if finished or self._inbox or not self.policy.stable or (
                    self.config.drop_late and now >= self._next_drop_check):
                return True
            rows += strides * steps
            t_start, self._compute_s = now, 0.0

    def _learn_overhead(self, wall: float, batch: StepBatch, steps: int) -> None:
        cost = self.costs.costs.get(batch.cell_type)
        if cost is None:
            return
        self._busy_wall += wall
        self._busy_modelled += steps * cost(batch.size)
        if self._busy_wall > 0.05 and self._busy_modelled > 0:
            ratio = max(1.0, self._busy_wall / self._busy_modelled)
            self.overhead_factor += 0.3 * (ratio - self.overhead_factor)
            self._busy_wall = self._busy_modelled = 0.0

    def _round_time(self, load: dict[str, int]) -> float:
        return self.costs.round_time(load) * self.overhead_factor

    def _lone_steps(self, batch: StepBatch) -> int:
        """How many steps each lane of a small batch may run alone, one lane after the other,
        in one call of its kernel's run_lane (up to LONE_LANE_CHUNK); 0 when the batch takes
        the batched step. Small means up to the kernel's `lone_lanes`."""
        kernel = self.kernels[batch.cell_type]
        if batch.size > getattr(kernel, "lone_lanes", 0):
            return 0
        steps = LONE_LANE_CHUNK
        for lane_id in batch.lane_ids:
            lane = self.policy.lane(lane_id)
            if lane is None or lane.length is None:
                return 0
            steps = min(steps, lane.length - lane.step)
        return steps

    def run_until_idle(self, timeout_s: float = 60.0) -> None:
        """Step until every submitted request has responded (for tests and scripts)."""
        end = time.monotonic() + timeout_s
        while not self.idle():
            if time.monotonic() > end:
                raise TimeoutError("engine did not drain in time")
            if not self.step():
                wake = self.policy.wake_at(self.clock.now())
                if wake is not None:
                    time.sleep(max(0.0, min(wake - self.clock.now(), 0.01)))

    def serve_forever(self, stop: threading.Event) -> None:
        """The worker loop of a server: step while there is work, sleep when there is none.

        Run it in the process's main thread, and submit from others: libgomp (torch's OpenMP,
        which the CPU kernels use) cuts its spin-waiting when more OpenMP threads exist than
        cores, and a second thread that runs parallel regions makes that so; measured here,
        an empty parallel region took 0.5 us from the main thread and 8.8 us from another.

        Start the threads that submit (front ends) before: with `pin_threads`, this thread
        and its OpenMP workers are pinned to one core each while the loop runs (see
        kernels/affinity.py), and threads started from here would inherit its core."""
        with affinity.openmp_threads_pinned(self.config.pin_threads) as pinned:
            if pinned:
                log.info("kernel threads pinned to cores %s", pinned)
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

    # ---- admission ----

    def _admit(self, request: Request, now: float) -> None:
        model = self.models.get(request.model)
        if model is None:
            self._respond_early(request, Status.INVALID, f"{UnknownModel.__name__}: unknown model {request.model!r}")
            return
        try:
            inputs = validate_inputs(model, request.inputs)
        except InvalidInput as exc:
            self._respond_early(request, Status.INVALID, str(exc))
            return
        if len(self._runs) >= self.config.max_active:
            self._respond_early(request, Status.REJECTED, f"queue full: {len(self._runs)} requests in flight")
            return
        if request.timeout_s is not None and not request.timeout_s > 0:
            self._respond_early(request, Status.INVALID, f"timeout must be > 0 seconds, got {request.timeout_s}")
            return
        timeout = request.timeout_s if request.timeout_s is not None else self.config.default_timeout_s
        deadline = request.arrival + timeout if timeout is not None else math.inf
        run = _Run(request, model, {**model.constants, **inputs}, deadline,
                   self._rounds_plan(model, inputs), model.batch_size(inputs))
        if self.config.admission and deadline < math.inf:
            load = dict(self._committed)
            for t in run.model.cell_types():
                load[t] += run.batch
            # An idle engine has nothing running to learn from: price at the fastest steps seen,
            # or one slow spell could make it refuse everything from then on.
            round_s = self._round_time(load) if self._runs else self.costs.round_time(load, best=True)
            predicted = sum(run.rounds_plan) * round_s
            # Headroom: requests admitted later slow this one down too.
            if predicted > self.config.admission_headroom * (deadline - now):
                self._respond_early(request, Status.REJECTED,
                                    f"predicted finish in {predicted * 1e3:.1f} ms misses the deadline "
                                    f"({max(deadline - now, 0.0) * 1e3:.1f} ms left)")
                return
        self._commit(run, +1)
        run.admitted = now
        self._runs[request.request_id] = run
        self._advance(run)

    def _rounds_plan(self, model: Model, inputs: dict) -> list[int]:
        length = 1
        for name, sem in model.semantics.items():
            if sem.time_axis is not None:
                length = max(length, inputs[name].shape[sem.time_axis])
        return [length + (1 if isinstance(s, AttentionDecoder) else 0) for s in model.recurrent_steps()]

    def _commit(self, run: _Run, sign: int, layers: slice | None = None) -> None:
        """Add (+1) or take back (-1) a run's lanes in the cell types of its layers."""
        for types in self._layer_types[run.model.name][layers or slice(run.layer, None)]:
            for t in types:
                self._committed[t] += sign * run.batch

    def _rounds_left(self, run: _Run) -> int:
        rounds = sum(run.rounds_plan[run.layer + 1:])
        steps = [self.policy.lane(i) for i in run.lanes]
        current = [(lane.length or run.rounds_plan[run.layer]) - lane.step for lane in steps if lane is not None]
        return rounds + max(current, default=run.rounds_plan[run.layer] if run.layer < len(run.rounds_plan) else 0)

    def _drop_late(self, now: float) -> None:
        """Drop admitted requests that can no longer finish in time: their work is wasted.
        Priced at the lanes running now (admission prices the committed load: a request is
        refused on the slow estimate but dropped only on the fast one)."""
        self._next_drop_check = now + _DROP_CHECK_S
        round_s = self._round_time({t: self.policy.lanes_of(t) for t in self.kernels})
        for run in [r for r in self._runs.values() if r.deadline < math.inf]:
            if now + self._rounds_left(run) * round_s > run.deadline:
                self._finish_run(run, Status.DROPPED,
                                 f"dropped: can no longer finish before its deadline "
                                 f"({max(run.deadline - now, 0.0) * 1e3:.1f} ms left)")

    # ---- a request's walk through its program ----

    def _advance(self, run: _Run) -> None:
        """Run plain ops until the next recurrent step starts (or the program ends)."""
        t0 = self.clock.now()
        try:
            program = run.model.program
            while run.pc < len(program):
                step = program[run.pc]
                if isinstance(step, DenseNode):
                    dense_ops.run(step, run.env)
                    run.pc += 1
                elif isinstance(step, (RecurrentLayer, LayerStack)):
                    self._start_layer(run, step)
                    return
                else:
                    self._start_decoder(run, step)
                    return
            outputs = {spec.name: run.env[spec.name] for spec in run.model.outputs}
            self._finish_run(run, Status.OK, outputs=outputs)
        except CellserveError as exc:
            self._finish_run(run, Status.INVALID if isinstance(exc, InvalidInput) else Status.ERROR, str(exc))
        except Exception as exc:  # a model op failing on this request's data: this request only
            self._finish_run(run, Status.ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self._compute_s += self.clock.now() - t0

    def _start_layer(self, run: _Run, step: RecurrentLayer | LayerStack) -> None:
        layers = _layers(step)
        x = run.env[layers[0].x]
        time_len, batch = x.shape[:2]
        lens = np.full(batch, time_len, np.int64)
        if layers[0].seq_lens:  # never in a stack
            lens = np.asarray(run.env[layers[0].seq_lens]).astype(np.int64).reshape(-1)
            if lens.shape != (batch,) or lens.min() < 1 or lens.max() > time_len:
                raise InvalidInput(f"sequence lengths {lens.tolist()} must be {batch} values in [1, {time_len}]")
        states = [self._initial_state(run, layer, batch) for layer in layers]
        run.outputs = {layer.name: {"y": np.zeros((time_len, len(layer.directions), batch, layer.hidden), np.float32),
                                    "h": np.empty((len(layer.directions), batch, layer.hidden), np.float32),
                                    "c": np.empty((len(layer.directions), batch, layer.hidden), np.float32)}
                       for layer in layers}
        if isinstance(step, LayerStack):  # one lane per sequence through every layer
            cell_type = f"{run.model.name}/{step.name}"
            kernel = self.kernels[cell_type]
            for b in range(batch):
                row_states = [(None if h0 is None else h0[0, b], None if c0 is None else c0[0, b]) for h0, c0 in states]
                storage = kernel.start(x[:, b], row_states)
                self.stats.executed_flops += time_len * step.flops_per_token_projection()
                self._add_lane(run, cell_type, time_len, storage, storage.base, 1, _LaneRef(kernel, storage, 0, b))
            return
        layer, (h0, c0) = step, states[0]
        for d in range(len(layer.directions)):
            cell_type = f"{run.model.name}/{layer.name}/{d}"
            kernel = self.kernels[cell_type]
            reverse = layer.is_reverse(d)
            for b in range(batch):
                n = int(lens[b])
                storage = kernel.start(x[:n, b], None if h0 is None else h0[d, b], None if c0 is None else c0[d, b])
                self.stats.executed_flops += n * layer.flops_per_token_projection()
                row0, stride = (storage.base + n - 1, -1) if reverse else (storage.base, 1)
                self._add_lane(run, cell_type, n, storage, row0, stride, _LaneRef(kernel, storage, d, b))

    @staticmethod
    def _initial_state(run: _Run, layer: RecurrentLayer, batch: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """A layer's (h0, c0), [directions, batch, hidden] each or None: a stream's carried
        state, else the graph's initial-state inputs."""
        carried = (run.request.initial_state or {}).get(layer.name)
        if carried is None:
            return (run.env[layer.initial_h] if layer.initial_h else None,
                    run.env[layer.initial_c] if layer.initial_c else None)
        h0, c0 = carried  # a stream's next chunk goes on from where the last one ended
        if h0.shape != (len(layer.directions), batch, layer.hidden):
            raise InvalidInput(f"carried state of layer {layer.name!r} has shape {list(h0.shape)}, "
                               f"the input needs {[len(layer.directions), batch, layer.hidden]}")
        return h0, c0

    def _start_decoder(self, run: _Run, dec: AttentionDecoder) -> None:
        memory, h0, c0 = run.env[dec.memory], run.env[dec.initial_h], run.env[dec.initial_c]
        cell_type = f"{run.model.name}/{dec.name}"
        kernel = self.kernels[cell_type]
        run.outputs = {}
        for b in range(memory.shape[1]):
            storage = kernel.start(memory[:, b], h0[b], c0[b])
            self._add_lane(run, cell_type, None, storage, storage.base, 0,
                           _LaneRef(kernel, storage, 0, b, tokens=[]))

    def _add_lane(self, run: _Run, cell_type: str, length: int | None, storage: LaneStorage,
                  row0: int, stride: int, ref: _LaneRef) -> None:
        lane = Lane(next(self._lane_ids), run.request.request_id, cell_type, length, run.deadline,
                    run.request.priority, run.request.arrival, storage.slot, row0, stride)
        run.lanes[lane.lane_id] = ref
        self.policy.add(lane)

    # ---- executing a batch and taking its results back ----

    def _execute(self, batch: StepBatch, slots: np.ndarray, rows: np.ndarray,
                 lone_steps: int) -> tuple[frozenset[int], int]:
        """Run one batched step, or up to `lone_steps` steps of each lane alone (see
        _lone_steps). Returns the lanes that ended and the steps run: a lone run stops early
        when a request arrives, and the other lanes then run as many as the first."""
        steps = 1
        kernel = self.kernels[batch.cell_type]
        t0 = self.clock.now()
        ended: frozenset[int] = frozenset()
        spec = self._step_spec[batch.cell_type]
        if isinstance(kernel, DecoderKernel):
            tokens = kernel.step(slots, rows)
            ended = frozenset(self._record_tokens(batch, tokens, spec))
            flops = sum(spec.flops_per_step(int(kernel.memory_len[s])) for s in batch.slots)
        elif lone_steps:
            first, *others = zip(batch.slots, rows.tolist(), batch.strides)
            steps = kernel.run_lane(*first, lone_steps, self._arrived)
            for slot, row, stride in others:
                kernel.run_lane(slot, row, stride, steps)
            flops = batch.size * steps * spec.flops_per_step()
        else:
            kernel.step(slots, rows, rows)
            flops = batch.size * spec.flops_per_step()
        dt = self.clock.now() - t0
        self._compute_s += dt
        self.costs.observe(batch.cell_type, batch.size, dt / steps)
        s = self.stats
        s.cell_steps += steps
        s.batch_size_sum += batch.size * steps
        s.steps_by_type[batch.cell_type] = s.steps_by_type.get(batch.cell_type, 0) + steps
        s.lanes_by_type[batch.cell_type] = s.lanes_by_type.get(batch.cell_type, 0) + batch.size * steps
        s.executed_flops += flops
        s.busy_s += dt
        return ended, steps

    def _record_tokens(self, batch: StepBatch, tokens: np.ndarray, dec: AttentionDecoder) -> list[int]:
        ended = []
        for lane_id, token in zip(batch.lane_ids, tokens.tolist()):
            lane = self.policy.lane(lane_id)
            if lane is None:
                continue  # padding
            ref = self._runs[lane.request_id].lanes[lane_id]
            if token == dec.eos:
                ended.append(lane_id)
                continue
            ref.tokens.append(token)
            if len(ref.tokens) >= dec.max_len:
                ended.append(lane_id)
        return ended

    def _lane_finished(self, lane: Lane) -> None:
        run = self._runs.get(lane.request_id)
        if run is None:
            return
        t0 = self.clock.now()
        ref = run.lanes.pop(lane.lane_id)
        if isinstance(ref.kernel, DecoderKernel):
            ref.kernel.release(ref.storage)
            run.outputs[ref.batch_index] = ref.tokens
        else:
            results = ref.kernel.finish(ref.storage)
            layers = _layers(run.model.program[run.pc])
            n, d, b = ref.storage.length, ref.direction, ref.batch_index
            for layer, (y, h, c) in zip(layers, results if isinstance(ref.kernel, StackKernel) else [results]):
                outputs = run.outputs[layer.name]
                outputs["y"][:n, d, b] = y
                outputs["h"][d, b] = h
                if c is not None:
                    outputs["c"][d, b] = c
        self._compute_s += self.clock.now() - t0
        if not run.lanes:
            self._store_outputs(run)
            self._commit(run, -1, slice(run.layer, run.layer + 1))
            run.layer += 1
            run.pc += 1
            self._advance(run)

    def _store_outputs(self, run: _Run) -> None:
        step = run.model.program[run.pc]
        if isinstance(step, (RecurrentLayer, LayerStack)):
            for layer in _layers(step):
                outputs = run.outputs[layer.name]
                for name, key in ((layer.y, "y"), (layer.y_h, "h"), (layer.y_c, "c")):
                    if name:
                        run.env[name] = outputs[key]
                if run.request.return_state:
                    run.state[layer.name] = (outputs["h"], outputs["c"] if layer.kind == "lstm" else None)
        else:
            rows = [run.outputs[b] for b in sorted(run.outputs)]
            width = max(1, max(len(r) for r in rows))
            tokens = np.full((len(rows), width), step.pad, np.int64)
            for b, r in enumerate(rows):
                tokens[b, : len(r)] = r
            run.env[step.output] = tokens

    # ---- responses ----

    def _finish_run(self, run: _Run, status: Status, reason: str = "", outputs: dict | None = None) -> None:
        for lane_id, ref in run.lanes.items():
            self.policy.remove(lane_id)
            ref.kernel.release(ref.storage)
        run.lanes.clear()
        if self._runs.pop(run.request.request_id, None) is not None:
            self._commit(run, -1)
        if run.responded:
            raise RuntimeError(f"request {run.request.request_id} answered twice")
        run.responded = True
        self._deliver(run.request, Response(run.request.request_id, status, outputs or {}, reason,
                                            run.request.arrival, self.clock.now(), run.admitted,
                                            run.state if status is Status.OK else {}))

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

    def _respond_early(self, request: Request, status: Status, reason: str) -> None:
        self._deliver(request, Response(request.request_id, status, {}, reason, request.arrival, self.clock.now()))

    @staticmethod
    def _deliver(request: Request, response: Response) -> None:
        if request.on_done is not None:
            try:
                request.on_done(response)
            except Exception:  # a client's callback must not stop the engine
                log.exception("on_done callback of request %s failed", request.request_id)
