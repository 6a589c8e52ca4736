"""Models: the graph a request walks (model.py) and the ways to build one.

    from cellserve.graph import load_onnx, load_torch, load_torch_seq2seq, zoo

The loaders are imported on first use (PEP 562), so that importing a submodule such as
`cellserve.graph.model` does not import onnx and torch.
"""

from __future__ import annotations

import importlib

_LAZY = {"load_onnx": "cellserve.graph.onnx_import", "load_torch": "cellserve.graph.torch_import",
         "load_torch_seq2seq": "cellserve.graph.seq2seq_import", "Model": "cellserve.graph.model"}
__all__ = [*_LAZY, "zoo"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "zoo":
        return importlib.import_module("cellserve.graph.zoo")
    raise AttributeError(f"module 'cellserve.graph' has no attribute {name!r}")
