"""Only a chunk whose answer is sent changes its sequence: a chunk answered with an error,
including one whose answer was ready after its deadline, or one whose client closed its
connection, leaves the state, the start and the end as they were, so a client that retries it
gets what one good chunk gives.

In process, on a real engine: lateness enters through the core's clock, which the answer's
encoding moves past the deadline (as a slow encoding, or a slow loop, would), not a sleep; a
disconnect is a real HTTP client's, while the engine is held before its first step."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading

import numpy as np
import pytest

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.server.core import Core, InferInput
from cellserve.server.errors import BadRequest, DeadlineExceeded, SequenceError
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo
from inprocess import PausableEngine, SkippingClock, serve_in_process
from serverproc import wait_until
from zoo_reference import token_reference

MODEL = "gru-256"
TOKENS = np.random.default_rng(11).integers(0, 10000, (1, 12))


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


def test_a_failed_restart_of_an_ended_id_still_says_how_it_ended(core):
    async def go():
        await chunk(core, TOKENS[:, :4], sequence_id=8, sequence_start=True, sequence_end=True)
        with pytest.raises(BadRequest, match="out of range"):
            await chunk(core, [[1, 99999]], sequence_id=8, sequence_start=True)
        with pytest.raises(SequenceError, match="sequence 8 of model 'gru-256' was ended by sequence_end; "
                                                "start a new one with sequence_start"):
            await chunk(core, TOKENS[:, 4:], sequence_id=8)
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


def test_statistics_count_only_answers_sent_in_time(core):
    """Triton's inference_count, queue and compute figures are of successes: a request whose
    answer was ready past its deadline (the engine ran it) is a failure, and only that."""
    def stats() -> dict:
        found = core.model_statistics(MODEL)["model_stats"][0]
        figures = found["inference_stats"]
        return {"inferences": found["inference_count"],
                **{kind: figures[kind]["count"] for kind in ("success", "fail", "queue", "compute_infer")}}

    async def plain(late: bool):
        request = InferInput(MODEL, "", {"tokens": np.asarray(TOKENS, np.int64)}, parameters={"timeout": 10_000_000})

        def encode(output):
            if late:
                core.clock.skipped += 11.0
            return output
        return await core.infer(request, encode=encode)

    async def go():
        before = stats()
        with pytest.raises(DeadlineExceeded):
            await plain(late=True)
        with pytest.raises(DeadlineExceeded):
            await chunk(core, TOKENS[:, :4], late=True, sequence_start=True)
        after_late = stats()
        assert after_late == {**before, "fail": before["fail"] + 2}
        await plain(late=False)
        await chunk(core, TOKENS[:, :4], sequence_start=True, sequence_end=True)
        assert stats() == {**after_late, "inferences": before["inferences"] + 2,
                           **{kind: after_late[kind] + 2 for kind in ("success", "queue", "compute_infer")}}
    asyncio.run(go())


# ---- over HTTP: a client that closes its connection while its chunk runs ----

@pytest.fixture
def served_over_http():
    """Real HTTP frontends in this process, their engine's worker (pausable) and the
    requests submitted to the engine."""
    server = serve_in_process([MODEL], EngineConfig(profile=False, pin_threads=False), grpc=False)
    worker = PausableEngine(server.engine)
    worker.start()
    yield server.ports["http"], server.core, server.submitted, worker
    server.stop()
    worker.stop.set()


def _chunk_body(tokens, **flags) -> bytes:
    tokens = np.asarray(tokens, np.int64)
    return json.dumps({"inputs": [{"name": "tokens", "shape": list(tokens.shape), "datatype": "INT64",
                                   "data": tokens.ravel().tolist()}],
                       "outputs": [{"name": "probabilities"}],
                       "parameters": {"sequence_id": 9, **flags}}).encode()


def _post(address: str, body: bytes) -> np.ndarray:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    doc = json.loads(response.read())
    assert response.status == 200, doc
    [output] = doc["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_an_http_chunk_whose_client_left_is_cancelled_and_its_retry_counts_once(served_over_http):
    address, core, submitted, worker = served_over_http
    _post(address, _chunk_body(TOKENS[:, :4], sequence_start=True))
    worker.pause()  # the next chunk waits in the engine's inbox until the test goes on
    host, port = address.rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=60)
    body = _chunk_body(TOKENS[:, 4:8])
    client.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: test\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_until(lambda: len(submitted) == 2, "the second chunk reaches the engine")
    client.close()
    wait_until(lambda: submitted[1].cancelled, "the chunk whose client left is cancelled in the engine")
    worker.start()
    again = _post(address, _chunk_body(TOKENS[:, 4:8]))  # the retry: as if the first try had not run
    np.testing.assert_allclose(again, reference(TOKENS[:, :8]), rtol=1e-4, atol=1e-6)
    last = _post(address, _chunk_body(TOKENS[:, 8:], sequence_end=True))
    np.testing.assert_allclose(last, reference(TOKENS), rtol=1e-4, atol=1e-6)
    stats = core.model_statistics(MODEL)["model_stats"][0]["inference_stats"]
    assert stats["success"]["count"] == 3 and stats["fail"]["count"] == 1


def test_a_pipelined_request_whose_client_left_is_cancelled_too(served_over_http, caplog):
    """Requests pipelined on one connection: uvicorn tells only the last one parsed that the
    client left; the one being answered is told too, and nothing is written to the closed
    connection (an error in the log)."""
    address, core, submitted, worker = served_over_http
    worker.pause()
    host, port = address.rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=60)
    plain = json.dumps({"inputs": [{"name": "tokens", "shape": [1, 4], "datatype": "INT64",
                                    "data": TOKENS[0, :4].tolist()}]}).encode()
    one = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(plain)}\r\n\r\n").encode() + plain
    client.sendall(one * 3)
    wait_until(lambda: len(submitted) == 1, "the first request reaches the engine (the others wait behind it)")
    client.close()
    wait_until(lambda: submitted[0].cancelled, "the request being answered is cancelled")
    worker.start()
    _post(address, _chunk_body(TOKENS[:, :4], sequence_start=True, sequence_end=True))  # still serving
    assert len(submitted) == 2  # the pipelined ones behind it never ran
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
