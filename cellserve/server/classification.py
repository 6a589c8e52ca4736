"""Triton's classification extension: an output requested with `classification: K` (HTTP: the
output's `parameters`; gRPC: its `classification` parameter; tritonclient's
`InferRequestedOutput(name, class_count=K)`) is answered as its top K classes instead of
its values.

The answer is a BYTES tensor of shape [..., K]: the output's last axis (its classes) replaced
by the K largest entries of each row, largest first (ties: the lower index first), each the
string "value:index", or "value:index:label" where the model's repository config gives that
output a `label_filename` (one label per line, line i for class i). Values are written as
Triton writes them: a float with six decimals, an integer as it is. K beyond the number of
classes gives them all, as Triton does. Only numeric outputs with a class axis can be
classified; anything else is refused before the request runs.
"""

from __future__ import annotations

import numpy as np

from cellserve.graph.model import TensorSpec
from cellserve.server.errors import BadRequest

PARAMETER = "classification"


def class_count(value: object, where: str) -> int:
    """A request's `classification` parameter, checked: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{where}: parameter '{PARAMETER}' must be an integer >= 1 (the classes to return), "
                         f"got {value!r}")
    return value


def check_classifiable(spec: TensorSpec | None, name: str, model: str) -> None:
    """BadRequest unless output `name` (its spec, None when it has none) can be classified."""
    if spec is None:
        raise BadRequest(f"output {name!r} of model {model!r} cannot be classified: it is not one of the "
                         "model's declared outputs")
    if np.dtype(spec.dtype).kind not in "iuf" or len(spec.shape) < 1:
        raise BadRequest(f"output {name!r} of model {model!r} cannot be classified: classification needs numeric "
                         f"values with a class axis, and it is {np.dtype(spec.dtype)} of shape {list(spec.shape)}")


def top_classes(values: np.ndarray, k: int, labels: list[str] | None = None) -> np.ndarray:
    """The top `k` classes of each row of `values` (its last axis), as an object array of
    bytes [..., min(k, classes)] (module docstring)."""
    values = np.asarray(values)
    k = min(k, values.shape[-1])
    # a stable sort of the negated values: largest first, equal values in index order
    order = np.argsort(-values.astype(np.float64), axis=-1, kind="stable")[..., :k]
    chosen = np.take_along_axis(values, order, axis=-1)
    floats = values.dtype.kind == "f"
    out = np.empty(order.shape, dtype=object)
    flat_out, flat_order, flat_values = out.reshape(-1), order.reshape(-1), chosen.reshape(-1)
    for i, (index, value) in enumerate(zip(flat_order.tolist(), flat_values.tolist())):
        text = f"{value:f}:{index}" if floats else f"{value}:{index}"
        if labels is not None and index < len(labels):
            text += f":{labels[index]}"
        flat_out[i] = text.encode()
    return out
