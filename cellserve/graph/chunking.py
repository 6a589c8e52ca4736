"""Whether a model answers a sequence sent in chunks exactly as sent whole, the promise a
stream (`sequence_id`) makes: the engine carries each recurrent layer's final state from one
chunk to the next, so what the recurrences compute is the same either way, but the plain ops
around them see one chunk at a time. A head over the last step (or the final state) or over
each step apart chunks exactly; one that pools over time (a mean, a max, attention over the
steps), reads the first step, or starts one layer from another's final state does not: its
answer for a chunk is not its answer for the whole.

The check runs the model's program on made-up inputs, with every recurrent layer replaced by
a stand-in that has no memory (each step's output a fixed random function of that step's
input, the final state the last step's output): a stand-in chunks exactly, so any difference
between the chunks' answers and the whole's comes from the plain ops. Each output must then be
the last chunk's (a final answer) or the chunks' joined along one axis (an answer per step).
Random data makes an accidental match of a pooling head unlikely; two splits make it more so.
"""

from __future__ import annotations

import numpy as np

from cellserve.graph import dense_ops
from cellserve.graph.model import DenseNode, LayerStack, Model, RecurrentLayer

_ROWS = 3  # sequences in each made-up request
_SPLITS = ((3, 4), (1, 6))  # chunk lengths: one chunk's answer against the whole's
_RTOL, _ATOL = 1e-5, 1e-6


def chunking_problem(model: Model) -> str | None:
    """Why `model` does not answer a sequence in chunks as it answers it whole (None when it
    does, for every output). Call it for models whose recurrences all run forward."""
    timed = [spec for spec in model.inputs
             if model.semantics.get(spec.name) is not None and model.semantics[spec.name].time_axis is not None]
    if not timed:
        return "no input has a time axis to cut into chunks"
    started = _state_from_the_sequence(model, {spec.name for spec in timed})
    if started is not None:  # the stand-ins ignore initial states: checked on the graph instead
        return started
    time_names = {spec.dim_names[model.semantics[spec.name].time_axis] for spec in timed
                  if model.semantics[spec.name].time_axis < len(spec.dim_names)} - {""}
    rng = np.random.default_rng(0)
    for split in _SPLITS:
        whole_len = sum(split)
        inputs = {spec.name: _made_up(model, spec, whole_len, time_names, rng) for spec in model.inputs}
        try:
            whole = _run(model, inputs, whole_len)
            parts, start = [], 0
            for length in split:
                chunk = {name: _time_slice(model, name, value, start, start + length)
                         for name, value in inputs.items()}
                parts.append(_run(model, chunk, length))
                start += length
        except Exception as exc:  # noqa: BLE001 - whatever stops the check, the model is not vouched for
            return f"its graph could not be checked on chunks ({type(exc).__name__}: {exc})"
        for spec in model.outputs:
            if not _joins(whole[spec.name], [p[spec.name] for p in parts]):
                return (f"output {spec.name!r} depends on more of the sequence than one chunk holds (a pooling "
                        "or attention over time, the first step, or a layer started from another's final "
                        "state): a chunk's answer would not be the whole sequence's")
    return None


def _state_from_the_sequence(model: Model, timed: set[str]) -> str | None:
    """A layer whose initial state is computed from the sequence (another layer's final
    state, say): a chunk would start it from that chunk's, not the whole sequence's."""
    depends = set(timed)
    for step in model.program:
        if isinstance(step, DenseNode):
            if depends.intersection(step.inputs):
                depends.update(step.outputs)
            continue
        for layer in getattr(step, "layers", [step]):
            for name in (layer.initial_h, layer.initial_c):
                if name and name in depends:
                    return (f"layer {layer.name!r} starts from a state computed from the sequence ({name!r}): "
                            "a chunk would start it from that chunk's, not the whole sequence's")
            depends.update(n for n in (layer.y, layer.y_h, layer.y_c) if n)
    return None


def _made_up(model: Model, spec, time_len: int, time_names: set[str], rng: np.random.Generator) -> np.ndarray:
    """An input of `time_len` steps and _ROWS sequences: token ids within the vocabulary,
    random floats; an input without a time axis holds the time length (integers: what a
    lengths input means) or zeros (floats: an initial state). `time_names`: the dimension
    names of the time axes, so that another input's dimension of that name is as long."""
    sem = model.semantics.get(spec.name)
    shape = []
    for axis, dim in enumerate(spec.shape):
        if sem is not None and axis == sem.time_axis:
            shape.append(time_len)
        elif sem is not None and axis == sem.batch_axis:
            shape.append(_ROWS)
        elif dim is not None and dim >= 0:
            shape.append(dim)
        else:
            named = spec.dim_names[axis] if axis < len(spec.dim_names) else ""
            shape.append(time_len if named and named in time_names else _ROWS)
    dtype = np.dtype(spec.dtype)
    if sem is not None and sem.time_axis is not None:
        if dtype.kind in "iu":
            return rng.integers(0, sem.vocab or 2, shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)
    return np.full(shape, time_len, dtype) if dtype.kind in "iu" else np.zeros(shape, dtype)


def _time_slice(model: Model, name: str, value: np.ndarray, start: int, end: int) -> np.ndarray:
    sem = model.semantics.get(name)
    if sem is None or sem.time_axis is None:
        return np.full_like(value, end - start) if value.dtype.kind in "iu" else value
    index = [slice(None)] * value.ndim
    index[sem.time_axis] = slice(start, end)
    return np.ascontiguousarray(value[tuple(index)])


def _run(model: Model, inputs: dict[str, np.ndarray], time_len: int) -> dict[str, np.ndarray]:
    env = {**model.constants, **inputs}
    for step in model.program:
        if isinstance(step, DenseNode):
            dense_ops.run(step, env)
        elif isinstance(step, LayerStack):
            x = env[step.layers[0].x]
            for layer in step.layers:
                y = _stand_in(layer, x, env)
                x = y[:, 0]  # the next layer's input, as the stack feeds it
        elif isinstance(step, RecurrentLayer):
            _stand_in(step, env[step.x], env)
        else:
            raise TypeError(f"{type(step).__name__} {step.name!r} is not a recurrent layer")
    return {spec.name: np.asarray(env[spec.name]) for spec in model.outputs}


def _stand_in(layer: RecurrentLayer, x: np.ndarray, env: dict) -> np.ndarray:
    """A memoryless layer of `layer`'s shapes: y [T, D, B, H] = tanh(x_t P_d) per step; the
    final h (and c) the last step's; written to the layer's output names, as the engine does."""
    if layer.token_table is not None:
        x = layer.token_table[np.asarray(x, np.int64)]
    x = np.asarray(x, np.float32)
    rng = np.random.default_rng(len(layer.name))  # fixed per layer: the same function for every chunk
    projections = [rng.standard_normal((x.shape[-1], layer.hidden)).astype(np.float32) / np.sqrt(x.shape[-1])
                   for _ in layer.directions]
    y = np.stack([np.tanh(x @ p) for p in projections], axis=1)  # [T, D, B, H]
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
