"""How many OpenMP threads the next kernel call gets: all of the executor's, or one, whichever
its recent calls of the same kind ran faster with.

Why: a parallel region ends when its slowest thread does. On a machine whose cores are all
busy (a load generator, the frontends, another tenant), one of the kernel's threads is often
descheduled, and every step waits for it: a step of a few tens of microseconds then takes
milliseconds, and the engine's throughput falls to a fraction of what one thread alone does.
On an idle machine the team is faster. Neither can be known ahead, and it changes while the
server runs, so the executor measures both and keeps the faster (docs/performance.md,
"Kernel threads under contention").

`TeamGovernor` is the rule alone, on an injected clock and given timings: the executor asks
`choose(key)` before a call and reports `observe(key, team, seconds, steps)` after it. A key is
a kind of call whose time per step is comparable (cell type, batched or lone, batch size
rounded up to a power of two). Each team size's time per step is a moving average of its
recent calls; the faster is used, and the other is tried again once its estimate is older
than `explore_after_s` (the retry's time replaces the stale estimate), so the choice follows
the machine within a fraction of a second and costs at most one slower call per key in that
time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable


@dataclass
class _Estimate:
    per_step_s: float = 0.0
    samples: int = 0
    seen: float = float("-inf")  # clock time of the last sample


@dataclass
class TeamGovernor:
    """Chooses between `full` threads and one for each kind of call. `full` < 2: always `full`.

    The first call after the team size changed is not measured: it pays for waking threads
    that slept (or for a team that just shrank), which says nothing about the size itself, and
    would bias every retry against the team. A retry lasts until one call was measured."""

    full: int
    explore_after_s: float = 0.25
    alpha: float = 0.3  # weight of a new sample in the moving average
    clock: Callable[[], float] = time.perf_counter
    _estimates: dict[Hashable, dict[int, _Estimate]] = field(default_factory=dict, repr=False)
    _retrying: dict[Hashable, int] = field(default_factory=dict, repr=False)
    _last_team: int = 0  # the team size of the last call (0: none yet: the first call is measured)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.full, 1) if self.full > 1 else (max(self.full, 1),)

    def choose(self, key: Hashable) -> int:
        sizes = self.sizes
        if len(sizes) == 1:
            return sizes[0]
        est = self._estimates.get(key)
        if est is None:
            est = self._estimates[key] = {n: _Estimate() for n in sizes}
        for n in sizes:  # each team size measured once before any comparison
            if est[n].samples == 0:
                return n
        retry = self._retrying.get(key)
        if retry is not None:
            return retry
        best = min(sizes, key=lambda n: est[n].per_step_s)
        other = sizes[1] if best == sizes[0] else sizes[0]
        if self.clock() - est[other].seen > self.explore_after_s:
            self._retrying[key] = other
            return other
        return best

    def observe(self, key: Hashable, team: int, seconds: float, steps: int) -> None:
        switched = self._last_team not in (0, team)
        self._last_team = team
        est = self._estimates.get(key)
        if switched or est is None or team not in est or steps <= 0:
            return
        e, now = est[team], self.clock()
        per_step = seconds / steps
        # a stale estimate is replaced, not averaged: the machine it measured may be gone
        fresh = e.samples > 0 and now - e.seen <= self.explore_after_s
        e.per_step_s = e.per_step_s + self.alpha * (per_step - e.per_step_s) if fresh else per_step
        e.samples += 1
        e.seen = now
        if self._retrying.get(key) == team:
            del self._retrying[key]

    def preferred(self, key: Hashable) -> int | None:
        """The team size now believed faster for `key` (None before both were measured)."""
        est = self._estimates.get(key)
        if est is None or any(e.samples == 0 for e in est.values()):
            return None
        return min(est, key=lambda n: est[n].per_step_s)


def call_key(cell_type: str, lone: bool, size: int) -> tuple[str, bool, int]:
    """The kind of a kernel call: batch sizes rounded up to a power of two share an estimate."""
    return cell_type, lone, 1 << max(size - 1, 0).bit_length()
