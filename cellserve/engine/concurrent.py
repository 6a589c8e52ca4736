"""The engine's loop when several executors run at once (a partition: a bidirectional layer's
two directions on two core groups, an encoder and its decoder apart).

The step stays schedule -> execute -> update, per executor: the loop admits arrivals, hands
each idle executor a batch of the cell types placed on it (cellular batching per executor:
`policy.next_batch(now, only=its cell types)`), and takes back each finished batch from the
completion queue, advancing its lanes and the requests they finish.

Threads: the first executor (`Engine._default`, which runs what the placement leaves
unnamed) runs on this thread, which pins itself to that executor's cores and leads its
OpenMP team; every other executor runs on a worker thread of its own (executor/workers.py).
So two single-core executors use two threads, not three, and the first executor's batches
pay no hand-off. Its batch runs last in a round, after the workers got theirs; a lone-lane
run there stops after its step in progress when a worker's batch comes back or a request
arrives (the engine's `_arrived` flag, which the workers raise too), so the workers are not
left idle behind it.

Invariant (no kernel is changed under a running step): every executor call but `execute`
runs on this thread while that executor has no batch in flight (the first executor's batches
run on this thread, so it never has one in flight between calls). A lane to start, or to free,
on a busy executor waits in the executor's deferred list, run as soon as its batch comes
back and before it gets the next one; the worker's stop flag is raised, so a lone lane's run
gives way after the step in progress. A request whose lanes wait counts them (`_Run.waiting`):
its recurrent step is done only when none is running and none is waiting.

Tensors crossing executors: a tensor computed on one executor and read on another (a
direction's output read by the plain ops placed elsewhere, a plain op's output read by a lane
on another executor) is counted once per request, reading executor and tensor, with its bytes
(`EngineStats.transfers`). The executors here share the host's memory, so the count measures
what a partition moves, not a copy made. The request's inputs and the model's constants live
on the host and are not counted.

Cost model: a round takes as long as its busiest executor (`CostModel.group_of`), and the
per-step overhead is learnt per batch from the time between handing it out and taking it
back, beyond the cost model's price of its steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from queue import Empty, SimpleQueue

import numpy as np

from cellserve.engine.runs import _Work

log = logging.getLogger(__name__)


class ConcurrentSteps:
    """Mixed into Engine (engine.py): the methods of the concurrent loop and its helpers."""

    def _init_concurrency(self, concurrent: bool | None) -> None:
        executors = list(self.executors.values())
        able = all(ex.concurrent for ex in executors)
        if concurrent is None:
            concurrent = len(executors) > 1 and able
        if concurrent and not able:
            raise ValueError("executors " + ", ".join(sorted(ex.name for ex in executors if not ex.concurrent))
                             + " cannot run at once with others (concurrent=True)")
        self._concurrent = bool(concurrent)
        self._busy: set = set()  # executors with a batch in flight (always empty with one loop)
        self._deferred: dict = {}  # executor -> calls waiting for its batch to come back
        self._workers: dict = {}  # executor -> ExecutorWorker, started on the first step
        self._stop_flags: list[np.ndarray] = []  # the workers' flags, raised by submit
        self._done: SimpleQueue = SimpleQueue()
        self._types_on: dict = {}  # executor -> frozenset of its cell types
        for cell_type, ex in self._placed.items():
            self._types_on.setdefault(ex, set()).add(cell_type)
        self._types_on = {ex: frozenset(types) for ex, types in self._types_on.items()}
        if self._concurrent:
            index = {ex: i for i, ex in enumerate(self._types_on)}
            self.costs.group_of = {t: index[ex] for t, ex in self._placed.items()}

    # ---- helpers the engine's request walk calls (walk.py) ----

    def _defer(self, executor, fn, *args) -> None:
        """Call fn(*args) once `executor`'s batch in flight is back (see the module docstring)."""
        self._deferred.setdefault(executor, []).append((fn, args))
        self._workers[executor].stop[0] = 1  # a lone run gives way after its step in progress

    def _defer_start(self, run, executor, start, *args) -> None:
        run.waiting += 1
        self._defer(executor, self._start_deferred, run, start, args)

    def _start_deferred(self, run, start, args) -> None:
        run.waiting -= 1
        if run.responded:
            return
        try:
            start(run, *args)
        except Exception as exc:  # noqa: BLE001 - this request only
            self._finish_run(run, self._error_status(exc), self._error_text(exc))

    def _run_deferred(self, executor) -> None:
        calls = self._deferred.pop(executor, None)
        if calls:
            for fn, args in calls:
                fn(*args)

    def _note_reads(self, run, executor, names) -> None:
        """Count the tensors `names` that `executor` reads from other executors (once per
        request, tensor and reader)."""
        for name in names:
            producers = run.producers.get(name)
            if not producers or (name, executor) in run.moved:
                continue
            others = [p for p in producers if p is not executor]
            if not others:
                continue
            run.moved.add((name, executor))
            value = run.env.get(name)
            share = (getattr(value, "nbytes", 0) or 0) // len(producers)
            for p in others:
                counts = self.stats.transfers.setdefault((p.name, executor.name), [0, 0])
                counts[0] += 1
                counts[1] += share

    def _step_executors(self, run) -> tuple:
        """The executors of the cell types of the request's current recurrent step."""
        return tuple(dict.fromkeys(self._placed[t] for t in self._layer_types[run.model.name][run.layer]))

    # ---- the loop ----

    def _start_workers(self) -> None:
        """A worker thread for every executor but the first (which runs on this thread)."""
        if self._workers:
            return
        from cellserve.executor.workers import ExecutorWorker

        for ex in self.executors.values():
            if ex is self._default:
                continue
            worker = ExecutorWorker(ex, self._done, self._wake, self.config.pin_threads, self._arrived)
            worker.start()
            if worker.pinned:
                log.info("kernel threads of executor %s pinned to cores %s", ex.name, worker.pinned)
            self._workers[ex] = worker
        self._stop_flags = [w.stop for w in self._workers.values()]

    def close(self) -> None:
        """Take back the batches in flight and stop the executors' threads (a later step
        starts them again)."""
        while self._busy:
            self._wake.wait(0.05)
            self._wake.clear()
            self._take_completions()
        for worker in self._workers.values():
            worker.close()
        self._workers, self._stop_flags = {}, []

    def _take_completions(self) -> bool:
        """Update the engine with every batch that came back; each executor's deferred calls
        run before it gets its next batch."""
        took = False
        while True:
            try:
                worker, work, result, error = self._done.get_nowait()
            except Empty:
                return took
            took = True
            executor = worker.executor
            self._busy.discard(executor)
            if error is not None:
                log.error("cell step of %s failed", work.batch.cell_type, exc_info=error)
                self._fail_batch(work.batch, f"internal error in cell {work.batch.cell_type}: "
                                             f"{type(error).__name__}: {error}")
            else:
                self._account(work, result)
                self._batch_back(work, result)
            self._run_deferred(executor)

    def _batch_back(self, work: _Work, result) -> None:
        """Advance a finished batch's lanes and learn the time it took, hand-out to now."""
        self._complete(work, result)
        now = self.clock.now()
        self._learn_overhead(now - work.started, work.batch, result.steps, now=now)

    def _dispatch(self, now: float) -> bool:
        """Hand each idle worker its next batch, then run the first executor's on this thread;
        whether any executor got one."""
        gave = False
        host_work = None
        for executor, types in self._types_on.items():
            if executor in self._busy:
                continue
            batch = self.policy.next_batch(now, types)
            if batch is None:
                continue
            work = _Work(batch, np.array(batch.slots, np.int64), np.array(batch.rows, np.int64),
                         np.array(batch.strides, np.int64), now, 0, 0)
            work.lone_steps = self._lone_steps(batch)
            gave = True
            if executor is self._default:
                host_work = work
                continue
            worker = self._workers[executor]
            worker.stop[0] = 0
            if self._inbox:  # after clearing it: a submit in between sets it again
                worker.stop[0] = 1
            self._busy.add(executor)
            worker.run(work)
        if host_work is not None:
            self._run_host(host_work)
        return gave

    def _run_host(self, work: _Work) -> None:
        """Run a batch of the first executor on this thread, as the single loop runs one
        (`Engine._execute`, its lone runs stopped by `_arrived`), and take it back at once."""
        if not self._done.empty():  # a worker's batch came back since _take_arrivals cleared the flag
            self._arrived[0] = 1
        result = self._execute(work)
        if result is not None:
            self._batch_back(work, result)
        self._run_deferred(self._default)

    def _step_concurrent(self) -> bool:
        """Take back finished batches, admit arrivals, hand out batches. Whether anything
        happened (False: wait for a completion or an arrival)."""
        self._start_workers()
        took = self._take_completions()
        now = self.clock.now()
        self._device_s = 0.0
        arrived = bool(self._inbox)
        self._take_arrivals(now)
        gave = self._dispatch(now)
        return took or arrived or gave

    def _serve_forever_concurrent(self, stop) -> None:
        self._stopping = stop  # as serve_forever's
        with self._host_placed():
            try:
                while not stop.is_set():
                    self._wake.clear()
                    if self._step_concurrent():
                        continue
                    now = self.clock.now()
                    wake = self.policy.wake_at(now)
                    self._wake.wait(timeout=0.05 if wake is None else max(0.0, min(wake - now, 0.05)))
            finally:
                self.close()

    def _run_until_idle_concurrent(self, timeout_s: float) -> None:
        end = self.clock.now() + timeout_s
        with self._host_placed():
            while not self.idle() or self._busy:
                if self.clock.now() > end:
                    raise TimeoutError(f"engine did not drain within {timeout_s} s")
                self._wake.clear()
                if self._step_concurrent():
                    continue
                if self._busy:
                    self._wake.wait(0.05)
                    continue
                self._sleep_until_wake()

    @contextlib.contextmanager
    def _host_placed(self):
        """For the loop's duration, this thread is the first executor's OpenMP master: with a
        core group, a team of one thread per core of the group, pinned there with
        `pin_threads`, and its cores given back after; without one (the CPU executor on every
        core, a CUDA executor), the team this thread already has."""
        from cellserve.kernels.affinity import openmp_team_size, pin_core_group

        cores = getattr(self._default, "cores", None)
        if not cores:
            yield
            return
        affinity = os.sched_getaffinity(0)
        with openmp_team_size(len(cores)):
            try:
                pinned = pin_core_group(list(cores), self.config.pin_threads)
                if pinned:
                    log.info("kernel threads of executor %s pinned to cores %s", self._default.name, pinned)
                yield
            finally:
                os.sched_setaffinity(0, affinity)

    @staticmethod
    def _error_status(exc: Exception):
        from cellserve.engine.request import Status
        from cellserve.errors import InvalidInput

        return Status.INVALID if isinstance(exc, InvalidInput) else Status.ERROR

    @staticmethod
    def _error_text(exc: Exception) -> str:
        from cellserve.errors import CellserveError

        return str(exc) if isinstance(exc, CellserveError) else f"{type(exc).__name__}: {exc}"

