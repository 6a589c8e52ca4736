"""ONNX Runtime on the same model: the outside reference a user would otherwise run.

`export_classifier_onnx` writes a zoo classifier with explicit `lengths`, so padded rows keep
the state of their own last token; a repository model runs as its own ONNX file, its padded
rows zeros to the batch's longest (what a padding batcher in front of it would send).
`OrtRunner` replays a trace open-loop against either, one request at a time or as padded
batches.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cellserve.bench.results import RequestOutcome, RunStats, span_s
from cellserve.bench.traces import SequenceInput, TraceRequest
from cellserve.graph.zoo.modules import RNNClassifier

OPSET = 17
_IDLE_SLEEP_S = 0.0005  # short, so a sleep never overshoots an arrival or deadline by much

# Rows of PyTorch's stacked gate weights, taken in ONNX's gate order.
_GATE_ORDER = {"lstm": [0, 3, 1, 2],  # PyTorch i,f,g,o -> ONNX i,o,f,c
               "gru": [1, 0, 2]}      # PyTorch r,z,n   -> ONNX z,r,h


def _rnn_kind(module: RNNClassifier) -> str:
    kind = type(module.rnn).__name__.lower()
    if kind not in _GATE_ORDER or module.directions != 1:
        raise ValueError(f"only unidirectional LSTM/GRU classifiers are supported, got {module.rnn}")
    return kind


def _onnx_gates(weight: np.ndarray, kind: str) -> np.ndarray:
    """Reorder the gate blocks along axis 0 and add ONNX's leading num_directions axis."""
    gates = np.split(weight, len(_GATE_ORDER[kind]), axis=0)
    return np.concatenate([gates[g] for g in _GATE_ORDER[kind]], axis=0)[None]


