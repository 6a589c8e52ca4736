"""What a model is: a graph of plain tensor ops around recurrent layers, whose cells are what
the engine batches.

A request's tensors flow through `Model.program` in order. `DenseNode`s are ordinary ops
(ONNX semantics) that run once per request. A `RecurrentLayer` (one ONNX LSTM/GRU/RNN
node: one layer, one or two directions) unfolds into one *lane* per sequence per direction;
each lane is a chain of cell invocations, and invocations of the same cell type from any
lanes at any step position are what the engine batches. A `LayerStack` (made by the engine
from stacked forward layers) is one lane per sequence through all its layers. A
`GraphDecoder` (a decoder step given as a graph) unfolds the same way, with a length known
only when it emits EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # decoder_graph imports this module
    from cellserve.graph.decode_spec import DecodeSpec
    from cellserve.graph.decoder_graph import DecoderStepGraph

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# A layer fed by an embedding keeps every token's input projection (vocabulary x gates floats)
# up to this size: a lane's start is then a lookup. Past it (a 100,000-token vocabulary and
# 1,024 LSTM units would take 1.6 GB, and seconds to compute at load), a lane's start looks up
# its tokens' embeddings and projects them as any other input (kernels/cell.py).
MAX_PROJECTED_TABLE_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as clients see it; -1 marks a dynamic dimension.
    `dim_names` (from ONNX's dim_param, "" where a dimension has none; empty when unknown)
    say which dynamic dimensions are the same size: the importer's probes give equal names
    equal sizes (`source [b, s]` and `lengths [b]`)."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32", ...
    shape: tuple[int, ...]
    dim_names: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass
class DenseNode:
    """One plain op with ONNX semantics, run per request by `graph.dense_ops`. Its attrs are
    the ONNX node's, and SOFTMAX_FLATTENS where a Softmax or LogSoftmax keeps the semantics of
    opsets before 13 (the importer marks them)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


# A Softmax or LogSoftmax of a model below opset 13: its input is taken as 2-D, the axes before
# `axis` (default 1) as rows and the rest as one axis, as those opsets define it
SOFTMAX_FLATTENS = "_flatten_from_axis"


@dataclass
class DirectionWeights:
    """Weights of one direction in cellserve's gate order (PyTorch's: LSTM i,f,g,o; GRU r,z,n).

    w_ih [G, I], w_hh [G, H], b_ih [G], b_hh [G] with G = gates * hidden.
    """

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray


@dataclass
class RecurrentLayer:
    """One recurrent layer. Input x is time-major [T, B, I]; outputs as ONNX's:
    y [T, D, B, H], y_h [D, B, H], y_c [D, B, H] (LSTM only). Empty names mean absent.

    When `token_table` is set, x holds token ids [T, B] and the layer's input is
    token_table[x]: the importer folded an embedding lookup into the layer so that the
    input projection becomes a row lookup in a precomputed table (see kernels.cell).
    """

    name: str
    kind: str  # lstm | gru | rnn_tanh | rnn_relu
    hidden: int
    directions: list[DirectionWeights]  # [forward] , [reverse] or [forward, reverse]
    reverse_only: bool = False
    x: str = ""
    seq_lens: str = ""
    initial_h: str = ""
    initial_c: str = ""
    y: str = ""
    y_h: str = ""
    y_c: str = ""
    token_table: np.ndarray | None = None

    @property
    def input_size(self) -> int:
        return int(self.directions[0].w_ih.shape[1])

    def is_reverse(self, direction: int) -> bool:
        return self.reverse_only or direction == 1

    def flops_per_step(self) -> float:
        """Multiply-adds x2 of one cell invocation's recurrent GEMM (h @ W_hh^T)."""
        return 2.0 * GATES[self.kind] * self.hidden * self.hidden

    def flops_per_token_projection(self) -> float:
        return 0.0 if self.token_table is not None else 2.0 * GATES[self.kind] * self.hidden * self.input_size

    def projected_table_bytes(self, limit: int = MAX_PROJECTED_TABLE_BYTES) -> int:
        """Bytes of its embedding table projected through W_ih, per direction, which a kernel
        keeps when they are at most `limit` (0: no table, or too large to keep)."""
        if self.token_table is None:
            return 0
        size = self.token_table.shape[0] * GATES[self.kind] * self.hidden * 4
        return size if size <= limit else 0

    def lane_bytes_per_token(self) -> int:
        """What the kernels hold for each token of a sequence while its lanes run: per
        direction, its input projection's row and its output's row (float32)."""
        return len(self.directions) * 4 * (GATES[self.kind] + 1) * self.hidden


