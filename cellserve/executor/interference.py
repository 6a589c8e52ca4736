"""How much of an executor's cores other processes take: interference, measured online.

Read from the kernel's accounting, not from our own step times: a step's slowdown tells how
much the version running now suffers, not how much another would (one thread barely notices a
neighbour that stalls two), so after a switch it could no longer see the neighbour leave.
The meter reads, per sample, the busy time of the executor's cores (/proc/stat: everything
but idle and iowait, so also the time a hypervisor stole) and this process's own CPU time
(/proc/self/stat; our threads spinning at a barrier count as ours), and calls the difference
*others' load*, in cores: 0.5 means other processes (or the hypervisor) held half a core on
average. Threads of this process that ran on other cores are subtracted too, so the figure
errs low where the process has threads beyond the executor's cores.

Sampled lazily (at most every `period_s`, when asked) and smoothed; the tick of /proc is
1/100 s, so a sample spans many. Where /proc cannot be read the level is 0 (no switching).

`CoreLoadMeter` measures the same per core, for several processes of ours at once (the engine
processes of a core allocation, cluster/core_allocation.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PERIOD_S = 0.25  # seconds between two samples at most
SMOOTHING = 0.5  # weight of a new sample in the smoothed level


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks since boot: busy and total of the cores read, and this process's CPU time."""

    busy: int
    total: int
    own: int


def read_cpu_times(cores: Iterable[int]) -> CpuTimes | None:
    """Ticks of `cores` (from /proc/stat) and of this process (from /proc/self/stat); None
    where they cannot be read."""
    ticks, own = read_core_ticks(cores), read_process_ticks("self")
    if ticks is None or own is None:
        return None
    total = sum(t for _, t in ticks.values())
    return CpuTimes(sum(b for b, _ in ticks.values()), total, own) if total else None


def others_load(before: CpuTimes, after: CpuTimes, cores: int) -> float:
    """Cores' worth of time others took between two readings (0 when no tick passed)."""
    elapsed = (after.total - before.total) / cores  # ticks per core
    if elapsed <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(max(others / elapsed, 0.0), float(cores))


class InterferenceMeter:
    """Others' load on `cores`, smoothed (see the module). `read` and `now` are injected for
    tests; by default /proc and the monotonic clock."""

    def __init__(self, cores: Iterable[int], period_s: float = PERIOD_S, smoothing: float = SMOOTHING,
                 read: Callable[[tuple[int, ...]], CpuTimes | None] = read_cpu_times,
                 now: Callable[[], float] = time.monotonic):
        self.cores = tuple(sorted(cores))
        if not self.cores:
            raise ValueError("an interference meter needs at least one core")
        if not period_s > 0 or not 0 < smoothing <= 1:
            raise ValueError(f"period_s must be > 0 and smoothing in (0, 1], got {period_s}, {smoothing}")
        self.period_s, self.smoothing = period_s, smoothing
        self._read, self._now = read, now
        self._last = read(self.cores)
        self._at = now()
        self.level = 0.0  # smoothed others' load, in cores
        self.samples = 0

    @classmethod
    def for_this_process(cls, cores: Iterable[int] | None = None, **kw) -> "InterferenceMeter":
        return cls(os.sched_getaffinity(0) if cores is None else cores, **kw)

    def read(self) -> float:
        """The smoothed level, after taking a sample if `period_s` passed since the last."""
        now = self._now()
        if now - self._at < self.period_s:
            return self.level
        times = self._read(self.cores)
        if times is not None and self._last is not None:
            sample = others_load(self._last, times, len(self.cores))
            self.level = sample if self.samples == 0 else self.level + self.smoothing * (sample - self.level)
            self.samples += 1
        self._last, self._at = times, now
        return self.level


def read_core_ticks(cores: Iterable[int]) -> dict[int, tuple[int, int]] | None:
    """Per core, (busy, total) clock ticks since boot from /proc/stat; None where unreadable."""
    wanted = {f"cpu{c}": c for c in cores}
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in wanted:
                    ticks = [int(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
                    out[wanted[name]] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    except (OSError, ValueError):
        return None
    return out if len(out) == len(wanted) else None


def read_process_ticks(pid: int | str) -> int | None:
    """A process's CPU time (all its threads, user and system) in clock ticks ("self": this
    process's); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


class CoreLoadMeter:
    """Per core, the load other processes put on it, for several processes of ours at once
    (the engine processes of a core allocation, each pinned to its cores): a core's busy time
    less our processes' time on it, each process's time spread evenly over the cores it is
    pinned to (its kernel threads are one per core). Smoothed as InterferenceMeter is; readers
    injected for tests."""

    def __init__(self, cores: Iterable[int], smoothing: float = SMOOTHING,
                 read_cores: Callable[[tuple[int, ...]], dict | None] = read_core_ticks,
                 read_process: Callable[[int], int | None] = read_process_ticks):
        self.cores = tuple(sorted(cores))
        if not self.cores:
            raise ValueError("a core load meter needs at least one core")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self._read_cores, self._read_process = read_cores, read_process
        self._last: tuple[dict, dict[int, int]] | None = None
        self.level = {c: 0.0 for c in self.cores}
        self.used: dict[int, float] = {}  # per process of ours, the cores' worth of CPU it used (smoothed)
        self.samples = 0

    def sample(self, ours: dict[int, tuple[int, ...]]) -> dict[int, float]:
        """Take a sample; `ours`: our processes' pids and the cores each was pinned to since
        the last sample. Returns the smoothed others' load per core (0 to 1)."""
        cores = self._read_cores(self.cores)
        own = {pid: self._read_process(pid) for pid in ours}
        last, self._last = self._last, (cores, own)
        if cores is None or last is None or last[0] is None:
            return self.level
        spent = {c: 0.0 for c in self.cores}
        elapsed = sum(cores[c][1] - last[0][c][1] for c in self.cores) / len(self.cores)  # ticks per core
        for pid, pinned in ours.items():
            before, after = last[1].get(pid), own[pid]
            mine = [c for c in pinned if c in spent]
            if before is None or after is None or not mine:
                continue
            for c in mine:
                spent[c] += (after - before) / len(mine)
            if elapsed > 0:
                use = (after - before) / elapsed
                old = self.used.get(pid)
                self.used[pid] = use if old is None else old + self.smoothing * (use - old)
        for c in self.cores:
            busy, total = cores[c][0] - last[0][c][0], cores[c][1] - last[0][c][1]
            sample = min(max((busy - spent[c]) / total, 0.0), 1.0) if total > 0 else 0.0
            self.level[c] = sample if self.samples == 0 else self.level[c] + self.smoothing * (sample - self.level[c])
        self.samples += 1
        return self.level
