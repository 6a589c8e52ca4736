"""The ONNX importer against onnxruntime: hand-built LSTM/GRU/RNN graphs served by the Engine
give onnxruntime's outputs for every request, and what cannot be run is refused at load."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cellserve.engine.engine import EngineConfig
from cellserve.errors import ModelLoadError, UnsupportedOperator
from cellserve.graph.model import InputSemantics
from cellserve.graph.onnx_import import load_onnx

from .helpers import BACKENDS, HIDDEN, X_SIZE, assert_outputs_match, onnx_bytes, ort_outputs, recurrent_onnx, serve

CELLS = [("LSTM", "Tanh"), ("GRU", "Tanh"), ("RNN", "Tanh"), ("RNN", "Relu")]
DIRECTIONS = ["forward", "reverse", "bidirectional"]
# (features, opset): each feature is exercised with every cell and direction
VARIANTS = {
    "plain": (dict(), 17),
    "seq_lens": (dict(seq_lens=True), 14),
    "initial_state+no_bias": (dict(initial_state=True, bias=False), 17),
    "seq_lens+initial_state": (dict(seq_lens=True, initial_state=True), 17),
    "batch_first+seq_lens+initial_state": (dict(batch_first=True, seq_lens=True, initial_state=True), 14),
}
# requests in flight together: (time, batch) without sequence_lens, (time, sequence_lens) with them
SHAPES = [(6, 2), (1, 1), (4, 3), (3, 1)]
LENGTHS = [(6, [6, 3, 1]), (1, [1, 1, 1]), (4, [2, 3, 1]), (3, [1, 3, 2])]


def recurrent_requests(op: str, direction: str, features: dict) -> list[dict]:
    """Inputs for recurrent_onnx(op, direction=direction, **features)."""
    seq_lens, initial_state = features.get("seq_lens", False), features.get("initial_state", False)
    rng = np.random.default_rng(0)
    d = 2 if direction == "bidirectional" else 1
    requests = []
    for time, lens in LENGTHS if seq_lens else SHAPES:
        batch = len(lens) if seq_lens else lens
        x = rng.standard_normal((time, batch, X_SIZE)).astype(np.float32)
        inputs = {"X": np.ascontiguousarray(x.transpose(1, 0, 2)) if features.get("batch_first") else x}
        if seq_lens:
            inputs["sequence_lens"] = np.array(lens, np.int32)
        if initial_state:
            for name in ("initial_h", "initial_c")[: 2 if op == "LSTM" else 1]:
                inputs[name] = rng.standard_normal((d, batch, HIDDEN)).astype(np.float32)
        requests.append(inputs)
    return requests


@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("op, activation", CELLS, ids=["LSTM", "GRU", "RNN_Tanh", "RNN_Relu"])
def test_recurrent_node_matches_onnxruntime_for_concurrent_requests(op, activation, direction, variant, backend):
    features, opset = VARIANTS[variant]
    data = recurrent_onnx(op, direction=direction, activation=activation, opset=opset, **features)
    requests = recurrent_requests(op, direction, features)
    got = serve(load_onnx(data, "rnn"), requests, EngineConfig(backend=backend))
    for i, (inputs, outputs) in enumerate(zip(requests, got)):
        assert_outputs_match(outputs, ort_outputs(data, inputs), where=f"request {i}")


def test_sequence_lens_zero_the_outputs_past_each_sequence_end():
    data = recurrent_onnx("LSTM", direction="bidirectional", seq_lens=True)
    x = np.random.default_rng(1).standard_normal((5, 3, X_SIZE)).astype(np.float32)
    inputs = {"X": x, "sequence_lens": np.array([5, 2, 1], np.int32)}
    (got,) = serve(load_onnx(data, "rnn"), [inputs])
    assert not got["Y"][2:, :, 1].any() and not got["Y"][1:, :, 2].any()
    assert_outputs_match(got, ort_outputs(data, inputs))


@pytest.mark.parametrize("lengths, reason", [
    ([7, 1, 1], r"^sequence lengths input 'sequence_lens' \[7, 1, 1\] must be 3 values in \[0, 5\]"),
    ([-1, 1, 1], r"^sequence lengths input 'sequence_lens' \[-1, 1, 1\] must be 3 values in \[0, 5\]"),
    ([5, 1], r"^input 'sequence_lens': dimension 0 \('batch', the batch\) is 2, but input 'X' holds 3 sequences$"),
])
def test_bad_sequence_lengths_are_refused_naming_the_input(lengths, reason):
    from cellserve.engine.engine import Engine
    from cellserve.engine.request import Request, Status

    engine = Engine([load_onnx(recurrent_onnx("GRU", seq_lens=True), "rnn")], EngineConfig())
    got = []
    x = np.zeros((5, 3, X_SIZE), np.float32)
    engine.submit(Request("rnn", {"X": x, "sequence_lens": np.array(lengths, np.int32)}, on_done=got.append))
    engine.submit(Request("rnn", {"X": x, "sequence_lens": np.array([5, 2, 1], np.int32)}, on_done=got.append))
    engine.run_until_idle()
    assert got[0].status is Status.INVALID and re.search(reason, got[0].reason), got[0].reason
    assert got[1].status is Status.OK


def test_an_error_about_a_cast_of_an_input_names_the_input():
    """PyTorch's exporter casts a lengths input before the LSTM's sequence_lens: an error
    about the cast tensor names the input a client sent."""
    from cellserve.graph.model import DenseNode, Model, TensorSpec

    model = Model("m", [TensorSpec("lengths", "int64", (-1,))], [], {},
                  [DenseNode("Cast", "c", ["lengths"], ["/Cast_1_output_0"]),
                   DenseNode("Squeeze", "s", ["/Cast_1_output_0"], ["/Squeeze_output_0"]),
                   DenseNode("Add", "a", ["/Squeeze_output_0", "one"], ["/Add_output_0"])])
    assert model.input_behind("/Squeeze_output_0") == "lengths" and model.input_behind("lengths") == "lengths"
    assert model.input_behind("/Add_output_0") is None  # not the input as it came


class _PooledClassifier:
    """An embedding, a batch-first GRU and a pooling head over time (mean, max or min), as
    users write classifiers: the head's Reduce* ops run as plain ops."""

    @staticmethod
    def onnx(pool: str, opset: int) -> bytes:
        import torch

        from cellserve.graph.torch_import import export_onnx_bytes

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embedding, self.rnn = torch.nn.Embedding(40, 8), torch.nn.GRU(8, 12, batch_first=True)
                self.head = torch.nn.Linear(12, 4)

            def forward(self, tokens):
                y = self.rnn(self.embedding(tokens))[0]
                pooled = {"mean": y.mean(1), "max": y.amax(1), "min": y.amin(1)}[pool]
                return self.head(pooled).softmax(-1)

        torch.manual_seed(2)
        return export_onnx_bytes(Net(), (torch.zeros((1, 3), dtype=torch.long),), ["tokens"], ["probs"],
                                 {"tokens": {0: "batch", 1: "time"}, "probs": {0: "batch"}}, opset=opset)


