"""The Prometheus endpoint: Triton's counters under cellserve_, and the cellular ones."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException


def scrape(server) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics").read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def infer(client, tokens, **kw):
    tensor = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens)
    return client.infer("lstm-512", [tensor], **kw)


def test_counters_follow_requests(zoo_server):
    m = {"model": "lstm-512", "version": "1"}
    before = scrape(zoo_server)
    with httpclient.InferenceServerClient(zoo_server.http) as client:
        infer(client, np.ones((2, 10), np.int64))
        infer(client, np.ones((1, 5), np.int64))
        with pytest.raises(InferenceServerException):
            infer(client, np.full((1, 3), 10**6, np.int64))
        with pytest.raises(InferenceServerException):
            infer(client, np.ones((1, 400), np.int64), timeout=1)
        infer(client, np.ones((1, 3), np.int64), sequence_id=77, sequence_start=True)
        after = scrape(zoo_server)
        infer(client, np.ones((1, 3), np.int64), sequence_id=77, sequence_end=True)
    gained = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert gained("cellserve_inference_request_success_total", **m) == 3
    assert gained("cellserve_inference_request_failure_total", **m, reason="invalid") == 1
    # the 1 us deadline: refused by admission, or, when a loaded machine's engine does not
    # reach it within the server's few milliseconds past the deadline, answered as dropped
    assert (gained("cellserve_inference_request_failure_total", **m, reason="rejected")
            + gained("cellserve_inference_request_failure_total", **m, reason="dropped")) == 1
    assert gained("cellserve_inference_count_total", **m) == 4  # a batch of 2 counts 2
    # every token of every layer ran in some batched step of the model's cell types
    assert gained("cellserve_inference_exec_count_total", **m) > 0
    lanes = {dict(k)["cell_type"]: v - value(before, n, **dict(k)) for (n, k), v in after.items()
             if n == "cellserve_cell_lanes_total" and dict(k)["cell_type"].startswith("lstm-512:1/")}
    # its two layers step as one stacked cell type; runs of lone lanes count each step
    assert list(lanes) == ["lstm-512:1/rnn.LSTM+rnn.LSTM_1"]
    assert lanes["lstm-512:1/rnn.LSTM+rnn.LSTM_1"] >= 2 * 10 + 5 + 3
    for name in ("request_duration_us", "queue_duration_us", "compute_duration_us"):
        assert gained(f"cellserve_inference_{name}_total", **m) > 0
    assert value(after, "cellserve_inference_pending_request_count", **m) == 0
    # other tests on this shared server may have left sequences open: count from `before`
    assert gained("cellserve_sequences_active", model="lstm-512") == 1
    final = scrape(zoo_server)
    assert value(final, "cellserve_sequences_active", model="lstm-512") == value(
        before, "cellserve_sequences_active", model="lstm-512")


def test_requests_refused_before_the_core_count_as_invalid_too(zoo_server):
    """A 400 for a body that cannot be read as a request (over HTTP, or a gRPC message whose
    tensors do not parse) counts under reason "invalid", as one the engine refuses does."""
    import json

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    m = {"model": "lstm-512", "version": "1"}
    before = scrape(zoo_server)
    url = f"http://{zoo_server.http}/v2/models/lstm-512/infer"
    bodies = [b"not json", json.dumps({"inputs": []}).encode(),  # no inputs at all
              json.dumps({"inputs": [{"name": "tokens", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3]}]}).encode()]
    for body in bodies:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 400
    with grpc.insecure_channel(zoo_server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        bad = service_pb2.ModelInferRequest(model_name="lstm-512")
        bad.inputs.add(name="tokens", datatype="INT64", shape=[1, 4])
        bad.raw_input_contents.append(b"\0" * 24)  # 3 of the 4 int64 values
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(zoo_server)
    assert (value(after, "cellserve_inference_request_failure_total", **m, reason="invalid")
            - value(before, "cellserve_inference_request_failure_total", **m, reason="invalid")) == len(bodies) + 1


def test_unknown_paths_on_the_metrics_port_are_json_404(zoo_server):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{zoo_server.metrics}/nope")
    assert err.value.code == 404 and b'"error"' in err.value.read()


@pytest.mark.slow  # starts a server of its own
def test_no_stack_layers_steps_each_layer_as_its_own_cell_type_with_the_same_answer(zoo_server):
    from serverproc import start_server

    tokens = np.arange(1, 13, dtype=np.int64).reshape(1, 12)
    with httpclient.InferenceServerClient(zoo_server.http) as client:
        stacked = infer(client, tokens).as_numpy("probabilities")
    server = start_server("--model", "lstm-512", "--no-stack-layers", "--grpc-port", "-1")
    try:
        with httpclient.InferenceServerClient(server.http) as client:
            layered = infer(client, tokens).as_numpy("probabilities")
        samples = scrape(server)
        steps = {dict(k)["cell_type"]: v for (n, k), v in samples.items() if n == "cellserve_cell_steps_total"}
        assert sorted(steps) == ["lstm-512:1/rnn.LSTM/0", "lstm-512:1/rnn.LSTM_1/0"], server.output()
        assert all(v > 0 for v in steps.values())
    finally:
        assert server.stop() == 0
    np.testing.assert_allclose(layered, stacked, rtol=1e-4, atol=1e-6)


def test_admissions_price_accuracy_is_exported_as_quantiles(zoo_server):
    with httpclient.InferenceServerClient(zoo_server.http) as client:
        for n in (4, 8, 16):  # a 10 s deadline: admission prices each, and each is answered
            infer(client, np.ones((1, n), np.int64), timeout=10_000_000)
    after = scrape(zoo_server)
    q = [value(after, "cellserve_admission_price_ratio", quantile=k) for k in ("0.1", "0.5", "0.9")]
    assert 0 < q[0] <= q[1] <= q[2]
