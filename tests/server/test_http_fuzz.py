"""Schemathesis against a running zoo server, driven by the packaged OpenAPI document: every
operation gets the document's examples (real models and requests that succeed), the coverage
phase's edge cases, and random valid and invalid requests. No answer may be a 5xx; every answer
must match the document (status code, content type, body schema, headers); every 4xx must be
`{"error": "<message>"}`. Afterwards the server still answers health and inference."""

from __future__ import annotations

import json
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.generation import GenerationMode

pytestmark = pytest.mark.slow  # hundreds of generated requests: over ten seconds

DOCUMENT = Path(str(resources.files("cellserve.server").joinpath("openapi.json")))

# Loaded at import time (parametrize needs the operations); the base URL comes at call time.
schema = schemathesis.openapi.from_path(DOCUMENT)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=60,
                                deterministic=True)


def error_body_on_4xx(ctx, response, case) -> bool | None:
    """Every client error is JSON `{"error": "<non-empty message>"}`."""
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/json"), \
            f"{response.status_code} with content type {content_type!r}: {response.content[:200]!r}"
        body = json.loads(response.content)
        assert isinstance(body, dict) and set(body) == {"error"}, f"{response.status_code} body {body!r}"
        assert isinstance(body["error"], str) and body["error"].strip(), f"{response.status_code} body {body!r}"
    return None


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance, error_body_on_4xx]


def test_document_is_valid_openapi():
    schema.validate()  # against the OpenAPI 3.0 meta-schema
    assert {op.ok().label for op in schema.get_all_operations()} >= {
        "GET /v2", "POST /v2/models/{model_name}/infer", "POST /v2/models/{model_name}/versions/{model_version}/infer"}


def test_served_document_is_the_packaged_one(zoo_server):
    with urllib.request.urlopen(f"{zoo_server.http_url}/openapi.json", timeout=10) as response:
        assert response.headers["content-type"].startswith("application/json")
        assert json.loads(response.read()) == json.loads(DOCUMENT.read_text())


# Sequences the fuzz left open ((model, version, sequence_id) -> whether ended), closed afterwards:
# the server is shared, and other tests count its active sequences.
SEQUENCES: dict[tuple[str, str, object], bool] = {}


def note_sequence(case, response) -> None:
    if case.method != "POST" or response.status_code != 200 or not case.path.startswith("/v2/models/"):
        return  # only inference answers carry sequences
    content = response.content
    length = response.headers.get("inference-header-content-length")
    if length:
        length = length[0] if isinstance(length, list) else length
        content = content[:int(length)]
    doc = json.loads(content)
    params = doc.get("parameters") or {}
    if "sequence_id" in params:
        key = (doc["model_name"], doc["model_version"], params["sequence_id"])
        SEQUENCES[key] = bool(params.get("sequence_end"))


@schema.parametrize()
@settings(deadline=None, max_examples=60, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_api_conforms(case, zoo_server):
    response = case.call_and_validate(base_url=zoo_server.http_url, checks=CHECKS, timeout=30)
    note_sequence(case, response)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_server_still_serves_after_fuzz(zoo_server):
    # the fuzz may have turned the shared server's log settings anywhere: back to the defaults
    post(f"{zoo_server.http_url}/v2/logging", {"log_info": False, "log_warning": True, "log_error": True,
                                               "log_verbose_level": 0, "log_format": "default"})
    with urllib.request.urlopen(f"{zoo_server.http_url}/v2/health/ready", timeout=10) as response:
        assert response.status == 200
    body = {"inputs": [{"name": "tokens", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    result = post(f"{zoo_server.http_url}/v2/models/lstm-512/infer", body)
    outputs = {o["name"]: o for o in result["outputs"]}
    assert result["model_name"] == "lstm-512" and set(outputs) == {"probabilities", "label"}
    assert outputs["probabilities"]["shape"] == [1, 8] and abs(sum(outputs["probabilities"]["data"]) - 1) < 1e-4


def test_close_sequences_the_fuzz_opened(zoo_server):
    """Each sequence the fuzz started and did not end takes one more chunk and ends."""
    for (model, version, sequence_id), ended in SEQUENCES.items():
        if ended:
            continue
        body = {"parameters": {"sequence_id": sequence_id, "sequence_end": True},
                "inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}
        result = post(f"{zoo_server.http_url}/v2/models/{model}/versions/{version}/infer", body)
        assert result["parameters"]["sequence_end"] is True