@pytest.mark.parametrize("opset", [17, 18])  # 18 moves the axes from an attribute to an input
@pytest.mark.parametrize("pool", ["mean", "max", "min"])
def test_pooling_heads_over_time_load_and_match_onnxruntime(pool, opset):
    data = _PooledClassifier.onnx(pool, opset)
    assert {"mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin"}[pool] in {
        n.op_type for n in onnx.load_from_string(data).graph.node}
    rng = np.random.default_rng(3)
    requests = [{"tokens": rng.integers(0, 40, (b, t))} for b, t in ((1, 1), (2, 5), (3, 17))]
    for got, inputs in zip(serve(load_onnx(data, "pooled"), requests), requests):
        assert_outputs_match(got, ort_outputs(data, inputs))


# ---- what the importer works out about the inputs ----

def test_seq_first_float_input_has_time_axis_0_and_batch_axis_1():
    model = load_onnx(recurrent_onnx("GRU", seq_lens=True, initial_state=True), "rnn")
    assert model.semantics["X"] == InputSemantics(batch_axis=1, time_axis=0, vocab=None)


def test_transposed_batch_first_float_input_has_batch_axis_0_and_time_axis_1():
    model = load_onnx(recurrent_onnx("LSTM", batch_first=True), "rnn")
    assert model.semantics["X"] == InputSemantics(batch_axis=0, time_axis=1, vocab=None)


