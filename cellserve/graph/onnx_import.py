"""Load an ONNX model (LSTM, GRU and RNN operators plus the ops real exports put around
them) into a `Model`.

At load time: shape arithmetic that does not depend on the inputs is folded; an embedding
lookup that feeds a recurrent layer is folded into that layer (see RecurrentLayer); ops
nobody reads are dropped; and the batch and time axes of every input are found by running
the graph once on probe shapes. An op that cannot be run is refused here, naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cellserve.errors import ModelLoadError, UnsupportedOperator
from cellserve.graph import dense_ops
from cellserve.graph.model import (
    SOFTMAX_FLATTENS,
    DenseNode,
    DirectionWeights,
    GraphDecoder,
    InputSemantics,
    Model,
    RecurrentLayer,
    TensorSpec,
)

RECURRENT_OPS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
# Block order of each op's gates in ONNX, taken to cellserve's (PyTorch's) order.
_LSTM_ONNX_TO_OURS = [0, 2, 3, 1]  # ONNX i,o,f,c -> i,f,c,o
_GRU_ONNX_TO_OURS = [1, 0, 2]  # ONNX z,r,h -> r,z,h


def read_onnx(source: str | Path | bytes | onnx.ModelProto, what: str) -> onnx.GraphProto:
    """The graph of an ONNX model given as a path, serialized bytes or a ModelProto; `what`
    names it in the ModelLoadError raised for a file that cannot be read or has no outputs."""
    return _read_model(source, what).graph


def _read_model(source: str | Path | bytes | onnx.ModelProto, what: str) -> onnx.ModelProto:
    try:
        if isinstance(source, onnx.ModelProto):
            proto = source
        elif isinstance(source, bytes):
            proto = onnx.load_from_string(source)
        else:
            proto = onnx.load(str(source))
    except Exception as exc:  # onnx raises several unrelated types for a broken file
        raise ModelLoadError(f"cannot read {what}: {exc}") from exc
    if not proto.graph.output:
        raise ModelLoadError(f"cannot read {what}: it has no graph outputs (is it an ONNX file?)")
    return _mark_legacy_softmax(proto)


def _mark_legacy_softmax(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Below opset 13 Softmax and LogSoftmax take their input as 2-D around `axis` (default
    1), from 13 on they act on one axis (default -1): the older nodes get their default axis
    written and SOFTMAX_FLATTENS set, on a copy of the model (the caller's is left as it was)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    legacy = [i for i, n in enumerate(proto.graph.node)
              if opset < 13 and n.op_type in ("Softmax", "LogSoftmax") and n.domain in ("", "ai.onnx")]
    if not legacy:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for i in legacy:
        node = copy.graph.node[i]
        if not any(a.name == "axis" for a in node.attribute):
            node.attribute.append(helper.make_attribute("axis", 1))
        node.attribute.append(helper.make_attribute(SOFTMAX_FLATTENS, 1))
    return copy


def load_onnx(source: str | Path | bytes | onnx.ModelProto, name: str = "model") -> Model:
    """Load from a path, serialized bytes or a ModelProto."""
    proto = _read_model(source, f"ONNX model {name!r}")
    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in constants]
    outputs = [_spec(v) for v in graph.output]
    program = [_convert(node, i, constants) for i, node in enumerate(graph.node)]
    program = _fold_constants(program, constants)
    shapes = _static_shapes(proto)
    outputs = [_inferred_where_undeclared(spec, value, shapes) for spec, value in zip(outputs, graph.output)]
    for layer in [s for s in program if isinstance(s, RecurrentLayer)]:
        _check_state_shapes(layer, shapes)
        _fold_embedding(layer, program, constants)
        _drop_zero_initial_state(layer, program, constants)
    program = _drop_unused(program, {o.name for o in outputs})
    model = Model(name=name, inputs=inputs, outputs=outputs, constants=constants, program=program)
    model.semantics = find_semantics(model)
    return model


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each tensor's shape as ONNX's shape inference finds it (a dimension it cannot fix:
    None); empty where inference fails (it is a check, not a requirement)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - an op inference does not know, a malformed model: no check
        return {}
    shapes = {}
    for value in [*inferred.value_info, *inferred.input, *inferred.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                  for d in t.shape.dim]
    return shapes


def _inferred_where_undeclared(spec: TensorSpec, value: onnx.ValueInfoProto,
                               shapes: dict[str, list[int | None]]) -> TensorSpec:
    """An output the graph declares without a shape (unknown rank, not a scalar) takes the
    shape ONNX's inference finds for it, so that the metadata does not publish rank 0."""
    if value.type.tensor_type.HasField("shape") or spec.name not in shapes:
        return spec
    dims = shapes[spec.name]
    return TensorSpec(spec.name, spec.dtype, tuple(-1 if d is None else d for d in dims), ("",) * len(dims))


