"""Tokens streamed as a decoder produces them (docs/streaming.md): the engine's per-token hook
and cancellation; gRPC ModelStreamInfer with the real tritonclient streaming client; HTTP
generate and generate_stream (server-sent events) with a plain HTTP client. Streamed tokens
and final answers equal the non-streamed answers; errors stay with their request; a client
that goes away, or a deadline that passes mid-stream, releases the request's lanes."""

from __future__ import annotations

import http.client
import json
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.zoo.seq2seq import PAD
from cellserve.server.core import Core
from cellserve.server.repository import load_zoo
from inprocess import serve_in_process
from serverproc import wait_until
from zoo_reference import digits

S2S = "seq2seq-reverse"
DECODER = f"{S2S}:1/decoder"
TEXTS = ["123456789012", "987654321098", "555555555551"]


def rows(tokens: np.ndarray) -> list[list[int]]:
    return [[t for t in row if t != PAD] for row in np.asarray(tokens).tolist()]


def lanes(engine: Engine) -> int:
    return sum(engine.policy.lanes_of(t) for t in engine.cell_types)


# ---- the engine: the hook and cancellation ----

@pytest.fixture(scope="module")
def engine():
    served = load_zoo([S2S])
    return Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))


def test_each_row_s_tokens_come_in_order_and_make_its_answer(engine):
    tokens, answers = [], []
    engine.submit(Request(f"{S2S}:1", {"digits": digits(TEXTS)}, on_done=answers.append,
                          on_tokens=lambda b, t: tokens.append((b, t))))
    engine.run_until_idle()
    [answer] = answers
    assert answer.status is Status.OK
    streamed = [[t for b, t in tokens if b == row] for row in range(len(TEXTS))]
    assert streamed == rows(answer.outputs["reversed"])
    assert all(len(r) == 12 for r in streamed)


def test_a_cancelled_request_s_lanes_go_at_the_next_step(engine):
    answers, tokens = [], []
    batch = 64
    request = Request(f"{S2S}:1", {"digits": digits(TEXTS[:1] * batch)}, on_done=answers.append)

    def on_tokens(b, t):
        tokens.append(t)
        if len(tokens) == 1:
            engine.cancel(request)  # from the engine thread, in the middle of a step's tokens

    request.on_tokens = on_tokens
    steps_before = engine.stats.lanes_by_type.get(DECODER, 0)
    engine.submit(request)
    engine.run_until_idle()
    assert [a.status for a in answers] == [Status.CANCELLED]
    assert "client went away" in answers[0].reason
    assert engine.active_requests == 0 and lanes(engine) == 0
    # far fewer decoder steps than the whole answer's 13 per row: it stopped at the next step
    assert engine.stats.lanes_by_type.get(DECODER, 0) - steps_before < batch * 13 / 2


def test_a_cancel_before_admission_answers_cancelled_and_after_the_answer_does_nothing(engine):
    answers = []
    early = Request(f"{S2S}:1", {"digits": digits(TEXTS[:1])}, on_done=answers.append)
    engine.cancel(early)
    engine.submit(early)
    late = Request(f"{S2S}:1", {"digits": digits(TEXTS[:1])}, on_done=answers.append)
    engine.submit(late)
    engine.run_until_idle()
    engine.cancel(late)  # answered already
    engine.run_until_idle()
    engine.step()
    assert [a.status for a in answers] == [Status.CANCELLED, Status.OK]


# ---- gRPC ModelStreamInfer, tritonclient's streaming client ----

