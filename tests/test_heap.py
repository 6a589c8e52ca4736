"""heap.settle(): start-up's objects leave the collector's generations, so a full pass walks
only what came after."""

from __future__ import annotations

import gc

from cellserve import heap


def test_settle_freezes_what_is_alive_and_leaves_later_garbage_collectable():
    built_at_startup = [[i] for i in range(10_000)]  # tracked objects start-up made
    try:
        frozen = heap.settle()
        assert frozen == gc.get_freeze_count() >= len(built_at_startup)
        # a full pass now walks none of them
        walked = gc.get_objects(generation=2)
        assert not any(o is built_at_startup for o in walked)
        assert len(walked) < len(built_at_startup)
        # garbage made after start-up is still collected
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