def _check_state_shapes(layer: RecurrentLayer, shapes: dict[str, list[int | None]]) -> None:
    """Refuse a recurrent node whose initial states cannot be its own ([directions, batch,
    hidden_size]): onnxruntime refuses to run such a model, and serving it anyway would
    answer for a model other than the one exported (an LSTM with proj_size, exported by
    torch's dynamo exporter, comes out so)."""
    directions = len(layer.directions)
    for what, name in (("initial_h", layer.initial_h), ("initial_c", layer.initial_c)):
        dims = shapes.get(name) if name else None
        if not dims:
            continue
        if len(dims) != 3:
            raise ModelLoadError(f"node {layer.name!r}: {what} {name!r} has shape {dims}; it must be "
                                 f"[directions, batch, hidden_size] ([{directions}, batch, {layer.hidden}])")
        if (dims[2] is not None and dims[2] != layer.hidden) or (dims[0] is not None and dims[0] != directions):
            raise ModelLoadError(f"node {layer.name!r}: {what} {name!r} has shape {dims}, but the node runs "
                                 f"{directions} direction(s) of hidden_size {layer.hidden}: the export is not "
                                 "consistent (onnxruntime refuses to run it too)")


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TensorSpec(value.name, dtype, shape, tuple(d.dim_param for d in t.shape.dim))


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    if node.op_type == "Cast":
        out["to"] = np.dtype(helper.tensor_dtype_to_np_dtype(out["to"]))
    if node.op_type == "Constant":
        if "value" not in out:
            key = next(iter(out))
            out = {"value": np.array(out[key], dtype=np.float32 if "float" in key else np.int64)}
    return out


def _convert(node: onnx.NodeProto, index: int, constants: dict) -> DenseNode:
    name = node.name.strip("/").replace("/", ".") or f"{node.op_type}_{index}"
    if node.op_type not in dense_ops.SUPPORTED and node.op_type not in RECURRENT_OPS:
        raise UnsupportedOperator(node.op_type, name, "a model may use " + ", ".join(sorted(RECURRENT_OPS))
                                  + " and around them " + ", ".join(sorted(dense_ops.SUPPORTED)))
    if node.domain not in ("", "ai.onnx"):
        raise UnsupportedOperator(f"{node.domain}.{node.op_type}", name)
    return DenseNode(node.op_type, name, list(node.input), list(node.output), _attrs(node))


def _fold_constants(program: list[DenseNode], constants: dict) -> list:
    """Evaluate ops whose inputs are all known now; turn recurrent ops into RecurrentLayers
    (their weights must be constant by then)."""
    out = []
    for node in program:
        if node.op in RECURRENT_OPS:
            out.append(_recurrent(node, constants))
            continue
        if all(not i or i in constants for i in node.inputs):
            try:
                dense_ops.run(node, constants)
                continue
            except Exception as exc:
                raise ModelLoadError(f"node {node.name!r} ({node.op}) fails on its constant inputs: {exc}") from exc
        out.append(node)
    return out


def _const(node: DenseNode, position: int, constants: dict, what: str) -> np.ndarray | None:
    if position >= len(node.inputs) or not node.inputs[position]:
        return None
    name = node.inputs[position]
    if name not in constants:
        raise UnsupportedOperator(node.op, node.name, f"{what} ({name!r}) must be a constant initializer")
    return constants[name]


