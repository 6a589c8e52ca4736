"""Deadlines, priority and bounded queues over HTTP: refusals are 429s with the reason, and
under 3x overload the server keeps its goodput and answers health checks.

No test here times a request: "overtakes" is read off the order in which answers came back,
and the work a refusal needs (a busy engine, a full queue) is in place before the request it
refuses is sent (waiting on the server's counters, not a sleep), sized to outlast the check."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.bench.loadgen import RequestFormat, open_loop
from cellserve.bench.traces import TraceRequest, make_trace
from serverproc import arrived, metric, sized_shape, start_server, wait_until

pytestmark = pytest.mark.slow  # each test starts a server or loads one for seconds


def send(address, tokens, **kw):
    """(status, message): "ok" and "", or the error's HTTP status and message."""
    with httpclient.InferenceServerClient(address, network_timeout=300) as client:
        tensor = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
        tensor.set_data_from_numpy(tokens)
        try:
            client.infer("gru-256", [tensor], **kw)
            return "ok", ""
        except InferenceServerException as exc:
            return exc.status(), exc.message()


@pytest.fixture(scope="module")
def server():
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--max-batch", "1", "--max-inflight", "24")
    yield server
    assert server.stop() == 0


def test_a_deadline_that_cannot_be_met_is_refused_at_admission(server):
    """A busy engine predicts a request's finish and refuses one that would miss its deadline:
    1,000 steps beside the busy request's lanes, one lane a step, take far longer than 2 s;
    2 s leaves a loaded machine time to hand the request to the engine and its refusal back
    before the deadline passes (that would be a 504). The busy request has a deadline too: a
    lane with none is less urgent, never stepped before the new one's (one lane a step), and
    admission does not count it beyond the batch it fills."""
    tokens = np.ones(sized_shape(server, "gru-256", (1, 300)), np.int64)
    steps = metric(server, "cellserve_cell_steps_total")
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(send, server.http, tokens, timeout=600_000_000)  # us: a deadline it meets
        # stepping, not just arrived: admitting a request this large takes the engine a while
        # (its arenas grow), and a request sent meanwhile would wait out its deadline there
        wait_until(lambda: metric(server, "cellserve_cell_steps_total") > steps + 100,
                   "the engine stepping a request that keeps it busy")
        # up to three tries: on a loaded machine one may reach the engine only after its
        # deadline (then it is a 504, a deadline kept, never a late success)
        answers = []
        for _ in range(3):
            answers.append(send(server.http, np.ones((1, 1000), np.int64), timeout=2_000_000))
            if answers[-1][0] != "504":
                break
        status, message = answers[-1]
        assert status == "429" and "predicted finish" in message and "misses the deadline" in message, answers
        assert busy.result() == ("ok", "")
    assert send(server.http, np.ones((1, 400), np.int64), timeout=5_000_000)[0] == "ok"


def test_priority_requests_overtake_the_queue(server):
    """15 requests at the server, one lane per step (--max-batch 1), the most urgent first: in
    order of arrival, each taking 0.5 s or more. One more with priority 1, sent last, comes
    back before most of them."""
    shape = sized_shape(server, "gru-256", (1, 300), alone_s=0.5)
    tokens = np.ones(shape, np.int64)
    order = itertools.count()
    lock = threading.Lock()

    def timed_send(**kw):
        result = send(server.http, tokens, **kw)
        with lock:
            return result, next(order)

    base = arrived(server, "gru-256")
    with ThreadPoolExecutor(16) as pool:
        background = [pool.submit(timed_send) for _ in range(15)]
        wait_until(lambda: arrived(server, "gru-256") >= base + 15, "15 background requests at the server")
        urgent = pool.submit(timed_send, priority=1)
        results = [f.result() for f in background]
        (status, _), urgent_place = urgent.result()
    assert status == "ok" and all(r[0][0] == "ok" for r in results), results
    later = sum(place > urgent_place for _, place in results)
    assert later > len(results) // 2, f"only {later} of {len(results)} earlier requests came back after it"


def test_a_full_queue_refuses_with_429():
    """One request in flight fills a limit of one; the next is refused while it runs."""
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--max-batch", "1", "--max-inflight", "1")
    try:
        tokens = np.ones(sized_shape(server, "gru-256", (1, 300)), np.int64)
        base = arrived(server, "gru-256")
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(send, server.http, tokens)  # 1.5 s or more: in flight while the next is sent
            wait_until(lambda: arrived(server, "gru-256") > base, "the first request at the server")
            status, message = send(server.http, np.ones((1, 5), np.int64))
            assert status == "429" and "queue full" in message, (status, message)
            assert running.result() == ("ok", "")
        assert send(server.http, np.ones((1, 5), np.int64)) == ("ok", "")  # the place is free again
    finally:
        assert server.stop() == 0


def test_a_model_default_slo_applies_to_requests_without_timeout():
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--slo-ms", "0.01")
    try:
        status, message = send(server.http, np.ones((1, 50), np.int64))
        # 10 us cannot be met: admission refuses it (429), or, where the engine does not get to
        # it within the server's few milliseconds past the deadline, the server answers that the
        # deadline passed (504); either way the model's default deadline applied
        assert status in ("429", "504") and "deadline" in message, (status, message)
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
        burst = [TraceRequest(r.request_id, 0.0, r.sequence) for r in make_trace(rng, 1.0, 300, 10000)]

        def burst_capacity() -> float:
            outcomes = open_loop(server.http, "gru-256", burst).outcomes
            assert all(o.status == "ok" for o in outcomes)
            return len(outcomes) / max(o.finish_s for o in outcomes)

        capacity = burst_capacity()

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
        # the overload cut the admission bound; once it is over, quiet time doubles the bound
        # back (core.Admission): wait for room for the whole burst
        wait_until(lambda: metric(server, "cellserve_admission_limit") >= len(burst), "the bound to recover")
        # what the machine gave the server may change during the test (a neighbour starting
        # up): the capacity it is judged against is the lower of a burst before and one after
        capacity = min(capacity, burst_capacity())
        # Not collapsing: without admission, goodput falls to ~0 here (the peers in `bench
        # compare` keep 10-30% of their peak). 40%, not more: on 2 cores, offering and refusing
        # 2x capacity costs the generator and the frontend CPU the engine would use (a CI run
        # measured 49.6% with the lean load generator, which truly offers all of it).
        assert good / span > 0.4 * capacity, f"goodput {good / span:.0f} r/s vs capacity {capacity:.0f} r/s"
        # Health checks must not hang. Not 100 ms (the goal, measured by `bench load`):
        # under 3x the server still has stalls of 1-2 s, an open defect (docs/performance.md,
        # Overload); one held a check 1.48 s in a fresh-clone run.
        assert health and max(health) < 3.0, f"health check took up to {max(health):.2f} s"
    finally:
        assert server.stop() == 0
