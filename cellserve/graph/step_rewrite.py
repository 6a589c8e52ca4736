"""Rewrites of a decoder-step graph that fold constant work into its weights, once at load.

`fold(nodes, constants, outputs)` returns an equivalent node list (ONNX semantics kept; new
constants added to `constants`). The step compiler (graph/step_compile.py) runs it first.
Each rewrite removes torch calls from every step, the way the hand-written kernels do:

- **Embedding into projection.** `Gather(E, token)` feeding `Gemm(., W, b)` becomes one row
  lookup `Gather(E @ W' + b, token)` in a table projected at load (W' = W or W^T per
  transB, alpha and beta applied). When the lookup is one side of a `Concat` feeding the
  Gemm (input feeding: [embedding, attentional vector] @ W_ih^T), the table takes W's rows of
  that side and the Gemm keeps the rest, with the lookup as its C: Gemm(rest, W_rest, C=lookup).
- **Bias into a private table.** `Add(Gemm(x, W, b), Gather(T, idx))`, where T serves only
  that lookup (a table the first rewrite made): b moves into T and the Add into the Gemm's C:
  Gemm(x, W, C=Gather(T + b, idx)) -- an LSTM's h @ W_hh^T + b_hh + x @ W_ih^T + b_ih in one
  addmm after one lookup.
- **Negated condition.** `Where(Not(c), a, b)` becomes `Where(c, b, a)` (after dropping a
  Cast to bool of a value that is already bool, as PyTorch's exporter writes for masked_fill).

A rewrite applies only when the intermediate values it removes have no other consumer and are
not graph outputs. Tables are computed in float64 and stored in the weights' dtype: the
folded table is the exact product rounded once, where the graph rounded at run time (the
tokens the tests compare are the argmax of logits, unchanged by that last-bit difference
except at exact ties).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellserve.graph.model import DenseNode


def fold(nodes: list[DenseNode], constants: dict[str, np.ndarray], outputs: set[str]) -> list[DenseNode]:
    """The rewritten node list; `constants` gains the folded tables (see the module docstring)."""
    nodes = list(nodes)
    for rewrite in (_redundant_bool_cast, _negated_where, _embedding_into_gemm, _bias_into_table):
        changed = True
        while changed:  # one rewrite at a time: each invalidates the use counts
            changed = rewrite(nodes, constants, _uses(nodes, outputs))
    return nodes


def _uses(nodes: list[DenseNode], outputs: set[str]) -> dict[str, int]:
    uses: dict[str, int] = {name: 1 for name in outputs}
    for node in nodes:
        for i in node.inputs:
            if i:
                uses[i] = uses.get(i, 0) + 1
    return uses


def _producer(nodes: list[DenseNode], value: str, op: str) -> DenseNode | None:
    return next((n for n in nodes if value in n.outputs and n.op == op), None)


def _new_name(constants: dict, base: str) -> str:
    name, k = base, 1
    while name in constants:
        name, k = f"{base}.{k}", k + 1
    return name


def _table_gather(nodes, constants, uses, value: str, private: bool = False) -> DenseNode | None:
    """The Gather producing `value` (used once) from a constant 2-D table on axis 0, if any;
    with `private`, only a table that serves no other node."""
    g = _producer(nodes, value, "Gather")
    if g is None or uses.get(value, 0) != 1 or g.inputs[0] not in constants:
        return None
    if int(g.attrs.get("axis", 0)) != 0 or np.ndim(constants[g.inputs[0]]) != 2:
        return None
    if private and uses.get(g.inputs[0], 0) != 1:
        return None
    return g


def _gemm_parts(node: DenseNode, constants: dict):
    """(B' [K, N] as float64, alpha, beta, C or None) of a Gemm with constant B, A not
    transposed and C constant (or absent) of at most one row; None otherwise."""
    if node.op != "Gemm" or node.attrs.get("transA", 0) or node.inputs[1] not in constants:
        return None
    b = np.asarray(constants[node.inputs[1]])
    if b.ndim != 2 or not np.issubdtype(b.dtype, np.floating):
        return None
    c = None
    if len(node.inputs) > 2 and node.inputs[2]:
        if node.inputs[2] not in constants:
            return None
        c = np.asarray(constants[node.inputs[2]], np.float64)
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            return None
    bt = (b.T if node.attrs.get("transB", 0) else b).astype(np.float64)
    return bt, float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0)), c


def _replace(nodes: list[DenseNode], old: list[DenseNode], at: DenseNode, new: list[DenseNode]) -> None:
    """Put `new` where `at` was and drop `old` (which includes `at`)."""
    i = next(k for k, n in enumerate(nodes) if n is at)
    nodes[i:i + 1] = new
    for n in old:
        if n is not at:
            del nodes[next(k for k, m in enumerate(nodes) if m is n)]


_BOOL_OPS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not"}


def _redundant_bool_cast(nodes, constants, uses) -> bool:
    """Cast(to=bool) of a comparison's or logical op's output (already bool): its consumers
    read the input instead (kept when the cast's output is a graph output)."""
    for cast in nodes:
        if cast.op != "Cast" or np.dtype(cast.attrs.get("to", np.float32)) != np.dtype(bool):
            continue
        source = next((n for n in nodes if cast.inputs[0] in n.outputs), None)
        out = cast.outputs[0]
        if source is None or source.op not in _BOOL_OPS or any(out in n.outputs for n in nodes if n is not cast):
            continue
        if uses.get(out, 0) != sum(n.inputs.count(out) for n in nodes):
            continue  # a graph output
        for k, n in enumerate(nodes):  # copies: the graph's own nodes stay as loaded
            if out in n.inputs:
                nodes[k] = dataclasses.replace(n, inputs=[cast.inputs[0] if i == out else i for i in n.inputs])
        _replace(nodes, [cast], cast, [])
        return True
    return False


def _negated_where(nodes, constants, uses) -> bool:
    for w in nodes:
        if w.op != "Where":
            continue
        neg = _producer(nodes, w.inputs[0], "Not")
        if neg is not None and uses.get(w.inputs[0], 0) == 1:
            swapped = DenseNode("Where", w.name, [neg.inputs[0], w.inputs[2], w.inputs[1]], list(w.outputs), dict(w.attrs))
            _replace(nodes, [neg, w], w, [swapped])
            return True
    return False


def _embedding_into_gemm(nodes, constants, uses) -> bool:
    for gemm in nodes:
        parts = _gemm_parts(gemm, constants)
        if parts is None or uses.get(gemm.inputs[0], 0) != 1:
            continue
        bt, alpha, beta, c = parts
        gather = _table_gather(nodes, constants, uses, gemm.inputs[0])
        if gather is not None:  # Gemm(Gather(E, idx), W, b) -> Gather(E @ W' + b, idx)
            table = _table(constants, gather.inputs[0], bt, alpha, beta, c)
            if table is None:
                continue
            name = _new_name(constants, f"{gemm.name}.projected")
            constants[name] = table
            _replace(nodes, [gather, gemm], gemm, [DenseNode("Gather", gemm.name, [name, gather.inputs[1]],
                                                             list(gemm.outputs), {"axis": 0})])
            return True
        concat = _producer(nodes, gemm.inputs[0], "Concat")
        if concat is None or int(concat.attrs.get("axis", 0)) not in (1, -1) or len(concat.inputs) < 2:
            continue
        for side in (0, len(concat.inputs) - 1):  # only an end's rows are known without the others' widths
            gather = _table_gather(nodes, constants, uses, concat.inputs[side])
            if gather is None:
                continue
            width = np.shape(constants[gather.inputs[0]])[1]
            rows = slice(0, width) if side == 0 else slice(bt.shape[0] - width, bt.shape[0])
            rest = np.delete(bt, np.arange(bt.shape[0])[rows], axis=0)
            table = _table(constants, gather.inputs[0], bt[rows], alpha, beta, c)
            if table is None or rest.shape[0] == 0:
                continue
            table_name = _new_name(constants, f"{gemm.name}.projected")
            rest_name = _new_name(constants, f"{gemm.name}.rest")
            constants[table_name] = table
            constants[rest_name] = rest.astype(np.asarray(constants[gemm.inputs[1]]).dtype)
            others = [x for k, x in enumerate(concat.inputs) if k != side]
            looked_up = f"fold:{gemm.name}.lookup"
            new = [DenseNode("Gather", f"{gemm.name}.lookup", [table_name, gather.inputs[1]], [looked_up], {"axis": 0})]
            x = others[0]
            if len(others) > 1:
                x = f"fold:{concat.name}.rest"
                new.append(DenseNode("Concat", concat.name, others, [x], {"axis": 1}))
            new.append(DenseNode("Gemm", gemm.name, [x, rest_name, looked_up], list(gemm.outputs),
                                 {"alpha": alpha, "beta": 1.0}))
            _replace(nodes, [gather, concat, gemm], gemm, new)
            return True
    return False


def _bias_into_table(nodes, constants, uses) -> bool:
    for add in nodes:
        if add.op != "Add" or len(add.inputs) != 2:
            continue
        for g_side in (0, 1):
            gemm = _producer(nodes, add.inputs[g_side], "Gemm")
            parts = None if gemm is None or uses.get(add.inputs[g_side], 0) != 1 else _gemm_parts(gemm, constants)
            gather = _table_gather(nodes, constants, uses, add.inputs[1 - g_side], private=True)
            if parts is None or gather is None:
                continue
            bt, alpha, beta, c = parts
            table = np.asarray(constants[gather.inputs[0]])
            if table.shape[1] != bt.shape[1] or not np.issubdtype(table.dtype, np.floating):
                continue
            if c is not None:
                table = (table.astype(np.float64) + beta * np.broadcast_to(c.reshape(-1), (bt.shape[1],))).astype(table.dtype)
            name = _new_name(constants, f"{gather.inputs[0]}.biased")
            constants[name] = table
            looked_up = f"fold:{add.name}.lookup"
            attrs = {k: v for k, v in gemm.attrs.items() if k in ("alpha", "transB")}
            new = [DenseNode("Gather", f"{add.name}.lookup", [name, gather.inputs[1]], [looked_up], {"axis": 0}),
                   DenseNode("Gemm", gemm.name, [gemm.inputs[0], gemm.inputs[1], looked_up], list(add.outputs), attrs)]
            _replace(nodes, [gemm, gather, add], add, new)
            return True
    return False


def _table(constants: dict, table: str, bt: np.ndarray, alpha: float, beta: float, c) -> np.ndarray | None:
    """alpha * E @ B' + beta * C in float64, stored in E's dtype; None for a non-float E."""
    e = np.asarray(constants[table])
    if not np.issubdtype(e.dtype, np.floating) or e.shape[1] != bt.shape[0]:
        return None
    out = alpha * (e.astype(np.float64) @ bt)
    if c is not None:
        out = out + beta * c.reshape(1, -1) if c.ndim else out + beta * float(c)
    return out.astype(np.result_type(e.dtype, np.asarray(constants[table]).dtype))
