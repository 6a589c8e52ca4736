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


def _set_team_size(libgomp: ctypes.CDLL | None, n: int) -> None:
    """The calling thread's OpenMP team size (its own ICV: other threads keep theirs). Torch's
    CPU ops, oneDNN and the C kernels' parallel regions all read it from the calling thread."""
    if libgomp is not None:
        libgomp.omp_set_num_threads(ctypes.c_int(n))


def pin_core_group(cores: list[int], pin: bool = True) -> list[int] | None:
    """Make the calling thread an OpenMP master of len(cores) threads (its team: itself and
    len(cores) - 1 workers) and, with `pin`, pin thread i of the team to cores[i]; returns
    the cores pinned, or None when nothing was pinned (pin off, no libgomp for a team of
    several, or the user placed the threads: OMP_PROC_BIND, OMP_PLACES, GOMP_CPU_AFFINITY).

    For an executor of a core group (executor/workers.py): each executor's worker thread
    calls this once, so that two executors on two core groups each run their kernels on their
    own cores, with their own OpenMP pool (libgomp keeps one per master thread)."""
    if not cores:
        raise ValueError("a core group needs at least one core")
    libgomp = _torch_libgomp()
    _set_team_size(libgomp, len(cores))
    if not pin or any(v in os.environ for v in _USER_PLACEMENT):
        return None
    if len(cores) == 1:  # no team to start: the thread pins itself
        try:
            os.sched_setaffinity(0, {cores[0]})
        except OSError:
            return None
        return list(cores)
    if libgomp is None:
        return None
    pinned: dict[int, int] = {}

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def pin_one(_unused):
        i = libgomp.omp_get_thread_num()
        try:
            os.sched_setaffinity(0, {cores[i]})
        except OSError:
            return
        pinned[i] = cores[i]

    libgomp.GOMP_parallel(pin_one, None, len(cores), 0)
    return [pinned[i] for i in sorted(pinned)]


@contextlib.contextmanager
def openmp_team_size(n: int) -> Iterator[None]:
    """The calling thread's OpenMP team size is `n` for the block, then what it was.

    Why: with several executors the engine's own thread leads the first executor's team (the
    size of its core group, engine/concurrent.py), not a team of one thread per core whose
    workers would spin after each region on the cores the other executors' threads run on."""
    libgomp = _torch_libgomp()
    before = torch.get_num_threads()
    _set_team_size(libgomp, n)
    try:
        yield
    finally:
        _set_team_size(libgomp, before)


def set_team_size(n: int) -> None:
    """The calling thread's OpenMP team size (see _set_team_size); torch's setting where torch
    uses another OpenMP than libgomp."""
    libgomp = _torch_libgomp()
    if libgomp is None:
        torch.set_num_threads(n)
    else:
        _set_team_size(libgomp, n)