def _recurrent(node: DenseNode, constants: dict) -> RecurrentLayer:
    a = node.attrs
    if "clip" in a:
        raise UnsupportedOperator(node.op, node.name, f"clip={a['clip']:g}; export without it",
                                  feature="attribute 'clip' (cell clipping)")
    if a.get("input_forget", 0):
        raise UnsupportedOperator(node.op, node.name, feature="input_forget=1 (coupled input and forget gates)")
    if a.get("layout", 0):
        raise UnsupportedOperator(node.op, node.name, "export with the default layout",
                                  feature="layout=1 (batch-major)")
    if node.op == "LSTM" and len(node.inputs) > 7 and node.inputs[7]:
        raise UnsupportedOperator(node.op, node.name, feature="input P (peephole weights)")
    kind = RECURRENT_OPS[node.op]
    direction = a.get("direction", "forward")
    ndir = 2 if direction == "bidirectional" else 1
    defaults = {"lstm": ["Sigmoid", "Tanh", "Tanh"], "gru": ["Sigmoid", "Tanh"], "rnn": ["Tanh"]}[kind]
    acts = a.get("activations", defaults * ndir)
    if len(acts) != len(defaults) * ndir:  # ONNX: one list of the op's functions per direction
        raise ModelLoadError(f"{node.op!r} node {node.name!r}: activations lists {len(acts)} function(s) "
                             f"({acts}); a {direction} {node.op} takes {len(defaults) * ndir} "
                             f"({len(defaults)} per direction, as {defaults})")
    if kind == "rnn" and all(x == "Relu" for x in acts):
        kind = "rnn_relu"
    elif kind == "rnn" and all(x == "Tanh" for x in acts):
        kind = "rnn_tanh"
    elif [x.lower() for x in acts] != [x.lower() for x in defaults * ndir]:
        raise UnsupportedOperator(node.op, node.name, f"supported: {defaults} per direction"
                                  + (", or Relu" if kind == "rnn" else ""), feature=f"activations {acts}")
    if kind == "gru" and not a.get("linear_before_reset", 0):
        raise UnsupportedOperator(node.op, node.name, "PyTorch exports use 1",
                                  feature="linear_before_reset=0")
    W, R = _const(node, 1, constants, "W"), _const(node, 2, constants, "R")
    if W is None or R is None:
        raise UnsupportedOperator(node.op, node.name, "W and R are required")
    B = _const(node, 3, constants, "B")
    hidden = int(a.get("hidden_size", R.shape[-1]))
    gates = {"lstm": 4, "gru": 3}.get(kind, 1)
    for what, m, want in (("W", W, (ndir, gates * hidden, None)), ("R", R, (ndir, gates * hidden, hidden)),
                          ("B", B, (ndir, 2 * gates * hidden))):
        if m is not None and (m.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, m.shape))):
            shape = ["input_size" if w is None else w for w in want]
            raise ModelLoadError(f"node {node.name!r} ({node.op}): {what} has shape {list(m.shape)}; {ndir} "
                                 f"direction(s) of hidden_size {hidden} need {shape}")
    order = {"lstm": _LSTM_ONNX_TO_OURS, "gru": _GRU_ONNX_TO_OURS}.get(kind, [0])

    def reorder(m: np.ndarray) -> np.ndarray:
        blocks = m.reshape(gates, hidden, *m.shape[1:])
        return np.ascontiguousarray(blocks[order].reshape(m.shape), dtype=np.float32)

    directions = []
    for d in range(ndir):
        bias = B[d] if B is not None else np.zeros(2 * gates * hidden, np.float32)
        directions.append(DirectionWeights(
            w_ih=reorder(W[d]), w_hh=reorder(R[d]),
            b_ih=reorder(bias[: gates * hidden]), b_hh=reorder(bias[gates * hidden:])))
    names = node.inputs + [""] * (7 - len(node.inputs))
    outs = node.outputs + [""] * (3 - len(node.outputs))
    return RecurrentLayer(
        name=node.name, kind=kind, hidden=hidden, directions=directions,
        reverse_only=direction == "reverse", x=names[0], seq_lens=names[4],
        initial_h=names[5], initial_c=names[6] if kind == "lstm" else "",
        y=outs[0], y_h=outs[1], y_c=outs[2] if kind == "lstm" else "")


