"""Checks a request's inputs against the model before anything runs; each failure names
the input and what was wrong with it."""

from __future__ import annotations

import numpy as np

from cellserve.datatypes import protocol_name
from cellserve.errors import InvalidInput
from cellserve.graph.model import LayerStack, Model, RecurrentLayer, layers_of


def validate_request(model: Model, request) -> None:
    """A Request's own fields as the Python API takes them (the server's are checked when it
    parses): InvalidInput naming the field, not an internal error later."""
    if not isinstance(request.inputs, dict):
        raise InvalidInput(f"inputs must be a dict of input name -> array, got {type(request.inputs).__name__}")
    timeout = request.timeout_s
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.number))):
        raise InvalidInput(f"timeout_s must be a number of seconds or None, got {timeout!r}")
    priority = request.priority
    if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)) or priority < 0:
        raise InvalidInput(f"priority must be an integer >= 0 (lower runs first), got {priority!r}")
    if request.initial_state is not None:
        _check_initial_state(model, request.initial_state)


def _check_initial_state(model: Model, state) -> None:
    layers = {layer.name: layer for step in model.recurrent_steps() if isinstance(step, (RecurrentLayer, LayerStack))
              for layer in layers_of(step)}
    if not isinstance(state, dict):
        raise InvalidInput(f"initial_state must be a dict of layer name -> (h, c), got {type(state).__name__}")
    unknown = sorted(set(state) - set(layers))
    if unknown:
        raise InvalidInput(f"initial_state names {unknown}, which are not recurrent layers of model {model.name!r} "
                           f"(its layers: {sorted(layers)})")
    for name, value in state.items():
        if not isinstance(value, (tuple, list)) or len(value) != 2 or value[0] is None:
            raise InvalidInput(f"initial_state[{name!r}] must be a pair (h, c), h an array and c an array or None")
        if layers[name].kind == "lstm" and value[1] is None:
            raise InvalidInput(f"initial_state[{name!r}]: layer {name!r} is an LSTM, so its state needs c as well as h")


