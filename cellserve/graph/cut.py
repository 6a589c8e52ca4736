"""A model cut into parts at its recurrent steps, each part a model of its own: what a
pipeline's stages serve (docs/pipelines.md, "A real pipeline").

`cut_model(model, cuts)` splits the program after the recurrent steps numbered `cuts`
(0-based, in `Model.recurrent_steps()` order, unstacked: a stack's layers are separate
steps). Part k runs program steps from just after cut k-1 through recurrent step cuts[k]
(the plain ops between two recurrent steps go with the later part). A part's inputs are the
tensors it reads that no step of it makes: the model's own inputs or what an earlier part
made; its outputs, what it makes that a later part reads or the model answers. Each part is
served as any model is (its inputs' batch and time axes found as an importer finds them), so
running the parts in turn, each fed from what the request and the parts before it hold,
answers as the whole model does: the same steps run on the same kernels.

`ModelCut.carried[k]` names what must travel from after part k to the parts after it (a
request's own inputs that a later part reads included); `answer` picks the model's outputs
from what the last part holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellserve.graph.decode_spec import beam_output_names
from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, Model, TensorSpec

# two probes with different sizes: a dimension of an intermediate tensor that differs between
# them is dynamic (batch, time), one that agrees is fixed
_PROBES = ([7, 5, 11, 13, 17, 19, 23], [29, 31, 37, 41, 43, 47, 53])


class CutError(ValueError):
    """A cut that cannot be made; the message names the model and the cut."""


@dataclass(frozen=True)
class ModelCut:
    """The parts, in order, and per part the tensor names carried past it (the last part's:
    the model's outputs)."""

    model: str
    parts: tuple[Model, ...]
    carried: tuple[frozenset[str], ...]
    outputs: tuple[str, ...]

    def part_inputs(self, k: int, held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Part k's inputs from what the request and the parts before it hold."""
        return {spec.name: held[spec.name] for spec in self.parts[k].inputs}

    def carry(self, k: int, held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What must travel on after part k (held: the request's inputs and every part's outputs
        so far)."""
        return {name: held[name] for name in self.carried[k]}

    def answer(self, held: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: held[name] for name in self.outputs}


def _reads(step) -> list[str]:
    if isinstance(step, DenseNode):
        return list(step.inputs)
    if isinstance(step, GraphDecoder):
        return step.reads()
    if isinstance(step, LayerStack):
        raise CutError("a model is cut unstacked (load it as imported; the engine stacks its layers itself)")
    return [t for t in (step.x, step.seq_lens, step.initial_h, step.initial_c) if t]


def _makes(step) -> list[str]:
    if isinstance(step, DenseNode):
        return list(step.outputs)
    if isinstance(step, GraphDecoder):
        return [t for t in (step.output, step.spec.scores_output, *beam_output_names(step.output)) if t]
    return [t for t in (step.y, step.y_h, step.y_c) if t]


def _specs(model: Model, names: list[str], runs: list[dict]) -> list[TensorSpec]:
    """Specs of the named tensors, from two probe runs of the whole model's plain ops (`runs`,
    probe_tensors at _PROBES): a dimension that differs between the runs is dynamic, and named
    after the model input's dimension whose probe size it has (so that a part's probes give a
    batch axis one size in every input, as the whole model's did)."""
    from cellserve.graph.onnx_import import probe_shapes

    source: list[dict[int, str]] = []  # per run: probe size -> the input dimension given it
    for sizes in _PROBES:
        found = {}
        for spec, shape in zip(model.inputs, probe_shapes(model.inputs, sizes).values()):
            for axis, d in enumerate(spec.shape):
                if d == -1:
                    given = spec.dim_names[axis] if axis < len(spec.dim_names) else ""
                    found.setdefault(shape[axis], given or f"{spec.name}:{axis}")
        source.append(found)
    given = {spec.name: spec for spec in model.inputs}
    out = []
    for name in names:
        a, b = (np.asarray(run[name]) for run in runs)
        if a.ndim != b.ndim:
            raise CutError(f"model {model.name!r}: tensor {name!r} changes rank with its inputs' sizes")
        shape, dims = [], []
        for x, y in zip(a.shape, b.shape):
            named = source[0].get(x, "") if source[0].get(x) == source[1].get(y) else ""
            shape.append(x if x == y else -1)
            dims.append(named if x != y else "")
        dtype = given[name].dtype if name in given else a.dtype.name
        out.append(TensorSpec(name, dtype, tuple(shape), tuple(dims)))
    return out


def cut_model(model: Model, cuts: list[int] | tuple[int, ...]) -> ModelCut:
    """`model` cut after each recurrent step numbered in `cuts` (ascending, each before the
    last step). CutError naming the model when the cut cannot be made."""
    steps = model.recurrent_steps()
    if any(isinstance(s, LayerStack) for s in steps):
        raise CutError(f"model {model.name!r} is stacked: cut it as imported (unstacked)")
    cuts = list(cuts)
    if not cuts or cuts != sorted(set(cuts)) or cuts[0] < 0 or cuts[-1] >= len(steps) - 1:
        raise CutError(f"model {model.name!r} has {len(steps)} recurrent steps: a cut is after step 0.."
                       f"{len(steps) - 2}, ascending and distinct, got {cuts}")
    ends, seen = [], -1
    for i, step in enumerate(model.program):
        if not isinstance(step, DenseNode):
            seen += 1
            if seen in cuts:
                ends.append(i + 1)
    bounds = [0, *ends, len(model.program)]
    programs = [model.program[a:b] for a, b in zip(bounds, bounds[1:])]
    outputs = [spec.name for spec in model.outputs]
    made_by = [set(t for step in prog for t in _makes(step)) for prog in programs]
    read_by = [set(t for step in prog for t in _reads(step)) for prog in programs]
    consts = set(model.constants)
    from cellserve.graph.onnx_import import find_semantics, probe_tensors

    runs = [probe_tensors(model, sizes) for sizes in _PROBES]
    parts, carried = [], []
    for k, prog in enumerate(programs):
        later_reads = set().union(*read_by[k + 1:], set(outputs))
        inputs = sorted(read_by[k] - made_by[k] - consts)
        part_outputs = (sorted(made_by[k] & later_reads) if k < len(programs) - 1 else
                        [name for name in outputs if name in made_by[k]])
        if k < len(programs) - 1 and not part_outputs:
            raise CutError(f"model {model.name!r}: nothing made before cut {cuts[k]} is read after it")
        used = {t for step in prog for t in _reads(step)} & consts
        part = Model(name=f"{model.name}.part{k}", inputs=_specs(model, inputs, runs),
                     outputs=_specs(model, part_outputs, runs),
                     constants={c: model.constants[c] for c in used}, program=list(prog),
                     max_sequence_length=model.max_sequence_length, max_request_rows=model.max_request_rows)
        parts.append(part)
        carried.append(frozenset(later_reads - set().union(*made_by[k + 1:]) - consts)
                       if k < len(programs) - 1 else frozenset(outputs))
    for part in parts:
        semantics = find_semantics(part)
        for spec in part.inputs:  # a model input keeps what the importer found (its vocabulary)
            if spec.name in model.semantics:
                semantics[spec.name] = model.semantics[spec.name]
        part.semantics = semantics
    return ModelCut(model.name, tuple(parts), tuple(carried), tuple(outputs))
