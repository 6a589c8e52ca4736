"""The Python heap of a serving process: what start-up built stays out of the garbage
collector's full passes.

A full (generation 2) collection walks every object the collector tracks, holding the GIL
throughout, so every thread stops for it: the engine's step, the frontends' loop, the load
generator of a benchmark in the same process. A process that has imported torch and gRPC
and built its models tracks some 10^5 objects, and the collector starts a full pass whenever
enough objects have survived into the oldest generation, which steady serving reaches every
few seconds: each pass is a stall that lands in the p99 of whatever was in flight (measured
in docs/performance.md). What start-up built (modules, models, kernels) is never garbage, so
`settle()` collects once and then freezes it (`gc.freeze`): later full passes walk only what
was allocated since.

The cost: an object frozen here that later becomes garbage in a reference cycle is never
freed; only start-up's objects are frozen, and a server does not drop them.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


def settle() -> int:
    """Collect, then move every object alive now to the collector's permanent generation.
    Call once, when start-up is done and before serving; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextmanager
def long_lived(gen0_threshold: int = 50_000):
    """For a run that holds a great many objects for its whole length (a simulation: its trace
    and engines): what is alive at entry is frozen, and the youngest generation is collected
    less often (its objects mostly go by reference counting); both are undone on exit. gc has
    no partial unfreeze: if objects were frozen before entry (`settle`), nothing is unfrozen."""
    threshold = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    gc.set_threshold(max(threshold[0], gen0_threshold), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if not frozen_before:
            gc.unfreeze()
