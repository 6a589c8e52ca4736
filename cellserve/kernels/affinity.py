"""Pin the CPU kernels' OpenMP threads, one per core.

Why: torch's OpenMP (libgomp) workers spin a while after each parallel region, then sleep.
After an idle spell the kernel's scheduler may wake a sleeping worker on the very core of
the thread that woke it; that thread then spins at the region's barrier waiting for a
worker that cannot run until the spin gives up. Measured on this project's 2-vCPU VM, a
[25, 512] x [512, 2048] GEMM on 2 threads took 0.27 ms back to back but 7.5 ms after a
100 ms pause; with the threads pinned to distinct cores, 0.68 ms. Light load is exactly a
series of such pauses.

How: libgomp's own entry point GOMP_parallel runs a callback on every thread of the
calling thread's team (the same pool torch's parallel regions use), and each thread pins
itself. Only when the threads match the cores the process may use; OMP_PROC_BIND,
OMP_PLACES or GOMP_CPU_AFFINITY, when set, mean the user placed the threads: then nothing
is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

_USER_PLACEMENT = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


@functools.cache
def _torch_libgomp() -> ctypes.CDLL | None:
    """torch's own libgomp (already loaded with torch), or None if torch uses another OpenMP."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return ctypes.CDLL(str(found[0])) if found else None


def pin_openmp_threads() -> list[int] | None:
    """Pin the calling thread (the OpenMP master, which runs the kernels) and its team's
    workers to one core each; returns those cores, or None when nothing was pinned: one
    thread, a thread count other than the cores this process may use, no libgomp, or
    placement set by the user. (A process with fewer threads than its cores shares them with
    others, and pinning each such process to the same first cores would stack them; give
    each its own cores with taskset and --threads to match.)

    Call it from the thread that runs the kernels, after the threads that should float
    (front ends) were started: threads started later from this one inherit its one core."""
    threads = torch.get_num_threads()
    cores = sorted(os.sched_getaffinity(0))
    if threads < 2 or len(cores) != threads or any(v in os.environ for v in _USER_PLACEMENT):
        return None
    libgomp = _torch_libgomp()
    if libgomp is None:
        return None
    pinned: dict[int, int] = {}

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def pin(_unused):
        i = libgomp.omp_get_thread_num()
        try:
            os.sched_setaffinity(0, {cores[i]})
        except OSError:  # refused (a container's policy, say): this thread stays where it was
            return
        pinned[i] = cores[i]

    libgomp.GOMP_parallel(pin, None, threads, 0)
    return [pinned[i] for i in sorted(pinned)]


@contextlib.contextmanager
def openmp_threads_pinned(enabled: bool = True) -> Iterator[list[int] | None]:
    """Pin as pin_openmp_threads does (when `enabled`) for the duration of the block, then give
    the calling thread back the cores it had; yields the pinned cores, or None."""
    cores = os.sched_getaffinity(0)
    pinned = pin_openmp_threads() if enabled else None
    try:
        yield pinned
    finally:
        if pinned:
            os.sched_setaffinity(0, cores)
