"""The Triton kernel module in the mode a device needs: compiled for a GPU, or interpreted on
the CPU (TRITON_INTERPRET semantics).

Triton decides between the two when a function is decorated with @triton.jit, by reading
TRITON_INTERPRET at that moment; a module imported once is stuck in one mode for the process.
So each mode gets its own copy of kernels/triton_cells.py, loaded under its own module name
with TRITON_INTERPRET set for the load: a test process can interpret while a compile check in
the same process compiles, whatever the order in which they run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).with_name("triton_cells.py")
_loaded: dict[bool, ModuleType] = {}
_lock = threading.Lock()


def triton_cells(interpret: bool) -> ModuleType:
    """kernels/triton_cells.py with its functions interpreted (True) or compiled (False)."""
    with _lock:
        if interpret not in _loaded:
            name = f"cellserve.kernels._triton_cells_{'interpreted' if interpret else 'compiled'}"
            before = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
            try:
                spec = importlib.util.spec_from_file_location(name, _SOURCE)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module  # triton looks functions up through their module
                spec.loader.exec_module(module)
            finally:
                if before is None:
                    del os.environ["TRITON_INTERPRET"]
                else:
                    os.environ["TRITON_INTERPRET"] = before
            _loaded[interpret] = module
        return _loaded[interpret]
