"""The zoo served to the Open Inference Protocol's reference Python client, KServe's SDK:
`InferenceRESTClient` (protocol v2) and `InferenceGRPCClient`, for health, readiness and
inference, checked against PyTorch; and the REST fields that client sends (`model_name` in
the body) checked against the URL. The SDK runs in a process of its own (kserve_driver.py:
its gRPC stubs and tritonclient's cannot share one)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from zoo_reference import token_reference

MODEL = "gru-256"
DRIVER = Path(__file__).with_name("kserve_driver.py")


def kserve(command: str, **args):
    """What KServe's SDK got, run by kserve_driver.py."""
    done = subprocess.run([sys.executable, str(DRIVER), json.dumps({"command": command, "model": MODEL, **args})],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_against_pytorch(outputs: dict, tokens: np.ndarray) -> None:
    want = token_reference(MODEL, tokens)
    np.testing.assert_allclose(np.array(outputs["probabilities"]), want["probabilities"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.array(outputs["label"]), want["label"])


@pytest.mark.slow  # KServe's SDK starts in a process of its own
def test_rest_health_and_readiness(zoo_server):
    assert kserve("rest_health", url=zoo_server.http_url) == [True, True, True, False]


def test_health_bodies_are_the_protocols(zoo_server):
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                       (f"/v2/models/{MODEL}/ready", {"name": MODEL, "ready": True})):
        with urllib.request.urlopen(zoo_server.http_url + path, timeout=10) as response:
            assert response.status == 200 and json.loads(response.read()) == body, path


@pytest.mark.slow  # KServe's SDK starts in a process of its own
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_inference_matches_pytorch(zoo_server, binary):
    tokens = np.random.default_rng(1).integers(0, 5000, (2, 11))
    got = kserve("rest_infer", url=zoo_server.http_url, tokens=tokens.tolist(), binary=binary, request_id="k-1")
    assert got["model_name"] == MODEL and got["id"] == "k-1"
    check_against_pytorch(got["outputs"], tokens)


@pytest.mark.slow  # KServe's SDK starts in a process of its own
def test_grpc_health_readiness_and_inference(zoo_server):
    tokens = np.random.default_rng(2).integers(0, 5000, (3, 7))
    got = kserve("grpc", address=zoo_server.grpc, tokens=tokens.tolist())
    assert got["health"] == [True, True, True]
    assert got["model_name"] == MODEL
    check_against_pytorch(got["outputs"], tokens)


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


@pytest.mark.slow  # KServe's SDK starts in a process of its own
def test_rest_client_sees_a_contradiction_as_an_error(zoo_server):
    """kserve's client names the model twice (URL and body); a mismatch is a 400 it raises."""
    got = kserve("rest_infer", url=zoo_server.http_url, tokens=[[1, 1, 1]], binary=False, url_model="lstm-512")
    assert got.get("raised") == "HTTPStatusError" and "contradicts" in got["message"]