def _fold_embedding(layer: RecurrentLayer, program: list, constants: dict) -> None:
    """x = Gather(table, ids) [-> Transpose(1,0,2)]: let the layer look its inputs up in a
    table it projects once, instead of projecting every token at run time."""
    producers = {o: s for s in program if isinstance(s, DenseNode) for o in s.outputs}
    node = producers.get(layer.x)
    transpose = None
    if node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == [1, 0, 2]:
        transpose, node = node, producers.get(node.inputs[0])
    if node is None or node.op != "Gather" or node.attrs.get("axis", 0) != 0:
        return
    table = constants.get(node.inputs[0])
    if table is None or table.ndim != 2 or table.shape[1] != layer.input_size:
        return
    ids = node.inputs[1]
    if transpose is not None:
        ids_t = f"{ids}__time_major"
        program.insert(program.index(layer), DenseNode("Transpose", f"{layer.name}/ids_time_major", [ids], [ids_t], {"perm": [1, 0]}))
        ids = ids_t
    layer.x, layer.token_table = ids, table.astype(np.float32, copy=False)


_ZERO_PRESERVING = {"Slice", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Identity", "Concat"}


def _drop_zero_initial_state(layer: RecurrentLayer, program: list, constants: dict) -> None:
    """An initial state that is all zeros (exports build it from the input's shape with
    ConstantOfShape) is the default: forget it, so the shape arithmetic behind it goes too."""
    producers = {o: s for s in program if isinstance(s, DenseNode) for o in s.outputs}

    def is_zero(name: str) -> bool:
        if name in constants:
            return not np.any(constants[name])
        node = producers.get(name)
        if node is None:
            return False
        if node.op == "ConstantOfShape":
            return not np.any(node.attrs.get("value", 0))
        if node.op == "Concat":
            return all(is_zero(i) for i in node.inputs)
        return node.op in _ZERO_PRESERVING and is_zero(node.inputs[0])

    if layer.initial_h and is_zero(layer.initial_h):
        layer.initial_h = ""
    if layer.initial_c and is_zero(layer.initial_c):
        layer.initial_c = ""


def _drop_unused(program: list, wanted: set[str]) -> list:
    needed = set(wanted)
    kept = []
    for step in reversed(program):
        outs = step.outputs if isinstance(step, DenseNode) else [step.y, step.y_h, step.y_c]
        if isinstance(step, DenseNode) and not needed.intersection(outs):
            continue
        kept.append(step)
        ins = step.inputs if isinstance(step, DenseNode) else [step.x, step.seq_lens, step.initial_h, step.initial_c]
        needed.update(i for i in ins if i)
    return kept[::-1]


def find_semantics(model: Model) -> dict[str, InputSemantics]:
    """Find each input's batch and time axes (and vocabulary, for token ids) by running the
    model's plain ops on probe shapes, with recurrent layers replaced by zeros of the right
    shape, and reading which probe sizes the first recurrent layer that depends on the input
    sees as its time and batch sizes. Two runs with different sizes: an axis counts only if
    both agree, so a fixed dimension that happens to equal a probe size is not mistaken."""
    runs = [_probe(model, [7, 5, 11, 13, 17, 19, 23]), _probe(model, [29, 31, 37, 41, 43, 47, 53])]
    result = {}
    for spec in model.inputs:
        a, b = runs[0][spec.name], runs[1][spec.name]
        result[spec.name] = InputSemantics(
            batch_axis=a.batch_axis if a.batch_axis == b.batch_axis else None,
            time_axis=a.time_axis if a.time_axis == b.time_axis else None,
            vocab=a.vocab)
    return result


def probe_shapes(inputs: list[TensorSpec], probe_sizes: list[int]) -> dict[str, list[int]]:
    """Each input's shape on a probe: fixed dimensions as they are, dynamic ones the next of
    `probe_sizes` (3 when they run out), except that dynamic dimensions sharing an ONNX
    dim_param name share one size (a batch axis named `b` in both `source [b, s]` and
    `lengths [b]` must agree, or the encoder cannot run on the probe at all)."""
    sizes, named, shapes = iter(probe_sizes), {}, {}
    for spec in inputs:
        shape = []
        for axis, d in enumerate(spec.shape):
            name = spec.dim_names[axis] if axis < len(spec.dim_names) else ""
            if d != -1:
                shape.append(d)
            elif name:
                if name not in named:
                    named[name] = next(sizes, 3)
                shape.append(named[name])
            else:
                shape.append(next(sizes, 3))
        shapes[spec.name] = shape
    return shapes


def _probe(model: Model, probe_sizes: list[int]) -> dict[str, InputSemantics]:
    shapes = probe_shapes(model.inputs, probe_sizes)
    env, marks = dict(model.constants), {}
    for spec in model.inputs:
        shape = shapes[spec.name]
        marks[spec.name] = {s: axis for axis, (s, d) in enumerate(zip(shape, spec.shape)) if d == -1}
        env[spec.name] = np.zeros(shape, dtype=spec.dtype)
    result = {spec.name: InputSemantics(None, None) for spec in model.inputs}
    seen = set()
    step = None
    def mark(tensor: str, time: int, batch: int, vocab: int | None) -> None:
        """The inputs `tensor` depends on, not yet marked: their axes of these probe sizes."""
        for spec in model.inputs:
            if spec.name not in seen and _depends_on(model, tensor, spec.name):
                seen.add(spec.name)
                sem = result[spec.name]
                sem.time_axis = marks[spec.name].get(time)
                sem.batch_axis = marks[spec.name].get(batch)
                if vocab is not None:
                    sem.vocab = vocab

    try:
        with np.errstate(all="ignore"):  # zeros make 0 / 0 and the like: the shapes are what counts
            for step in model.program:
                if isinstance(step, DenseNode):
                    dense_ops.run(step, env)
                    continue
                if isinstance(step, GraphDecoder):  # its memory is [batch, source, width]
                    memory = env[step.memory]
                    mark(step.memory, memory.shape[1], memory.shape[0], None)
                    _zero_tokens(step, env)
                    continue
                time, batch = env[step.x].shape[:2]
                mark(step.x, time, batch, None if step.token_table is None else step.token_table.shape[0])
                _zero_outputs(step, env, time, batch)
    except Exception as exc:
        at = f" at {step.op} node {step.name!r}" if isinstance(step, DenseNode) else ""
        raise ModelLoadError(f"model {model.name!r} does not run on probe inputs{at}: "
                             f"{type(exc).__name__}: {exc}") from exc
    for step in model.program:  # token inputs read by a plain Gather of a constant table
        if isinstance(step, DenseNode) and step.op == "Gather" and step.inputs[0] in model.constants:
            if step.inputs[1] in result and result[step.inputs[1]].vocab is None:
                result[step.inputs[1]].vocab = model.constants[step.inputs[0]].shape[step.attrs.get("axis", 0)]
    return result


def _zero_tokens(decoder: GraphDecoder, env: dict) -> None:
    """A decoder's output on probe inputs: one zero token per sequence (its memory is
    batch-first, [B, S, M])."""
    env[decoder.output] = np.zeros((env[decoder.memory].shape[0], 1), np.int64)


def probe_tensors(model: Model, probe_sizes: list[int]) -> dict[str, np.ndarray]:
    """Every tensor of the model's program on zero inputs whose dynamic dimensions take
    `probe_sizes` in order, one per dim_param name (`probe_shapes`; recurrent layers and
    decoders give zeros of the right shape): what an importer checks shapes against."""
    shapes = probe_shapes(model.inputs, probe_sizes)
    env = dict(model.constants)
    for spec in model.inputs:
        env[spec.name] = np.zeros(shapes[spec.name], dtype=spec.dtype)
    with np.errstate(all="ignore"):  # zeros make 0 / 0 and the like: the shapes are what counts
        for step in model.program:
            if isinstance(step, DenseNode):
                dense_ops.run(step, env)
            elif isinstance(step, GraphDecoder):
                _zero_tokens(step, env)
            else:
                _zero_outputs(step, env, *env[step.x].shape[:2])
    return env


def _zero_outputs(layer: RecurrentLayer, env: dict, time: int, batch: int) -> None:
    d, h = len(layer.directions), layer.hidden
    for name, shape in ((layer.y, (time, d, batch, h)), (layer.y_h, (d, batch, h)), (layer.y_c, (d, batch, h))):
        if name:
            env[name] = np.zeros(shape, np.float32)


def _depends_on(model: Model, tensor: str, source: str) -> bool:
    producers = {o: s for s in model.program if isinstance(s, DenseNode) for o in s.outputs}
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t == source:
            return True
        if t in seen or t not in producers:
            continue
        seen.add(t)
        stack.extend(i for i in producers[t].inputs if i)
    return False
