"""Step costs learnt from the engine's own runs, and the finish-time prediction made from them.

Each cell type's step time is fitted as t(b) = fixed + per_lane * b by least squares over
its most recent steps (seeded by a profile at start-up). A request's predicted latency is
its steps per cell type times the duration of one *round*, in which every active cell type
runs its lanes once, in batches of at most max_batch.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class StepCost:
    def __init__(self, window: int = 512):
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.fixed, self.per_lane = 0.0, 0.0
        self._since_fit = 0

    def observe(self, batch: int, seconds: float) -> None:
        self._samples.append((batch, seconds))
        self._since_fit += 1
        if self._since_fit >= 64 or len(self._samples) < 16:
            self._fit()

    def __call__(self, batch: int) -> float:
        return self.fixed + self.per_lane * batch

    def _fit(self) -> None:
        self._since_fit = 0
        b = np.array([s[0] for s in self._samples], float)
        t = np.array([s[1] for s in self._samples], float)
        if len(b) == 0:
            return
        if np.ptp(b) == 0:
            self.fixed, self.per_lane = float(np.median(t)), self.per_lane
            return
        slope, intercept = np.polyfit(b, t, 1)
        self.per_lane, self.fixed = max(float(slope), 0.0), max(float(intercept), 0.0)


class CostModel:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.costs: dict[str, StepCost] = {}

    def observe(self, cell_type: str, batch: int, seconds: float) -> None:
        cost = self.costs.get(cell_type)
        if cost is None:
            cost = self.costs[cell_type] = StepCost()
        cost.observe(batch, seconds)

    def round_time(self, load: dict[str, int]) -> float:
        """Seconds for every cell type to run its `load[type]` lanes once."""
        total = 0.0
        for cell_type, lanes in load.items():
            if lanes <= 0:
                continue
            cost = self.costs.get(cell_type)
            if cost is None:
                continue
            batches = math.ceil(lanes / self.max_batch)
            total += batches * cost(min(lanes, self.max_batch))
        return total

    def predict(self, rounds: int, load: dict[str, int]) -> float:
        """Predicted seconds for work that needs `rounds` rounds at the given lanes per type
        (the caller counts the request's own lanes in `load`)."""
        return rounds * self.round_time(load)
