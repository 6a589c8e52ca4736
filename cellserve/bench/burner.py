"""A process that takes a set share of one core: the interfering neighbour of the kernel-version
profiles and of `bench tenancy` (Veltair's co-located load, made repeatable).

It spins for `duty` of every `period_s` and sleeps the rest, pinned to one core; a duty of 1
spins without pause. A fresh interpreter (not a fork, nor multiprocessing's spawn, which
re-imports the caller's main module), so it shares nothing with the process measuring beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys

PERIOD_S = 0.01

_PROGRAM = """
import os, sys, time
core, duty, period, parent = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
try:
    os.sched_setaffinity(0, {core})
except OSError:
    pass
print("ready", flush=True)
while os.getppid() == parent:  # ends with the process that started it, however that one ended
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duty * period:
        pass
    if duty < 1:
        time.sleep((1 - duty) * period)
"""


class Burner:
    """`with Burner(core, duty):` the neighbour runs for the block (nothing when duty is 0)."""

    def __init__(self, core: int, duty: float, period_s: float = PERIOD_S):
        if not 0 <= duty <= 1:
            raise ValueError(f"a burner's duty is a share of a core, 0 to 1; got {duty}")
        if not period_s > 0:
            raise ValueError(f"a burner's period must be > 0 seconds, got {period_s}")
        self.core, self.duty, self.period_s = core, duty, period_s
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "Burner":
        if self.duty > 0:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _PROGRAM, str(self.core), repr(self.duty), repr(self.period_s), str(os.getpid())],
                stdout=subprocess.PIPE, text=True)
            if self._process.stdout.readline().strip() != "ready":
                self.__exit__()
                raise RuntimeError(f"the burner process for core {self.core} did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process.stdout.close()
            self._process = None
