"""The zoo served over gRPC (KServe v2 / Triton GRPCInferenceService), with tritonclient.grpc
as the client: health, metadata, inference for every zoo model checked against PyTorch,
sequences in chunks, typed contents, and bad requests answered INVALID_ARGUMENT with a
message that names the problem."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serverproc import start_server
from zoo_reference import TOKEN_MODELS, digits, reversed_texts, token_reference

MODELS = ["lstm-512", "gru-256", "bilstm-tagger", "seq2seq-reverse"]
TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def client(zoo_server):
    with grpcclient.InferenceServerClient(zoo_server.grpc) as c:
        yield c


@pytest.fixture(scope="module")
def stub(zoo_server):
    """The raw generated stub, for requests tritonclient would not build."""
    with grpc.insecure_channel(zoo_server.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def tensor(name, array, datatype="INT64"):
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def infer(client, model, array, name="tokens", outputs=None, **kw):
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, [tensor(name, array)], outputs=requested, **kw)


def status_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value


def assert_serves_gru(client):
    """The server still answers a good request correctly."""
    tokens = np.array([[4, 5, 6]])
    np.testing.assert_allclose(infer(client, "gru-256", tokens).as_numpy("probabilities"),
                               token_reference("gru-256", tokens)["probabilities"], **TOL)


# ---- health and metadata ----

def test_server_live_ready_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "cellserve" and meta.version
    assert {"binary_tensor_data", "sequence", "priority", "timeout"} <= set(meta.extensions)


@pytest.mark.parametrize("model", MODELS)
def test_model_ready_and_metadata(client, model):
    assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model)
    assert meta.name == model and list(meta.versions) == ["1"] and meta.platform
    (inp,) = meta.inputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("digits" if model == "seq2seq-reverse" else "tokens",
                                                         "INT64", [-1, -1])
    # outputs: the reference module's names and dtypes; batch and time dims dynamic (-1)
    with_version = client.get_model_metadata(model, "1")
    assert with_version.outputs == meta.outputs
    outputs = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
    if model == "seq2seq-reverse":
        assert outputs == {"reversed": ("INT64", [-1, -1])}
        return
    probs, labels = TOKEN_MODELS[model]
    want = token_reference(model, np.array([[1, 2, 3]]))
    assert outputs[probs][0] == "FP32" and want[probs].dtype == np.float32
    assert outputs[labels][0] == "INT64" and want[labels].dtype == np.int64
    assert outputs[probs][1][0] == -1 and outputs[probs][1][-1] == want[probs].shape[-1]
    assert all(d == -1 for d in outputs[labels][1])
    if model == "bilstm-tagger":  # per-token outputs: the time axis is dynamic too
        assert outputs[probs][1] == [-1, -1, 16] and outputs[labels][1] == [-1, -1]


@pytest.mark.parametrize("version", ["", "7"])
def test_unknown_model_or_version_is_not_found(client, version):
    model = "no-such-model" if version == "" else "gru-256"
    assert client.is_model_ready(model, version) is False  # not ready, not an error (as Triton answers)
    for call in (lambda: client.get_model_metadata(model, version),
                 lambda: infer(client, model, np.array([[1]]), model_version=version)):
        err = status_of(call)
        assert err.status() == "StatusCode.NOT_FOUND"
        assert (f"version '{version}'" if version else "'no-such-model'") in err.message()


# ---- inference ----

@pytest.mark.parametrize("model", list(TOKEN_MODELS))
def test_token_models_match_pytorch(client, model):
    tokens = np.random.default_rng(len(model)).integers(0, 5000, (3, 17))  # within every model's vocabulary
    result = infer(client, model, tokens)
    want = token_reference(model, tokens)
    probs, labels = TOKEN_MODELS[model]
    np.testing.assert_allclose(result.as_numpy(probs), want[probs], **TOL)
    np.testing.assert_array_equal(result.as_numpy(labels), want[labels])
    assert {o.name for o in result.get_response().outputs} == {probs, labels}


def test_seq2seq_reverses_digits(client):
    texts = ["1234567", "9081726", "5550123"]
    result = infer(client, "seq2seq-reverse", digits(texts), name="digits")
    assert reversed_texts(result.as_numpy("reversed")) == [t[::-1] for t in texts]
    assert result.as_numpy("reversed").dtype == np.int64


def test_requested_outputs_subset_and_request_id_echoed(client):
    tokens = np.array([[5, 6, 7, 8]])
    result = infer(client, "lstm-512", tokens, outputs=["label"], request_id="req-42", model_version="1")
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"] and result.as_numpy("probabilities") is None
    assert response.id == "req-42" and response.model_name == "lstm-512" and response.model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("label"), token_reference("lstm-512", tokens)["label"])
    err = status_of(lambda: infer(client, "lstm-512", tokens, outputs=["logits"]))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "'logits'" in err.message()


def test_int32_tokens_priority_and_timeout_are_accepted(client):
    tokens = np.array([[1, 2, 3, 4]], np.int32)
    result = client.infer("gru-256", [tensor("tokens", tokens, "INT32")], priority=3, timeout=30_000_000)
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               token_reference("gru-256", tokens.astype(np.int64))["probabilities"], **TOL)


def test_concurrent_requests_each_get_their_own_answer(client):
    rng = np.random.default_rng(11)
    batches = [rng.integers(0, 10000, (1, int(rng.integers(1, 20)))) for _ in range(16)]
    with ThreadPoolExecutor(8) as pool:  # one channel, many calls in flight at once
        results = list(pool.map(lambda tokens: infer(client, "lstm-512", tokens).as_numpy("probabilities"), batches))
    for tokens, got in zip(batches, results):
        np.testing.assert_allclose(got, token_reference("lstm-512", tokens)["probabilities"], **TOL)


def test_a_client_that_gives_up_does_not_disturb_the_server(client):
    err = status_of(lambda: infer(client, "lstm-512", np.ones((8, 200), np.int64), client_timeout=0.001))
    # the call's deadline is the request's: the server refuses it at once when it sees the 1 ms
    # cannot be met, unless gRPC's own timer ends the call first
    assert err.status() in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED"), err
    if err.status() == "StatusCode.RESOURCE_EXHAUSTED":
        assert "misses the deadline" in err.message()
    assert_serves_gru(client)


@pytest.mark.parametrize("model,sequence_id", [("lstm-512", 101), ("gru-256", "user-7/stream-1")])
def test_sequence_in_chunks_equals_the_whole(client, model, sequence_id):
    tokens = np.random.default_rng(3).integers(0, 10000, (1, 23))
    bounds = [0, 5, 6, 15, 23]
    for a, b in zip(bounds, bounds[1:]):
        result = infer(client, model, tokens[:, a:b], sequence_id=sequence_id, sequence_start=a == 0,
                       sequence_end=b == 23)
        # each chunk answers for the prefix so far; the last one for the whole sequence
        np.testing.assert_allclose(result.as_numpy("probabilities"),
                                   token_reference(model, tokens[:, :b])["probabilities"], **TOL)
        params = result.get_response().parameters
        got_id = params["sequence_id"].string_param or params["sequence_id"].int64_param
        assert got_id == sequence_id and params["sequence_end"].bool_param == (b == 23)
    err = status_of(lambda: infer(client, model, tokens[:, :2], sequence_id=sequence_id))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "ended by sequence_end" in err.message()


def test_sequence_on_a_whole_input_model_is_refused(client):
    err = status_of(lambda: infer(client, "bilstm-tagger", np.array([[1, 2]]), sequence_id=9, sequence_start=True))
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "cannot serve sequences" in err.message()


def test_typed_contents_instead_of_raw(stub):
    tokens = np.array([[7, 8, 9], [10, 11, 12]])
    request = service_pb2.ModelInferRequest(model_name="gru-256")
    request.inputs.add(name="tokens", datatype="INT32", shape=[2, 3]).contents.int_contents.extend(tokens.ravel())
    response = stub.ModelInfer(request)
    (probs,) = [i for i, o in enumerate(response.outputs) if o.name == "probabilities"]
    got = np.frombuffer(response.raw_output_contents[probs], np.float32).reshape(list(response.outputs[probs].shape))
    np.testing.assert_allclose(got, token_reference("gru-256", tokens)["probabilities"], **TOL)


# ---- bad requests ----

def bad(client, call, *words):
    err = status_of(call)
    assert err.status() == "StatusCode.INVALID_ARGUMENT", err
    for word in words:
        assert word in err.message(), err.message()
    assert_serves_gru(client)


def test_wrong_input_name(client):
    bad(client, lambda: infer(client, "lstm-512", np.array([[1, 2]]), name="words"), "'words'", "'tokens'")


def test_wrong_datatype(client):
    bad(client, lambda: client.infer("lstm-512", [tensor("tokens", np.array([[1.0, 2.0]], np.float32), "FP32")]),
        "input 'tokens': has datatype FP32; the model expects INT64")


def test_wrong_shape_and_byte_length(client):
    bad(client, lambda: infer(client, "lstm-512", np.array([[[1, 2]]])), "'tokens'", "rank 2")
    short = tensor("tokens", np.array([[1, 2, 3]]))
    short.set_shape([1, 4])  # the shape says 32 bytes, the data has 24
    bad(client, lambda: client.infer("lstm-512", [short]), "'tokens'", "needs 32 bytes, got 24")
    negative = tensor("tokens", np.array([[1, 2, 3]]))
    negative.set_shape([1, -3])
    bad(client, lambda: client.infer("lstm-512", [negative]), "'tokens'", "positive")


def test_a_shape_past_the_models_limits_is_refused_before_its_data_is_read(client):
    long = tensor("tokens", np.array([[1, 2, 3]]))
    long.set_shape([1, 30_000_000])  # 24 bytes of data: the declared shape is refused first
    bad(client, lambda: client.infer("lstm-512", [long]), "sequence length 30000000 exceeds the model's limit")


def test_token_id_out_of_range(client):
    bad(client, lambda: infer(client, "lstm-512", np.array([[1, 2, 10_000]])), "token id 10000 is out of range")
    bad(client, lambda: infer(client, "seq2seq-reverse", np.array([[1, -4]]), name="digits"), "token id -4")


def test_malformed_messages_from_the_raw_stub(client, stub):
    def call(request):
        def send():
            try:
                stub.ModelInfer(request)
            except grpc.RpcError as exc:  # rephrased as tritonclient does, for `bad`
                raise InferenceServerException(exc.details(), str(exc.code())) from None
        return send

    mixed = service_pb2.ModelInferRequest(model_name="gru-256", raw_input_contents=[np.int64(1).tobytes()])
    mixed.inputs.add(name="tokens", datatype="INT64", shape=[1, 1]).contents.int64_contents.append(1)
    bad(client, call(mixed), "'tokens'", "raw_input_contents")

    count = service_pb2.ModelInferRequest(model_name="gru-256", raw_input_contents=[b"", b""])
    count.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    bad(client, call(count), "raw_input_contents has 2 entries for 1 inputs")

    empty = service_pb2.ModelInferRequest(model_name="gru-256")
    empty.inputs.add(name="tokens", datatype="INT64", shape=[1, 2])
    bad(client, call(empty), "'tokens'", "no data")

    wrong_field = service_pb2.ModelInferRequest(model_name="gru-256")
    wrong_field.inputs.add(name="tokens", datatype="INT64", shape=[1, 1]).contents.fp32_contents.append(1.0)
    bad(client, call(wrong_field), "'tokens'", "int64_contents")

    too_wide = service_pb2.ModelInferRequest(model_name="gru-256")
    too_wide.inputs.add(name="tokens", datatype="INT8", shape=[1, 1]).contents.int_contents.append(300)
    bad(client, call(too_wide), "'tokens'", "does not fit INT8")

    unnamed = service_pb2.ModelInferRequest(model_name="gru-256", raw_input_contents=[b"\0" * 8])
    unnamed.inputs.add(datatype="INT64", shape=[1, 1])
    bad(client, call(unnamed), "inputs[0] needs a name")

    twice = service_pb2.ModelInferRequest(model_name="gru-256", raw_input_contents=[b"\0" * 8] * 2)
    twice.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    twice.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    bad(client, call(twice), "'tokens' is given twice")

    unknown_type = service_pb2.ModelInferRequest(model_name="gru-256", raw_input_contents=[b"\0" * 8])
    unknown_type.inputs.add(name="tokens", datatype="INT63", shape=[1, 1])
    bad(client, call(unknown_type), "'tokens'", "unsupported datatype 'INT63'")

    flag = service_pb2.ModelInferRequest(model_name="gru-256", raw_input_contents=[b"\0" * 8])
    flag.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    flag.parameters["sequence_start"].string_param = "yes"
    bad(client, call(flag), "'sequence_start' must be a boolean")


# ---- the server's own limits ----

@pytest.mark.slow  # starts servers of its own
def test_message_size_limit_and_port_in_use():
    server = start_server("--model", "gru-256", "--max-request-size", "4096")
    try:
        with grpcclient.InferenceServerClient(server.grpc) as client:
            err = status_of(lambda: infer(client, "gru-256", np.ones((1, 1000), np.int64)))
            assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert_serves_gru(client)
        # a port already taken (even by a socket that allows SO_REUSEPORT) fails the start
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proc = subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", "--model", "gru-256",
                                   "--http-port", "0", "--metrics-port", "0", "--grpc-port", str(port)],
                                  capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"cannot bind gRPC to 127.0.0.1:{port}" in proc.stderr
    finally:
        assert server.stop() == 0
