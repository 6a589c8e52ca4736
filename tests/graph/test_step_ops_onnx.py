"""The decoder step's torch ops against ONNX's reference evaluator, for the cases torch does
not do natively: Slice stepping backwards (ONNX's own clamping of starts and ends) and ArgMax
giving ties to the last index."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from cellserve.graph import step_ops
from cellserve.graph.model import DenseNode


def _reference(node: onnx.NodeProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED, None)])
    return ReferenceEvaluator(helper.make_model(graph)).run(None, inputs)[0]


def _ours(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None) -> np.ndarray:
    node = DenseNode(op, "n", list(inputs), ["y"], attrs or {})
    env = {name: torch.from_numpy(v) for name, v in inputs.items()}
    step_ops.run(node, env)
    return env["y"].numpy()


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([-1], [-100], [1], [-1]),  # the whole axis, reversed
    ([4], [0], [1], [-2]),  # every other, backwards, the end excluded
    ([100], [-100], [0], [-1]),  # starts past the end are clamped to the last
    ([3, 1], [0, 5], [1, 0], [-1, 2]),  # backwards on one axis, forwards on another
    ([-2], [-5], [-1], [-1]),  # a negative axis
])
def test_slice_steps_backwards_as_onnx_does(starts, ends, axes, steps):
    x = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    ints = {"x": x, "starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64),
            "axes": np.array(axes, np.int64), "steps": np.array(steps, np.int64)}
    want = _reference(helper.make_node("Slice", list(ints), ["y"]), ints)
    np.testing.assert_array_equal(_ours("Slice", ints), want)


def test_a_slice_step_of_zero_is_refused_naming_the_node():
    ints = {"x": np.zeros((3, 3), np.float32), "starts": np.array([0], np.int64), "ends": np.array([2], np.int64),
            "axes": np.array([0], np.int64), "steps": np.array([0], np.int64)}
    with pytest.raises(ValueError, match="Slice 'n': step 0 on axis 0"):
        _ours("Slice", ints)


@pytest.mark.parametrize("axis, keepdims", [(0, 1), (1, 0), (-1, 1)])
def test_argmax_gives_ties_to_the_last_index_when_asked(axis, keepdims):
    x = {"x": np.array([[1, 3, 3, 0], [2, 2, 1, 2], [5, 5, 5, 5]], np.float32)}
    attrs = {"axis": axis, "keepdims": keepdims, "select_last_index": 1}
    want = _reference(helper.make_node("ArgMax", ["x"], ["y"], **attrs), x)
    np.testing.assert_array_equal(_ours("ArgMax", x, attrs), want)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_an_older_opset_s_softmax_flattens_from_its_axis_as_onnx_did(op, axis):
    """A decoder step's Softmax below opset 13 (the importer marks it): the axes from `axis` on
    taken as one, as onnxruntime does at opset 11 (ONNX's reference evaluator gives 13's
    meaning at every opset); the numpy plain op too."""
    import onnxruntime as ort

    from cellserve.graph import dense_ops
    from cellserve.graph.model import SOFTMAX_FLATTENS

    x = {"x": np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)}
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], axis=axis)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    attrs = {"axis": axis, SOFTMAX_FLATTENS: 1}
    np.testing.assert_allclose(_ours(op, x, attrs), want, rtol=1e-5, atol=1e-6)
    env = dict(x)
    dense_ops.run(DenseNode(op, "n", ["x"], ["y"], attrs), env)
    np.testing.assert_allclose(env["y"], want, rtol=1e-5, atol=1e-6)
