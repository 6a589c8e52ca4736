"""How the server hands a client's timeout to the engine: the deadline runs from when the
request reached the server, and the engine gets the timeout less the hand-back it has
learned, so that an answer in time for the engine is in time for the client."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.server.core import Core, InferInput
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo


@pytest.fixture(scope="module")
def core():
    served = load_zoo(["lstm-512"])
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    seen = []
    submit = engine.submit
    # a spy: records each request with the engine's time, then hands it to the real engine
    engine.submit = lambda request: (seen.append((engine.clock.now(), request)), submit(request))
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    worker.start()
    yield Core(served, engine, Metrics(engine)), seen
    stop.set()
    worker.join(timeout=10)


def infer(core: Core, timeout_us: int) -> None:
    request = InferInput("lstm-512", "", {"tokens": np.arange(1, 6, dtype=np.int64).reshape(1, 5)},
                         parameters={"timeout": timeout_us})
    asyncio.run(core.infer(request))


def test_the_engine_deadline_runs_from_receipt_less_the_learned_hand_back(core):
    core, seen = core
    infer(core, 10_000_000)
    submitted_at, first = seen[-1]
    assert first.timeout_s == pytest.approx(10.0)  # nothing learned yet
    assert first.arrival is not None and first.arrival < submitted_at  # stamped at receipt, before the submit
    for _ in range(20):
        infer(core, 10_000_000)
    learned = core._handback_s + 4 * core._handback_dev_s
    assert learned > 0 and core.handback_margin_s == learned
    _, last = seen[-1]
    assert last.timeout_s == pytest.approx(10.0 - learned, abs=1e-3)
    assert 10.0 - last.timeout_s < 0.5  # a hand-back takes microseconds to milliseconds, not seconds
    # operators see it: the metrics endpoint exports the margin as it stands
    exported = [line for line in core.metrics.exposition().decode().splitlines()
                if line.startswith("cellserve_deadline_margin_seconds ")]
    assert exported and float(exported[0].split()[1]) == pytest.approx(core.handback_margin_s)


def test_the_margin_never_takes_more_than_half_the_timeout(core):
    core, seen = core
    core._handback_s = 1.0  # as if hand-backs had been taking a second
    infer(core, 100_000)
    assert seen[-1][1].timeout_s == pytest.approx(0.05)
    core._handback_s = core._handback_dev_s = 0.0


def test_a_request_whose_client_goes_away_counts_as_a_cancelled_failure(core):
    core, _ = core

    def failures() -> float:
        for line in core.metrics.exposition().decode().splitlines():
            if line.startswith("cellserve_inference_request_failure_total{") and 'reason="cancelled"' in line:
                return float(line.split()[-1])
        return 0.0

    before = failures()
    request = InferInput("lstm-512", "", {"tokens": np.ones((1, 400), np.int64)})

    async def go_away() -> None:
        task = asyncio.ensure_future(core.infer(request))
        await asyncio.sleep(0)  # submitted; the client goes away before the answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go_away())
    assert failures() == before + 1
    pending = [line for line in core.metrics.exposition().decode().splitlines()
               if line.startswith("cellserve_inference_pending_request_count{")]
    assert pending and all(float(line.split()[-1]) == 0 for line in pending)
