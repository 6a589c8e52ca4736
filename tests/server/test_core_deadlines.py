"""How the server hands a client's timeout to the engine: the deadline runs from when the
request reached the server, and the engine gets the timeout less the hand-back it has
learned, so that an answer in time for the engine is in time for the client. A gRPC call's
own deadline is a timeout too, when it is the shorter one."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.server.core import Core, InferInput
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo
from inprocess import PausableEngine, SkippingClock, serve_in_process
from serverproc import wait_until


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


def infer(core: Core, timeout_us: int | None, client_timeout_s: float | None = None) -> None:
    request = InferInput("lstm-512", "", {"tokens": np.arange(1, 6, dtype=np.int64).reshape(1, 5)},
                         parameters={} if timeout_us is None else {"timeout": timeout_us},
                         client_timeout_s=client_timeout_s)
    asyncio.run(core.infer(request))


def failures(core: Core, reason: str) -> float:
    for line in core.metrics.exposition().decode().splitlines():
        if line.startswith("cellserve_inference_request_failure_total{") and f'reason="{reason}"' in line:
            return float(line.split()[-1])
    return 0.0


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
    before = failures(core, "cancelled")
    request = InferInput("lstm-512", "", {"tokens": np.ones((1, 400), np.int64)})

    async def go_away() -> None:
        task = asyncio.ensure_future(core.infer(request))
        await asyncio.sleep(0)  # submitted; the client goes away before the answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go_away())
    assert failures(core, "cancelled") == before + 1
    pending = [line for line in core.metrics.exposition().decode().splitlines()
               if line.startswith("cellserve_inference_pending_request_count{")]
    assert pending and all(float(line.split()[-1]) == 0 for line in pending)


def test_a_client_deadline_shorter_than_the_timeout_is_the_engines(core):
    core, seen = core
    # the engine gets the shorter, less the learned hand-back (microseconds to milliseconds)
    infer(core, 10_000_000, client_timeout_s=2.0)
    assert seen[-1][1].timeout_s == pytest.approx(2.0, abs=0.05)
    infer(core, 1_000_000, client_timeout_s=2.0)  # the parameter is the shorter
    assert seen[-1][1].timeout_s == pytest.approx(1.0, abs=0.05)
    infer(core, None, client_timeout_s=3.0)  # no parameter: the model's default is none
    assert seen[-1][1].timeout_s == pytest.approx(3.0, abs=0.05)


def test_a_call_ended_at_its_client_deadline_counts_as_dropped_not_cancelled():
    """gRPC ends a call when its deadline passes: that is a deadline missed (reason
    "dropped", as the engine's own drops), not a client that went away."""
    served = load_zoo(["lstm-512"])
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    core = Core(served, engine, Metrics(engine), clock=SkippingClock())  # its worker never runs: the call waits
    request = InferInput("lstm-512", "", {"tokens": np.ones((1, 5), np.int64)}, client_timeout_s=2.0)

    async def ended_at_the_deadline() -> None:
        task = asyncio.ensure_future(core.infer(request))
        await asyncio.sleep(0)  # submitted
        core.clock.skipped += 2.0  # the client's deadline comes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(ended_at_the_deadline())
    assert (failures(core, "dropped"), failures(core, "cancelled")) == (1, 0)
    assert engine._inbox[0].cancelled  # and the engine is told to let it go


def test_a_grpc_deadline_reaches_the_engine_and_its_end_is_a_missed_deadline():
    """End to end, with tritonclient's client_timeout: the engine is given the call's deadline
    (it may refuse or drop the request by it), and a call gRPC ends there counts as dropped."""
    server = serve_in_process(["lstm-512"], EngineConfig(profile=False, pin_threads=False))
    worker = PausableEngine(server.engine)  # not started: the request waits in the inbox past its deadline
    try:
        client = grpcclient.InferenceServerClient(server.ports["grpc"])
        tensor = grpcclient.InferInput("tokens", [1, 5], "INT64")
        tensor.set_data_from_numpy(np.ones((1, 5), np.int64))
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("lstm-512", [tensor], client_timeout=0.5)
        [submitted] = server.submitted
        # the call's deadline, as gRPC carries it (its timeout header is rounded: a hair either way)
        assert submitted.timeout_s == pytest.approx(0.5, abs=0.02)
        wait_until(lambda: failures(server.core, "dropped") == 1, "the call's end counted as a missed deadline")
        assert failures(server.core, "cancelled") == 0 and submitted.cancelled
        worker.start()  # the engine lets it go; the server goes on serving
        client.infer("lstm-512", [tensor], client_timeout=60)
    finally:
        server.stop()
        worker.stop.set()


def test_the_engines_default_timeout_is_the_deadline_the_server_keeps_too():
    """--default-timeout (the engine's default for requests that send none and whose model sets
    none) is the deadline of the server's wait as well: the engine is handed it like a client's
    timeout, so a late answer is a 504 and a counted miss, never a late success."""
    served = load_zoo(["lstm-512"])
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False,
                                                            default_timeout_s=0.75))
    seen = []
    submit = engine.submit
    engine.submit = lambda request: (seen.append(request), submit(request))
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    worker.start()
    try:
        core = Core(served, engine, Metrics(engine))
        assert core.default_timeout_s == 0.75
        infer(core, None)
        assert seen[-1].timeout_s == pytest.approx(0.75, abs=0.05)
        infer(core, 2_000_000)  # a request's own timeout still wins
        assert seen[-1].timeout_s == pytest.approx(2.0, abs=0.05)
    finally:
        stop.set()
        worker.join(timeout=10)