class Stream:
    """tritonclient's gRPC stream, its callbacks' (result, error) in a queue."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, model: str, name: str, array: np.ndarray, request_id: str, **kwargs) -> None:
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        self.client.async_stream_infer(model, [tensor], request_id=request_id, enable_empty_final_response=True,
                                       **kwargs)

    def until_final(self, count: int = 1) -> list:
        """Every (result, error) until `count` requests had their last response."""
        got, finals = [], 0
        while finals < count:
            result, error = self.results.get(timeout=120)
            got.append((result, error))
            finals += error is not None or result.get_response().parameters["triton_final_response"].bool_param
        return got

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _params(result) -> dict:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in result.get_response().parameters.items()}


def test_grpc_stream_sends_each_token_then_the_answer_modelinfer_gives(zoo_server):
    x = digits(TEXTS)
    with grpcclient.InferenceServerClient(zoo_server.grpc) as client:
        tensor = grpcclient.InferInput("digits", list(x.shape), "INT64")
        tensor.set_data_from_numpy(x)
        plain = client.infer(S2S, [tensor]).as_numpy("reversed")
    stream = Stream(zoo_server.grpc)
    try:
        stream.send(S2S, "digits", x, "r1")
        got = stream.until_final()
    finally:
        stream.close()
    assert all(error is None for _, error in got)
    *tokens, final = [result for result, _ in got]
    streamed = [[] for _ in TEXTS]
    for result in tokens:
        params = _params(result)
        assert params["triton_final_response"] is False and result.get_response().id == "r1"
        assert params["position"] == len(streamed[params["batch_index"]])
        [[token]] = result.as_numpy("reversed").tolist()
        streamed[params["batch_index"]].append(token)
    assert streamed == rows(plain)
    assert _params(final) == {"triton_final_response": True} and final.get_response().id == "r1"
    np.testing.assert_array_equal(final.as_numpy("reversed"), plain)


def test_grpc_stream_answers_a_bad_request_with_its_error_and_goes_on(zoo_server):
    stream = Stream(zoo_server.grpc)
    try:
        stream.send(S2S, "digits", np.array([[99]], np.int64), "bad")
        stream.send("no-such-model", "digits", digits(TEXTS[:1]), "unknown")
        got = stream.until_final(2)
        stream.send(S2S, "digits", digits(TEXTS[:1]), "good")
        got += stream.until_final()
    finally:
        stream.close()
    errors = [str(error) for _, error in got if error is not None]
    assert len(errors) == 2
    assert any("INVALID_ARGUMENT" in e and "'digits'" in e and "99" in e for e in errors)
    assert any("NOT_FOUND" in e and "no-such-model" in e for e in errors)
    final = got[-1][0]
    assert final.get_response().id == "good"
    assert rows(final.as_numpy("reversed")) == [[int(c) + 3 for c in reversed(TEXTS[0])]]


def test_grpc_stream_answers_bytes_that_are_no_message_in_the_stream_and_goes_on(zoo_server):
    import grpc
    from tritonclient.grpc import service_pb2

    good = service_pb2.ModelInferRequest(model_name=S2S, id="good")
    x = digits(TEXTS[:1])
    good.inputs.add(name="digits", datatype="INT64", shape=list(x.shape))
    good.raw_input_contents.append(x.astype("<i8").tobytes())
    with grpc.insecure_channel(zoo_server.grpc) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=None,
                                     response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        answers = list(call(iter([b"\xff\xff not a message", good.SerializeToString()]), timeout=120))
    assert "INVALID_ARGUMENT" in answers[0].error_message and "not a valid ModelInferRequest" in answers[0].error_message
    final = answers[-1]
    assert final.error_message == "" and final.infer_response.id == "good"
    assert final.infer_response.parameters["triton_final_response"].bool_param


def test_grpc_stream_answers_a_model_without_a_decoder_once(zoo_server):
    tokens = np.arange(1, 9, dtype=np.int64).reshape(1, 8)
    with grpcclient.InferenceServerClient(zoo_server.grpc) as client:
        tensor = grpcclient.InferInput("tokens", [1, 8], "INT64")
        tensor.set_data_from_numpy(tokens)
        plain = client.infer("lstm-512", [tensor])
    stream = Stream(zoo_server.grpc)
    try:
        stream.send("lstm-512", "tokens", tokens, "c")
        [(result, error)] = stream.until_final()
    finally:
        stream.close()
    assert error is None and _params(result) == {"triton_final_response": True}
    np.testing.assert_array_equal(result.as_numpy("probabilities"), plain.as_numpy("probabilities"))
    assert stream.results.empty()


def test_grpc_stream_of_a_classified_decoder_output_sends_only_the_classes(zoo_server):
    """Classification answers the output's classes (BYTES): its INT64 tokens are not streamed first."""
    stream = Stream(zoo_server.grpc)
    try:
        stream.send(S2S, "digits", digits(TEXTS[:1]), "k",
                    outputs=[grpcclient.InferRequestedOutput("reversed", class_count=1)])
        [(result, error)] = stream.until_final()
    finally:
        stream.close()
    assert error is None and _params(result) == {"triton_final_response": True}
    assert result.get_output("reversed").datatype == "BYTES"


# ---- HTTP generate and generate_stream ----

def post(address: str, path: str, doc) -> http.client.HTTPResponse:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, doc if isinstance(doc, str) else json.dumps(doc))
    return conn.getresponse()


def events(response: http.client.HTTPResponse):
    """The server-sent events' JSON objects, one at a time as they arrive."""
    while True:
        line = response.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            assert response.readline() == b"\n", "an event ends with a blank line"
            yield json.loads(line[len(b"data: "):])
        else:
            assert line == b"\n", f"not an event line: {line!r}"


