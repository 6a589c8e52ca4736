"""The zoo served to the Open Inference Protocol's reference Python client, KServe's SDK:
`InferenceRESTClient` (protocol v2) and `InferenceGRPCClient`, for health, readiness and
inference, checked against PyTorch; and the REST fields that client sends (`model_name` in
the body) checked against the URL."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from zoo_reference import token_reference

MODEL = "gru-256"


def run(coro):
    return asyncio.run(coro)


def request(tokens: np.ndarray, binary: bool, **kw) -> InferRequest:
    tensor = InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens, binary_data=binary)
    return InferRequest(model_name=MODEL, infer_inputs=[tensor], **kw)


def check_against_pytorch(response, tokens: np.ndarray) -> None:
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    want = token_reference(MODEL, tokens)
    np.testing.assert_allclose(outputs["probabilities"], want["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(outputs["label"], want["label"])


def test_rest_health_and_readiness(zoo_server):
    async def go():
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            return (await client.is_server_live(zoo_server.http_url), await client.is_server_ready(zoo_server.http_url),
                    await client.is_model_ready(zoo_server.http_url, MODEL),
                    await client.is_model_ready(zoo_server.http_url, "no-such-model"))

    assert run(go()) == (True, True, True, False)


def test_health_bodies_are_the_protocols(zoo_server):
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                       (f"/v2/models/{MODEL}/ready", {"name": MODEL, "ready": True})):
        with urllib.request.urlopen(zoo_server.http_url + path, timeout=10) as response:
            assert response.status == 200 and json.loads(response.read()) == body, path


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_inference_matches_pytorch(zoo_server, binary):
    tokens = np.random.default_rng(1).integers(0, 5000, (2, 11))

    async def go():
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            return await client.infer(zoo_server.http_url, request(tokens, binary, request_id="k-1"),
                                      model_name=MODEL)

    response = run(go())
    assert response.model_name == MODEL and response.id == "k-1"
    check_against_pytorch(response, tokens)


def test_grpc_health_readiness_and_inference(zoo_server):
    tokens = np.random.default_rng(2).integers(0, 5000, (3, 7))

    async def go():
        client = InferenceGRPCClient(zoo_server.grpc)
        try:
            health = (await client.is_server_live(), await client.is_server_ready(),
                      await client.is_model_ready(MODEL))
            return health, await client.infer(request(tokens, True))
        finally:
            await client.close()

    health, response = run(go())
    assert health == (True, True, True)
    assert response.model_name == MODEL
    check_against_pytorch(response, tokens)


def post(zoo_server, path: str, doc: dict) -> tuple[int, dict]:
    req = urllib.request.Request(zoo_server.http_url + path, json.dumps(doc).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


TENSOR = {"name": "tokens", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}


def test_body_model_name_and_version_that_agree_with_the_url_are_accepted(zoo_server):
    status, body = post(zoo_server, f"/v2/models/{MODEL}/versions/1/infer",
                        {"model_name": MODEL, "model_version": "1", "inputs": [TENSOR]})
    assert status == 200 and body["model_name"] == MODEL
    # a version named only in the body picks it
    status, body = post(zoo_server, f"/v2/models/{MODEL}/infer", {"model_version": "1", "inputs": [TENSOR]})
    assert status == 200 and body["model_version"] == "1"


@pytest.mark.parametrize("doc, says", [
    ({"model_name": "lstm-512"}, "'model_name' 'lstm-512' in the body contradicts the model 'gru-256' in the URL"),
    ({"model_version": "2"}, "'model_version' '2' in the body contradicts version '1' in the URL"),
    ({"model_name": 5}, "'model_name' must be a string, got 5"),
])
def test_body_fields_that_contradict_the_url_are_400(zoo_server, doc, says):
    status, body = post(zoo_server, f"/v2/models/{MODEL}/versions/1/infer", {**doc, "inputs": [TENSOR]})
    assert status == 400 and says in body["error"]


def test_rest_client_sees_a_contradiction_as_an_error(zoo_server):
    """kserve's client names the model twice (URL and body); a mismatch is a 400 it raises."""
    async def go():
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            await client.infer(zoo_server.http_url, request(np.ones((1, 3), np.int64), False), model_name="lstm-512")

    with pytest.raises(httpx.HTTPStatusError, match="contradicts"):
        run(go())
