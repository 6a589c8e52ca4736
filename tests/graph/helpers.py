"""Shared by the importer tests: tiny seeded recurrent models (as ONNX graphs and as PyTorch
modules), the references they must match (onnxruntime, the module itself), and serving
requests through the Engine."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.model import Model
from cellserve.graph.zoo.modules import seeded

BACKENDS = [None, "torch"]  # None: the engine's default backend (the best one for the CPU)


# ---- serving and comparing ----

def serve(model: Model, requests: list[dict], config: EngineConfig | None = None) -> list[dict[str, np.ndarray]]:
    """Submit all requests to a fresh Engine before it runs any, run it until idle, and return
    each request's outputs in submission order; each must get exactly one OK response."""
    engine = Engine([model], config or EngineConfig())
    responses = defaultdict(list)
    for i, inputs in enumerate(requests):
        engine.submit(Request(model.name, inputs, on_done=lambda r, i=i: responses[i].append(r)))
    engine.run_until_idle(timeout_s=30)
    outputs = []
    for i in range(len(requests)):
        assert len(responses[i]) == 1, f"request {i} got {len(responses[i])} responses"
        (response,) = responses[i]
        assert response.status is Status.OK, f"request {i}: {response.status} {response.reason}"
        outputs.append(response.outputs)
    return outputs


def assert_outputs_match(got: dict, want: dict, where: str = "") -> None:
    assert set(got) == set(want), f"{where}: outputs {sorted(got)} != {sorted(want)}"
    for name, expected in want.items():
        actual = np.asarray(got[name])
        assert actual.shape == np.shape(expected), f"{where}: {name} shape {actual.shape} != {np.shape(expected)}"
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5, err_msg=f"{where}: output {name}")


def ort_outputs(model_bytes: bytes, inputs: dict) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # exporters' static output shapes make onnxruntime warn on every run
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs)))


# ---- ONNX graphs built by hand ----

ONNX_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
HIDDEN, X_SIZE = 5, 3


def recurrent_onnx(op: str, *, direction: str = "forward", activation: str = "Tanh", hidden: int = HIDDEN,
                   input_size: int = X_SIZE, seq_lens: bool = False, initial_state: bool = False,
                   batch_first: bool = False, bias: bool = True, opset: int = 17, peephole: bool = False,
                   attrs: dict | None = None, seed: int = 0) -> bytes:
    """One ONNX LSTM/GRU/RNN node named "rnn" with seeded weights W, R (and B, P) over input
    X [time, batch, input], or X [batch, time, input] through a Transpose when batch_first.
    Optional graph inputs: sequence_lens [batch] (int32), initial_h (and initial_c for an LSTM)
    [directions, batch, hidden]. Outputs Y, Y_h (and Y_c). `attrs` override the node's attributes."""
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    g = ONNX_GATES[op] * hidden
    weights = {"W": (d, g, input_size), "R": (d, g, hidden), "B": (d, 2 * g) if bias else None,
               "P": (d, 3 * hidden) if peephole else None}
    initializers = [numpy_helper.from_array(rng.uniform(-0.6, 0.6, shape).astype(np.float32), name)
                    for name, shape in weights.items() if shape]
    value = helper.make_tensor_value_info
    states = ["initial_h", "initial_c"] if op == "LSTM" else ["initial_h"]
    x_shape = ["batch", "time", input_size] if batch_first else ["time", "batch", input_size]
    inputs = [value("X", TensorProto.FLOAT, x_shape)]
    inputs += [value("sequence_lens", TensorProto.INT32, ["batch"])] if seq_lens else []
    inputs += [value(n, TensorProto.FLOAT, [d, "batch", hidden]) for n in states] if initial_state else []
    nodes = []
    if batch_first:
        nodes.append(helper.make_node("Transpose", ["X"], ["X_time_major"], name="to_time_major", perm=[1, 0, 2]))
    optional = {"B": bias, "sequence_lens": seq_lens, **{n: initial_state for n in states}, "P": peephole}
    rnn_inputs = ["X_time_major" if batch_first else "X", "W", "R", *(n if on else "" for n, on in optional.items())]
    while rnn_inputs[-1] == "":
        rnn_inputs.pop()
    outputs = [value("Y", TensorProto.FLOAT, ["time", d, "batch", hidden])]
    outputs += [value(n, TensorProto.FLOAT, [d, "batch", hidden]) for n in ["Y_h", "Y_c"][: len(states)]]
    node_attrs = {"hidden_size": hidden, "direction": direction}
    node_attrs.update({"GRU": {"linear_before_reset": 1}, "RNN": {"activations": [activation] * d}}.get(op, {}))
    node_attrs.update(attrs or {})
    nodes.append(helper.make_node(op, rnn_inputs, [o.name for o in outputs], name="rnn", **node_attrs))
    return onnx_bytes(nodes, inputs, outputs, initializers, opset)


