"""The direct data plane end to end without Ray: two real EngineWorkers (each in a process of
its own, serving gru-256 on its socket), the driver's RayCore calling them through
ray_cluster.socket_call. Killing one worker's process (SIGKILL) with calls in flight on its
socket fails those calls as WorkerDied; each is sent once more, to the other worker, and
every request gets one correct answer. A sequence's chunks stay on the worker holding its
state, over the socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellserve.cluster.data_plane import Connection
from cellserve.cluster.ray_cluster import socket_call
from cellserve.cluster.ray_core import RayCore
from cellserve.cluster.ray_router import Router, WorkerInfo, WorkerState
from cellserve.engine.clock import MonotonicClock
from cellserve.server.core import InferInput
from cellserve.server.errors import DeadlineExceeded, SequenceError
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from zoo_reference import token_reference  # noqa: E402

pytestmark = pytest.mark.slow  # two worker processes load a zoo model each (a few seconds)

WORKER = """
import asyncio, dataclasses, json, sys
from cellserve.cluster.ray_worker import EngineWorker, WorkerSpec
from cellserve.engine.config import EngineConfig

async def main():
    w = EngineWorker(WorkerSpec(sys.argv[1], ("gru-256",), EngineConfig(profile=False), 1))
    address = await w.data_address(None)  # no driver node: TCP
    print(json.dumps({"address": address, "info": dataclasses.asdict(w.info())}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture()
def workers():
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"w{i}"], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        found = []
        for p in procs:
            line = p.stdout.readline()
            assert line, f"worker process exited with {p.wait()}"
            found.append(json.loads(line))
        yield procs, found
    finally:
        for p in procs:
            p.kill()
            p.wait()


def driver(found):
    states = []
    for f in found:
        i = f["info"]
        info = WorkerInfo(i["worker_id"], i["node_id"], tuple(i["models"]), i["cell_types"], i["extra_rounds"],
                          i["max_batch"], i["pid"])
        states.append(WorkerState(info, None))
    conns = {w.id: Connection(f["address"], w.describe()) for w, f in zip(states, found)}

    async def no_ray(worker, call):
        raise AssertionError("nothing here may need Ray's path")
    served = load_zoo(["gru-256"])
    core = RayCore(served, Router(states), socket_call(conns, no_ray), Metrics(None))
    return core, served[0], conns


def test_a_killed_workers_in_flight_socket_calls_are_retried_once_on_the_other(workers):
    procs, found = workers
    core, entry, conns = driver(found)
    x = np.random.default_rng(5).integers(0, 10000, (1, 120))
    want = token_reference("gru-256", x)["probabilities"]

    async def go():
        tasks = [asyncio.ensure_future(core._submit(entry, {"tokens": x}, None, 0, core.clock.now()))
                 for _ in range(40)]
        victim = core.router.workers["w0"]
        while victim.outstanding < 5:  # calls sent on w0's socket, not yet answered
            await asyncio.sleep(0)
        in_flight = victim.outstanding
        os.kill(procs[0].pid, signal.SIGKILL)
        replies = await asyncio.gather(*tasks)
        return in_flight, replies
    in_flight, replies = asyncio.run(go())
    assert len(replies) == 40
    for r in replies:
        assert r.status == "ok"
        np.testing.assert_allclose(r.outputs["probabilities"], want, rtol=1e-4, atol=1e-6)
    assert 1 <= core.retries <= in_flight  # each failed call sent once more (some w0 answered before it died)
    assert not core.router.workers["w0"].alive and core.router.workers["w1"].alive
    assert core.deaths and "worker w0" in core.deaths[0] and "at 1" in core.deaths[0]  # lost at its address
    assert conns["w0"].lost is not None and conns["w1"].lost is None


class SkippingClock(MonotonicClock):
    """The monotonic clock, plus however far a test has skipped it ahead."""

    skipped = 0.0

    def now(self) -> float:
        return super().now() + self.skipped


def test_a_sequence_stays_on_its_worker_over_the_socket_and_is_lost_with_it(workers):
    """Chunks go to the worker holding the state; one answered past its deadline (its
    encoding moves the driver's clock on) leaves the state as it was, so its retry counts
    once; the worker's death loses the sequence, and says so."""
    procs, found = workers
    core, entry, _ = driver(found)
    core.clock = SkippingClock()
    x = np.random.default_rng(6).integers(0, 10000, (1, 12))

    def chunk(tokens, late=False, **flags):
        request = InferInput("gru-256", "", {"tokens": tokens},
                             parameters={"sequence_id": 9, "timeout": 10_000_000, **flags})

        def encode(output):
            core.clock.skipped += 11.0 if late else 0.0
            return output.outputs["probabilities"]
        return core.infer(request, encode=encode)

    async def go():
        await chunk(x[:, :4], sequence_start=True)
        worker = core.sequences._active[("gru-256", "1", 9)].state.worker
        with pytest.raises(DeadlineExceeded):
            await chunk(x[:, 4:8], late=True)
        middle = await chunk(x[:, 4:8])
        last = await chunk(x[:, 8:])
        os.kill(procs[int(worker.id[1:])].pid, signal.SIGKILL)
        lost = f"sequence 9 of model 'gru-256' was lost when {worker.describe()} died"
        with pytest.raises(SequenceError, match=re.escape(lost)):
            await chunk(x[:, 8:])
        return middle, last
    middle, last = asyncio.run(go())
    np.testing.assert_allclose(middle, token_reference("gru-256", x[:, :8])["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(last, token_reference("gru-256", x)["probabilities"], rtol=1e-4, atol=1e-6)


def test_sequences_spread_over_the_workers_and_are_uncounted_when_they_end(workers):
    """Idle sequences add no load, so each first chunk goes where the fewest are kept; the
    count follows each sequence's state and drops when it ends (or is lost)."""
    _, found = workers
    core, _, _ = driver(found)
    x = np.random.default_rng(8).integers(0, 10000, (1, 6))

    def chunk(sequence_id, tokens, **flags):
        request = InferInput("gru-256", "", {"tokens": tokens}, parameters={"sequence_id": sequence_id, **flags})
        return core.infer(request)

    async def go():
        for s in range(1, 7):
            await chunk(s, x[:, :3], sequence_start=True)
        counts = sorted(w.sequences for w in core.router.workers.values())
        for s in range(1, 7):
            await chunk(s, x[:, 3:])  # later chunks stay where their state is
        same = sorted(w.sequences for w in core.router.workers.values())
        for s in range(1, 7):
            await chunk(s, x[:, 3:], sequence_end=True)
        return counts, same
    counts, same = asyncio.run(go())
    assert counts == same == [3, 3]
    assert [w.sequences for w in core.router.workers.values()] == [0, 0]
