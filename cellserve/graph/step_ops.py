"""The plain ops a decoder-step graph may contain, with ONNX semantics, in torch.

A decoder step runs once per output position for a whole batch of lanes, so unlike
`dense_ops` (numpy, once per request) these run batched on the kernel's device. `SUPPORTED`
is the decoder-step importer's list of what loads; anything else is refused at load naming
the operator and the node. Integer arguments that ONNX passes as tensors (shapes, axes,
split sizes) may be constants or computed at run time (Shape -> Gather -> Concat).
Opset 13 and newer (axes as inputs); the attribute form of older opsets is read too.
"""

from __future__ import annotations

import math

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cellserve.graph.model import SOFTMAX_FLATTENS, DenseNode

Args = list  # list[torch.Tensor | None], positional as in ONNX


def _ints(t) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else np.reshape(t, -1))]


def _axes(node: DenseNode, a: Args, position: int) -> list[int] | None:
    if len(a) > position and a[position] is not None:
        return _ints(a[position])
    axes = node.attrs.get("axes")
    return None if axes is None else [int(x) for x in axes]


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def _gemm(node: DenseNode, a: Args) -> list[torch.Tensor]:
    x, w = a[0], a[1]
    if node.attrs.get("transA", 0):
        x = x.t()
    if node.attrs.get("transB", 0):
        w = w.t()
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if len(a) > 2 and a[2] is not None:
        return [torch.addmm(a[2].expand(x.shape[0], w.shape[1]) if a[2].dim() < 2 else a[2], x, w,
                            beta=beta, alpha=alpha)]
    return [alpha * (x @ w)]


def _softmax(node: DenseNode, a: Args, log: bool = False) -> list[torch.Tensor]:
    x, axis = a[0], int(node.attrs.get("axis", -1))
    shape = x.shape
    if node.attrs.get(SOFTMAX_FLATTENS) and x.dim():  # before opset 13: over every axis from `axis` on
        axis %= x.dim()
        x, axis = x.reshape(math.prod(shape[:axis]), -1), 1
    return [(torch.log_softmax(x, axis) if log else torch.softmax(x, axis)).reshape(shape)]


def _gather(node: DenseNode, a: Args) -> list[torch.Tensor]:
    x, idx = a[0], a[1].long()
    axis = int(node.attrs.get("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


def _squeeze(node: DenseNode, a: Args) -> list[torch.Tensor]:
    axes = _axes(node, a, 1)
    x = a[0]
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(ax % x.dim() for ax in axes))]


def _unsqueeze(node: DenseNode, a: Args) -> list[torch.Tensor]:
    axes = _axes(node, a, 1)
    y = a[0]
    rank = y.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        y = y.unsqueeze(ax)
    return [y]


def _reshape(node: DenseNode, a: Args) -> list[torch.Tensor]:
    shape = _ints(a[1])
    if not node.attrs.get("allowzero", 0):
        shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [a[0].reshape(shape)]


def _slice(node: DenseNode, a: Args) -> list[torch.Tensor]:
    x = a[0]
    starts, ends = _ints(a[1]), _ints(a[2])
    axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        dim = x.shape[ax]
        s, e = s + dim if s < 0 else s, e + dim if e < 0 else e
        if st > 0:
            index[ax] = slice(min(max(s, 0), dim), min(max(e, 0), dim), st)
        elif st < 0:  # torch slices do not step backwards: gather the positions, ONNX's clamping
            kept = range(min(max(s, 0), dim - 1), min(max(e, -1), dim - 1), st)
            x = x.index_select(ax, torch.tensor(list(kept), dtype=torch.long, device=x.device))
        else:
            raise ValueError(f"Slice {node.name!r}: step 0 on axis {ax}")
    return [x[tuple(index)]]


