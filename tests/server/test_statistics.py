"""Triton's statistics extension over HTTP and gRPC, read by tritonclient's
get_inference_statistics: the counts move by what the test sent (the zoo server is shared
with other tests, so each check is a difference), unknown models and versions are 404 /
NOT_FOUND, and the server lists the extension. And the model repository extension: its index
(get_model_repository_index), and load/unload refused saying why."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.graph import zoo


def stats_of(zoo_server, protocol: str, model: str = "", version: str = "") -> list[dict]:
    """model_stats as JSON with numbers (gRPC's JSON form writes uint64 as strings)."""
    if protocol == "grpc":
        with grpcclient.InferenceServerClient(zoo_server.grpc) as c:
            found = c.get_inference_statistics(model, version, as_json=True)["model_stats"]
        return [_numbers(s) for s in found]
    with httpclient.InferenceServerClient(zoo_server.http) as c:
        return c.get_inference_statistics(model, version)["model_stats"]


def _numbers(value, key: str = ""):
    if isinstance(value, dict):
        return {k: _numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return int(value) if key not in ("name", "version") and isinstance(value, str) else value


def duration(stat: dict, kind: str) -> tuple[int, int]:
    d = stat["inference_stats"].get(kind, {})
    return d.get("count", 0), d.get("ns", 0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_counts_move_by_what_was_sent(zoo_server, protocol):
    (before,) = stats_of(zoo_server, protocol, "gru-256", "1")
    started_ms = time.time() * 1e3
    tokens = httpclient.InferInput("tokens", [2, 3], "INT64")
    tokens.set_data_from_numpy(np.array([[1, 2, 3], [4, 5, 6]]))
    bad = httpclient.InferInput("tokens", [1, 1], "INT64")
    bad.set_data_from_numpy(np.array([[99_999]]))
    with httpclient.InferenceServerClient(zoo_server.http) as c:
        for _ in range(3):
            c.infer("gru-256", [tokens])
        with pytest.raises(InferenceServerException):
            c.infer("gru-256", [bad])
    (after,) = stats_of(zoo_server, protocol, "gru-256", "1")
    assert (after["name"], after["version"]) == ("gru-256", "1")
    assert after["inference_count"] - before["inference_count"] == 6  # 3 requests of 2 sequences
    assert after["execution_count"] - before["execution_count"] >= 6  # 3 steps of 2 layers at least
    for kind, more in (("success", 3), ("fail", 1), ("queue", 3), ("compute_infer", 3)):
        (n0, ns0), (n1, ns1) = duration(before, kind), duration(after, kind)
        assert n1 - n0 == more, kind
        assert ns1 > ns0, kind
    assert duration(after, "compute_input") == duration(after, "compute_output") == (0, 0)
    assert after["last_inference"] >= started_ms - 1000  # wall clock: allow a second of skew
    assert after["batch_stats"] == [] if protocol == "http" else "batch_stats" not in after


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_no_model_means_every_model_and_no_version_every_version(zoo_server, protocol):
    everything = stats_of(zoo_server, protocol)
    assert {s["name"] for s in everything} == set(zoo.names())  # the zoo server serves the whole zoo
    assert [(s["name"], s["version"]) for s in stats_of(zoo_server, protocol, "lstm-512")] == [("lstm-512", "1")]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unknown_model_or_version_is_not_found(zoo_server, protocol):
    for model, version in (("no-such-model", ""), ("gru-256", "7")):
        with pytest.raises(InferenceServerException) as err:
            stats_of(zoo_server, protocol, model, version)
        assert err.value.status() in ("404", "StatusCode.NOT_FOUND")
        assert repr(model if not version else version) in err.value.message()


def test_the_server_lists_the_extension(zoo_server):
    with httpclient.InferenceServerClient(zoo_server.http) as c:
        assert "statistics" in c.get_server_metadata()["extensions"]


# ---- the model repository extension: its index; load and unload are refused ----

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_repository_index_lists_every_version_ready(zoo_server, protocol):
    if protocol == "grpc":
        with grpcclient.InferenceServerClient(zoo_server.grpc) as c:
            index = c.get_model_repository_index(as_json=True)["models"]
    else:
        with httpclient.InferenceServerClient(zoo_server.http) as c:
            index = c.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == \
        sorted((name, "1", "READY") for name in zoo.names())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_load_and_unload_are_refused_saying_why(zoo_server, protocol):
    module = grpcclient if protocol == "grpc" else httpclient
    with module.InferenceServerClient(zoo_server.grpc if protocol == "grpc" else zoo_server.http) as c:
        for call, verb in ((c.load_model, "load"), (c.unload_model, "unload")):
            with pytest.raises(InferenceServerException) as err:
                call("gru-256")
            assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
            assert f"cannot {verb} model 'gru-256'" in err.value.message()
            assert "model control mode NONE" in err.value.message()
            assert "--model-control-mode explicit" in err.value.message()
        assert c.is_model_ready("gru-256")  # nothing changed


def test_a_bad_index_request_is_refused(zoo_server):
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{zoo_server.http_url}/v2/repository/index", b'{"ready": "yes"}',
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400 and '"ready": true|false' in json.loads(err.value.read())["error"]
    ready_only = urllib.request.Request(f"{zoo_server.http_url}/v2/repository/index", b'{"ready": true}',
                                        {"Content-Type": "application/json"})
    with urllib.request.urlopen(ready_only) as answer:
        assert {m["name"] for m in json.loads(answer.read())} == set(zoo.names())
