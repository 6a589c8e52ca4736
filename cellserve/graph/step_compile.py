"""A decoder-step graph compiled, once per device, into one generated Python function.

The interpreter (`decoder_graph.run_step_graph` without a compiled step) dispatches every
node through `step_ops.run`: a dictionary of values, an argument list, the op's attributes
read again at each step. For a small decoder that dispatch costs more than the arithmetic
(the digit reverser's ~30 nodes: about 2.4x the hand-written kernel's step). `compile_step`
instead

1. folds constant work into the weights (graph/step_rewrite.py: the token embedding into the
   first projection, the recurrent bias into that table, negated conditions);
2. drops nodes that compute nothing (Identity, a Cast to the dtype a value already has);
3. writes one Python function with a line per remaining node: a direct torch call with its
   attributes and constant integer arguments (axes, split sizes, permutations, shapes)
   written in as literals, weights used where the kernel placed them (a Gemm's W^T is a
   view: `torch.addmm(bias, x, w.t())` costs what a contiguous copy would), values in
   local variables.

A node with no specialised form (Shape, Slice, Range, ...; or one whose integer arguments
are computed at run time) becomes a call of its `step_ops` implementation, so every graph
the importer accepts compiles. The function computes what the interpreter computes (ONNX
semantics); the folded tables are rounded once at load where the graph rounds per step,
which the tests check leaves logits within float tolerance and tokens identical.
When the compiled function raises, the interpreter runs the same feeds so that the error
names the failing node (see `CompiledStep.__call__`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from cellserve.graph import step_ops, step_rewrite
from cellserve.graph.model import SOFTMAX_FLATTENS, DenseNode

if TYPE_CHECKING:
    from cellserve.graph.decoder_graph import DecoderStepGraph

_BOOL_OPS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not"}
_BINARY = {"Add": "torch.add", "Sub": "torch.sub", "Mul": "torch.mul", "Pow": "torch.pow",
           "MatMul": "torch.matmul", "Equal": "torch.eq", "Greater": "torch.gt", "Less": "torch.lt",
           "GreaterOrEqual": "torch.ge", "LessOrEqual": "torch.le", "And": "torch.logical_and",
           "Or": "torch.logical_or", "Max": "torch.maximum", "Min": "torch.minimum"}
_UNARY = {"Not": "torch.logical_not", "Neg": "torch.neg", "Abs": "torch.abs", "Exp": "torch.exp",
          "Log": "torch.log", "Sqrt": "torch.sqrt", "Reciprocal": "torch.reciprocal", "Tanh": "torch.tanh",
          "Sigmoid": "torch.sigmoid", "Relu": "torch.relu", "Erf": "torch.erf"}


@dataclass
class CompiledStep:
    """`step(feeds)` -> the graph's outputs by name, as `run_step_graph` returns them.
    `source` is the generated function (for reading and for the tests)."""

    graph: "DecoderStepGraph"
    source: str
    nodes: int  # torch calls per step (lines of the generated function)
    fn: Callable[[dict], dict]
    interpret: Callable[[dict], dict]  # the same step through the interpreter, for errors

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self.fn(feeds)
        except Exception:
            self.interpret(feeds)  # raises naming the node that fails (RuntimeError)
            raise  # the interpreter did not fail: the compiled form is at fault, say where


def compile_step(graph: "DecoderStepGraph", device: torch.device, interpret: Callable[[dict], dict],
                 placed: dict[str, torch.Tensor] | None = None) -> CompiledStep:
    """Compile `graph` for `device` (see the module docstring). `interpret(feeds)` runs the
    same step uncompiled; it is called only to name the node of an error. `placed`: the
    graph's constants already on `device` (by name), which the compiled step uses as they
    are (a Gemm's transposed weight is a view, not a copy), so that only the tables the folds
    make take more device memory."""
    constants = dict(graph.constants)
    nodes = step_rewrite.fold(graph.nodes, constants, {o.name for o in graph.outputs})
    gen = _Gen(constants, device, {s.name: np.dtype(s.dtype) for s in graph.inputs},
               {s.name: len(s.shape) for s in graph.inputs if s.shape is not None}, placed or {})
    gen.lines.append("def step(F):")
    for spec in graph.inputs:
        gen.lines.append(f"    {gen.bind(spec.name)} = F[{spec.name!r}]")
    calls = 0
    for node in nodes:
        calls += gen.emit(node)
    outs = ", ".join(f"{o.name!r}: {gen.ref(o.name)}" for o in graph.outputs)
    gen.lines.append(f"    return {{{outs}}}")
    source = "\n".join(gen.lines) + "\n"
    scope = dict(gen.globals)
    exec(compile(source, f"<decoder step {graph.name}>", "exec"), scope)  # noqa: S102 - our own generated code
    return CompiledStep(graph, source, calls, scope["step"], interpret)


class _Gen:
    """The generator's state: Python names of values, constants placed on the device, lines."""

    def __init__(self, constants: dict[str, np.ndarray], device: torch.device, dtypes: dict[str, np.dtype],
                 ranks: dict[str, int], placed: dict[str, torch.Tensor]):
        self.constants, self.device, self.placed = constants, device, placed
        self.dtypes: dict[str, np.dtype | None] = dict(dtypes)
        self.dtypes.update({k: np.asarray(v).dtype for k, v in constants.items()})
        self.ranks: dict[str, int | None] = dict(ranks)
        self.ranks.update({k: np.ndim(v) for k, v in constants.items()})
        self.names: dict[str, str] = {}
        self.globals: dict[str, object] = {"torch": torch, "_OPS": step_ops.OPS}
        self.lines: list[str] = []

    def bind(self, value: str) -> str:
        name = f"v{len(self.names)}"
        self.names[value] = name
        return name

    def place(self, array: np.ndarray | torch.Tensor) -> str:
        """A global name for a constant: a tensor already on the device as it is, an array copied there."""
        name = f"k{sum(1 for k in self.globals if k.startswith('k'))}"
        self.globals[name] = (array if isinstance(array, torch.Tensor)
                              else torch.as_tensor(np.ascontiguousarray(array), device=self.device))
        return name

    def constant(self, value: str, transpose: bool = False) -> str:
        """A global name for the constant `value` (optionally transposed): the placed tensor
        (a view) where there is one, else a copy of the array made for this step."""
        if value in self.placed:
            return self.place(self.placed[value].t() if transpose else self.placed[value])
        array = np.asarray(self.constants[value])
        return self.place(array.T if transpose else array)

    def ref(self, value: str) -> str:
        if not value:
            return "None"
        if value not in self.names:
            if value not in self.constants:
                raise KeyError(f"value {value!r} is neither computed before use nor a constant")
            self.names[value] = self.constant(value)
        return self.names[value]

    def ints(self, value: str | None) -> list[int] | None:
        """A constant integer argument as a list, or None if computed at run time."""
        if not value or value not in self.constants:
            return None
        return [int(v) for v in np.reshape(self.constants[value], -1)]

    def emit(self, node: DenseNode) -> int:
        """Write `node`'s line (or alias its output); returns the torch calls it adds."""
        self._dtype(node)
        self._rank(node)
        if node.op == "Identity" or (node.op == "Cast" and self.dtypes.get(node.inputs[0]) == np.dtype(node.attrs["to"])):
            self.names[node.outputs[0]] = self.ref(node.inputs[0])
            return 0
        expr = _special(self, node)
        if expr is None:  # the op's step_ops form, with its attributes read at run time
            self.globals[f"_N{len(self.lines)}"] = node
            args = ", ".join(self.ref(i) for i in node.inputs)
            expr = f"_OPS[{node.op!r}](_N{len(self.lines)}, [{args}])"
            targets = ", ".join(self.bind(o) if o else "_" for o in node.outputs) + ","
        elif len(node.outputs) > 1:
            targets = ", ".join(self.bind(o) if o else "_" for o in node.outputs)
        else:
            targets = self.bind(node.outputs[0])
        self.lines.append(f"    {targets} = {expr}  # {node.op} {node.name}")
        return 1

    def _dtype(self, node: DenseNode) -> None:
        """Static dtype propagation, enough to drop redundant casts and type Where/Gather."""
        first = self.dtypes.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
        if node.op in _BOOL_OPS:
            out = np.dtype(bool)
        elif node.op == "Cast":
            out = np.dtype(node.attrs["to"])
        elif node.op in ("Shape", "ArgMax"):
            out = np.dtype(np.int64)
        elif node.op == "Where":
            out = self.dtypes.get(node.inputs[1])
        elif node.op in ("Gather",):
            out = first
        else:
            out = first if node.op not in ("ConstantOfShape", "Range") else None
        for o in node.outputs:
            if o:
                self.dtypes[o] = out


    def _rank(self, node: DenseNode) -> None:
        """Static rank propagation (None where unknown), enough to pick bmm for a MatMul."""
        rank = [self.ranks.get(i) if i else None for i in node.inputs]
        op, out = node.op, None
        if op in _UNARY or op in ("Cast", "Softmax", "LogSoftmax", "Split", "Concat", "Identity"):
            out = rank[0]
        elif op in _BINARY or op in ("Div", "Where"):
            out = None if None in rank else max(rank)
        elif op == "Gemm":
            out = 2
        elif op in ("Squeeze", "Unsqueeze") and rank[0] is not None:
            axes = self.ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else node.attrs.get("axes")
            if axes is not None:
                out = rank[0] + (len(axes) if op == "Unsqueeze" else -len(axes))
        elif op == "Gather" and None not in rank[:2]:
            out = rank[0] - 1 + rank[1]
        for o in node.outputs:
            if o:
                self.ranks[o] = out


def _special(gen: _Gen, node: DenseNode) -> str | None:
    """The node as one direct torch expression, or None for the generic form."""
    op, a, at = node.op, node.inputs, node.attrs
    r = gen.ref
    if op == "MatMul" and gen.ranks.get(a[0]) == 3 and gen.ranks.get(a[1]) == 3:
        x, y = r(a[0]), r(a[1])  # bmm is matmul without its broadcasting checks: 3x cheaper at these sizes
        return f"torch.bmm({x}, {y}) if {x}.shape[0] == {y}.shape[0] else torch.matmul({x}, {y})"
    if op in _BINARY and len(a) == 2:
        return f"{_BINARY[op]}({r(a[0])}, {r(a[1])})"
    if op == "Div" and len(a) == 2 and _is_float(gen, a[0]):
        return f"torch.div({r(a[0])}, {r(a[1])})"
    if op in _UNARY:
        return f"{_UNARY[op]}({r(a[0])})"
    if op == "Where" and gen.dtypes.get(a[0]) == np.dtype(bool):
        return f"torch.where({r(a[0])}, {r(a[1])}, {r(a[2])})"
    if op in ("Softmax", "LogSoftmax") and not at.get(SOFTMAX_FLATTENS):  # the older form: step_ops
        return f"torch.{'log_softmax' if op == 'LogSoftmax' else 'softmax'}({r(a[0])}, {int(at.get('axis', -1))})"
    if op == "Concat":
        return f"torch.cat([{', '.join(r(x) for x in a)}], {int(at['axis'])})"
    if op == "Cast":
        return f"{r(a[0])}.to({step_ops.torch_dtype(np.dtype(at['to']))})"
    if op == "Gather" and int(at.get("axis", 0)) == 0 and gen.dtypes.get(a[1]) == np.dtype(np.int64):
        return f"{r(a[0])}[{r(a[1])}]"  # torch's indexing wraps negative indices as ONNX does
    if op == "ArgMax" and not at.get("select_last_index", 0):
        return f"torch.argmax({r(a[0])}, {int(at.get('axis', 0))}, {bool(at.get('keepdims', 1))})"
    if op == "Gemm":
        return _gemm(gen, node)
    if op == "Split":
        sizes = gen.ints(a[1]) if len(a) > 1 and a[1] else at.get("split")
        return None if sizes is None else f"{r(a[0])}.split_with_sizes({[int(s) for s in sizes]}, {int(at.get('axis', 0))})"
    if op in ("Squeeze", "Unsqueeze"):
        axes = gen.ints(a[1]) if len(a) > 1 and a[1] else at.get("axes")
        if axes is None or (op == "Unsqueeze" and len(axes) > 1 and min(axes) < 0):
            return None
        if op == "Squeeze":
            return f"{r(a[0])}.squeeze({int(axes[0]) if len(axes) == 1 else tuple(int(x) for x in axes)})"
        return r(a[0]) + "".join(f".unsqueeze({int(x)})" for x in sorted(axes))
    if op == "Transpose" and at.get("perm"):
        return f"{r(a[0])}.permute({[int(p) for p in at['perm']]})"
    if op == "Reshape":
        shape = gen.ints(a[1])
        if shape is None or (0 in shape and not at.get("allowzero", 0)):
            return None
        return f"{r(a[0])}.reshape({shape})"
    return None


def _is_float(gen: _Gen, value: str) -> bool:
    dtype = gen.dtypes.get(value)
    return dtype is not None and np.issubdtype(dtype, np.floating)


def _gemm(gen: _Gen, node: DenseNode) -> str | None:
    """Gemm with a constant B: B' (a view when transposed), C as addmm's first argument."""
    a, at = node.inputs, node.attrs
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    if at.get("transA", 0) or a[1] not in gen.constants or np.ndim(gen.constants[a[1]]) != 2:
        return None
    w = gen.constant(a[1], transpose=bool(at.get("transB", 0)))  # addmm reads a transposed view as fast
    x = gen.ref(a[0])
    scale = "" if alpha == 1.0 else f", alpha={alpha!r}"
    if len(a) < 3 or not a[2]:
        return f"torch.mm({x}, {w})" if alpha == 1.0 else None
    c = gen.constants.get(a[2])
    if c is not None and np.ndim(c) == 2 and np.shape(c)[0] != 1:
        return None  # a per-row constant C: the generic form broadcasts it as ONNX says
    return f"torch.addmm({gen.ref(a[2])}, {x}, {w}{'' if beta == 1.0 else f', beta={beta!r}'}{scale})"
