"""The ONNX importer against onnxruntime: hand-built LSTM/GRU/RNN graphs served by the Engine
give onnxruntime's outputs for every request, and what cannot be run is refused at load."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cellserve.engine.engine import EngineConfig
from cellserve.errors import ModelLoadError, UnsupportedOperator
from cellserve.graph.model import InputSemantics
from cellserve.graph.onnx_import import load_onnx

from .helpers import BACKENDS, assert_outputs_match, onnx_bytes, ort_outputs, recurrent_onnx, serve

CELLS = [("LSTM", "Tanh"), ("GRU", "Tanh"), ("RNN", "Tanh"), ("RNN", "Relu")]
DIRECTIONS = ["forward", "reverse", "bidirectional"]
# (features, opset): each feature is exercised with every cell and direction
VARIANTS = {
    "plain": (dict(), 17),
    "seq_lens": (dict(seq_lens=True), 14),
    "initial_state": (dict(initial_state=True), 17),
    "seq_lens+initial_state": (dict(seq_lens=True, initial_state=True), 17),
    "batch_first+seq_lens+initial_state": (dict(batch_first=True, seq_lens=True, initial_state=True), 14),
}
# (time, batch) of the requests in flight together; a batch of 3 with sequence_lens gets 3 lengths
SHAPES = [(6, 3), (1, 3), (4, 3), (3, 3)]
SHAPES_ANY_BATCH = [(6, 2), (1, 1), (4, 3), (3, 1)]


def recurrent_requests(op: str, features: dict, hidden: int = 5, input_size: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    d = 2 if features.get("direction") == "bidirectional" else 1
    requests = []
    for time, batch in SHAPES if features.get("seq_lens") else SHAPES_ANY_BATCH:
        x = rng.standard_normal((time, batch, input_size)).astype(np.float32)
        inputs = {"X": x.transpose(1, 0, 2).copy() if features.get("batch_first") else x}
        if features.get("seq_lens"):
            inputs["sequence_lens"] = np.array([time, rng.integers(1, time + 1), 1], np.int32)
        if features.get("initial_state"):
            inputs["initial_h"] = rng.standard_normal((d, batch, hidden)).astype(np.float32)
            if op == "LSTM":
                inputs["initial_c"] = rng.standard_normal((d, batch, hidden)).astype(np.float32)
        requests.append(inputs)
    return requests


@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("op, activation", CELLS, ids=["LSTM", "GRU", "RNN_Tanh", "RNN_Relu"])
def test_recurrent_node_matches_onnxruntime_for_concurrent_requests(op, activation, direction, variant, backend):
    features, opset = VARIANTS[variant]
    data = recurrent_onnx(op, direction=direction, activation=activation, opset=opset, **features)
    requests = recurrent_requests(op, {**features, "direction": direction})
    got = serve(load_onnx(data, "rnn"), requests, EngineConfig(backend=backend))
    for i, (inputs, outputs) in enumerate(zip(requests, got)):
        assert_outputs_match(outputs, ort_outputs(data, inputs), where=f"request {i}")


def test_sequence_lens_zero_the_outputs_past_each_sequence_end():
    data = recurrent_onnx("LSTM", direction="bidirectional", seq_lens=True)
    x = np.random.default_rng(1).standard_normal((5, 3, 3)).astype(np.float32)
    inputs = {"X": x, "sequence_lens": np.array([5, 2, 1], np.int32)}
    (got,) = serve(load_onnx(data, "rnn"), [inputs])
    assert not got["Y"][2:, :, 1].any() and not got["Y"][1:, :, 2].any()
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


# ---- refusals at load time ----

def _single_node_model(op: str, opset: int = 17, **attrs) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, None])
    weights = {"Conv": [np.ones((2, 2, 3), np.float32)], "LayerNormalization": [np.ones(4, np.float32)]}[op]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    node = helper.make_node(op, ["x", *(i.name for i in inits)], ["y"], name=f"my_{op.lower()}", **attrs)
    return onnx_bytes([node], [x], [y], inits, opset)


@pytest.mark.parametrize("op", ["Conv", "LayerNormalization"])
def test_unsupported_operator_is_refused_naming_operator_and_node(op):
    with pytest.raises(UnsupportedOperator, match=f"'{op}'.*'my_{op.lower()}'"):
        load_onnx(_single_node_model(op), "bad")


@pytest.mark.parametrize("attrs", [{"linear_before_reset": 0}, {}], ids=["explicit", "default"])
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


def test_non_onnx_file_and_missing_file_raise_model_load_error(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("just some notes\n" * 20)
    for path in (text, tmp_path / "missing.onnx"):
        with pytest.raises(ModelLoadError):
            load_onnx(path, "bad")
