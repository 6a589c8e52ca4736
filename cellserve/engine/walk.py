"""A request's walk through its model's program (a mixin of Engine): running its plain ops
on their executors, starting a recurrent step's lanes (one per sequence and direction, or one
per sequence through a stack of layers), and, as each lane finishes, putting the step's
outputs together and going on to the next step, or answering once the program ends.

A failure on the walk (bad sequence lengths, a carried state of the wrong shape, a model op
failing on this request's data) answers this request only; the decoders' part of the walk is
in decoding.py."""

from __future__ import annotations

import logging

import numpy as np

from cellserve.engine.beam import BeamRow
from cellserve.engine.request import Status
from cellserve.engine.runs import _LaneRef, _Run
from cellserve.engine.scheduler import Lane
from cellserve.errors import CellserveError, InvalidInput
from cellserve.graph.model import LayerStack, RecurrentLayer, layers_of
from cellserve.kernels.cell import LaneStorage

log = logging.getLogger(__name__)


def _layer_outputs(layer: RecurrentLayer, parts: dict, steps: int) -> tuple:
    """A layer's outputs from its lanes' results (y [n, hidden], h, c or None) keyed by
    (direction, row): y [steps, directions, rows, hidden] (after a lane's own n steps, zeros),
    h and c [directions, rows, hidden] (c None but for an LSTM). One lane of every step, the
    usual request, is used as it is: its results are already the lane's own copies."""
    hidden, directions = layer.hidden, len(layer.directions)
    if len(parts) == 1 and directions == 1:
        (y, h, c), = parts.values()
        if len(y) == steps and y.dtype == np.float32:
            return (y.reshape(steps, 1, 1, hidden), h.reshape(1, 1, hidden),
                    c.reshape(1, 1, hidden) if layer.kind == "lstm" else None)
    rows = len(parts) // directions
    y_all = np.zeros((steps, directions, rows, hidden), np.float32)
    h_all = np.empty((directions, rows, hidden), np.float32)
    c_all = np.empty((directions, rows, hidden), np.float32) if layer.kind == "lstm" else None
    for (d, b), (y, h, c) in parts.items():
        y_all[:len(y), d, b] = y
        h_all[d, b] = h
        if c_all is not None:
            c_all[d, b] = c
    return y_all, h_all, c_all