def export_classifier_onnx(module: RNNClassifier, path: str | Path) -> None:
    """Write `module` as an opset-17 ONNX graph:
    tokens int64 [batch, time], lengths int32 [batch] -> probabilities [batch, classes],
    label int64 [batch]."""
    kind = _rnn_kind(module)
    rnn = module.rnn
    weights = {name: p.detach().numpy().astype(np.float32) for name, p in module.named_parameters()}
    initializers = [numpy_helper.from_array(weights["embedding.weight"], "embedding"),
                    numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
                    numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
                    numpy_helper.from_array(weights["head.weight"], "head_w"),
                    numpy_helper.from_array(weights["head.bias"], "head_b")]
    nodes = [helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], axis=0),
             helper.make_node("Transpose", ["embedded"], ["x0"], perm=[1, 0, 2])]  # time-major
    x = "x0"
    for layer in range(rnn.num_layers):
        w, r, b = f"W{layer}", f"R{layer}", f"B{layer}"
        initializers += [
            numpy_helper.from_array(_onnx_gates(weights[f"rnn.weight_ih_l{layer}"], kind), w),
            numpy_helper.from_array(_onnx_gates(weights[f"rnn.weight_hh_l{layer}"], kind), r),
            numpy_helper.from_array(np.concatenate(
                [_onnx_gates(weights[f"rnn.bias_ih_l{layer}"], kind),
                 _onnx_gates(weights[f"rnn.bias_hh_l{layer}"], kind)], axis=1), b)]
        # PyTorch's GRU applies the reset gate after the recurrent matmul: linear_before_reset.
        extra = {"linear_before_reset": 1} if kind == "gru" else {}
        last = layer == rnn.num_layers - 1
        outputs = ["", "h_last"] if last else [f"y{layer}"]  # Y [T, 1, B, H], Y_h [1, B, H]
        nodes.append(helper.make_node(kind.upper(), [x, w, r, b, "lengths"], outputs,
                                      hidden_size=rnn.hidden_size, **extra))
        if not last:
            x = f"x{layer + 1}"
            nodes.append(helper.make_node("Squeeze", [f"y{layer}", "axis1"], [x]))
    nodes += [helper.make_node("Squeeze", ["h_last", "axis0"], ["h"]),
              helper.make_node("Gemm", ["h", "head_w", "head_b"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
              helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)]
    classes = module.head.out_features
    graph = helper.make_graph(
        nodes, f"{kind}_classifier",
        inputs=[helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"]),
                helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
                 helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cellserve")
    model.ir_version = 8  # the first IR version with opset 17; any ONNX Runtime loads it
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _flops_model(model: onnx.ModelProto) -> tuple[float, float]:
    """(FLOPs per token per batch row over all recurrent layers, FLOPs of the head per row),
    counting each multiply-add of the gate and head GEMMs as 2 FLOPs. Layers and Gemm heads
    whose weights are not initializers are not counted."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    per_token = 0.0
    head = 0.0
    for node in model.graph.node:
        if node.op_type in ("LSTM", "GRU", "RNN"):
            w, r = shapes.get(node.input[1]), shapes.get(node.input[2])
            if w is not None and r is not None:
                directions, gates_h, inputs = w  # W: [directions, gates * H, I]
                per_token += 2.0 * directions * gates_h * (inputs + r[2])  # R: [directions, gates * H, H]
        elif node.op_type == "Gemm" and shapes.get(node.input[1]) is not None and len(shapes[node.input[1]]) == 2:
            rows, cols = shapes[node.input[1]]
            head += 2.0 * rows * cols
    return per_token, head


class OrtRunner:
    """Replays a trace open-loop in real time against one ONNX Runtime session.

    padded=False ("ort"): one request per run, first come first served.
    padded=True ("ort-padded"): waits until `max_batch` requests are queued or the oldest
    has waited `batch_timeout_s`, then pads them to the longest and runs them as one batch.
    """

    def __init__(self, onnx_path: str | Path, padded: bool, max_batch: int = 8,
                 batch_timeout_s: float = 0.005, threads: int = 2, sequence: SequenceInput | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.padded = padded
        self.max_batch = max_batch if padded else 1
        self.batch_timeout_s = batch_timeout_s
        self.policy = "ort-padded" if padded else "ort"
        self.sequence = sequence
        self._flops_per_token, self._head_flops = _flops_model(onnx.load(str(onnx_path)))
        # One run up front so session start-up cost is not billed to the first request (and a
        # model that cannot take padded batches fails here, not in a run).
        first = (np.zeros(1, dtype=np.int64) if sequence is None
                 else sequence.draw(np.random.default_rng(0), 1))
        self.session.run(None, self._feeds([first] * self.max_batch if padded else [first]))
        if padded:
            self.session.run(None, self._feeds([np.concatenate([first, first]), first]))

    def _feeds(self, sequences: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One run's inputs: the zoo classifier's tokens and lengths (`sequence` None), or a
        model's own sequence input, its rows padded with zeros to the longest, with its initial
        states (zeros) and lengths (SequenceInput.states) for the batch."""
        lengths = np.array([len(x) for x in sequences], dtype=np.int32)
        first = sequences[0]
        batch = np.zeros((len(sequences), int(lengths.max()), *first.shape[1:]), dtype=first.dtype)
        for row, x in enumerate(sequences):
            batch[row, :len(x)] = x
        if self.sequence is None:
            return {"tokens": batch, "lengths": lengths}
        feeds = {self.sequence.name: np.swapaxes(batch, 0, 1) if self.sequence.time_major else batch}
        for state in self.sequence.states:  # [directions, batch, hidden] or [batch]
            feeds[state.name] = (lengths.astype(state.dtype) if state.lengths
                                 else np.zeros((state.shape[0], len(sequences), state.shape[2]), dtype=state.dtype))
        return feeds

    def _ready(self, queue: deque[TraceRequest], now: float) -> bool:
        if not self.padded:
            return True
        return len(queue) >= self.max_batch or now - queue[0].arrival_s >= self.batch_timeout_s

    def run(self, trace: list[TraceRequest]) -> RunStats:
        """Serve `trace` in real time; latencies run from each scheduled arrival, so time a
        request spends waiting behind a busy session counts. `rate_rps` is the trace's own
        offered load; a caller that swept a nominal rate may overwrite it."""
        pending = deque(sorted(trace, key=lambda r: r.arrival_s))
        queue: deque[TraceRequest] = deque()
        outcomes: list[RequestOutcome] = []
        stats = RunStats(policy=self.policy, rate_rps=_mean_rate(trace), duration_s=0.0, outcomes=outcomes)
        start = time.perf_counter()
        while pending or queue:
            now = time.perf_counter() - start
            while pending and pending[0].arrival_s <= now:
                queue.append(pending.popleft())
            if not queue or not self._ready(queue, now):
                events = [pending[0].arrival_s] if pending else []
                if queue:
                    events.append(queue[0].arrival_s + self.batch_timeout_s)
                time.sleep(min(max(min(events) - now, 0.0), _IDLE_SLEEP_S))
                continue
            batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            feeds = self._feeds([r.sequence for r in batch])
            run_start = time.perf_counter()
            self.session.run(None, feeds)
            finish = time.perf_counter()
            stats.busy_s += finish - run_start
            # Our side of each run: admitting arrivals, forming and padding the batch.
            stats.overhead_us_per_step.append((run_start - start - now) * 1e6)
            stats.cell_steps += 1
            stats.batch_size_sum += len(batch)
            padded_len = max(len(r.sequence) for r in batch)
            stats.executed_flops += len(batch) * (padded_len * self._flops_per_token + self._head_flops)
            outcomes += [RequestOutcome(r.request_id, r.arrival_s, finish - start, "ok") for r in batch]
        stats.duration_s = span_s(outcomes)
        return stats


def _mean_rate(trace: list[TraceRequest]) -> float:
    """Offered load of the trace: requests per second over its arrival span."""
    arrivals = [r.arrival_s for r in trace]
    span = max(arrivals) - min(arrivals) if trace else 0.0
    return (len(trace) - 1) / span if span > 0 else 0.0
