"""Overload and slow clients: the admission bound refuses at the headers (429 before the body
is read, RESOURCE_EXHAUSTED over gRPC), connections are bounded and slow ones timed out, and a
request's deadline is kept to its answer (504, never a late success)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from cellserve.bench.loadgen import open_loop
from cellserve.bench.traces import TraceRequest
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.server.core import Admission, Core, InferInput
from cellserve.server.errors import DeadlineExceeded, Overloaded
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo
from serverproc import early_server, take_server

MODEL = "gru-256"
BODY = json.dumps({"inputs": [{"name": "tokens", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}).encode()


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def head(length: int = len(BODY), path: str = f"/v2/models/{MODEL}/infer") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP response: (status, headers, body); reads exactly its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response; got {data!r}")
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response body")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in the metrics")


# ---- admission at the headers, over a real server ----

BOUNDED = early_server(__name__, "bounded", "--model", MODEL, "--max-inflight", "2", "--max-connections", "6",
                       "--idle-timeout", "60")


@pytest.fixture(scope="module")
def bounded():
    server = take_server(BOUNDED)
    yield server
    assert server.stop() == 0


def hold_places(server, n: int) -> list[socket.socket]:
    """n inference requests whose headers arrived and whose bodies have not: each holds a
    place in the admission bound until its body comes."""
    held = []
    for _ in range(n):
        sock = connect(server.http)
        sock.sendall(head() + BODY[:5])
        held.append(sock)
    return held


def wait_in_flight(server, n: int) -> None:
    for _ in range(300):  # the server takes the places as it parses the headers
        if metric(server, "cellserve_admission_in_flight") == n:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"the server never held {n} requests in flight")


def test_a_full_bound_answers_429_at_the_headers_and_skips_the_body(bounded):
    held = hold_places(bounded, 2)
    wait_in_flight(bounded, 2)
    shed_before = metric(bounded, "cellserve_requests_shed_total")
    sock = connect(bounded.http)
    sock.sendall(head())  # headers only: the answer must not wait for the body
    status, _, body = read_response(sock)
    assert status == 429
    assert "queue full: 2 requests in flight" in json.loads(body)["error"]
    assert metric(bounded, "cellserve_requests_shed_total") == shed_before + 1
    # the body, sent late, is skipped: the connection serves its next request
    sock.sendall(BODY + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock)[0] == 200
    # the held requests, once their bodies arrive, are served; then there is room again
    for h in held:
        h.sendall(BODY[5:])
    assert [read_response(h)[0] for h in held] == [200, 200]
    sock.sendall(head() + BODY)
    assert read_response(sock)[0] == 200
    for s in (sock, *held):
        s.close()


def test_grpc_is_refused_by_the_same_bound(bounded):
    held = hold_places(bounded, 2)
    wait_in_flight(bounded, 2)
    with grpcclient.InferenceServerClient(bounded.grpc) as client:
        tensor = grpcclient.InferInput("tokens", [1, 3], "INT64")
        tensor.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [tensor])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue full: 2 requests in flight" in refused.value.message()
        for h in held:
            h.sendall(BODY[5:])
            assert read_response(h)[0] == 200
            h.close()
        assert client.infer(MODEL, [tensor]).as_numpy("label").shape == (1,)


def test_the_load_generators_grpc_client_counts_refusals_and_answers(bounded):
    """`bench load`'s lean gRPC client (prebuilt request bytes, answers not parsed) tells a
    RESOURCE_EXHAUSTED refusal from an answer."""
    trace = [TraceRequest(i, 0.0, np.array([1, 2, 3], np.int64)) for i in range(3)]
    held = hold_places(bounded, 2)
    wait_in_flight(bounded, 2)
    refused = open_loop(bounded.grpc, MODEL, trace, protocol="grpc").outcomes
    assert [o.status for o in refused] == ["rejected"] * 3
    assert "queue full: 2 requests in flight" in refused[0].reason
    for h in held:
        h.sendall(BODY[5:])
        assert read_response(h)[0] == 200
        h.close()
    answered = open_loop(bounded.grpc, MODEL, trace[:2], protocol="grpc").outcomes
    assert [o.status for o in answered] == ["ok", "ok"]


def test_connections_past_the_limit_are_answered_503_and_closed(bounded):
    wait_in_flight(bounded, 0)
    open_ = [connect(bounded.http) for _ in range(6)]
    for sock in open_:  # each is served: the server has taken all six
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    extra = connect(bounded.http)
    status, _, body = read_response(extra)
    assert status == 503 and "too many open connections" in json.loads(body)["error"]
    assert closed_by_server(extra)
    open_.pop().close()
    for _ in range(300):  # the server sees the close, then takes a new one
        again = connect(bounded.http)
        again.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status = read_response(again)[0]
        again.close()
        if status == 200:
            break
        threading.Event().wait(0.05)
    assert status == 200
    for sock in open_:
        sock.close()


# ---- slow clients ----

IMPATIENT = early_server(__name__, "impatient", "--model", MODEL, "--grpc-port", "-1", "--read-timeout", "0.5",
                         "--idle-timeout", "0.5")


@pytest.fixture(scope="module")
def impatient():
    server = take_server(IMPATIENT)
    yield server
    assert server.stop() == 0


def test_half_a_header_is_answered_408_and_closed(impatient):
    sock = connect(impatient.http)
    sock.sendall(b"POST /v2/models/gru-256/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
    status, _, body = read_response(sock)  # blocks until the server's read timeout
    assert status == 408 and "headers did not arrive within 0.5 s" in json.loads(body)["error"]
    assert closed_by_server(sock)
    assert metric(impatient, "cellserve_http_requests_timed_out_total") >= 1


def test_the_metrics_port_times_out_half_a_header_too(impatient):
    """Unguarded, such clients held their sockets on the metrics port until the process ran
    out of file descriptors, and the inference port with it."""
    sock = connect(impatient.metrics)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    status, _, body = read_response(sock)  # blocks until the server's read timeout
    assert status == 408 and "headers did not arrive within 0.5 s" in json.loads(body)["error"]
    assert closed_by_server(sock)
    scrape = connect(impatient.metrics)  # and a whole request is served as before
    scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = read_response(scrape)
    assert status == 200 and b"cellserve_inference_request_success_total" in body
    scrape.close()


def test_a_stalled_body_is_answered_408_and_closed(impatient):
    sock = connect(impatient.http)
    sock.sendall(head() + BODY[:5])
    status, _, body = read_response(sock)
    assert status == 408 and "body stalled" in json.loads(body)["error"]
    assert closed_by_server(sock)
    assert metric(impatient, "cellserve_admission_in_flight") == 0  # its place was given back


def test_an_expectation_other_than_100_continue_is_answered_417_and_closed(impatient):
    sock = connect(impatient.http)
    sock.sendall(head().replace(b"Host: x\r\n", b"Host: x\r\nExpect: something-else\r\n") + BODY)
    status, _, body = read_response(sock)  # at once, not at the read timeout
    assert status == 417 and json.loads(body)["error"] == ("Expect: 'something-else' cannot be met; this server "
                                                           "knows only 100-continue")
    assert closed_by_server(sock)


def test_an_idle_connection_is_closed(impatient):
    sock = connect(impatient.http)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock)[0] == 200
    assert closed_by_server(sock)  # idle past --idle-timeout: closed without a word


def responses_until_closed(sock: socket.socket) -> list[tuple[int, dict, bytes]]:
    """Every response the server writes before it closes the connection (several may come
    in one read)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    answers = []
    while data:
        header, _, rest = data.partition(b"\r\n\r\n")
        lines = header.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", 0))
        answers.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return answers


