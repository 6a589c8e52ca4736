"""Engines in processes of their own, pinned to their cores (cluster/core_workers.py): the
processes run for real (slow); a repin moves every thread of the worker; a worker that
cannot load its model says so by name."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cellserve.bench.engine_runner import Stream
from cellserve.bench.traces import TraceRequest
from cellserve.cluster.core_workers import CoreWorker, CoreWorkerError, WorkerSpec

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("kw, says", [
    ({"models": ()}, "serves no model"),
    ({"cores": ()}, "distinct core numbers"),
    ({"cores": (0, 0)}, "distinct core numbers"),
])
def test_bad_specs_are_refused(kw, says):
    with pytest.raises(ValueError, match=says):
        WorkerSpec(**{"name": "w", "models": ("gru-256",), "cores": (0,), **kw})


def _threads_cores(pid: int) -> set[str]:
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            out |= {line.split(":")[1].strip() for line in f if line.startswith("Cpus_allowed_list")}
    return out


def _stream(n: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    trace = [TraceRequest(i, i * 0.01, rng.integers(0, 100, size=int(rng.integers(1, 30)), dtype=np.int64))
             for i in range(n)]
    return Stream("gru-256", "tokens", trace, None)


@pytest.mark.slow
@pytest.mark.skipif(len(CORES) < 2, reason="two workers on two cores")
def test_two_workers_serve_at_once_and_a_repin_moves_every_thread():
    first, last = CORES[0], CORES[-1]
    workers = [CoreWorker(WorkerSpec("a", ("gru-256",), (first,))), CoreWorker(WorkerSpec("b", ("gru-256",), (last,)))]
    try:
        assert _threads_cores(workers[0].pid) == {str(first)}
        assert _threads_cores(workers[1].pid) == {str(last)}
        assert all(w.capacity("gru-256", seed=1, n=20) > 0 for w in workers)
        workers[0].repin((last,))  # applied between two steps: at the replay's first
        streams = [_stream(40, 1), _stream(30, 2)]
        start = time.perf_counter() + 0.2  # the workers' common start: a real clock, as real processes share
        for w, s in zip(workers, streams):
            w.start_replay([s], start)
        results = [w.replay_result() for w in workers]
        for s, r in zip(streams, results):
            (outcomes,) = r["outcomes"]
            assert [o.request_id for o in outcomes] == [t.request_id for t in s.trace]  # each answered once
            assert all(o.status == "ok" for o in outcomes), [o.reason for o in outcomes if o.status != "ok"]
        assert [r["repins"] for r in results] == [1, 0]
        assert workers[0].cores == (last,)
        assert _threads_cores(workers[0].pid) == {str(last)}  # the engine's thread, its team and the rest
    finally:
        for w in workers:
            w.close()
    assert not any(w.process.is_alive() for w in workers)


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_model_names_it():
    with pytest.raises(CoreWorkerError, match="worker 'x'.*no-such-model"):
        CoreWorker(WorkerSpec("x", ("no-such-model",), (CORES[0],)))
