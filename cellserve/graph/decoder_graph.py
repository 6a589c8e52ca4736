"""A decoder step given as a graph of plain ops: one output position for a batch of lanes.

`load_decoder_step` reads an ONNX decoder-step graph (a file, bytes or a ModelProto) into a
`DecoderStepGraph`: plain data (nodes with ONNX semantics, constant initializers as numpy,
the graph's inputs and outputs). At load, every operator is checked against
`graph.step_ops.SUPPORTED` (anything else is refused naming the operator and the node), ops
whose inputs are all constant are folded, and ops no output needs are dropped.
`run_step_graph` evaluates it batched in torch; the kernel (kernels/decoder.py) calls it with
its constants on its device (`device_constants`, which also compiles the graph for that
device: graph/step_compile.py), the importer on the CPU to check shapes and count FLOPs.

The graph's interface is the decoder-step contract (docs/decoders.md): inputs token int64
[B], memory float [B, S, M], memory_mask float [B, S] and one float [B, D_i] per state;
outputs logits [B, V] and the next value of each state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from cellserve.errors import ModelLoadError, UnsupportedOperator
from cellserve.graph import step_ops
from cellserve.graph.model import DenseNode, TensorSpec
from cellserve.graph.onnx_import import _attrs, _spec, read_onnx

if TYPE_CHECKING:
    from cellserve.graph.decode_spec import DecodeSpec
    from cellserve.graph.step_compile import CompiledStep


@dataclass
class DecoderStepGraph:
    """A decoder-step graph: `nodes` run in order over the feeds and `constants`."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[DenseNode] = field(default_factory=list)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)

    def ops(self) -> list[str]:
        return sorted({n.op for n in self.nodes})

    def attends(self, spec: DecodeSpec) -> bool:
        """Whether the step attends over the memory (takes the spec's memory_input or
        mask_input). A step without attention (its state alone carries the source, as the
        encoder's final state set it) takes neither; the memory then only gives each lane its
        source length."""
        names = {i.name for i in self.inputs}
        return spec.memory_input in names or spec.mask_input in names


def load_decoder_step(source: str | Path | bytes | onnx.ModelProto, name: str = "decoder_step") -> DecoderStepGraph:
    """Read and check a decoder-step graph (see the module docstring). Raises
    ModelLoadError (UnsupportedOperator for an op that cannot run) naming what is wrong."""
    graph = read_onnx(source, f"decoder-step graph {name!r}")
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in constants]
    outputs = [_spec(v) for v in graph.output]
    nodes = [_convert(node, i) for i, node in enumerate(graph.node)]
    nodes = _fold_constants(nodes, constants, name)
    nodes = _drop_unused(nodes, {o.name for o in outputs})
    return DecoderStepGraph(name, inputs, outputs, constants, nodes)


def _convert(node: onnx.NodeProto, index: int) -> DenseNode:
    name = node.name.strip("/").replace("/", ".") or f"{node.op_type}_{index}"
    if node.domain not in ("", "ai.onnx"):
        raise UnsupportedOperator(f"{node.domain}.{node.op_type}", name, "not an ONNX standard operator")
    if node.op_type not in step_ops.SUPPORTED:
        raise UnsupportedOperator(node.op_type, name, "a decoder-step graph may use "
                                  + ", ".join(sorted(step_ops.SUPPORTED)))
    return DenseNode(node.op_type, name, list(node.input), list(node.output), _attrs(node))


def _fold_constants(nodes: list[DenseNode], constants: dict, graph: str) -> list[DenseNode]:
    """Evaluate the nodes whose inputs are all constants now (weights transposed or cast,
    shape constants), keeping the rest."""
    env = {}
    kept = []
    for node in nodes:
        if all(not i or i in constants for i in node.inputs):
            for i in node.inputs:
                if i and i not in env:
                    env[i] = torch.from_numpy(np.array(constants[i]))
            try:
                step_ops.run(node, env)
            except Exception as exc:
                raise ModelLoadError(f"decoder-step graph {graph!r}: node {node.name!r} ({node.op}) fails on "
                                     f"its constant inputs: {exc}") from exc
            for o in node.outputs:
                if o:
                    constants[o] = env[o].numpy()
            continue
        kept.append(node)
    return kept