def test_embedding_lookup_gives_the_token_input_its_vocabulary():
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((11, 3)).astype(np.float32), "table")
    rnn = onnx.load_from_string(recurrent_onnx("RNN", batch_first=True)).graph
    nodes = [helper.make_node("Gather", ["table", "tokens"], ["X"], name="embed", axis=0), *rnn.node]
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    data = onnx_bytes(nodes, [tokens], list(rnn.output), [table, *rnn.initializer])
    model = load_onnx(data, "rnn")
    assert model.semantics["tokens"] == InputSemantics(batch_axis=0, time_axis=1, vocab=11)
    requests = [{"tokens": np.random.default_rng(i).integers(0, 11, (i + 1, 4 - i))} for i in range(3)]
    for inputs, outputs in zip(requests, serve(model, requests)):
        assert_outputs_match(outputs, ort_outputs(data, inputs))


# ---- the plain ops exporters put around recurrent layers ----

INT64_MIN = int(np.iinfo(np.int64).min)
# name -> (output type, chain of (op, constant inputs after the first, attributes)) applied to an
# LSTM's Y [time, 1, batch, 5]
GLUE = {
    "Shape_start_end": (TensorProto.INT64, [("Shape", [], {"start": 1, "end": -1})]),
    "Flatten_axis_2": (TensorProto.FLOAT, [("Flatten", [], {"axis": 2})]),
    "Flatten_axis_equal_to_rank": (TensorProto.FLOAT, [("Flatten", [], {"axis": 4})]),
    "Slice_reversed_time": (TensorProto.FLOAT, [("Slice", [[-1], [INT64_MIN], [0], [-1]], {})]),
    "Gather_negative_index": (TensorProto.FLOAT, [("Gather", [[-1]], {"axis": 0})]),
    "Reshape_keep_dim_0": (TensorProto.FLOAT, [("Reshape", [[0, -1]], {})]),
    "Squeeze_Unsqueeze": (TensorProto.FLOAT, [("Squeeze", [[1]], {}), ("Unsqueeze", [[-1]], {})]),
    "Softmax_axis_0": (TensorProto.FLOAT, [("Softmax", [], {"axis": 0})]),
    "ArgMax_last_index": (TensorProto.INT64, [("ArgMax", [], {"axis": -1, "keepdims": 0, "select_last_index": 1})]),
    "Div_negative_integers": (TensorProto.INT64, [("Mul", [[50.0]], {}), ("Cast", [], {"to": TensorProto.INT64}),
                                                  ("Div", [[4]], {})]),
    # a head as exporters write one: Gemm with B transposed and a bias, and with alpha, beta and C broadcast
    "Gemm_head": (TensorProto.FLOAT, [("Flatten", [], {"axis": 3}),
                                      ("Gemm", [np.linspace(-1, 1, 15).reshape(3, 5).tolist(), [0.5, -0.25, 1.0]],
                                       {"transB": 1}), ("Softmax", [], {"axis": -1})]),
    "Gemm_alpha_beta": (TensorProto.FLOAT, [("Flatten", [], {"axis": 3}),
                                            ("Gemm", [np.linspace(-1, 1, 15).reshape(5, 3).tolist(), [[0.5, -0.25, 1.0]]],
                                             {"alpha": 0.5, "beta": 2.0})]),
}


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset, axis", [(9, None), (11, None), (11, 2), (11, -1), (11, -3), (13, None), (13, 2)])
def test_softmax_keeps_its_opset_s_meaning_and_matches_onnxruntime(op, opset, axis):
    """Below opset 13 Softmax and LogSoftmax take their input as 2-D around `axis` (default 1);
    from 13 on they act on one axis (default -1). On an LSTM's 4-D output [T, 1, N, H] the
    two differ (a sweep found the older models answered with 13's meaning: 0.26-1.1 off)."""
    lstm = onnx.load_from_string(recurrent_onnx("LSTM", opset=opset)).graph
    attrs = {} if axis is None else {"axis": axis}
    nodes = list(lstm.node) + [helper.make_node(op, ["Y"], ["out"], name="head", **attrs)]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    data = onnx_bytes(nodes, list(lstm.input), [out], list(lstm.initializer), opset, check=False)
    rng = np.random.default_rng(1)
    requests = [{"X": rng.standard_normal((t, b, X_SIZE)).astype(np.float32)} for t, b in [(4, 2), (3, 3)]]
    for inputs, got in zip(requests, serve(load_onnx(data, "softmax"), requests)):
        assert_outputs_match(got, ort_outputs(data, inputs))


