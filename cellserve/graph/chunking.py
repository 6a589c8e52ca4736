"""Whether a model answers a sequence sent in chunks exactly as sent whole, the promise a
stream (`sequence_id`) makes: the engine carries each recurrent layer's final state from one
chunk to the next, so what the recurrences compute is the same either way, but the plain ops
around them see one chunk at a time. A head over the last step (or the final state) or over
each step apart chunks exactly; one that pools over time (a mean, a max, attention over the
steps), reads the first step, or starts one layer from another's final state does not: its
answer for a chunk is not its answer for the whole.

The check runs the model's program on made-up inputs, with every recurrent layer replaced by
a stand-in that has no memory (each step's output a fixed random function of that step's
input, its own for each layer, with the layer's range of values; the final state the last
step's output): a stand-in chunks exactly, so any difference between the chunks' answers and
the whole's comes from the plain ops. Each output must then be the last chunk's (a final
answer) or the chunks' joined along one axis (an answer per step); so must the float tensor
behind a discrete answer (an ArgMax's scores, a comparison's operands), which a few made-up
rows could otherwise match by chance. Inputs without a time axis get random values, the same
in every chunk, as a client sends a per-sequence value with each chunk.
"""

from __future__ import annotations

import numpy as np

from cellserve.graph import dense_ops
from cellserve.graph.model import DenseNode, LayerStack, Model, RecurrentLayer, layers_of

_ROWS = 3  # sequences in each made-up request
_SPLITS = ((3, 4), (1, 6))  # chunk lengths: one chunk's answer against the whole's
_RTOL, _ATOL = 1e-5, 1e-6
_DISCRETE = frozenset({"ArgMax", "Greater", "Less", "Equal", "Cast"})  # ops that may make a float answer discrete


def chunking_problem(model: Model) -> str | None:
    """Why `model` does not answer a sequence in chunks as it answers it whole (None when it
    does, for every output). Call it for models whose recurrences all run forward."""
    time_axes = _time_axes(model)
    if not any(model.semantics.get(name) is not None and model.semantics[name].time_axis is not None
               for name in time_axes):
        return "no input has a time axis to cut into chunks"
    started = _state_from_the_sequence(model, set(time_axes))
    if started is not None:  # the stand-ins ignore initial states: checked on the graph instead
        return started
    rng = np.random.default_rng(0)
    for split in _SPLITS:
        whole_len = sum(split)
        inputs = {spec.name: _made_up(model, spec, time_axes.get(spec.name), whole_len, rng) for spec in model.inputs}
        try:
            whole, behind = _run(model, inputs)
            parts, start = [], 0
            for length in split:
                chunk = {name: _time_slice(value, time_axes.get(name), start, start + length)
                         for name, value in inputs.items()}
                parts.append(_run(model, chunk)[0])
                start += length
        except Exception as exc:  # noqa: BLE001 - whatever stops the check, the model is not vouched for
            return f"its graph could not be checked on chunks ({type(exc).__name__}: {exc})"
        for name in [spec.name for spec in model.outputs] + sorted(behind):
            if not _joins(whole[name], [p[name] for p in parts]):
                what = f"output {name!r}" if name not in behind else f"the scores behind a discrete answer ({name!r})"
                return (f"{what} depends on more of the sequence than one chunk holds (a pooling or attention "
                        "over time, the first step, or a layer started from another's final state): a chunk's "
                        "answer would not be the whole sequence's")
    return None


def _time_axes(model: Model) -> dict[str, int]:
    """Each input's time axis: the importer's (the inputs a recurrence reads), else the axis
    whose dimension bears the name of one of those time axes (a mask or a bias over the steps
    read by the head alone)."""
    axes, names = {}, set()
    for spec in model.inputs:
        sem = model.semantics.get(spec.name)
        if sem is not None and sem.time_axis is not None:
            axes[spec.name] = sem.time_axis
            if sem.time_axis < len(spec.dim_names) and spec.dim_names[sem.time_axis]:
                names.add(spec.dim_names[sem.time_axis])
    for spec in model.inputs:
        if spec.name not in axes:
            named = [axis for axis, dim in enumerate(spec.dim_names) if dim in names]
            if named:
                axes[spec.name] = named[0]
    return axes


def _state_from_the_sequence(model: Model, timed: set[str]) -> str | None:
    """A layer whose initial state is computed from the sequence (another layer's final
    state, say): a chunk would start it from that chunk's, not the whole sequence's."""
    depends = set(timed)
    for step in model.program:
        if isinstance(step, DenseNode):
            if depends.intersection(step.inputs):
                depends.update(step.outputs)
            continue
        for layer in layers_of(step):  # a decoder never gets here: why_not_streamable refused it
            for name in (layer.initial_h, layer.initial_c):
                if name and name in depends:
                    return (f"layer {layer.name!r} starts from a state computed from the sequence ({name!r}): "
                            "a chunk would start it from that chunk's, not the whole sequence's")
            depends.update(n for n in (layer.y, layer.y_h, layer.y_c) if n)
    return None