def _drop_unused(nodes: list[DenseNode], wanted: set[str]) -> list[DenseNode]:
    needed, kept = set(wanted), []
    for node in reversed(nodes):
        if needed.intersection(node.outputs):
            kept.append(node)
            needed.update(i for i in node.inputs if i)
    return kept[::-1]


class DeviceConstants(dict):
    """A graph's constants on one device (name -> tensor), with the graph compiled for that
    device (`compiled`, see graph/step_compile.py): what a kernel holds for its step."""

    compiled: "CompiledStep | None" = None


def device_constants(graph: DecoderStepGraph, device: torch.device, compiled: bool = True) -> DeviceConstants:
    """The graph's constants as tensors on `device` (float64 weights stay float64: the graph
    says what it computes in), and unless `compiled` is False the graph compiled for that
    device, which `run_step_graph` then runs instead of interpreting the nodes."""
    from cellserve.graph.step_compile import compile_step

    constants = DeviceConstants({k: torch.as_tensor(np.array(v), device=device) for k, v in graph.constants.items()})
    if compiled:
        constants.compiled = compile_step(graph, device, lambda feeds: interpret_step_graph(graph, feeds, constants),
                                          constants)
    return constants


def run_step_graph(graph: DecoderStepGraph, feeds: dict[str, torch.Tensor],
                   constants: dict[str, torch.Tensor], keep: bool = False) -> dict[str, torch.Tensor]:
    """Evaluate the graph on `feeds` (every graph input by name). Returns the graph's outputs
    by name, or with `keep` every tensor computed (for counting FLOPs). Constants from
    `device_constants` carry the compiled graph, which runs unless `keep` asks for every
    intermediate value (the compiled form has different ones)."""
    compiled = getattr(constants, "compiled", None)
    if compiled is not None and not keep:
        return compiled(feeds)
    return interpret_step_graph(graph, feeds, constants, keep)


def interpret_step_graph(graph: DecoderStepGraph, feeds: dict[str, torch.Tensor],
                         constants: dict[str, torch.Tensor], keep: bool = False) -> dict[str, torch.Tensor]:
    """`run_step_graph` node by node through `step_ops` (the reference the compiled form is
    tested against); a failing node raises RuntimeError naming it."""
    env = dict(constants)
    env.update(feeds)
    for node in graph.nodes:
        try:
            step_ops.run(node, env)
        except Exception as exc:
            raise RuntimeError(f"decoder-step graph {graph.name!r}: node {node.name!r} ({node.op}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    return env if keep else {o.name: env[o.name] for o in graph.outputs}


def step_flops(graph: DecoderStepGraph, env: dict[str, torch.Tensor], batch: int) -> float:
    """FLOPs of one lane's step as compiled: the MatMul and Gemm multiply-adds x2 of the graph
    after the compiler's folds (graph/step_rewrite.py: an embedding's projection is a table
    lookup, not a GEMM), from an evaluation kept with `run_step_graph(..., keep=True)` on
    `batch` lanes (a folded Gemm keeps its output's name, so its M and N are read there)."""
    from cellserve.graph.step_rewrite import fold

    constants = dict(graph.constants)
    total = 0.0
    for node in fold(graph.nodes, constants, {o.name for o in graph.outputs}):
        if node.op == "Gemm" and node.inputs[1] in constants and node.outputs[0] in env:
            b = np.shape(constants[node.inputs[1]])
            rows, cols = env[node.outputs[0]].shape
            total += 2.0 * rows * cols * b[1 if node.attrs.get("transB", 0) else 0]
        elif all(not i or i in env for i in node.inputs):
            total += step_ops.matmul_flops(node, env)
    return total / batch