def onnx_bytes(nodes: list, inputs: list, outputs: list, initializers: list, opset: int = 17,
               check: bool = True) -> bytes:
    """The serialized model; `check=False` allows outputs of unknown shape."""
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if check:
        onnx.checker.check_model(model)
    return model.SerializeToString()


# ---- PyTorch modules ----

VOCAB, INPUT_SIZE, CLASSES = 30, 5, 3
_RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


class RecurrentNet(nn.Module):
    """[nn.Embedding ->] nn.LSTM/GRU/RNN -> nn.Linear over every step. Returns (scores, h_n)
    or, for an LSTM, (scores, h_n, c_n): the final states of every layer and direction."""

    def __init__(self, kind: str, hidden: int, layers: int, bidirectional: bool, batch_first: bool,
                 vocab: int | None):
        super().__init__()
        self.embedding = nn.Embedding(vocab, INPUT_SIZE) if vocab else None
        extra = {"nonlinearity": kind.split("_")[1]} if kind.startswith("rnn_") else {}
        self.rnn = _RNN_CLASSES[kind](INPUT_SIZE, hidden, num_layers=layers, bidirectional=bidirectional,
                                      batch_first=batch_first, **extra)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, state = self.rnn(self.embedding(x) if self.embedding is not None else x)
        return (self.head(y), *state) if isinstance(state, tuple) else (self.head(y), state)


@dataclass(frozen=True)
class NetSpec:
    """A RecurrentNet configuration, and how to export it and make requests for it."""

    kind: str
    hidden: int = 8
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = True
    tokens: bool = True  # token ids through an nn.Embedding, or float features
    seed: int = 0

    def __str__(self) -> str:
        return (f"{self.kind}-h{self.hidden}-l{self.layers}{'-bi' if self.bidirectional else ''}"
                f"-{'batch_first' if self.batch_first else 'seq_first'}-{'tokens' if self.tokens else 'features'}")

    @property
    def input_name(self) -> str:
        return "tokens" if self.tokens else "features"

    @property
    def output_names(self) -> list[str]:
        return ["scores", "h_n", "c_n"] if self.kind == "lstm" else ["scores", "h_n"]

    def module(self) -> RecurrentNet:
        net = RecurrentNet(self.kind, self.hidden, self.layers, self.bidirectional, self.batch_first,
                           VOCAB if self.tokens else None)
        return seeded(net, self.seed)

    def axes(self) -> dict[int, str]:
        """The batch and time axes of the input (and of scores)."""
        return {0: "batch", 1: "time"} if self.batch_first else {0: "time", 1: "batch"}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {self.input_name: self.axes(), "scores": self.axes(),
                **{name: {1: "batch"} for name in self.output_names[1:]}}

    def example(self, batch: int = 2, time: int = 3) -> tuple[torch.Tensor]:
        return (torch.as_tensor(self.request(np.random.default_rng(0), batch, time)[self.input_name]),)

    def request(self, rng: np.random.Generator, batch: int, time: int) -> dict[str, np.ndarray]:
        shape = (batch, time) if self.batch_first else (time, batch)
        if self.tokens:
            return {self.input_name: rng.integers(0, VOCAB, shape).astype(np.int64)}
        return {self.input_name: rng.standard_normal((*shape, INPUT_SIZE)).astype(np.float32)}


def torch_outputs(module: nn.Module, spec: NetSpec, inputs: dict) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = module(torch.as_tensor(inputs[spec.input_name]))
    return {name: out.numpy() for name, out in zip(spec.output_names, outs)}


def export_torchscript(module: nn.Module, spec: NetSpec, opset: int = 17) -> bytes:
    """torch.onnx.export with the TorchScript exporter, batch and time dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, spec.example(), buffer, dynamo=False, opset_version=opset,
                          input_names=[spec.input_name], output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes())
    return buffer.getvalue()


def export_dynamo_apart(spec: NetSpec, time_dynamic: bool, time: int = 4) -> bytes:
    """export_dynamo of `spec.module()` (seeded: the caller's has the same weights) in a process
    of its own: torch's exporter keeps state between exports in one process, and an LSTM
    exported with a dynamic time after another came out with its time fixed."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_export_module_of, spec, time_dynamic, time).result()


def _export_module_of(spec: NetSpec, time_dynamic: bool, time: int) -> bytes:
    return export_dynamo(spec.module(), spec, time_dynamic, time)


def export_dynamo(module: nn.Module, spec: NetSpec, time_dynamic: bool, time: int = 4) -> bytes:
    """torch.onnx.export with the dynamo exporter from an example of `time` steps; batch is
    dynamic, and time too when `time_dynamic`."""
    axes = {a: torch.export.Dim(n) for a, n in spec.axes().items() if n == "batch" or time_dynamic}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, spec.example(2, time), dynamo=True, opset_version=18,
                                    input_names=[spec.input_name], output_names=spec.output_names,
                                    dynamic_shapes={"x": axes}, verbose=False)
    return program.model_proto.SerializeToString()
