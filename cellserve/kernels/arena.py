"""Device-resident storage for lanes: a pool of state slots and a pool of row blocks.

A lane holds one slot (its recurrent state) and one block of rows (its input projection,
one row per step, and its outputs) for as long as it runs, so that a batched step gathers
and scatters by index instead of copying whole states around. Slot 0 and row 0 are scratch,
never handed out: padded batches point their finished lanes there.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass
class LaneStorage:
    """Where one lane lives in a kernel's arenas."""

    slot: int
    base: int  # first row of its block
    length: int


class SlotPool:
    """Integer slots 1..capacity-1; grows by doubling (the caller resizes its tensors)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._free = list(range(capacity - 1, 0, -1))

    def take(self) -> int:
        if not self._free:
            old = self.capacity
            self.capacity *= 2
            self._free = list(range(self.capacity - 1, old - 1, -1))
        return self._free.pop()

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def shrink_to(self, capacity: int) -> None:
        """Back to `capacity` (what growing took it from), if every slot past it is free."""
        kept = [s for s in self._free if s < capacity]
        if capacity < self.capacity and len(self._free) - len(kept) == self.capacity - capacity:
            self._free, self.capacity = kept, capacity

    @property
    def in_use(self) -> int:
        return self.capacity - 1 - len(self._free)


class RowPool:
    """First-fit allocation of contiguous row blocks in [1, capacity); grows by doubling."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._starts = [1]  # free blocks, sorted by start, never adjacent
        self._lengths = [capacity - 1]

    def take(self, n: int) -> int:
        n = max(n, 1)
        for i, length in enumerate(self._lengths):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += n
                    self._lengths[i] -= n
                return start
        self._grow(max(n, self.capacity))
        return self.take(n)

    def give(self, start: int, n: int) -> None:
        n = max(n, 1)
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._lengths.insert(i, n)
        # merge with the next and the previous free block where they touch
        if i + 1 < len(self._starts) and start + n == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:
            self._lengths[i - 1] += self._lengths.pop(i)
            self._starts.pop(i)

    def shrink_to(self, capacity: int) -> None:
        """Back to `capacity` (what growing took it from), if every row past it is free."""
        if capacity < self.capacity and self._starts and self._starts[-1] <= capacity and (
                self._starts[-1] + self._lengths[-1] == self.capacity):
            self._lengths[-1] = capacity - self._starts[-1]
            if not self._lengths[-1]:
                del self._starts[-1], self._lengths[-1]
            self.capacity = capacity

    def _grow(self, extra: int) -> None:
        old = self.capacity
        self.capacity += extra
        self.give(old, extra)


@contextmanager
def new_lane(slots: SlotPool, rows: RowPool, length: int,
             release: Callable[[LaneStorage], None]) -> Iterator[LaneStorage]:
    """A lane's slot and block of `length` rows, for the block to fill (its kernel's arenas
    fitted to the pools first). If the block raises, the lane is released and a pool that
    grew for it goes back to its size before: a kernel whose arrays could not grow (a
    MemoryError on a huge request) must not keep a pool that hands out rows past its arrays,
    which failed every later lane of its model."""
    before = (slots.capacity, rows.capacity)
    lane = LaneStorage(slots.take(), rows.take(length), length)
    try:
        yield lane
    except BaseException:
        release(lane)
        slots.shrink_to(before[0])
        rows.shrink_to(before[1])
        raise