def test_a_malformed_request_pipelined_behind_valid_ones_is_answered_400_after_them(impatient):
    """The parser's 400 waits for the answers owed before it: written at once (uvicorn's way),
    it overtook them and closed the connection under them."""
    sock = connect(impatient.http)
    sock.sendall(head() + BODY + head() + BODY + b"NOT HTTP AT ALL\r\n\r\n")
    answers = responses_until_closed(sock)
    assert [status for status, _, _ in answers] == [200, 200, 400], answers
    assert all(json.loads(body)["outputs"] for _, _, body in answers[:2])
    _, headers, body = answers[2]
    assert headers["connection"] == "close" and b"Invalid HTTP request" in body


def test_a_request_whose_body_cannot_be_parsed_is_not_run_and_is_answered_400(impatient):
    """Its headers were read (a request waiting behind the one being answered) but its chunked
    body is malformed: it is dropped from the pipeline, the request before it is answered, then
    the 400."""
    sock = connect(impatient.http)
    chunked = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               "Transfer-Encoding: chunked\r\n\r\nZZ\r\n").encode()
    sock.sendall(head() + BODY + chunked)
    # not left waiting for a body that cannot come (the idle timeout would close it unanswered)
    assert [status for status, _, _ in responses_until_closed(sock)] == [200, 400]


# ---- deadlines, in the core ----