@pytest.mark.parametrize("glue", GLUE)
def test_plain_ops_after_a_recurrent_layer_match_onnxruntime(glue):
    out_type, chain = GLUE[glue]
    lstm = onnx.load_from_string(recurrent_onnx("LSTM")).graph
    nodes, inits, x = list(lstm.node), list(lstm.initializer), "Y"
    for k, (op, consts, attrs) in enumerate(chain):
        names = [f"c{k}_{j}" for j in range(len(consts))]
        inits += [numpy_helper.from_array(np.array(c, np.float32 if np.asarray(c).dtype.kind == "f" else np.int64), n)
                  for n, c in zip(names, consts)]
        y = "out" if k == len(chain) - 1 else f"glue{k}"
        nodes.append(helper.make_node(op, [x, *names], [y], name=f"glue{k}", **attrs))
        x = y
    out = helper.make_tensor_value_info("out", out_type, None)
    data = onnx_bytes(nodes, list(lstm.input), [out], inits, check=False)
    rng = np.random.default_rng(0)
    requests = [{"X": rng.standard_normal((t, b, X_SIZE)).astype(np.float32)} for t, b in [(4, 2), (1, 3), (6, 1)]]
    for inputs, got in zip(requests, serve(load_onnx(data, "glue"), requests)):
        assert_outputs_match(got, ort_outputs(data, inputs))


# ---- refusals at load time ----

def _single_node_model(op: str) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, None])
    weights = {"Conv": [np.ones((2, 2, 3), np.float32)], "LayerNormalization": [np.ones(4, np.float32)]}[op]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    node = helper.make_node(op, ["x", *(i.name for i in inits)], ["y"], name=f"my_{op.lower()}")
    return onnx_bytes([node], [x], [y], inits)


@pytest.mark.parametrize("op", ["Conv", "LayerNormalization"])
def test_unsupported_operator_is_refused_naming_operator_and_node(op):
    with pytest.raises(UnsupportedOperator, match=f"'{op}'.*'my_{op.lower()}'"):
        load_onnx(_single_node_model(op), "bad")


@pytest.mark.parametrize("attrs", [{"linear_before_reset": 0}, {}], ids=["explicit_0", "absent"])
def test_gru_with_linear_before_reset_0_is_refused(attrs):
    data = recurrent_onnx("GRU", attrs=attrs)
    if not attrs:
        proto = onnx.load_from_string(data)
        node = proto.graph.node[0]
        node.attribute.remove(next(a for a in node.attribute if a.name == "linear_before_reset"))
        data = proto.SerializeToString()
    with pytest.raises(UnsupportedOperator, match="'GRU'.*'rnn'.*linear_before_reset"):
        load_onnx(data, "bad")


def test_lstm_with_peephole_weights_is_refused():
    with pytest.raises(UnsupportedOperator, match="'LSTM'.*'rnn'.*peephole"):
        load_onnx(recurrent_onnx("LSTM", peephole=True), "bad")


@pytest.mark.parametrize("op, attrs, detail", [
    ("LSTM", {"clip": 1.0}, "clip"),
    ("LSTM", {"input_forget": 1}, "input_forget"),
    ("LSTM", {"layout": 1}, "layout"),
    ("RNN", {"activations": ["LeakyRelu"]}, "activations"),
    ("GRU", {"activations": ["HardSigmoid", "Tanh"]}, "activations"),
], ids=["clip", "input_forget", "layout", "RNN_LeakyRelu", "GRU_HardSigmoid"])
def test_recurrent_attributes_it_cannot_run_are_refused(op, attrs, detail):
    with pytest.raises(UnsupportedOperator, match=f"'{op}'.*'rnn'.*{detail}"):
        load_onnx(recurrent_onnx(op, attrs=attrs), "bad")