def _split(node: DenseNode, a: Args) -> list[torch.Tensor]:
    axis = int(node.attrs.get("axis", 0))
    sizes = _ints(a[1]) if len(a) > 1 and a[1] is not None else node.attrs.get("split")
    if sizes is None:
        parts = len(node.outputs)
        dim = a[0].shape[axis]
        step = -(-dim // parts)
        sizes = [min(step, dim - i * step) for i in range(parts)]
    return list(torch.split(a[0], [int(s) for s in sizes], dim=axis))


def _reduce(fn: Callable) -> Callable:
    def run(node: DenseNode, a: Args) -> list[torch.Tensor]:
        axes = _axes(node, a, 1)
        keep = bool(node.attrs.get("keepdims", 1))
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return [a[0]]
            axes = list(range(a[0].dim()))
        return [fn(a[0], tuple(axes), keep)]
    return run


def _reduce_max(x: torch.Tensor, axes: tuple, keep: bool) -> torch.Tensor:
    return torch.amax(x, dim=axes, keepdim=keep)


def _argmax(node: DenseNode, a: Args) -> list[torch.Tensor]:
    axis, keep = int(node.attrs.get("axis", 0)), bool(node.attrs.get("keepdims", 1))
    if node.attrs.get("select_last_index", 0):  # ties go to the last: the first of the flipped tensor
        return [a[0].shape[axis] - 1 - torch.argmax(a[0].flip(axis), dim=axis, keepdim=keep)]
    return [torch.argmax(a[0], dim=axis, keepdim=keep)]


def _int_div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype.is_floating_point or y.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")  # ONNX integer division rounds towards zero


def _constant(node: DenseNode, a: Args) -> list[torch.Tensor]:
    return [torch.as_tensor(np.array(node.attrs["value"]))]  # a copy: the attribute stays read-only


def _constant_of_shape(node: DenseNode, a: Args) -> list[torch.Tensor]:
    value = np.asarray(node.attrs.get("value", np.zeros(1, np.float32)))
    return [torch.full(_ints(a[0]), value.reshape(-1)[0].item(), dtype=torch_dtype(value.dtype),
                       device=a[0].device)]


def _expand(node: DenseNode, a: Args) -> list[torch.Tensor]:
    shape = torch.broadcast_shapes(tuple(a[0].shape), tuple(_ints(a[1])))
    return [a[0].expand(shape)]


def _layer_norm(node: DenseNode, a: Args) -> list[torch.Tensor]:
    x = a[0]
    axis = int(node.attrs.get("axis", -1)) % x.dim()
    bias = a[2] if len(a) > 2 else None
    return [F.layer_norm(x, tuple(x.shape[axis:]), a[1], bias, float(node.attrs.get("epsilon", 1e-5)))]


def _flatten(node: DenseNode, a: Args) -> list[torch.Tensor]:
    axis = int(node.attrs.get("axis", 1))
    axis = axis + a[0].dim() if axis < 0 else axis
    return [a[0].reshape(int(np.prod(a[0].shape[:axis])), -1)]


def _shape(node: DenseNode, a: Args) -> list[torch.Tensor]:
    shape = list(a[0].shape)[node.attrs.get("start", 0):node.attrs.get("end")]
    return [torch.tensor(shape, dtype=torch.int64)]


def _variadic(fn: Callable) -> Callable:
    def run(node: DenseNode, a: Args) -> list[torch.Tensor]:
        out = a[0]
        for x in a[1:]:
            out = fn(out, x)
        return [out]
    return run


def _unary(fn: Callable) -> Callable:
    return lambda node, a: [fn(a[0])]


def _binary(fn: Callable) -> Callable:
    return lambda node, a: [fn(a[0], a[1])]


OPS: dict[str, Callable[[DenseNode, Args], list[torch.Tensor]]] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_int_div),
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul),
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal), "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu), "Erf": _unary(torch.erf), "Identity": _unary(lambda x: x),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Where": lambda node, a: [torch.where(a[0].bool(), a[1], a[2])],
    "Gemm": _gemm, "Softmax": _softmax, "LogSoftmax": lambda node, a: _softmax(node, a, log=True),
    "Gather": _gather, "Concat": lambda node, a: [torch.cat(a, dim=int(node.attrs["axis"]))],
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Reshape": _reshape, "Slice": _slice, "Split": _split,
    "Transpose": lambda node, a: [a[0].permute(*(node.attrs.get("perm") or range(a[0].dim() - 1, -1, -1)))],
    "Flatten": _flatten,
    "Shape": _shape, "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Expand": _expand,
    "Cast": lambda node, a: [a[0].to(torch_dtype(node.attrs["to"]))],
    "ReduceSum": _reduce(lambda x, axes, keep: torch.sum(x, dim=axes, keepdim=keep)),
    "ReduceMean": _reduce(lambda x, axes, keep: torch.mean(x, dim=axes, keepdim=keep)),
    "ReduceMax": _reduce(_reduce_max), "ArgMax": _argmax,
    "LayerNormalization": _layer_norm,
    "Range": lambda node, a: [torch.arange(a[0].item(), a[1].item(), a[2].item(), dtype=a[0].dtype,
                                           device=a[0].device)],
}

SUPPORTED = frozenset(OPS)


def run(node: DenseNode, env: dict) -> None:
    """Run one node, reading its inputs from env and writing its outputs into it."""
    args = [env[name] if name else None for name in node.inputs]
    for name, value in zip(node.outputs, OPS[node.op](node, args)):
        if name:
            env[name] = value


def matmul_flops(node: DenseNode, env: dict) -> float:
    """Multiply-adds x2 of a MatMul or Gemm node whose inputs are in env (0 for other ops)."""
    if node.op not in ("MatMul", "Gemm"):
        return 0.0
    x, w = env[node.inputs[0]], env[node.inputs[1]]
    if node.op == "Gemm":
        m = x.shape[1 if node.attrs.get("transA", 0) else 0]
        k = x.shape[0 if node.attrs.get("transA", 0) else 1]
        n = w.shape[0 if node.attrs.get("transB", 0) else 1]
        return 2.0 * m * k * n
    out = torch.broadcast_shapes(tuple(x.shape[:-2]), tuple(w.shape[:-2])) if x.dim() > 1 and w.dim() > 1 else ()
    rows = x.shape[-2] if x.dim() > 1 else 1
    cols = w.shape[-1] if w.dim() > 1 else 1
    return 2.0 * float(np.prod(out or [1])) * rows * x.shape[-1] * cols
