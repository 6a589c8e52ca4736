"""Tensors on the wire: the protocol's datatypes, and turning JSON data or raw bytes into
numpy arrays (and back), with an error that names the tensor for every way it can go wrong."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from cellserve.datatypes import BY_DTYPE as _BY_DTYPE
from cellserve.datatypes import DATATYPES
from cellserve.engine.validation import check_request_limits
from cellserve.errors import InvalidInput
from cellserve.server.errors import BadRequest

MAX_ELEMENTS = 1 << 26  # a shape asking for more is refused before anything is allocated
# (input name, its declared shape, where) -> None, or BadRequest: a served model's limits on a
# request's shape, checked before its data is decoded (declared_shape_check)
ShapeCheck = Callable[[str, tuple[int, ...], str], None]


def declared_shape_check(entry) -> ShapeCheck:
    """The ShapeCheck of a served model (a ServedModel): its sequences per request and their
    length (engine/validation.py check_request_limits, which the engine applies again)."""
    model = entry.model

    def check(name: str, shape: tuple[int, ...], where: str) -> None:
        try:
            check_request_limits(model, name, shape, where)
        except InvalidInput as exc:
            raise BadRequest(str(exc)) from None

    return check


def no_misplaced_params(parameters, where: str, output: bool = False) -> None:
    """BadRequest for `classification` on an input (`output` False): it asks for an output
    (both protocols)."""
    if not output and "classification" in parameters:
        raise BadRequest(f"{where}: parameter 'classification' belongs to a requested output, not an input")


def datatype_of(dtype: np.dtype | str) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _BY_DTYPE:
        raise ValueError(f"no protocol datatype for numpy dtype {dtype}")
    return _BY_DTYPE[dtype]


def dtype_of(datatype: object, where: str) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise BadRequest(f"{where}: unsupported datatype {datatype!r}; use one of {known}")
    return DATATYPES[datatype]


def check_shape(shape: object, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"{where}: shape must be a list of integers, got {shape!r}")
    if any(d <= 0 for d in shape):
        raise BadRequest(f"{where}: every dimension must be positive, got shape {list(shape)}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise BadRequest(f"{where}: shape {list(shape)} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def from_json_data(data: object, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """A tensor from JSON `data`: a flat or nested list in row-major order."""
    if not isinstance(data, list):
        raise BadRequest(f"{where}: data must be a list, got {type(data).__name__}")
    flat = _flatten(data, where)
    expected = math.prod(shape)
    if len(flat) != expected:
        raise BadRequest(f"{where}: shape {list(shape)} needs {expected} values, got {len(flat)}")
    kind = dtype.kind
    for value in flat:
        if kind == "b":
            ok = isinstance(value, bool)
        elif kind in "iu":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            want = {"b": "booleans", "i": "integers", "u": "integers"}.get(kind, "numbers")
            raise BadRequest(f"{where}: {_name(dtype)} data must be {want}, got {value!r}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise BadRequest(f"{where}: a value does not fit {_name(dtype)} ({exc})") from exc


def from_raw(raw: bytes | memoryview, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """A tensor from little-endian row-major bytes (the binary extension, gRPC raw contents)."""
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(f"{where}: shape {list(shape)} of {_name(dtype)} needs {expected} bytes, "
                         f"got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=True).reshape(shape)


def to_raw(array: np.ndarray) -> bytes:
    """Little-endian row-major bytes; BYTES as the protocol lays them out: each element's
    length as 4 little-endian bytes, then the element."""
    array = np.asarray(array)
    if array.dtype == object:
        return b"".join(len(item).to_bytes(4, "little") + item for item in array.reshape(-1).tolist())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def to_json_data(array: np.ndarray) -> list:
    """Row-major values; BYTES as strings (UTF-8)."""
    array = np.asarray(array)
    if array.dtype == object:
        return [item.decode() for item in array.reshape(-1).tolist()]
    return array.reshape(-1).tolist()


def _flatten(data: list, where: str) -> list:
    out, stack = [], [iter(data)]
    while stack:  # iterative: a deeply nested body must not exhaust the recursion limit
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > MAX_ELEMENTS:
                raise BadRequest(f"{where}: more than {MAX_ELEMENTS} values")
        else:
            stack.pop()
    return out


def _name(dtype: np.dtype) -> str:
    return _BY_DTYPE.get(dtype, str(dtype))