def test_generate_answers_as_infer_does(zoo_server):
    x = digits(TEXTS)
    infer = post(zoo_server.http, f"/v2/models/{S2S}/infer", {"inputs": [
        {"name": "digits", "shape": list(x.shape), "datatype": "INT64", "data": x.tolist()}]})
    [output] = json.loads(infer.read())["outputs"]
    response = post(zoo_server.http, f"/v2/models/{S2S}/versions/1/generate", {"digits": x.tolist()})
    assert response.status == 200 and response.getheader("content-type") == "application/json"
    assert json.loads(response.read()) == {"model_name": S2S, "model_version": "1", "reversed": output["data"]}


def test_generate_stream_sends_each_token_then_generate_s_answer(zoo_server):
    x = digits(TEXTS[:1])
    whole = json.loads(post(zoo_server.http, f"/v2/models/{S2S}/generate", {"digits": x[0].tolist()}).read())
    response = post(zoo_server.http, f"/v2/models/{S2S}/generate_stream", {"digits": x[0].tolist()})
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    *tokens, final = list(events(response))
    assert [t["position"] for t in tokens] == list(range(len(tokens)))
    assert all(t["triton_final_response"] is False and t["batch_index"] == 0 for t in tokens)
    assert [t["reversed"] for t in tokens] == whole["reversed"]
    assert final == {**whole, "triton_final_response": True}


def test_generate_stream_of_a_model_without_a_decoder_is_one_event(zoo_server):
    tokens = list(range(1, 9))
    whole = json.loads(post(zoo_server.http, "/v2/models/lstm-512/generate", {"tokens": tokens}).read())
    [event] = list(events(post(zoo_server.http, "/v2/models/lstm-512/generate_stream", {"tokens": tokens})))
    assert event == {**whole, "triton_final_response": True}
    assert set(whole) == {"model_name", "model_version", "probabilities", "label"}


@pytest.mark.parametrize("path", ["generate", "generate_stream"])
@pytest.mark.parametrize("doc, status, words", [
    ({"digit": [4, 5]}, 400, ["unknown field 'digit'", "['digits']"]),
    ({"parameters": {"timeout": 5}}, 400, ["missing input(s) ['digits']"]),
    ({"digits": [[4, 5], [6]]}, 400, ["input 'digits'", "ragged"]),
    ('{"digits": [4], "digits": [5]}', 400, ["'digits' is given twice"]),
    ({"digits": [4, 99]}, 400, ["'digits'", "99"]),
    ({"digits": [4], "timeout": -1}, 400, ["'timeout'", "-1"]),
])
def test_generate_refuses_a_bad_request_naming_what_is_wrong(zoo_server, path, doc, status, words):
    response = post(zoo_server.http, f"/v2/models/{S2S}/{path}", doc)
    assert response.status == status and response.getheader("content-type") == "application/json"
    message = json.loads(response.read())["error"]
    assert all(w in message for w in words), message


def test_a_bad_generate_or_stream_request_counts_as_a_failure_as_infers_do(zoo_server):
    from serverproc import metric

    def invalid() -> float:
        return metric(zoo_server, "cellserve_inference_request_failure_total", model=S2S, reason="invalid")

    before = invalid()
    for path in ("generate", "generate_stream"):
        assert post(zoo_server.http, f"/v2/models/{S2S}/{path}", {"digit": [4, 5]}).status == 400
    stream = Stream(zoo_server.grpc)
    try:
        tensor = grpcclient.InferInput("digits", [1, 2], "INT64")
        tensor.set_data_from_numpy(np.array([[4, 5]], np.int64))
        tensor.set_shape([1, 30_000_000])  # refused by the frontend, before the core sees it
        stream.client.async_stream_infer(S2S, [tensor], request_id="bad", enable_empty_final_response=True)
        [(_, error)] = stream.until_final()
        assert "INVALID_ARGUMENT" in str(error)
    finally:
        stream.close()
    wait_until(lambda: invalid() == before + 3, "the three bad requests counted")


def test_generate_of_an_unknown_model_is_404_and_the_extension_is_listed(zoo_server):
    response = post(zoo_server.http, "/v2/models/nope/generate_stream", {"x": 1})
    assert response.status == 404 and "nope" in json.loads(response.read())["error"]
    host, port = zoo_server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/v2")
    assert "generate" in json.loads(conn.getresponse().read())["extensions"]


# ---- a server in this process, to watch its engine: cancellation and deadlines ----

