"""Where the engine reads time: an injected clock, so that tests and the simulator drive it.

Contract: `now()` returns seconds as a float that never decreases. The engine, the server core
and the sequence store read time only through a clock; `sleep`-like waits are not the clock's
job (a real loop waits on events, the simulator advances virtual time).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    def now(self) -> float:
        return time.perf_counter()