class SteppedClock:
    """The server's clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def engine():
    served = load_zoo([MODEL])
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    yield served, engine


def tokens_request(timeout_us: int | None) -> InferInput:
    params = {} if timeout_us is None else {"timeout": timeout_us}
    return InferInput(MODEL, "", {"tokens": np.arange(1, 6, dtype=np.int64).reshape(1, 5)}, parameters=params)


def serving(engine):
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    worker.start()
    return stop, worker


def test_an_answer_ready_after_the_deadline_is_a_504_not_a_late_success(engine):
    served, eng = engine
    clock = SteppedClock()
    core = Core(served, eng, Metrics(eng), clock=clock)
    stop, worker = serving(eng)
    try:
        def slow_encoding(result):  # the encoding took 3 s on the server's clock
            clock.t += 3.0
            return result

        # deadlines far beyond what the engine takes, even on a loaded machine: only the
        # encoding's 3 s decides
        assert asyncio.run(core.infer(tokens_request(100_000_000), encode=slow_encoding)).outputs  # 100 s: in time
        with pytest.raises(DeadlineExceeded, match="past its deadline of 2000 ms"):
            asyncio.run(core.infer(tokens_request(2_000_000), encode=slow_encoding))
    finally:
        stop.set()
        worker.join(10)


def test_an_engine_that_never_answers_is_a_504_by_the_deadline(engine):
    served, eng = engine  # not serving: nothing will answer
    core = Core(served, eng, Metrics(eng))
    with pytest.raises(DeadlineExceeded, match="engine had not answered when the deadline of 20 ms passed"):
        asyncio.run(core.infer(tokens_request(20_000)))


# ---- the admission bound's rules ----

def fill(admission: Admission, n: int) -> list[int]:
    return [admission.enter() for _ in range(n)]


def refusing(admission: Admission) -> Admission:
    """The bound of a server whose engine has lately refused most of what reached it (the
    share of congested answers past CUT_SHARE), as in an overload."""
    admission.congested_share = 1.0
    return admission


def test_a_few_refusals_among_many_answers_do_not_cut_and_a_refusing_engine_does():
    admission = Admission(ceiling=4096, clock=SteppedClock())
    tickets = fill(admission, 200)
    for i, t in enumerate(tickets[:100]):  # one answer in ten refused: a moment's misestimate
        admission.leave(t, Admission.CONGESTED if i % 10 == 0 else Admission.OK)
    assert admission.cuts == 0 and admission.limit == 4096
    for t in tickets[100:112]:  # then the engine refuses all: the share passes CUT_SHARE within a dozen
        admission.leave(t, Admission.CONGESTED)
    assert admission.cuts == 1 and admission.limit < 100


def test_the_bound_refuses_past_its_limit_and_says_so():
    admission = Admission(ceiling=3, clock=SteppedClock())
    tickets = fill(admission, 3)
    assert admission.full()
    with pytest.raises(Overloaded, match=r"queue full: 3 requests in flight, at the server's limit of 3"):
        admission.enter()
    assert admission.shed == 1
    admission.leave(tickets[0], Admission.OTHER)
    assert not admission.full() and admission.in_flight == 2


def test_congestion_cuts_once_per_window_to_90_percent_of_what_is_in_flight():
    admission = refusing(Admission(ceiling=100, clock=SteppedClock()))
    tickets = fill(admission, 60)
    admission.leave(tickets[0], Admission.CONGESTED)  # 60 in flight: cut to 54
    assert admission.limit == pytest.approx(54) and admission.cuts == 1
    admission.leave(tickets[1], Admission.CONGESTED)  # entered before the cut: no second cut
    assert admission.limit == pytest.approx(54) and admission.cuts == 1
    for t in tickets[2:10]:
        admission.leave(t, Admission.OTHER)
    later = fill(admission, 2)  # 52 in flight
    admission.leave(later[0], Admission.CONGESTED)  # entered after the cut: cuts again, to 90% of 52
    assert admission.limit == pytest.approx(0.9 * 52) and admission.cuts == 2


def test_one_request_alone_missing_its_deadline_is_not_congestion():
    admission = refusing(Admission(ceiling=100, floor=8, clock=SteppedClock()))
    tickets = fill(admission, 8)
    admission.leave(tickets[0], Admission.CONGESTED)  # no more in flight than the floor: not load
    assert admission.limit == 100 and admission.cuts == 0


def test_congestion_far_under_the_limit_cuts_to_what_was_in_flight():
    """Refusals the engine makes quickly never fill a large limit: what was in flight when
    the engine said it was full is what it holds, however far under the limit."""
    admission = refusing(Admission(ceiling=4096, clock=SteppedClock()))
    tickets = fill(admission, 200)
    admission.leave(tickets[0], Admission.CONGESTED)
    assert admission.limit == pytest.approx(180) and admission.cuts == 1


def test_quiet_time_doubles_a_cut_limit_back_to_the_ceiling_and_congestion_holds_it():
    """An overload that ended stops costing refusals: every QUIET_S without congestion
    doubles the limit (applied when requests find it full, or read by a scrape); while the
    engine keeps refusing, the limit stays where the cuts put it."""
    clock = SteppedClock()
    admission = refusing(Admission(ceiling=4096, clock=clock))
    tickets = fill(admission, 100)
    admission.leave(tickets.pop(), Admission.CONGESTED)  # cut to 90
    assert admission.limit == pytest.approx(90)
    for t in tickets[:30]:
        admission.leave(t, Admission.OTHER)
    tickets = tickets[30:] + fill(admission, 21)  # 90 in flight: full
    clock.t += 0.9 * Admission.QUIET_S
    admission.leave(tickets.pop(0), Admission.CONGESTED)  # still congested (entered before the cut: no new cut)
    tickets.append(admission.enter())
    clock.t += 0.9 * Admission.QUIET_S
    assert admission.full() and admission.limit == pytest.approx(90)
    clock.t += 2.2 * Admission.QUIET_S  # 1.1 + 2.2 quiet periods since the congestion: three doublings
    assert admission.limit_now() == pytest.approx(720) and admission.limit == pytest.approx(90)  # a read changes nothing
    assert not admission.full() and admission.limit == pytest.approx(720)
    clock.t += 10 * Admission.QUIET_S
    assert admission.limit_now() == 4096


def test_a_deadline_too_short_for_an_idle_engine_is_not_congestion():
    assert Admission.outcome(Overloaded("predicted finish misses the deadline", congestion=False)) == Admission.OTHER
    assert Admission.outcome(Overloaded("predicted finish misses the deadline")) == Admission.CONGESTED
    assert Admission.outcome(DeadlineExceeded("late")) == Admission.CONGESTED


def test_answers_in_time_grow_a_used_limit_back_to_the_ceiling_and_no_further():
    admission = refusing(Admission(ceiling=40, floor=8, clock=SteppedClock()))
    tickets = fill(admission, 40)
    admission.leave(tickets.pop(), Admission.CONGESTED)
    cut = admission.limit
    assert cut == pytest.approx(36)
    for _ in range(3):  # down to the new limit
        admission.leave(tickets.pop(), Admission.OTHER)
    for _ in range(2000):  # keep it used: one leaves, one enters
        admission.leave(tickets.pop(0), Admission.OK)
        tickets.append(admission.enter())
    assert admission.limit == 40
    idle = Admission(ceiling=40, clock=SteppedClock())
    (t,) = fill(idle, 1)
    idle.limit = 20.0
    idle.leave(t, Admission.OK)  # unused: no evidence the engine takes more
    assert idle.limit == 20.0


def test_the_limit_never_falls_under_its_floor():
    admission = refusing(Admission(ceiling=10, floor=8, clock=SteppedClock()))
    for _ in range(5):
        tickets = fill(admission, int(admission.limit))
        admission.leave(tickets[0], Admission.CONGESTED)
        for t in tickets[1:]:
            admission.leave(t, Admission.OTHER)
    assert admission.cuts >= 2 and 8 <= admission.limit < 9


def test_grpc_core_refuses_calls_past_its_backlog_while_the_loop_is_busy(engine):
    """The frontend's loop held up (as by a burst it cannot keep up with): calls past
    --grpc-max-pending are refused by gRPC core at once, in C, without the loop; those within
    the bound are served once the loop is free again."""
    from cellserve.server.grpc_frontend import start_grpc

    served, eng = engine
    core = Core(served, eng, Metrics(eng))
    stop, worker = serving(eng)
    loop = asyncio.new_event_loop()
    started: dict = {}

    async def start() -> None:
        started["server"], started["port"] = await start_grpc(core, "127.0.0.1", 0, 1 << 20, max_pending=2)

    loop.run_until_complete(start())
    frontend = threading.Thread(target=loop.run_forever, daemon=True)
    frontend.start()
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait)  # the loop is busy until released
    try:
        tensor = grpcclient.InferInput("tokens", [1, 3], "INT64")
        tensor.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
        results: list = []
        with grpcclient.InferenceServerClient(f"127.0.0.1:{started['port']}") as client:
            def call(i: int) -> None:
                try:
                    client.infer(MODEL, [tensor], client_timeout=60)
                    results.append("ok")
                except InferenceServerException as exc:
                    results.append(exc.status())

            callers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
            for c in callers:
                c.start()
            # gRPC core answers the calls past the bound while the loop is still held: of 8,
            # at most 2 wait in the backlog and 1 in the call the loop asked for before it stopped
            for _ in range(600):
                if len(results) >= 5:
                    break
                threading.Event().wait(0.05)
            assert len(results) >= 5 and set(results) == {"StatusCode.CANCELLED"}, results
            release.set()
            for c in callers:
                c.join(60)
        assert results.count("ok") >= 1 and len(results) == 8, results
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(started["server"].stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        frontend.join(30)
        stop.set()
        worker.join(30)