@pytest.mark.parametrize("op, acts", [("LSTM", ["Sigmoid", "Tanh", "Tanh"]), ("RNN", ["Relu"])])
def test_a_bidirectional_node_with_one_direction_s_activations_is_refused(op, acts):
    """ONNX lists the functions of each direction: three names for a bidirectional LSTM (or
    one Relu for a bidirectional RNN) is a malformed node, as onnxruntime says too; it was
    refused as if the names were unsupported (LSTM), or loaded (RNN)."""
    data = recurrent_onnx(op, direction="bidirectional", attrs={"activations": acts})
    with pytest.raises(ModelLoadError, match=f"'{op}' node 'rnn': activations lists {len(acts)} function"
                                             f".*a bidirectional {op} takes {2 * len(acts)}"):
        load_onnx(data, "bad")


def test_recurrent_weights_that_are_graph_inputs_are_refused():
    proto = onnx.load_from_string(recurrent_onnx("GRU"))
    w = next(i for i in proto.graph.initializer if i.name == "W")
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    proto.graph.initializer.remove(w)
    with pytest.raises(UnsupportedOperator, match="'GRU'.*'rnn'.*'W'.*constant"):
        load_onnx(proto, "bad")


def _with_state_width(width: int | str, declared_on: str = "initial_c") -> onnx.ModelProto:
    """An LSTM whose graph input `declared_on` says its width is `width` (hidden_size is HIDDEN)."""
    proto = onnx.load_from_string(recurrent_onnx("LSTM", initial_state=True))
    dim = next(v for v in proto.graph.input if v.name == declared_on).type.tensor_type.shape.dim[2]
    if isinstance(width, int):
        dim.dim_value = width
    else:
        dim.dim_param = width
    return proto


def test_an_initial_state_wider_than_the_hidden_size_is_refused_at_load():
    """onnxruntime refuses such a model at run time (torch's dynamo exporter writes one for an
    LSTM with proj_size); serving it would answer for some other model."""
    with pytest.raises(ModelLoadError, match=r"node 'rnn': initial_c 'initial_c' has shape \[1, None, 7\], but the "
                                             rf"node runs 1 direction\(s\) of hidden_size {HIDDEN}"):
        load_onnx(_with_state_width(7), "bad")


def test_recurrent_weights_of_the_wrong_shape_are_refused_at_load():
    proto = onnx.load_from_string(recurrent_onnx("GRU"))
    r = next(i for i in proto.graph.initializer if i.name == "R")
    r.CopyFrom(numpy_helper.from_array(np.zeros((1, 3 * HIDDEN, HIDDEN + 1), np.float32), "R"))
    with pytest.raises(ModelLoadError, match=rf"node 'rnn' \(GRU\): R has shape \[1, {3 * HIDDEN}, {HIDDEN + 1}\]; "
                                             rf"1 direction\(s\) of hidden_size {HIDDEN} need \[1, {3 * HIDDEN}, {HIDDEN}\]"):
        load_onnx(proto, "bad")


def test_an_initial_state_of_the_wrong_width_sent_for_a_dynamic_input_is_a_400():
    from cellserve.engine.engine import Engine
    from cellserve.engine.request import Request, Status

    engine = Engine([load_onnx(_with_state_width("width", "initial_h"), "rnn")], EngineConfig(profile=False))
    got = []
    x = np.zeros((4, 2, X_SIZE), np.float32)
    for width in (7, HIDDEN):
        engine.submit(Request("rnn", {"X": x, "initial_h": np.zeros((1, 2, width), np.float32),
                                      "initial_c": np.zeros((1, 2, HIDDEN), np.float32)}, on_done=got.append))
    engine.run_until_idle()
    assert got[0].status is Status.INVALID and got[0].reason == (
        f"initial state 'initial_h' has shape [1, 2, 7]; layer 'rnn' needs [1, 2, {HIDDEN}] "
        "(directions, sequences, hidden size)")
    assert got[1].status is Status.OK


@pytest.mark.parametrize("data", [b"", b"this is not an ONNX model", bytes(range(256)) * 4],
                         ids=["empty", "text", "binary"])