class Local:
    def __init__(self, engine: Engine, core: Core, ports: dict, submitted: list):
        self.engine, self.core, self.http, self.grpc, self.submitted = engine, core, ports["http"], ports["grpc"], submitted

    def idle(self) -> bool:
        return self.engine.active_requests == 0 and lanes(self.engine) == 0


@pytest.fixture(scope="module")
def local():
    """seq2seq-reverse served by real frontends and engine in this process, with admission
    and drops off (a deadline then ends a request when it passes, not earlier)."""
    server = serve_in_process([S2S], EngineConfig(profile=False, pin_threads=False, admission=False,
                                                  drop_late=False))
    server.core.model(S2S).model.max_request_rows = BIG  # the cancellation tests' requests are this big
    stop = threading.Event()
    worker = threading.Thread(target=server.engine.serve_forever, args=(stop,), daemon=True)
    worker.start()
    yield Local(server.engine, server.core, server.ports, server.submitted)
    server.stop()
    stop.set()
    worker.join(30)


# Rows of 12 digits: requests of this many rows are still decoding when the client acts after
# its first token, on a fast machine too (the cancel tests); on a slow one they take seconds.
BIG = 2048


@pytest.mark.slow
def test_a_client_closing_generate_stream_frees_its_lanes(local):
    response = post(local.http, f"/v2/models/{S2S}/generate_stream", {"digits": digits(TEXTS[:1] * BIG).tolist()})
    assert response.status == 200
    first = next(events(response))
    assert first["triton_final_response"] is False
    response.close()  # the client goes away mid-stream
    wait_until(lambda: local.submitted and local.submitted[-1].cancelled, "the request is cancelled")
    wait_until(local.idle, "the engine holds no request and no lane")


@pytest.mark.slow
def test_a_client_cancelling_its_grpc_stream_frees_its_lanes(local):
    stream = Stream(local.grpc)
    stream.send(S2S, "digits", digits(TEXTS[:1] * BIG), "big")
    result, error = stream.results.get(timeout=120)
    assert error is None and _params(result)["triton_final_response"] is False
    stream.close(cancel=True)
    wait_until(lambda: local.submitted and local.submitted[-1].cancelled, "the request is cancelled")
    wait_until(local.idle, "the engine holds no request and no lane")


def _sse_until_deadline(local, rows: int, timeout_us: int) -> str:
    """One generate_stream with this deadline: "early" (refused before any token), "mid"
    (tokens, then the 504 event) or "done" (the whole answer in time). Asserts that a stream
    ends in one of those ways and never with an answer after its deadline."""
    doc = {"digits": digits(TEXTS[:1] * rows).tolist(), "parameters": {"timeout": timeout_us}}
    response = post(local.http, f"/v2/models/{S2S}/generate_stream", doc)
    if response.status != 200:
        assert response.status == 504 and "deadline" in json.loads(response.read())["error"]
        return "early"
    got = list(events(response))
    wait_until(local.idle, "the engine holds no request and no lane")
    if got[-1].get("triton_final_response"):
        return "done"
    assert got[-1]["status"] == 504 and "deadline" in got[-1]["error"]
    assert got[0]["triton_final_response"] is False and not any(e.get("triton_final_response") for e in got)
    return "mid"


def _grpc_until_deadline(local, rows: int, timeout_us: int) -> str:
    """The same over gRPC: DEADLINE_EXCEEDED in the request's last response."""
    stream = Stream(local.grpc)
    try:
        stream.send(S2S, "digits", digits(TEXTS[:1] * rows), "late", timeout=timeout_us)
        got = stream.until_final()
    finally:
        stream.close()
    wait_until(local.idle, "the engine holds no request and no lane")
    result, error = got[-1]
    if error is None:
        return "done"
    assert str(error).startswith("DEADLINE_EXCEEDED") and "deadline" in str(error)
    return "early" if len(got) == 1 else "mid"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_deadline_passing_mid_stream_ends_it_with_504_and_frees_the_lanes(local, protocol):
    """Each try's stream ends as the deadline says (checked in the helpers); the timeout is
    halved or doubled until one passes mid-stream (the machine's speed only sizes it)."""
    run = _sse_until_deadline if protocol == "http" else _grpc_until_deadline
    timeout_us, seen = 200_000, []
    for _ in range(12):
        seen.append(run(local, 256, timeout_us))
        if seen[-1] == "mid":
            break
        timeout_us = timeout_us * 2 if seen[-1] == "early" else max(timeout_us // 2, 1)
    assert seen[-1] == "mid", f"no deadline passed mid-stream: {seen}"
