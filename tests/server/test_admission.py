"""Deadlines, priority and bounded queues over HTTP: refusals are immediate 429s with the
reason, and under 3x overload the server keeps its goodput and answers health checks."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.bench.loadgen import RequestFormat, open_loop
from cellserve.bench.traces import TraceRequest, make_trace
from serverproc import start_server


def send(address, tokens, **kw):
    with httpclient.InferenceServerClient(address, network_timeout=120) as client:
        tensor = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
        tensor.set_data_from_numpy(tokens)
        t0 = time.perf_counter()
        try:
            client.infer("gru-256", [tensor], **kw)
            return "ok", time.perf_counter() - t0, ""
        except InferenceServerException as exc:
            return exc.status(), time.perf_counter() - t0, exc.message()


@pytest.fixture(scope="module")
def server():
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--max-batch", "1", "--max-queue", "24")
    yield server
    assert server.stop() == 0


def test_a_deadline_that_cannot_be_met_is_refused_at_once(server):
    status, seconds, message = send(server.http, np.ones((1, 400), np.int64), timeout=1000)  # 1 ms
    assert status == "429" and "predicted finish" in message and "misses the deadline" in message
    assert seconds < 0.5
    assert send(server.http, np.ones((1, 400), np.int64), timeout=5_000_000)[0] == "ok"


def test_priority_requests_overtake_the_queue(server):
    long = np.ones((1, 300), np.int64)
    with ThreadPoolExecutor(16) as pool:
        background = [pool.submit(send, server.http, long) for _ in range(15)]
        time.sleep(0.3)  # all of them queued and running, one lane per step (--max-batch 1)
        urgent = pool.submit(send, server.http, long, priority=1)
        results = [f.result() for f in background]
        status, urgent_s, _ = urgent.result()
    assert status == "ok" and all(r[0] == "ok" for r in results)
    # sent last, it still finishes before most of the requests sent before it
    assert urgent_s < np.median([r[1] for r in results])


def test_a_full_queue_refuses_with_429(server):
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda _: send(server.http, np.ones((1, 200), np.int64)), range(40)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {"ok", "429"} and "ok" in statuses and "429" in statuses
    assert all("queue full" in r[2] for r in results if r[0] == "429")


def test_a_model_default_slo_applies_to_requests_without_timeout():
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--slo-ms", "0.01")
    try:
        status, _, message = send(server.http, np.ones((1, 50), np.int64))
        assert status == "429" and "misses the deadline" in message
        assert send(server.http, np.ones((1, 50), np.int64), timeout=10_000_000)[0] == "ok"
    finally:
        assert server.stop() == 0


def test_overload_keeps_goodput_and_health():
    """Capacity measured with a closed burst; then 3x that (at most 1,500 req/s) offered
    open-loop with a 250 ms deadline: goodput does not collapse, everything is answered,
    health checks too."""
    server = start_server("--model", "gru-256", "--grpc-port", "-1")
    try:
        rng = np.random.default_rng(0)
        burst = [TraceRequest(r.request_id, 0.0, r.tokens) for r in make_trace(rng, 1.0, 300, 10000)]
        outcomes = open_loop(server.http, "gru-256", burst).outcomes
        assert all(o.status == "ok" for o in outcomes)
        capacity = len(outcomes) / max(o.finish_s for o in outcomes)

        # 3x capacity, but at most 1,500 req/s: past that, on 2 cores, the load generator and
        # the HTTP frontend take the CPU themselves (with stacked layers the burst capacity
        # here is ~1,000 req/s, and 3,000 offered left the engine too little to answer in time)
        offered = min(3 * capacity, 1500.0)
        trace = make_trace(rng, offered, int(offered * 3), 10000)  # 3 seconds
        run = open_loop(server.http, "gru-256", trace, fmt=RequestFormat(deadline_ms=250), health_every_s=0.1)
        outcomes, health = run.outcomes, run.health_latencies_s
        assert len(outcomes) == len(trace)
        statuses = {o.status for o in outcomes}
        assert statuses <= {"ok", "rejected", "dropped"}, [o.reason for o in outcomes if o.status == "error"][:3]
        assert "rejected" in statuses
        span = max(o.finish_s for o in outcomes) - min(o.arrival_s for o in outcomes)
        good = sum(o.status == "ok" and o.finish_s - o.arrival_s <= 0.25 for o in outcomes)
        # Not collapsing: without admission, goodput falls to ~0 here (the peers in `bench
        # compare` keep 10-30% of their peak). 40%, not more: on 2 cores, offering and refusing
        # 2x capacity costs the generator and the frontend CPU the engine would use (a CI run
        # measured 49.6% with the lean load generator, which truly offers all of it).
        assert good / span > 0.4 * capacity, f"goodput {good / span:.0f} r/s vs capacity {capacity:.0f} r/s"
        assert health and max(health) < 1.0, f"health check took up to {max(health):.2f} s"
    finally:
        assert server.stop() == 0
