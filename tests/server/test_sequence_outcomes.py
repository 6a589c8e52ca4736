"""Only a chunk whose answer is sent changes its sequence: a chunk answered with an error,
including one whose answer was ready after its deadline, leaves the state, the start and the
end as they were, so a client that retries it gets what one good chunk gives.

In process, on a real engine: lateness enters through the core's clock, which the answer's
encoding moves past the deadline (as a slow encoding, or a slow loop, would), not a sleep."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from cellserve.engine.clock import MonotonicClock
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.server.core import Core, InferInput
from cellserve.server.errors import BadRequest, DeadlineExceeded, SequenceError
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo
from zoo_reference import token_reference

MODEL = "gru-256"
TOKENS = np.random.default_rng(11).integers(0, 10000, (1, 12))


class SkippingClock(MonotonicClock):
    """The monotonic clock, plus however far a test has skipped it ahead."""

    def __init__(self):
        super().__init__()
        self.skipped = 0.0

    def now(self) -> float:
        return super().now() + self.skipped


@pytest.fixture(scope="module")
def engine():
    served = load_zoo([MODEL])
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    worker.start()
    yield served, engine
    stop.set()
    worker.join(timeout=10)


@pytest.fixture
def core(engine):
    served, engine = engine
    return Core(served, engine, Metrics(engine), clock=SkippingClock())


def chunk(core: Core, tokens, sequence_id=7, late: bool = False, **flags):
    """One chunk's probabilities; `late`: its encoding takes the clock past its 10 s deadline."""
    parameters = {"sequence_id": sequence_id, "timeout": 10_000_000, **flags}
    request = InferInput(MODEL, "", {"tokens": np.asarray(tokens, np.int64)}, parameters=parameters)

    def encode(output):
        if late:
            core.clock.skipped += 11.0
        return output.outputs["probabilities"]
    return core.infer(request, encode=encode)


def reference(tokens) -> np.ndarray:
    return token_reference(MODEL, np.asarray(tokens))["probabilities"]


def test_a_chunk_answered_late_leaves_the_state_as_it_was_and_its_retry_counts_once(core):
    async def go():
        await chunk(core, TOKENS[:, :4], sequence_start=True)
        with pytest.raises(DeadlineExceeded, match="past its deadline"):
            await chunk(core, TOKENS[:, 4:8], late=True)
        again = await chunk(core, TOKENS[:, 4:8])  # the retry: as if the late one had not run
        np.testing.assert_allclose(again, reference(TOKENS[:, :8]), rtol=1e-4, atol=1e-6)
        with pytest.raises(DeadlineExceeded):
            await chunk(core, TOKENS[:, 8:], late=True, sequence_end=True)
        assert len(core.sequences) == 1  # a late end does not end it
        last = await chunk(core, TOKENS[:, 8:], sequence_end=True)
        np.testing.assert_allclose(last, reference(TOKENS), rtol=1e-4, atol=1e-6)
        assert len(core.sequences) == 0
    asyncio.run(go())


def test_a_failed_first_chunk_leaves_no_sequence_behind(core):
    async def go():
        with pytest.raises(BadRequest, match="out of range"):
            await chunk(core, [[1, 99999]], sequence_start=True)
        assert len(core.sequences) == 0
        with pytest.raises(SequenceError, match="not active: its first request must set sequence_start"):
            await chunk(core, TOKENS[:, :4])
        with pytest.raises(DeadlineExceeded):
            await chunk(core, TOKENS[:, :4], late=True, sequence_start=True)
        assert len(core.sequences) == 0
        first = await chunk(core, TOKENS[:, :4], sequence_start=True)  # a good start starts it from zero
        np.testing.assert_allclose(first, reference(TOKENS[:, :4]), rtol=1e-4, atol=1e-6)
    asyncio.run(go())


def test_a_failed_restart_keeps_the_sequence_it_would_have_replaced(core):
    async def go():
        await chunk(core, TOKENS[:, :6], sequence_start=True)
        with pytest.raises(BadRequest, match="out of range"):
            await chunk(core, [[1, 99999]], sequence_start=True)
        with pytest.raises(DeadlineExceeded):
            await chunk(core, [[5, 6]], late=True, sequence_start=True)
        rest = await chunk(core, TOKENS[:, 6:], sequence_end=True)
        np.testing.assert_allclose(rest, reference(TOKENS), rtol=1e-4, atol=1e-6)
    asyncio.run(go())


def test_a_chunk_queued_behind_a_failing_start_does_not_run_from_a_fresh_state(core):
    async def go():
        start = asyncio.ensure_future(chunk(core, [[1, 99999]], sequence_start=True))
        await asyncio.sleep(0)  # the start holds the sequence's lock: the next chunk waits behind it
        follow = asyncio.ensure_future(chunk(core, TOKENS[:, :4]))
        outcomes = await asyncio.gather(start, follow, return_exceptions=True)
        assert isinstance(outcomes[0], BadRequest)
        assert isinstance(outcomes[1], SequenceError) and "must set sequence_start" in str(outcomes[1])
        assert len(core.sequences) == 0  # and nothing is left to count against --max-sequences
    asyncio.run(go())


def test_a_start_queued_behind_its_ids_ending_sequence_starts_a_new_one(core):
    """As a client pipelining sequences over one stream sends them: [start, end] then a new
    start with the same id while the end still runs."""
    async def go():
        await chunk(core, TOKENS[:, :4], sequence_start=True)
        ending = asyncio.ensure_future(chunk(core, TOKENS[:, 4:], sequence_end=True))
        await asyncio.sleep(0)  # the end holds the sequence's lock: the new start waits behind it
        fresh = asyncio.ensure_future(chunk(core, TOKENS[:, :5], sequence_start=True))
        whole, first = await asyncio.gather(ending, fresh)
        np.testing.assert_allclose(whole, reference(TOKENS), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(first, reference(TOKENS[:, :5]), rtol=1e-4, atol=1e-6)  # from zero
        rest = await chunk(core, TOKENS[:, 5:], sequence_end=True)
        np.testing.assert_allclose(rest, reference(TOKENS), rtol=1e-4, atol=1e-6)
        assert len(core.sequences) == 0
    asyncio.run(go())