def validate_inputs(model: Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the inputs as arrays of the model's dtypes, or raise InvalidInput."""
    expected = {spec.name: spec for spec in model.inputs}
    if inputs.keys() != expected.keys():
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise InvalidInput(f"unknown input(s) {unknown} for model {model.name!r}; expected {sorted(expected)}")
        raise InvalidInput(f"missing input(s) {sorted(set(expected) - set(inputs))} for model {model.name!r}")
    out = {}
    for name, spec in expected.items():
        where = f"input {name!r}"
        try:
            value = np.asarray(inputs[name])
        except (ValueError, TypeError) as exc:  # ragged nested lists and the like
            raise InvalidInput(f"{where}: not a rectangular array ({exc})") from exc
        if value.ndim != len(spec.shape):
            raise InvalidInput(f"{where}: expected rank {len(spec.shape)} (shape {list(spec.shape)}), got shape {list(value.shape)}")
        semantics = model.semantics.get(name)
        check_request_limits(model, name, value.shape, where)
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if want != -1 and want != got:
                raise InvalidInput(f"{where}: dimension {axis} must be {want}, got {got} (shape {list(value.shape)})")
            if got == 0:
                raise InvalidInput(f"{where}: dimension {axis} is empty (shape {list(value.shape)})")
        value = _convert_dtype(where, value, np.dtype(spec.dtype))
        if semantics is not None and semantics.vocab is not None and _out_of_range(value, semantics.vocab):
            low, high = int(value.min()), int(value.max())
            bad = low if low < 0 else high
            raise InvalidInput(f"{where}: token id {bad} is out of range [0, {semantics.vocab})")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise InvalidInput(f"{where}: contains NaN or infinity")
        out[name] = value
    if len(out) > 1:
        _check_shared_dimensions(model, out)
    return out


def check_request_limits(model: Model, name: str, shape: tuple[int, ...], where: str) -> None:
    """The model's bounds on one input's shape: its sequences per request and their length.
    The engine checks every request; the frontends check the shape a request declares, before
    they decode its data (a 60 MB body of one over-long sequence held their loop for seconds)."""
    semantics = model.semantics.get(name)
    if semantics is None:
        return
    axis = semantics.batch_axis
    if axis is not None and axis < len(shape) and shape[axis] > model.max_request_rows:
        raise InvalidInput(f"{where}: {shape[axis]} sequences (dimension {axis}) exceed the model's "
                           f"limit of {model.max_request_rows} per request (a repository model's "
                           "max_request_rows parameter, else its max_batch_size, sets it); split the batch")
    axis = semantics.time_axis
    if axis is not None and axis < len(shape) and shape[axis] > model.max_sequence_length:
        raise InvalidInput(f"{where}: sequence length {shape[axis]} exceeds the model's limit of "
                           f"{model.max_sequence_length} (a repository model's max_sequence_length parameter "
                           "sets it)")


def _check_shared_dimensions(model: Model, inputs: dict[str, np.ndarray]) -> None:
    """A request's inputs must agree on its batch size: those whose batch axis the importer
    found, and any axis the model names (ONNX dim_param) as one of those batch axes (a
    context vector, a lengths input). Otherwise a later op fails on the mismatch, or worse,
    broadcasts it. Only the batch: other named dimensions (a time axis two inputs share a
    name for) are the model's own business."""
    batch: tuple[str, int] | None = None  # the first input with a batch axis, and its size
    names: set[str] = set()
    for spec in model.inputs:
        sem = model.semantics.get(spec.name)
        if sem is None or sem.batch_axis is None:
            continue
        size = inputs[spec.name].shape[sem.batch_axis]
        if batch is None:
            batch = (spec.name, size)
        elif size != batch[1]:
            raise InvalidInput(f"inputs {batch[0]!r} and {spec.name!r} hold different batch sizes ({batch[1]} and "
                               f"{size}): each input of a request must hold the same sequences")
        if sem.batch_axis < len(spec.dim_names) and spec.dim_names[sem.batch_axis]:
            names.add(spec.dim_names[sem.batch_axis])
    if batch is None or not names:
        return
    for spec in model.inputs:
        shape = inputs[spec.name].shape
        for axis, dim in enumerate(spec.dim_names[:len(shape)]):
            if dim in names and shape[axis] != batch[1]:
                raise InvalidInput(f"input {spec.name!r}: dimension {axis} ({dim!r}, the batch) is {shape[axis]}, "
                                   f"but input {batch[0]!r} holds {batch[1]} sequences")


_UNSIGNED = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def _out_of_range(value: np.ndarray, vocab: int) -> bool:
    """Whether any token id lies outside [0, vocab): for signed integers one pass, their bits
    read as unsigned (a negative id reads as more than any vocabulary)."""
    if value.dtype.kind == "i":
        return bool(np.maximum.reduce(value.view(_UNSIGNED[value.itemsize]), axis=None) >= vocab)
    return bool(np.minimum.reduce(value, axis=None) < 0 or np.maximum.reduce(value, axis=None) >= vocab)


def _convert_dtype(where: str, value: np.ndarray, want: np.dtype) -> np.ndarray:
    if value.dtype == want:
        return value
    # Integers of another width are fine when they fit; nothing else is converted silently.
    if want.kind in "iu" and value.dtype.kind in "iu":
        info = np.iinfo(want)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise InvalidInput(f"{where}: values do not fit {want.name}")
        return value.astype(want)
    if want.kind == "f" and value.dtype.kind == "f":
        with np.errstate(over="ignore"):  # a value past the narrower type's range: said below
            out = value.astype(want)
        if want.itemsize < value.dtype.itemsize and (np.isinf(out) & np.isfinite(value)).any():
            raise InvalidInput(f"{where}: values do not fit {want.name} (largest magnitude "
                               f"{float(np.abs(value[np.isfinite(value)]).max()):g})")
        return out
    raise InvalidInput(f"{where}: has datatype {protocol_name(value.dtype)}; the model expects {protocol_name(want)}")
