"""The Open Inference Protocol's tensor datatypes and the numpy dtypes they are, shared by the
server's codec and the engine's input checks (so an error names a type as the client sent it)."""

from __future__ import annotations

import numpy as np

# BYTES (an object array of bytes) is only ever an output here: classification's answers
# (server/classification.py); no model takes it.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}
BY_DTYPE[np.dtype(object)] = "BYTES"


def protocol_name(dtype: np.dtype) -> str:
    """The protocol's name of a numpy dtype (numpy's own where the protocol has none)."""
    return BY_DTYPE.get(np.dtype(dtype), np.dtype(dtype).name)
