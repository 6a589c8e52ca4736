"""Kernel versions chosen by interference (Veltair), for the fused CPU step.

`VersionChooser` is the policy, plain Python. A version (plan/versions.py: openmp-N, elastic-N)
is how the executor's one stepping thread runs its steps, so one is in force for all the
profiled cell types at a time (a team switched between every two steps would pay for waking
its workers each time). Each period it prices the steps of the recent past (cell type, batch
size, whether the step came after a pause; older periods weigh half as much) under every
version from the profiles at the interference level measured now, and moves to the cheapest
if it is predicted SWITCH_GAIN cheaper than the version in force: hysteresis against noise in
the profile and in the meter.

`ThreadSwitch` applies a version to the calling thread (the master that runs the steps): its
OpenMP team size, whether its steps run on its elastic team (started the first time one is
asked for), and where it runs. All threads: the master on the core it was pinned to. Fewer:
the master floats over the executor's cores, so that the OS puts the lone thread where the
other process is not (pinned, it may sit on that process's core).

Cell types without a profile (a decoder's, whose torch ops may round differently on another
thread count) always step on the engine's own version, OpenMP's team of all threads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

from cellserve.executor.interference import InterferenceMeter
from cellserve.kernels import affinity
from cellserve.kernels.cell import _pointwise
from cellserve.plan.versions import VersionProfile, parse_version, profiles_model, version_name

PERIOD_S = 0.25  # seconds between two choices at most
# Others' load under this many cores is taken for none: the meter's tick is 1/100 s per core, and
# the machine's own daemons and a hypervisor's steal read as a few hundredths of a core; a
# version chosen on that noise cost the bench's runs without a neighbour a few percent
NOISE_FLOOR = 0.1
SWITCH_GAIN = 0.1  # another version must be predicted this share cheaper to replace the one in force
DECAY = 0.5  # weight of the steps of the period before, at each new period
# A step that starts this long after the executor's last one ended is priced as after a pause
# (plan/versions.py; profile-versions times steady steps 0.1 ms apart, paused ones 1 ms apart)
PAUSE_S = 0.0005
# An elastic team's workers spin this long for the next step, then sleep: short, so that a
# worker on a core another process wants is mostly asleep and rarely preempted mid-panel
# (which the master would wait for); OpenMP's spin far longer (docs/tenancy.md).
ELASTIC_SPIN_US = 100.0


def profiled_as(cell_type: str, profiles: list[VersionProfile]) -> tuple[VersionProfile, str] | None:
    """The profile of a served cell type and its name there, or None. A profile names cell
    types as its model was profiled ("lstm-512/stack0"); a server serves that model as
    "lstm-512:1", and a reload of it as "lstm-512:1#2": the same cell types."""
    served, slash, rest = cell_type.partition("/")
    for p in profiles:
        if profiles_model(p.model, served):
            key = p.model + slash + rest
            if key in p.step_s:
                return p, key
    return None


class VersionChooser:
    """The version (openmp-N or elastic-N) in force for the profiled cell types; see the module."""

    def __init__(self, profiles: list[VersionProfile], level: Callable[[], float], all_threads: int,
                 now: Callable[[], float] = time.monotonic, period_s: float = PERIOD_S):
        self.profiles = list(profiles)
        self.default = version_name("openmp", all_threads)  # the engine's without versions
        if any(self.default not in p.versions for p in self.profiles):
            raise ValueError(f"every kernel-versions profile must time {self.default}, the engine's own version")
        common = set.intersection(*(set(p.versions) for p in self.profiles)) if self.profiles else {self.default}
        self.versions = tuple(sorted(common))
        self._level, self._now, self.period_s = level, now, period_s
        self.version = self.default
        self._known: dict[str, tuple[VersionProfile, str] | None] = {}
        self._mix: dict[tuple[str, int, bool], float] = {}  # (cell type, batch, paused) -> weighted steps
        self._chose_at = now()

    def knows(self, cell_type: str) -> bool:
        found = self._known.get(cell_type, False)
        if found is False:
            found = self._known[cell_type] = profiled_as(cell_type, self.profiles)
        return found is not None

    def step(self, cell_type: str, batch: int, paused: bool, now: float | None = None) -> str:
        """The version for a step of `batch` lanes of a profiled cell type (`knows` it), which
        starts after a pause or not (at `now` on the chooser's clock; None: read it); the step
        is counted in the mix the next choice prices."""
        key = (cell_type, batch, paused)
        mix = self._mix
        if key in mix:
            mix[key] += 1.0
        elif self.knows(cell_type):
            mix[key] = 1.0
        else:
            raise ValueError(f"cell type {cell_type!r} is in no kernel-versions profile")
        if (self._now() if now is None else now) - self._chose_at >= self.period_s:
            self._choose()
        return self.version

    def predicted_s(self, version: str, level: float) -> float:
        """Seconds the recent mix of steps would take on `version` (one every profile has) at `level`."""
        total = 0.0
        for (cell_type, batch, paused), n in self._mix.items():
            p, name = self._known[cell_type]
            total += n * p.predict(name, version, batch, level, paused)
        return total

    def _choose(self) -> None:
        self._chose_at = self._now()
        level = self._level()
        level = level if level >= NOISE_FLOOR else 0.0
        if self._mix:
            cost = {v: self.predicted_s(v, level) for v in self.versions}
            best = min(cost, key=lambda v: (cost[v], v != self.default))  # ties: the engine's own
            if cost[best] < (1 - SWITCH_GAIN) * cost[self.version]:
                self.version = best
        self._mix = {k: n * DECAY for k, n in self._mix.items() if n * DECAY >= 0.5}


class ThreadSwitch:
    """Sets the calling thread's OpenMP team size and placement for a version (see the module).
    Built on the thread that runs the steps, after its threads were pinned (or not)."""

    def __init__(self, all_threads: int, cores: tuple[int, ...]):
        self.all_threads = all_threads
        self.cores = cores
        here = os.sched_getaffinity(0)
        self._home = set(here) if len(here) == 1 else None  # the core the master was pinned to
        self.version = version_name("openmp", all_threads)
        self._team = 0  # threads of this thread's elastic team (0: none started)

    def use(self, version: str) -> None:
        if version == self.version:
            return
        kind, threads = parse_version(version)
        if kind == "elastic" and self._team != threads:
            self._start_team(threads)
        affinity.set_team_size(threads if kind == "openmp" else self.all_threads)
        _pointwise.elastic_use(kind == "elastic")
        if self._home is not None:
            try:
                os.sched_setaffinity(0, self._home if threads == self.all_threads else set(self.cores))
            except OSError:  # refused (a container's policy): the team size alone changes
                pass
        self.version = version

    def _start_team(self, threads: int) -> None:
        """This thread's elastic team: the master on its home core, workers pinned to the
        others (unpinned where the master is not pinned)."""
        if self._home is None:
            cores = [-1] * threads
        else:
            home = next(iter(self._home))
            cores = [home] + [c for c in self.cores if c != home][:threads - 1]
        self._team = _pointwise.elastic_team(cores, ELASTIC_SPIN_US)

    def close(self) -> None:
        """Back to the engine's own version, the elastic team's workers stopped."""
        self.use(version_name("openmp", self.all_threads))
        if self._team:
            _pointwise.elastic_team(None)
            self._team = 0


class KernelVersions:
    """Versions for one executor's steps: the chooser, the meter it reads and the switch it
    works, and what they did (the metrics'). `prepare` before each step and `ended` after it,
    on the stepping thread; `reset` when that thread's pinning changes (it hands the master
    back all threads)."""

    def __init__(self, profiles: list[VersionProfile], cores: tuple[int, ...], meter: InterferenceMeter | None = None,
                 period_s: float = PERIOD_S):
        self.cores = cores
        self.meter = meter or InterferenceMeter(cores)
        # the chooser keeps time by the steps' perf_counter readings (prepare's `now`)
        self.chooser = VersionChooser(profiles, self.meter.read, len(cores), now=time.perf_counter, period_s=period_s)
        self._switch: ThreadSwitch | None = None
        self._thread = 0
        self.steps: dict[tuple[str, str], int] = {}  # (cell type, version) -> steps run
        self.switches = 0
        self.last_end = -math.inf  # time.perf_counter() when the executor's last step ended

    def prepare(self, cell_type: str, batch: int, now: float) -> str:
        """Set the calling thread up for one step of `batch` lanes of `cell_type` starting at
        `now` (time.perf_counter()); its version. On every step: kept to a few dict lookups."""
        switch = self._switch
        if switch is None or self._thread != threading.get_ident():
            self.reset()
            switch = self._switch = ThreadSwitch(len(self.cores), self.cores)
            self._thread = threading.get_ident()
        chooser = self.chooser
        if chooser.knows(cell_type):
            version = chooser.step(cell_type, batch, now - self.last_end > PAUSE_S, now)
        else:
            version = chooser.default
        if version != switch.version:
            switch.use(version)
            self.switches += 1
        key = (cell_type, version)
        steps = self.steps
        steps[key] = steps.get(key, 0) + 1
        return version

    def ended(self, now: float) -> None:
        self.last_end = now

    def reset(self) -> None:
        if self._switch is not None and self._thread == threading.get_ident():
            self._switch.close()
        self._switch = None
