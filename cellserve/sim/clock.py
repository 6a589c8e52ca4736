"""Virtual time: a clock that moves only when told to."""

from __future__ import annotations


class VirtualClock:
    """The engine's clock in a simulation. `now()` reads it; the simulated executor
    `advance`s it by what each call costs; the event loop `move_to`s a time when it hands the
    engine the next event. It never goes backwards."""

    def __init__(self, t: float = 0.0):
        self.t = float(t)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds} s")
        self.t += seconds

    sleep = advance

    def move_to(self, t: float) -> None:
        """Jump forward to `t` (no-op when the clock is already past it)."""
        if t > self.t:
            self.t = t
