"""The plain (non-recurrent) ops a model may contain, with ONNX semantics, in numpy.

They run once per request around the recurrent layers: embedding lookups, layout shuffles,
heads. `SUPPORTED` is the importer's list of what loads; anything else is refused at load.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cellserve.graph.model import SOFTMAX_FLATTENS, DenseNode

Args = list  # list[np.ndarray | None], positional as in ONNX


def _axes(node: DenseNode, args: Args, position: int) -> list[int] | None:
    if len(args) > position and args[position] is not None:
        return [int(a) for a in args[position]]
    return node.attrs.get("axes")


def _gemm(node: DenseNode, a: Args) -> list[np.ndarray]:
    x, w = a[0], a[1]
    if node.attrs.get("transA", 0):
        x = x.T
    if node.attrs.get("transB", 0):
        w = w.T
    y = node.attrs.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + node.attrs.get("beta", 1.0) * a[2]
    return [y.astype(np.float32, copy=False)]


def _squeeze(node: DenseNode, a: Args) -> list[np.ndarray]:
    axes = _axes(node, a, 1)
    return [np.squeeze(a[0], axis=tuple(axes)) if axes is not None else np.squeeze(a[0])]


def _unsqueeze(node: DenseNode, a: Args) -> list[np.ndarray]:
    axes = sorted(ax % (a[0].ndim + len(_axes(node, a, 1))) for ax in _axes(node, a, 1))
    y = a[0]
    for ax in axes:
        y = np.expand_dims(y, ax)
    return [y]


def _reshape(node: DenseNode, a: Args) -> list[np.ndarray]:
    shape = [int(s) for s in a[1]]
    if not node.attrs.get("allowzero", 0):
        shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [a[0].reshape(shape)]


def _slice(node: DenseNode, a: Args) -> list[np.ndarray]:
    x = a[0]
    if len(a) == 1:  # opset 1-9: starts, ends and axes are attributes, steps are 1
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", range(len(starts))), [1] * len(starts)
    else:
        starts, ends = a[1], a[2]
        axes = a[3] if len(a) > 3 and a[3] is not None else range(len(starts))
        steps = a[4] if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end"), as Python slices do.
        index[int(ax)] = slice(int(s), int(e), int(st))
    return [x[tuple(index)]]


def _constant(node: DenseNode, a: Args) -> list[np.ndarray]:
    return [node.attrs["value"]]


def _constant_of_shape(node: DenseNode, a: Args) -> list[np.ndarray]:
    value = node.attrs.get("value", np.zeros(1, np.float32))
    return [np.full([int(s) for s in a[0]], value.reshape(-1)[0], dtype=value.dtype)]


def _softmax(node: DenseNode, a: Args, log: bool = False) -> list[np.ndarray]:
    x, axis = a[0], node.attrs.get("axis", -1)
    shape = x.shape
    if node.attrs.get(SOFTMAX_FLATTENS) and x.ndim:  # before opset 13: over every axis from `axis` on
        axis %= x.ndim
        x, axis = x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1), 1
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=axis, keepdims=True)
    return [((z - np.log(s)) if log else (e / s)).reshape(shape)]


def _argmax(node: DenseNode, a: Args) -> list[np.ndarray]:
    axis, keep = node.attrs.get("axis", 0), node.attrs.get("keepdims", 1)
    x = a[0]
    if node.attrs.get("select_last_index", 0):
        idx = x.shape[axis] - 1 - np.argmax(np.flip(x, axis=axis), axis=axis)
    else:
        idx = np.argmax(x, axis=axis)
    idx = idx.astype(np.int64)
    return [np.expand_dims(idx, axis) if keep else idx]


def _gather(node: DenseNode, a: Args) -> list[np.ndarray]:
    return [np.take(a[0], a[1].astype(np.int64), axis=node.attrs.get("axis", 0))]


def _cast(node: DenseNode, a: Args) -> list[np.ndarray]:
    return [a[0].astype(node.attrs["to"])]


def _int_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integer division rounding towards zero, as ONNX (and C) define it."""
    q = np.floor_divide(x, y)
    return np.where((q < 0) & (q * y != x), q + 1, q).astype(np.result_type(x, y))


def _flatten(node: DenseNode, a: Args) -> list[np.ndarray]:
    axis = node.attrs.get("axis", 1)
    axis = axis + a[0].ndim if axis < 0 else axis
    return [a[0].reshape(int(np.prod(a[0].shape[:axis])), -1)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * np.tanh(0.5 * x) + 0.5).astype(x.dtype, copy=False)


def _reduce(fn: Callable) -> Callable:
    """An ONNX Reduce* op: axes from the attribute (before opset 18) or the second input, all
    of them when none are given (unless noop_with_empty_axes), keepdims by default; the
    result in the input's dtype (ONNX's: a mean of integers is an integer)."""
    def run(node: DenseNode, a: Args) -> list[np.ndarray]:
        axes = _axes(node, a, 1)
        if not axes and node.attrs.get("noop_with_empty_axes", 0):
            return [a[0]]
        axis = tuple(int(x) for x in axes) if axes else None
        return [np.asarray(fn(a[0], axis=axis, keepdims=bool(node.attrs.get("keepdims", 1)))).astype(a[0].dtype,
                                                                                                copy=False)]
    return run


def _elementwise(fn: Callable) -> Callable:
    return lambda node, a: [fn(*a)]


OPS: dict[str, Callable[[DenseNode, Args], list[np.ndarray]]] = {
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Div": _elementwise(lambda x, y: _int_div(x, y) if x.dtype.kind in "iu" else x / y),
    "MatMul": _elementwise(np.matmul),
    "Tanh": _elementwise(np.tanh),
    "Relu": _elementwise(lambda x: np.maximum(x, 0).astype(x.dtype, copy=False)),
    "Sigmoid": _elementwise(_sigmoid),
    "Identity": _elementwise(lambda x: x),
    "Shape": lambda node, a: [np.array(a[0].shape[node.attrs.get("start", 0):node.attrs.get("end")], dtype=np.int64)],
    "Transpose": lambda node, a: [np.transpose(a[0], node.attrs.get("perm"))],
    "Concat": lambda node, a: [np.concatenate(a, axis=node.attrs["axis"])],
    "Expand": lambda node, a: [a[0] * np.ones([int(s) for s in a[1]], dtype=a[0].dtype)],
    "Gemm": _gemm,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "Slice": _slice,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Softmax": _softmax,
    "LogSoftmax": lambda node, a: _softmax(node, a, log=True),
    "ArgMax": _argmax,
    "Gather": _gather,
    "Cast": _cast,
    "Flatten": _flatten,
    "Equal": _elementwise(np.equal),
    "Greater": _elementwise(np.greater),
    "Less": _elementwise(np.less),
    "Not": _elementwise(np.logical_not),
    "Where": _elementwise(lambda c, x, y: np.where(c, x, y)),
    "ReduceSum": _reduce(np.sum),
    "ReduceMean": _reduce(np.mean),  # pooling heads: the mean or the max over time
    "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
    "Range": lambda node, a: [np.arange(a[0].item(), a[1].item(), a[2].item(), dtype=a[0].dtype)],
}

SUPPORTED = frozenset(OPS)


def run(node: DenseNode, env: dict[str, np.ndarray]) -> None:
    """Run one node, reading its inputs from env and writing its outputs into it."""
    args = [env[name] if name else None for name in node.inputs]
    for name, value in zip(node.outputs, OPS[node.op](node, args)):
        if name:
            env[name] = value
