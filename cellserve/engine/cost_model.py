"""Step costs learnt from the engine's own runs, and the finish-time predictions made from them.

A cell type's step time is kept per batch-size bucket (powers of two) as a moving average of
measured steps, seeded by a profile at start-up, and read back by interpolating between
measured buckets: step time is far from linear in the batch at small batches (BLAS switches
kernels), so a straight-line fit mispredicted by up to 6x here.

Prediction: a request advances one step per *round*, in which every cell type with lanes
runs once (see scheduler.CellularPolicy). The engine prices a round at the load *committed*
to each cell type: the lanes of every admitted request that has yet to leave it, not just the
lanes there now, since requests in earlier layers arrive before a request admitted now leaves.
That errs on the slow side, which keeps admitted requests from being dropped later.

Costs learn only from steps that run, so after a slow spell (another process took the CPU)
an engine that refuses everything would never see that steps got fast again. The start-up
profile is kept as a floor for that case: an idle engine prices a request at the floor.
"""

from __future__ import annotations

import copy
import math

_ALPHA = 0.05  # weight of a new sample in a bucket's moving average
# A sample counts as at most this many times the bucket's mean: one stall (a page fault, the
# OS running something else) must not poison a bucket that later steps rarely visit, while a
# lasting slowdown is still learnt, 1.15x per sample.
_MAX_JUMP = 4.0


def _bucket(batch: int) -> int:
    return max(0, math.ceil(math.log2(max(batch, 1))))


class StepCost:
    def __init__(self) -> None:
        self._mean: dict[int, float] = {}  # bucket -> seconds per step

    def observe(self, batch: int, seconds: float) -> None:
        b = _bucket(batch)
        old = self._mean.get(b)
        if old is None:
            self._mean[b] = seconds
        else:
            self._mean[b] = old + _ALPHA * (min(seconds, _MAX_JUMP * old) - old)

    def __call__(self, batch: int) -> float:
        if not self._mean:
            return 0.0
        b = _bucket(batch)
        if b in self._mean:
            return self._mean[b]
        lower = [k for k in self._mean if k < b]
        upper = [k for k in self._mean if k > b]
        if lower and upper:
            lo, hi = max(lower), min(upper)
            frac = (batch - 2 ** lo) / (2 ** hi - 2 ** lo)
            return self._mean[lo] + frac * (self._mean[hi] - self._mean[lo])
        nearest = max(lower) if lower else min(upper)
        return self._mean[nearest] * max(batch / 2 ** nearest, 1.0)


class CostModel:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.costs: dict[str, StepCost] = {}
        self.floor: dict[str, StepCost] = {}

    def keep_as_floor(self) -> None:
        """Keep the costs measured so far (the start-up profile) for `round_time(floor=True)`."""
        self.floor = copy.deepcopy(self.costs)

    def observe(self, cell_type: str, batch: int, seconds: float) -> None:
        cost = self.costs.get(cell_type)
        if cost is None:
            cost = self.costs[cell_type] = StepCost()
        cost.observe(batch, seconds)

    def type_time(self, cell_type: str, lanes: int, floor: bool = False) -> float:
        """Seconds for `lanes` lanes of one cell type to advance one step each."""
        cost = (self.floor if floor else self.costs).get(cell_type)
        if lanes <= 0 or cost is None:
            return 0.0
        full, rest = divmod(lanes, self.max_batch)
        return full * cost(self.max_batch) + (cost(rest) if rest else 0.0)

    def round_time(self, load: dict[str, int], floor: bool = False) -> float:
        """Seconds for one round with `load[type]` lanes in each cell type (at the start-up
        profile's costs with `floor`)."""
        return sum(self.type_time(t, n, floor) for t, n in load.items())