@dataclass
class LayerStack:
    """Forward one-direction layers where each one's outputs are the next one's inputs,
    stepped as one cell type: a lane's step t runs step t of every layer, the lower first.
    L layers then take T rounds for T tokens instead of L * T (a wavefront across the
    layers). Each layer keeps its own weights, state and names; the input projection of
    every layer but the first is computed step by step. See graph/stacking.py for when
    layers are stacked."""

    name: str
    layers: list[RecurrentLayer]

    @property
    def token_table(self) -> np.ndarray | None:
        return self.layers[0].token_table

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    def flops_per_step(self) -> float:
        upper = sum(layer.flops_per_token_projection() for layer in self.layers[1:])
        return sum(layer.flops_per_step() for layer in self.layers) + upper

    def flops_per_token_projection(self) -> float:
        return self.layers[0].flops_per_token_projection()

    def lane_bytes_per_token(self) -> int:
        return sum(layer.lane_bytes_per_token() for layer in self.layers)


def layers_of(step: RecurrentLayer | LayerStack) -> list[RecurrentLayer]:
    """The layers a recurrent step runs: a stack's, or the layer itself."""
    return step.layers if isinstance(step, LayerStack) else [step]


def plain_group_key(model: str, k: int) -> str:
    """The name of a model's k-th group of plain ops: a run of consecutive plain ops in
    program order, numbered from 0 (a node of a partition plan, a key of the engine's
    placement map)."""
    return f"{model}/ops/{k}"


@dataclass
class GraphDecoder:
    """A decoder whose step is a graph (graph/decoder_graph.py) and whose wiring is a
    `DecodeSpec`: one lane per sequence, started from the encoder's memory [S, M] (its own S)
    and initial states, stepping until EOS or `spec.max_length` tokens, greedily (argmax).
    The engine reads the memory, lengths and initial states from the request's tensors
    named by the spec and writes the tokens [B, L] (padded with `pad`) to `spec.output`.

    vocab, state_sizes, memory_width and the FLOPs are found by the importer
    (graph/seq2seq_import.py) from a run of the graph on probe shapes: a step costs
    `flops_fixed + flops_per_position * S` for a memory of S positions.
    """

    name: str
    graph: DecoderStepGraph
    spec: DecodeSpec
    vocab: int
    state_sizes: list[int]
    memory_width: int
    flops_fixed: float = 0.0
    flops_per_position: float = 0.0

    @property
    def memory(self) -> str:
        return self.spec.memory

    @property
    def output(self) -> str:
        return self.spec.output

    @property
    def bos(self) -> int:
        return self.spec.bos

    @property
    def eos(self) -> int:
        return self.spec.eos

    @property
    def pad(self) -> int:
        return self.spec.pad

    def max_tokens(self, source_length: int) -> int:
        """The most tokens a lane with a memory of `source_length` positions emits."""
        return self.spec.max_length.limit(source_length)

    def flops_per_step(self, memory_len: int) -> float:
        return self.flops_fixed + self.flops_per_position * memory_len

    def lane_bytes_per_token(self) -> int:
        """What the kernel holds per source position of a row while it decodes: its attention
        memory's row (float32; a beam row's hypotheses share it)."""
        return 4 * self.memory_width

    # ---- what the planners and the GPU model read (plan/partition_model.py, gpu_model.py) ----

    @property
    def hidden(self) -> int:
        """The widest decoder state (an LSTM's or GRU's h): the planners' measure of what a
        lane carries per step, as a recurrent layer's hidden size is."""
        return max(self.state_sizes, default=self.memory_width)

    def reads(self) -> list[str]:
        """The request tensors a lane starts from: memory, its lengths, the initial states."""
        return [t for t in (self.spec.memory, self.spec.memory_length, *(e for _, e in self.spec.init)) if t]

    def weight_bytes(self) -> int:
        """Bytes of the step graph's constants (all of its weights, as loaded)."""
        return int(sum(np.asarray(a).nbytes for a in self.graph.constants.values()))

    def step_weight_bytes(self) -> int:
        """Bytes of the weights one batched step reads: the matrices of its MatMul and Gemm
        nodes once the compiler's folds are applied (graph/step_rewrite.py), so a token
        embedding and its input projection count as the table rows looked up, not as a GEMM."""
        from cellserve.graph.step_rewrite import fold

        constants = dict(self.graph.constants)
        nodes = fold(self.graph.nodes, constants, {o.name for o in self.graph.outputs})
        mats = {n.inputs[1] for n in nodes if n.op in ("MatMul", "Gemm") and n.inputs[1] in constants}
        mats |= {n.inputs[0] for n in nodes if n.op == "MatMul" and n.inputs[0] in constants}
        return int(sum(np.asarray(constants[m]).nbytes for m in mats if np.ndim(constants[m]) >= 2))


