"""The zoo served over HTTP, with tritonclient.http as the client: health, metadata, and
inference for every zoo model in JSON and in binary tensors, checked against PyTorch."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from zoo_reference import TOKEN_MODELS, digits, reversed_texts, token_reference


@pytest.fixture(scope="module")
def client(zoo_server):
    with httpclient.InferenceServerClient(zoo_server.http) as c:
        yield c


def infer(client, model, name, array, binary, outputs=None, **kw):
    tensor = httpclient.InferInput(name, list(array.shape), "INT64")
    tensor.set_data_from_numpy(array, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return client.infer(model, [tensor], outputs=requested, **kw)


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "cellserve" and {"binary_tensor_data", "sequence"} <= set(meta["extensions"])


@pytest.mark.parametrize("model", ["lstm-512", "gru-256", "bilstm-tagger", "seq2seq-reverse"])
def test_model_metadata_and_ready(client, model):
    assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model)
    assert meta["name"] == model and meta["versions"] == ["1"]
    (tensor,) = meta["inputs"]
    assert tensor == {"name": "digits" if model == "seq2seq-reverse" else "tokens", "datatype": "INT64",
                      "shape": [-1, -1]}
    assert client.get_model_metadata(model, "1")["outputs"] == meta["outputs"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", list(TOKEN_MODELS))
def test_token_models_match_pytorch(client, model, binary):
    tokens = np.random.default_rng(len(model)).integers(0, 5000, (3, 17))
    result = infer(client, model, "tokens", tokens, binary, outputs=list(TOKEN_MODELS[model]))
    want = token_reference(model, tokens)
    float_out = TOKEN_MODELS[model][0]
    np.testing.assert_allclose(result.as_numpy(float_out), want[float_out], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy(TOKEN_MODELS[model][1]), want[TOKEN_MODELS[model][1]])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_seq2seq_reverses_digits(client, binary):
    texts = ["1234567", "9081726", "5550123"]
    result = infer(client, "seq2seq-reverse", "digits", digits(texts), binary)
    assert reversed_texts(result.as_numpy("reversed")) == [t[::-1] for t in texts]


def test_all_outputs_by_default_and_request_id_echoed(client):
    result = infer(client, "gru-256", "tokens", np.array([[5, 6, 7]]), True, request_id="abc-1")
    response = result.get_response()
    assert response["id"] == "abc-1" and response["model_version"] == "1"
    assert {o["name"] for o in response["outputs"]} == {"probabilities", "label"}


def test_int32_tokens_are_accepted(client):
    tensor = httpclient.InferInput("tokens", [1, 4], "INT32")
    tensor.set_data_from_numpy(np.array([[1, 2, 3, 4]], np.int32))
    got = client.infer("gru-256", [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(got, token_reference("gru-256", np.array([[1, 2, 3, 4]]))["probabilities"],
                               rtol=1e-4, atol=1e-6)


def test_gzip_request_body(client):
    tensor = httpclient.InferInput("tokens", [1, 3], "INT64")
    tensor.set_data_from_numpy(np.array([[9, 8, 7]]))
    result = client.infer("gru-256", [tensor], request_compression_algorithm="gzip")
    assert result.as_numpy("label").shape == (1,)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_an_answer_is_compressed_when_the_client_accepts_it(client, zoo_server, coding):
    import gzip
    import http.client
    import zlib

    tokens = np.array([[9, 8, 7]])
    want = client.infer("gru-256", [_tokens(tokens)]).as_numpy("probabilities")
    tensor = _tokens(tokens)  # tritonclient asks with Accept-Encoding and inflates the answer
    got = client.infer("gru-256", [tensor], response_compression_algorithm=coding).as_numpy("probabilities")
    np.testing.assert_array_equal(got, want)
    body = json.dumps({"inputs": [{"name": "tokens", "shape": [1, 3], "datatype": "INT64", "data": [9, 8, 7]}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]})
    conn = http.client.HTTPConnection(zoo_server.http, timeout=30)
    try:
        conn.request("POST", "/v2/models/gru-256/infer", body, {"Accept-Encoding": f"{coding}, br;q=0.5"})
        response = conn.getresponse()
        raw = response.read()
        assert response.status == 200 and response.getheader("Content-Encoding") == coding
        plain = gzip.decompress(raw) if coding == "gzip" else zlib.decompress(raw)
        header = int(response.getheader("Inference-Header-Content-Length"))  # of the inflated body
        assert json.loads(plain[:header])["outputs"][0]["parameters"]["binary_data_size"] == len(plain) - header
        conn.request("POST", "/v2/models/gru-256/infer", body, {"Accept-Encoding": f"{coding};q=0"})
        response = conn.getresponse()
        response.read()
        assert response.getheader("Content-Encoding") is None  # refused by its weight: sent as it is
    finally:
        conn.close()


def _tokens(array: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("tokens", list(array.shape), "INT64")
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("version", ["", "1"])
def test_unknown_model_and_version_are_404(client, zoo_server, version):
    with pytest.raises(InferenceServerException) as err:
        infer(client, "no-such-model", "tokens", np.array([[1]]), False, model_version=version)
    assert err.value.status() == "404" and "no-such-model" in err.value.message()
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(f"{zoo_server.http_url}/v2/models/gru-256/versions/7")
    assert http_err.value.code == 404
    assert "version '7'" in json.loads(http_err.value.read())["error"]


def test_bad_request_names_the_problem_and_others_are_served(client):
    with pytest.raises(InferenceServerException) as err:
        infer(client, "lstm-512", "tokens", np.array([[1, 2, 10_000]]), True)
    assert err.value.status() == "400" and "token id 10000 is out of range" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        infer(client, "lstm-512", "words", np.array([[1, 2]]), False)
    assert err.value.status() == "400" and "'words'" in err.value.message()
    assert infer(client, "lstm-512", "tokens", np.array([[1, 2]]), True).as_numpy("label").shape == (1,)


def test_an_empty_outputs_list_asks_for_all_of_them(zoo_server):
    body = json.dumps({"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [3, 4]}],
                       "outputs": []}).encode()
    request = urllib.request.Request(f"{zoo_server.http_url}/v2/models/gru-256/infer", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        assert {o["name"] for o in json.loads(answer.read())["outputs"]} == {"probabilities", "label"}


def test_a_request_over_the_models_row_limit_is_refused_naming_it(client):
    with pytest.raises(InferenceServerException) as err:
        infer(client, "gru-256", "tokens", np.ones((1025, 1), np.int64), True)
    assert err.value.status() == "400"
    assert "1025 sequences (dimension 0) exceed the model's limit of 1024 per request" in err.value.message()