def _made_up(model: Model, spec, time_axis: int | None, time_len: int, rng: np.random.Generator) -> np.ndarray:
    """An input of `time_len` steps (along `time_axis`) and _ROWS sequences: token ids within
    the vocabulary, else 0 or 1 for integers (an index or a flag, valid wherever it goes),
    random floats."""
    sem = model.semantics.get(spec.name)
    shape = []
    for axis, dim in enumerate(spec.shape):
        if axis == time_axis:
            shape.append(time_len)
        elif (sem is not None and axis == sem.batch_axis) or dim is None or dim < 0:
            shape.append(_ROWS)
        else:
            shape.append(dim)
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        high = sem.vocab if sem is not None and sem.vocab else 2
        return rng.integers(0, high, shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.standard_normal(shape).astype(dtype)


def _time_slice(value: np.ndarray, time_axis: int | None, start: int, end: int) -> np.ndarray:
    if time_axis is None:
        return value  # a per-sequence value: the same with every chunk
    index = [slice(None)] * value.ndim
    index[time_axis] = slice(start, end)
    return np.ascontiguousarray(value[tuple(index)])


def _run(model: Model, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], set[str]]:
    """The program's outputs and float tensors behind its discrete ones (by name, in one
    dict), and the names of the latter."""
    env = {**model.constants, **inputs}
    behind = set()
    layer_index = 0
    for step in model.program:
        if isinstance(step, DenseNode):
            dense_ops.run(step, env)
            if step.op in _DISCRETE and any(np.asarray(env[o]).dtype.kind in "iub" for o in step.outputs if o):
                behind.update(name for name in step.inputs
                              if name and name not in model.constants and np.asarray(env[name]).dtype.kind == "f")
        elif isinstance(step, LayerStack):
            x = env[step.layers[0].x]
            for layer in step.layers:
                y = _stand_in(layer, layer_index, x, env)
                layer_index += 1
                x = y[:, 0]  # the next layer's input, as the stack feeds it
        elif isinstance(step, RecurrentLayer):
            _stand_in(step, layer_index, env[step.x], env)
            layer_index += 1
        else:
            raise TypeError(f"{type(step).__name__} {step.name!r} is not a recurrent layer")
    names = [spec.name for spec in model.outputs] + sorted(behind)
    return {name: np.asarray(env[name]) for name in names}, behind


def _stand_in(layer: RecurrentLayer, index: int, x: np.ndarray, env: dict) -> np.ndarray:
    """A memoryless layer of `layer`'s shapes and range: y [T, D, B, H] = f(x_t P_d) per step,
    f tanh (reaching past +-0.99: LSTM, GRU and tanh RNN outputs lie in (-1, 1)) or a ReLU
    reaching well past 1 for a ReLU RNN; P its own for each layer (`index`); the final h (and
    c) the last step's. Written to the layer's output names, as the engine does."""
    if layer.token_table is not None:
        x = layer.token_table[np.asarray(x, np.int64)]
    x = np.asarray(x, np.float32)
    rng = np.random.default_rng([index, 7919])  # fixed per layer: the same function for every chunk
    scale = 2.5 / np.sqrt(max(x.shape[-1], 1))
    projections = [rng.standard_normal((x.shape[-1], layer.hidden)).astype(np.float32) * scale
                   for _ in layer.directions]
    act = (lambda v: 2.0 * np.maximum(v, 0.0)) if layer.kind == "rnn_relu" else np.tanh
    y = np.stack([act(x @ p) for p in projections], axis=1).astype(np.float32)  # [T, D, B, H]
    last = np.ascontiguousarray(y[-1])  # [D, B, H]
    for name, value in ((layer.y, y), (layer.y_h, last), (layer.y_c, np.tanh(2 * last))):
        if name:
            env[name] = value
    return y


def _joins(whole: np.ndarray, parts: list[np.ndarray]) -> bool:
    """Whether the chunks' answers make the whole's: the last one alone, or all of them
    joined along one axis."""
    if _close(parts[-1], whole):
        return True
    for axis in range(whole.ndim):
        try:
            joined = np.concatenate(parts, axis=axis)
        except ValueError:
            continue
        if _close(joined, whole):
            return True
    return False


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=_RTOL, atol=_ATOL))
    return bool(np.array_equal(a, b))
