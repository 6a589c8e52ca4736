"""How many steps a decoder's lanes take, learnt from the lanes that ended.

Admission prices a request at its rounds (admission.py), and a decoder's rounds are its
output's length, unknown until the end token comes. Priced at the source's length plus the
end step, a model whose outputs are much shorter than its inputs (a date read from a
sentence: ten tokens from twenty-odd characters) was priced at twice its work and refused
near capacity; one whose outputs run longer (a translation into a wordier language) was
priced low and dropped late.

So each decoder fits a straight line, steps = a + b x (source length + 1), to its greedy
lanes' ends, with old lanes' weight decaying (DECAY per lane): one that emits the same
length whatever it reads gets b = 0, one that copies its input b = 1. Contracts:
- until MIN_LANES lanes ended, the price is the source's length plus the end step (the
  engine's price before any lane ended);
- a price is never below 1 step nor above the decode spec's limit at that length plus the
  end step (`limit`), and rounds up;
- lanes that stopped at the limit count at the limit: the line then learns the cap too.
"""

from __future__ import annotations

import math

DECAY = 0.995  # a lane's weight after 140 more lanes: about half
MIN_LANES = 32


class OutputLength:
    """One decoder's steps per lane against its source length (see the module docstring)."""

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # decayed sums over ended lanes
        self.lanes = 0

    def observe(self, source_length: int, steps: int) -> None:
        """A greedy lane with a memory of `source_length` positions ended after `steps` steps."""
        x, y, d = source_length + 1.0, float(steps), DECAY
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self.lanes += 1

    def steps(self, source_length: int, limit: int) -> int:
        """Steps to price a lane of `source_length` at, at most `limit`."""
        x = source_length + 1.0
        if self.lanes < MIN_LANES:
            estimate = x
        else:
            mean_x, mean_y = self._x / self._w, self._y / self._w
            var = self._xx / self._w - mean_x * mean_x
            # lanes of (almost) one source length leave the slope unknown: price at their mean
            slope = (self._xy / self._w - mean_x * mean_y) / var if var > 1e-6 * mean_x * mean_x else 0.0
            estimate = mean_y + slope * (x - mean_x)
        return max(1, min(limit, math.ceil(estimate - 1e-9)))
