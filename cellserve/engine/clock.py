"""Where the engine reads time: an injected clock, so that tests and the simulator drive it.

Contract: `now()` returns seconds as a float that never decreases; `sleep(s)` lets s seconds
of the clock's time pass. The engine, the server core and the sequence store read time only
through a clock (a server's worker loop still waits on events for wake-ups).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, never decreasing."""

    def sleep(self, seconds: float) -> None:
        """Let `seconds` of this clock's time pass (a virtual clock just moves on)."""


class MonotonicClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
