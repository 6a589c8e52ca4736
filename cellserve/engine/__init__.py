"""The engine: cellular batching of the models' cell steps (engine.py).

    from cellserve.engine import Engine, EngineConfig, Request, Status
    engine = Engine([model], EngineConfig(policy="cellular"))
    engine.submit(Request(model.name, {"tokens": ids}, on_done=print))
    engine.run_until_idle()

Imported on first use (PEP 562): importing a submodule does not import the engine's kernels.
"""

from __future__ import annotations

import importlib

_LAZY = {"Engine": "cellserve.engine.engine", "EngineConfig": "cellserve.engine.config",
         "Request": "cellserve.engine.request", "Response": "cellserve.engine.request",
         "Status": "cellserve.engine.request"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellserve.engine' has no attribute {name!r}")