class ModelWalk:
    """Engine's walk of each request through its program (see the module docstring)."""

    def _advance(self, run: _Run) -> None:
        """Run plain ops until the next recurrent step starts (or the program ends)."""
        try:
            program = run.model.program
            plain = self._plain[run.model.name]
            while run.pc < len(program):
                group = plain[run.pc]
                if group is not None:  # consecutive plain ops on one executor: one call
                    executor, nodes, end = group
                    if self._multi:
                        for node in nodes:
                            self._note_reads(run, executor, node.inputs)
                            run.producers.update(dict.fromkeys(node.outputs, (executor,)))
                    self._device_s += executor.run_plain(run.model.name, nodes, run.env)
                    run.pc = end
                else:
                    step = program[run.pc]
                    trace = run.request.trace if run.layer == 0 else None
                    if trace is not None:
                        trace.stamp("COMPUTE_INPUT_END")
                    if isinstance(step, (RecurrentLayer, LayerStack)):
                        self._start_layer(run, step)
                    else:
                        self._start_decoder(run, step)
                    if trace is not None:
                        trace.stamp("PROJECTION_END")
                        self._first_step.append(run)
                    return
            if run.request.trace is not None:
                run.request.trace.stamp("PLAIN_OPS_END")
            outputs = {spec.name: _as_declared(run.env[spec.name], spec.dtype) for spec in run.model.outputs}
            self._finish_run(run, Status.OK, outputs={**outputs, **run.extra_outputs})
        except CellserveError as exc:
            self._finish_run(run, Status.INVALID if isinstance(exc, InvalidInput) else Status.ERROR, str(exc))
        except Exception as exc:  # a model op failing on this request's data: this request only
            log.exception("request %s of model %s failed", run.request.request_id, run.model.name)
            self._finish_run(run, Status.ERROR, f"{type(exc).__name__}: {exc}")

    def _start_layer(self, run: _Run, step: RecurrentLayer | LayerStack) -> None:
        layers = layers_of(step)
        x = run.env[layers[0].x]
        time_len, batch = x.shape[:2]
        if time_len < 1:  # the model's own ops made an empty sequence of this request's input
            raise InvalidInput(f"layer {layers[0].name!r} gets no time steps from this request (its input "
                               f"{layers[0].x!r} has shape {list(x.shape)}): the model needs a longer sequence")
        lens = None  # every sequence runs time_len steps
        if layers[0].seq_lens:  # never in a stack
            lens = np.asarray(run.env[layers[0].seq_lens]).astype(np.int64).reshape(-1)
            if lens.shape != (batch,) or lens.min() < 0 or lens.max() > time_len:
                source = run.model.input_behind(layers[0].seq_lens)
                named = f"input {source!r}" if source else repr(layers[0].seq_lens)
                raise InvalidInput(f"sequence lengths {named} {lens.tolist()} must be {batch} values "
                                   f"in [0, {time_len}] (one per sequence, at most the input's time steps)")
        states = [self._initial_state(run, layer, batch) for layer in layers]
        # each layer's lanes' results by (direction, row), put together once the last is back
        run.outputs = {layer.name: {} for layer in layers}
        if isinstance(step, LayerStack):  # one lane per sequence through every layer
            cell_type = f"{run.model.name}/{step.name}"
            for b in range(batch):
                row_states = [(None if h0 is None else h0[0, b], None if c0 is None else c0[0, b]) for h0, c0 in states]
                self._start_lane(run, cell_type, x[:, b], row_states, 0, b, forward=True)
            return
        layer, (h0, c0) = step, states[0]
        for d in range(len(layer.directions)):
            cell_type = f"{run.model.name}/{layer.name}/{d}"
            for b in range(batch):
                n = time_len if lens is None else int(lens[b])
                if n == 0:  # an empty sequence (ONNX allows it): no lane; its outputs and final
                    zeros = np.zeros(layer.hidden, np.float32)  # state are zeros, as onnxruntime gives
                    run.outputs[layer.name][d, b] = (zeros[:0].reshape(0, layer.hidden), zeros,
                                                     zeros if layer.kind == "lstm" else None)
                    continue
                row_states = [(None if h0 is None else h0[d, b], None if c0 is None else c0[d, b])]
                self._start_lane(run, cell_type, x[:n, b], row_states, d, b, forward=not layer.is_reverse(d))
        if not run.lanes and not run.waiting:  # every sequence was empty: the layer is done now
            self._layer_done(run)

    def _start_lane(self, run: _Run, cell_type: str, x: np.ndarray, states: list[tuple], direction: int,
                    batch_index: int, forward: bool) -> None:
        executor = self._placed[cell_type]
        if self._busy and executor in self._busy:  # it runs a batch: start the lane once it is done
            self._defer_start(run, executor, self._start_lane, cell_type, x, states, direction, batch_index, forward)
            return
        if self._multi:
            self._note_reads(run, executor, [layers_of(run.model.program[run.pc])[0].x])
        started = executor.start_lane(cell_type, x, states)
        self._device_s += started.busy_s
        self.stats.executed_flops += started.flops
        storage = started.storage
        row0, stride = (storage.base, 1) if forward else (storage.base + storage.length - 1, -1)
        self._add_lane(run, cell_type, storage.length, storage, row0, stride,
                       _LaneRef(cell_type, executor, storage, direction, batch_index))

    @staticmethod
    def _initial_state(run: _Run, layer: RecurrentLayer, batch: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """A layer's (h0, c0), [directions, batch, hidden] each or None: a stream's carried
        state, else the graph's initial-state inputs."""
        carried = (run.request.initial_state or {}).get(layer.name)
        want = (len(layer.directions), batch, layer.hidden)
        if carried is None:
            h0 = run.env[layer.initial_h] if layer.initial_h else None
            c0 = run.env[layer.initial_c] if layer.initial_c else None
            for name, value in ((layer.initial_h, h0), (layer.initial_c, c0)):
                if value is not None and np.shape(value) != want:  # a model input of a dynamic shape
                    raise InvalidInput(f"initial state {name!r} has shape {list(np.shape(value))}; layer "
                                       f"{layer.name!r} needs {list(want)} (directions, sequences, hidden size)")
            return h0, c0
        h0, c0 = carried  # a stream's next chunk goes on from where the last one ended
        if h0.ndim == 3 and h0.shape[1] != batch:  # the one way a client can get it wrong
            raise InvalidInput(f"this request goes on from a sequence of {h0.shape[1]} row(s) (as its first "
                               f"request held) but holds {batch}: every request of a sequence must hold as many "
                               "rows as its first")
        if h0.shape != want:
            raise InvalidInput(f"carried state of layer {layer.name!r} has shape {list(h0.shape)}, "
                               f"the input needs {list(want)}")
        return h0, c0

    def _add_lane(self, run: _Run, cell_type: str, length: int | None, storage: LaneStorage,
                  row0: int, stride: int, ref: _LaneRef) -> None:
        lane = Lane(next(self._lane_ids), run.request.request_id, cell_type, length, run.deadline,
                    run.request.priority, run.request.arrival, storage.slot, row0, stride)
        run.lanes[lane.lane_id] = ref
        self.policy.add(lane)
        self.stats.lanes_started += 1

    # ---- taking a batch's results back ----

    def _lane_finished(self, lane: Lane) -> None:
        run = self._runs.get(lane.request_id)
        if run is None:
            return
        if run.request.trace is not None:  # the last lane's, of the last recurrent step, stays
            run.request.trace.stamp("LAST_STEP_END")
        ref = run.lanes.pop(lane.lane_id)
        finished = ref.executor.finish_lane(ref.cell_type, ref.storage)
        self._device_s += finished.busy_s
        self.stats.lanes_finished += 1
        if ref.beam is not None:
            run.outputs[ref.batch_index] = ref.beam.row
        elif ref.tokens is not None:
            run.outputs[ref.batch_index] = ref.tokens
        else:
            for layer, result in zip(layers_of(run.model.program[run.pc]), finished.layers):
                run.outputs[layer.name][ref.direction, ref.batch_index] = result
        if not run.lanes and not run.waiting:
            self._layer_done(run)

    def _layer_done(self, run: _Run) -> None:
        """The recurrent step's lanes are all back: its outputs go into the request's tensors
        and its walk goes on."""
        self._store_outputs(run)
        self._commit(run, -1, slice(run.layer, run.layer + 1))
        run.layer += 1
        run.pc += 1
        if run.request.trace is not None:  # outputs read back; the plain ops after it start
            run.request.trace.stamp("COMPUTE_OUTPUT_START")
        self._advance(run)

    def _store_outputs(self, run: _Run) -> None:
        step = run.model.program[run.pc]
        if isinstance(step, (RecurrentLayer, LayerStack)):
            layers = layers_of(step)
            steps = run.env[layers[0].x].shape[0]  # the input's time axis
            for layer in layers:
                y, h, c = _layer_outputs(layer, run.outputs[layer.name], steps)
                for name, value in ((layer.y, y), (layer.y_h, h), (layer.y_c, c)):
                    if name:
                        run.env[name] = value
                        if self._multi:
                            run.producers[name] = self._step_executors(run)
                if run.request.return_state:
                    run.state[layer.name] = (h, c if layer.kind == "lstm" else None)
        elif isinstance(run.outputs[0], BeamRow):
            self._store_beams(run, step)
        else:
            rows = [run.outputs[b] for b in sorted(run.outputs)]
            width = max(1, max(len(r) for r in rows))
            tokens = np.full((len(rows), width), step.pad, np.int64)
            for b, r in enumerate(rows):
                tokens[b, : len(r)] = r
            run.env[step.output] = tokens
            if self._multi:
                run.producers[step.output] = self._step_executors(run)


def _as_declared(value: np.ndarray, dtype: str) -> np.ndarray:
    """An output in the type the model declares for it: the kernels compute in float32 (and
    the plain ops in ONNX's types), so a float16 or float64 model's output, or an int32 one,
    is cast back at the end, as onnxruntime answers it and as the metadata says."""
    want = np.dtype(dtype)
    value = np.asarray(value)
    return value.astype(want) if value.dtype != want and value.dtype.kind == want.kind else value