Step = DenseNode | RecurrentLayer | LayerStack | GraphDecoder


@dataclass
class InputSemantics:
    """What an input means, worked out by the importer: which axes are batch and time, and
    for token inputs the vocabulary size (ids must lie in [0, vocab))."""

    batch_axis: int | None
    time_axis: int | None
    vocab: int | None = None


_PASS_THROUGH = frozenset({"Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"})  # see input_behind


@dataclass
class Model:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    constants: dict[str, np.ndarray]
    program: list[Step]
    semantics: dict[str, InputSemantics] = field(default_factory=dict)
    max_sequence_length: int = 1024
    max_request_rows: int = 1024  # sequences one request may hold (each costs the engine lanes and state)
    # why_not_streamable's answer once worked out (a 1-tuple): the check runs the graph
    _streamable: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def recurrent_steps(self) -> list[RecurrentLayer | LayerStack | GraphDecoder]:
        return [s for s in self.program if not isinstance(s, DenseNode)]

    def batch_size(self, inputs: dict) -> int:
        """Sequences in a request: the batch axis of its first input that has one (else 1)."""
        for name, sem in self.semantics.items():
            if sem.batch_axis is not None and name in inputs:
                return int(np.shape(inputs[name])[sem.batch_axis])
        return 1

    def input_behind(self, tensor: str) -> str | None:
        """The model input a tensor is, through casts and reshapes (an exporter's
        `Cast(lengths)` feeding an LSTM's sequence_lens), or None: what an error about it
        should name."""
        producers = {out: node for node in self.program if isinstance(node, DenseNode) for out in node.outputs}
        inputs = {spec.name for spec in self.inputs}
        seen = set()
        while tensor not in inputs:
            node = producers.get(tensor)
            if node is None or tensor in seen or node.op not in _PASS_THROUGH or not node.inputs:
                return None
            seen.add(tensor)
            tensor = node.inputs[0]
        return tensor

    def why_not_streamable(self) -> str | None:
        """Why this model cannot take a sequence in chunks carrying state between them (None
        when it can): only forward recurrences can go on from a saved state, and only heads
        that a chunk answers as the whole sequence would (graph/chunking.py). Worked out
        once (the program is not changed after import, but for its name)."""
        if self._streamable is None:
            self._streamable = (self._why_not_streamable(),)
        return self._streamable[0]

    def _why_not_streamable(self) -> str | None:
        from cellserve.graph.chunking import chunking_problem

        for step in self.recurrent_steps():
            if isinstance(step, GraphDecoder):
                return f"it decodes with {step.name!r}, which needs the whole input first"
            for layer in layers_of(step):
                if any(layer.is_reverse(d) for d in range(len(layer.directions))):
                    return f"layer {layer.name!r} runs backwards in time, which needs the whole input first"
        return chunking_problem(self)

    def cell_types(self) -> list[str]:
        """Names of this model's cell types, in program order."""
        names = []
        for step in self.recurrent_steps():
            if isinstance(step, RecurrentLayer):
                names += [f"{self.name}/{step.name}/{d}" for d in range(len(step.directions))]
            else:  # a stack or a decoder: one cell type
                names.append(f"{self.name}/{step.name}")
        return names


def plain_groups(model: Model) -> list[list[int]]:
    """The program positions of each group of consecutive plain ops, in order."""
    groups: list[list[int]] = []
    open_group = False
    for pc, step in enumerate(model.program):
        if isinstance(step, DenseNode):
            if not open_group:
                groups.append([])
                open_group = True
            groups[-1].append(pc)
        else:
            open_group = False
    return groups
