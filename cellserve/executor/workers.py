"""A worker thread per executor, so that several executors run batches at once.

The engine's loop hands each idle executor but the first (which it runs on its own thread)
one batch at a time (`ExecutorWorker.run`); the worker runs `executor.execute` on its own
thread and posts `(worker, work, result, error)` to the engine's completion queue, raises the
engine thread's stop flag (a lone-lane run there gives way) and sets its wake-up event. The
kernels release the GIL (the C extension and torch), so executors on different core groups
compute at once.

Contract: a worker runs only `execute`, one batch at a time, and only what it is handed; it
never touches the engine. The engine calls the executor's other methods (lane starts and
finishes, plain ops) on its own thread and only while the executor has no batch in flight,
so that no kernel's arenas are changed under a running step (see engine/concurrent.py).

Threads and cores: a worker of an executor with a core group (`executor.cores`) makes itself
an OpenMP master of that many threads and, with pinning on, pins its team one thread per
core of the group (kernels/affinity.py), so each executor computes on its own cores with its
own OpenMP pool (libgomp keeps one per master thread).
"""

from __future__ import annotations

import logging
import threading
from queue import SimpleQueue
from typing import Any

import numpy as np

from cellserve.executor.base import Executor

log = logging.getLogger(__name__)


class ExecutorWorker:
    """One executor's thread. `stop` is the int64 flag its lone-lane runs read between steps:
    the engine sets it when a request arrives or a lane waits to start on this executor."""

    def __init__(self, executor: Executor, done: SimpleQueue, wake: threading.Event, pin: bool = True,
                 host_stop: np.ndarray | None = None):
        self.executor = executor
        self.stop = np.zeros(1, np.int64)
        self.pinned: list[int] | None = None  # the cores its threads were pinned to
        self._done, self._wake, self._pin = done, wake, pin
        self._host_stop = host_stop  # the engine's `_arrived`, raised with each result: its lone run gives way
        self._jobs: SimpleQueue = SimpleQueue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"cellserve-executor-{executor.name}", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until it has placed itself on its cores."""
        self._thread.start()
        self._ready.wait()

    def run(self, work: Any) -> None:
        """Hand it a batch (the engine's _Work: batch, slots, rows, lone_steps)."""
        self._jobs.put(work)

    def close(self) -> None:
        """Stop the thread after what it was handed (the caller waits for those results)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _loop(self) -> None:
        cores = getattr(self.executor, "cores", None)
        try:
            if cores:
                from cellserve.kernels.affinity import pin_core_group

                self.pinned = pin_core_group(list(cores), self._pin)
        except Exception:  # noqa: BLE001 - unpinned threads still compute
            log.exception("placing executor %s on cores %s failed", self.executor.name, cores)
        finally:
            self._ready.set()
        while True:
            work = self._jobs.get()
            if work is None:
                return
            try:
                result = self.executor.execute(work.batch, work.slots, work.rows, work.lone_steps, self.stop)
                error = None
            except Exception as exc:  # noqa: BLE001 - the engine fails this batch's requests
                result, error = None, exc
            self._done.put((self, work, result, error))
            if self._host_stop is not None:
                self._host_stop[0] = 1
            self._wake.set()
