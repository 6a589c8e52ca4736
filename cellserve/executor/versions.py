"""Kernel versions chosen by interference (Veltair), for the fused CPU step.

`VersionChooser` is the policy, plain Python. The executor's steps run on one OpenMP team, so
a version is the team's thread count, one for all the profiled cell types at a time (a team
switched between every two steps would pay for waking its workers each time). Each period it
prices the steps of the recent past (cell type, batch size, whether the step came after a
pause; older periods weigh half as much) under every version from the profiles
(plan/versions.py) at the interference level measured now, and moves to the cheapest if it is
predicted SWITCH_GAIN cheaper than the version in force: hysteresis against noise in the
profile and in the meter.

`ThreadSwitch` applies a version to the calling thread (the OpenMP master that runs the
steps): its team size, and where it runs. All threads: the master back on the core it was
pinned to. Fewer: the master floats over the executor's cores, so that the OS puts the lone
thread where the other process is not (pinned, it may sit on that process's core).

Cell types without a profile (a decoder's, whose torch ops may round differently on another
thread count) always step on all threads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

from cellserve.executor.interference import InterferenceMeter
from cellserve.kernels import affinity
from cellserve.plan.versions import VersionProfile

PERIOD_S = 0.25  # seconds between two choices at most
SWITCH_GAIN = 0.1  # another version must be predicted this share cheaper to replace the one in force
DECAY = 0.5  # weight of the steps of the period before, at each new period
# A step that starts this long after the executor's last one ended is priced as after a pause
# (plan/versions.py): the OpenMP workers spin about this long before they sleep.
PAUSE_S = 0.0005


def profiled_as(cell_type: str, profiles: list[VersionProfile]) -> tuple[VersionProfile, str] | None:
    """The profile of a served cell type and its name there, or None. A profile names cell
    types as its model was profiled ("lstm-512/stack0"); a server serves that model as
    "lstm-512:1", and a reload of it as "lstm-512:1#2": the same cell types."""
    served, slash, rest = cell_type.partition("/")
    for p in profiles:
        if served == p.model or served.startswith((p.model + ":", p.model + "#")):
            key = p.model + slash + rest
            if key in p.step_s:
                return p, key
    return None


class VersionChooser:
    """The version (thread count) in force for the profiled cell types; see the module."""

    def __init__(self, profiles: list[VersionProfile], level: Callable[[], float], all_threads: int,
                 now: Callable[[], float] = time.monotonic, period_s: float = PERIOD_S):
        self.profiles = list(profiles)
        self.versions = tuple(sorted({t for p in self.profiles for t in p.threads if t <= all_threads}
                                     | {all_threads}))
        self._level, self._now, self.period_s = level, now, period_s
        self.threads = all_threads
        self.level = 0.0  # the level of the last choice
        self._known: dict[str, tuple[VersionProfile, str] | None] = {}
        self._mix: dict[tuple[str, int, bool], float] = {}  # (cell type, batch, paused) -> weighted steps
        self._chose_at = now()
        self.choices = 0

    def knows(self, cell_type: str) -> bool:
        found = self._known.get(cell_type, False)
        if found is False:
            found = self._known[cell_type] = profiled_as(cell_type, self.profiles)
        return found is not None

    def step(self, cell_type: str, batch: int, paused: bool) -> int:
        """The version for a step of `batch` lanes of a profiled cell type (`knows` it), which
        starts after a pause or not; the step is counted in the mix the next choice prices."""
        if not self.knows(cell_type):
            raise ValueError(f"cell type {cell_type!r} is in no kernel-versions profile")
        key = (cell_type, batch, paused)
        self._mix[key] = self._mix.get(key, 0.0) + 1.0
        if self._now() - self._chose_at >= self.period_s:
            self._choose()
        return self.threads

    def predicted_s(self, threads: int, level: float) -> float:
        """Seconds the recent mix of steps would take on `threads` threads at `level`."""
        total = 0.0
        for (cell_type, batch, paused), n in self._mix.items():
            p, name = self._known[cell_type]
            t = threads if threads in p.threads else max(x for x in p.threads if x <= threads)
            total += n * p.predict(name, t, batch, level, paused)
        return total

    def _choose(self) -> None:
        self._chose_at = self._now()
        self.level = level = self._level()
        self.choices += 1
        if self._mix:
            cost = {t: self.predicted_s(t, level) for t in self.versions}
            best = min(cost, key=lambda t: (cost[t], -t))  # ties: more threads (as without versions)
            if cost[best] < (1 - SWITCH_GAIN) * cost[self.threads]:
                self.threads = best
        self._mix = {k: n * DECAY for k, n in self._mix.items() if n * DECAY >= 0.5}


class ThreadSwitch:
    """Sets the calling thread's OpenMP team size and placement for a version (see the module).
    Built on the thread that runs the steps, after its threads were pinned (or not)."""

    def __init__(self, all_threads: int, cores: tuple[int, ...]):
        self.all_threads = all_threads
        self.cores = cores
        here = os.sched_getaffinity(0)
        self._home = set(here) if len(here) == 1 else None  # the core the master was pinned to
        self.threads = all_threads

    def use(self, threads: int) -> None:
        if threads == self.threads:
            return
        affinity.set_team_size(threads)
        if self._home is not None:
            try:
                os.sched_setaffinity(0, self._home if threads == self.all_threads else set(self.cores))
            except OSError:  # refused (a container's policy): the team size alone changes
                pass
        self.threads = threads


class KernelVersions:
    """Versions for one executor's steps: the chooser, the meter it reads and the switch it
    works, and what they did (the metrics'). `prepare` before each step and `ended` after it,
    on the stepping thread; `reset` when that thread's pinning changes (it hands the master
    back all threads)."""

    def __init__(self, profiles: list[VersionProfile], cores: tuple[int, ...], meter: InterferenceMeter | None = None,
                 period_s: float = PERIOD_S):
        self.cores = cores
        self.meter = meter or InterferenceMeter(cores)
        self.chooser = VersionChooser(profiles, self.meter.read, len(cores), period_s=period_s)
        self._switch: ThreadSwitch | None = None
        self._thread = 0
        self.steps: dict[tuple[str, int], int] = {}  # (cell type, threads) -> steps run
        self.switches = 0
        self.last_end = -math.inf  # time.perf_counter() when the executor's last step ended

    def prepare(self, cell_type: str, batch: int, now: float) -> int:
        """Set the calling thread up for one step of `batch` lanes of `cell_type` starting at
        `now` (time.perf_counter()); its threads."""
        switch = self._switch
        if switch is None or self._thread != threading.get_ident():
            self.reset()
            switch = self._switch = ThreadSwitch(len(self.cores), self.cores)
            self._thread = threading.get_ident()
        if self.chooser.knows(cell_type):
            threads = self.chooser.step(cell_type, batch, now - self.last_end > PAUSE_S)
        else:
            threads = switch.all_threads
        if threads != switch.threads:
            switch.use(threads)
            self.switches += 1
        key = (cell_type, threads)
        self.steps[key] = self.steps.get(key, 0) + 1
        return threads

    def ended(self, now: float) -> None:
        self.last_end = now

    def reset(self) -> None:
        if self._switch is not None and self._thread == threading.get_ident():
            self._switch.use(self._switch.all_threads)
        self._switch = None