def test_non_onnx_bytes_raise_model_load_error(data):
    with pytest.raises(ModelLoadError, match="bad"):
        load_onnx(data, "bad")


def test_truncated_model_raises_model_load_error():
    data = recurrent_onnx("LSTM", direction="bidirectional")
    for end in range(1, len(data), 37):
        with pytest.raises(ModelLoadError):
            load_onnx(data[:end], "bad")


def test_non_onnx_empty_and_missing_files_raise_model_load_error(tmp_path):
    (tmp_path / "notes.onnx").write_text("just some notes\n" * 20)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for path in (tmp_path / "notes.onnx", tmp_path / "empty.onnx", tmp_path / "missing.onnx"):
        with pytest.raises(ModelLoadError):
            load_onnx(path, "bad")


@pytest.mark.parametrize("elem, dtype", [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)])
def test_a_float16_or_float64_model_answers_in_its_declared_type(elem, dtype):
    """The kernels compute in float32; a model that declares float16 (or float64) tensors gets
    its outputs back in that type, as onnxruntime gives them and as its metadata says (a
    sweep found float32 answers under FP16 metadata)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((1, 3 * HIDDEN, X_SIZE)) * 0.5).astype(dtype), "W")
    r = numpy_helper.from_array((rng.standard_normal((1, 3 * HIDDEN, HIDDEN)) * 0.5).astype(dtype), "R")
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y", "Y_h"], hidden_size=HIDDEN, linear_before_reset=1)
    x_info = helper.make_tensor_value_info("X", elem, ["T", "N", X_SIZE])
    outs = [helper.make_tensor_value_info("Y", elem, ["T", 1, "N", HIDDEN]),
            helper.make_tensor_value_info("Y_h", elem, [1, "N", HIDDEN])]
    data = onnx_bytes([node], [x_info], outs, [w, r], 14, check=False)
    model = load_onnx(data, "typed")
    assert [s.dtype for s in model.outputs] == [np.dtype(dtype).name] * 2
    inputs = {"X": rng.standard_normal((4, 2, X_SIZE)).astype(dtype)}
    [got] = serve(model, [inputs])
    want = ort_outputs(data, inputs) if dtype == np.float16 else None  # onnxruntime has no float64 GRU
    for name in ("Y", "Y_h"):
        assert got[name].dtype == dtype, name
        if want is not None:
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=2e-3)


def test_an_output_declared_without_a_shape_takes_the_inferred_one():
    """A graph output with no shape at all (unknown rank, not a scalar) is published with the
    rank ONNX's shape inference finds, -1 where a size is not fixed (it was published as [],
    rank 0)."""
    lstm = onnx.load_from_string(recurrent_onnx("LSTM")).graph
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    model = load_onnx(onnx_bytes(list(lstm.node), list(lstm.input), [out], list(lstm.initializer), check=False))
    [spec] = model.outputs
    assert spec.shape == (-1, 1, -1, HIDDEN)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("lens", [[3, 0, 2], [0, 0]])
def test_an_empty_sequence_answers_zeros_as_onnxruntime_does(op, lens):
    """A length of 0 in sequence_lens (ONNX allows it; clients pad batches with empty rows):
    its outputs and final states are zeros, whatever the initial state, as onnxruntime gives
    them; a request whose every row is empty is answered too. (It was refused.)"""
    data = recurrent_onnx(op, direction="bidirectional", seq_lens=True, initial_state=True)
    rng = np.random.default_rng(4)
    batch = len(lens)
    inputs = {"X": rng.standard_normal((3, batch, X_SIZE)).astype(np.float32),
              "sequence_lens": np.array(lens, np.int32),
              "initial_h": rng.standard_normal((2, batch, HIDDEN)).astype(np.float32)}
    if op == "LSTM":
        inputs["initial_c"] = rng.standard_normal((2, batch, HIDDEN)).astype(np.float32)
    others = {**inputs, "sequence_lens": np.full(batch, 3, np.int32)}  # batched alongside
    got, _ = serve(load_onnx(data, "empty"), [inputs, others])
    assert_outputs_match(got, ort_outputs(data, inputs))
