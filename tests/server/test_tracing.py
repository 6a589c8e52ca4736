"""Triton's trace extension (cellserve/server/tracing.py, docs/tracing.md): the --trace-config
flag, the trace/setting endpoints over HTTP and gRPC with tritonclient, sampling by rate and
count, and the trace file a real server writes."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.server.tracing import (STAMPS, Trace, Tracer, TraceSettingError, TraceSettings, parse_trace_config,
                                      read_trace_files)
from serverproc import start_server

MODEL = "lstm-512"
# what a plain request through each protocol is stamped with, in order (docs/tracing.md)
ENGINE_STAMPS = ["REQUEST_START", "QUEUE_START", "ENGINE_ADMIT", "COMPUTE_START", "COMPUTE_INPUT_END",
                 "PROJECTION_END", "FIRST_STEP_START", "LAST_STEP_END", "COMPUTE_OUTPUT_START", "PLAIN_OPS_END",
                 "COMPUTE_END", "RESPONSE_ON_LOOP", "REQUEST_END"]
HTTP_STAMPS = ["HTTP_RECV_START", "HTTP_RECV_END", *ENGINE_STAMPS, "HTTP_SEND_START", "HTTP_SEND_END"]
GRPC_STAMPS = ["GRPC_WAITREAD_END", *ENGINE_STAMPS, "GRPC_SEND_START", "GRPC_SEND_END"]


# ---- the flag ----

def test_trace_config_reads_tritons_forms():
    s = parse_trace_config(["level=TIMESTAMPS", "rate=7", "count=3", "mode=triton", "triton,file=/tmp/t.json",
                            "triton,log-frequency=50"])
    assert s == TraceSettings("TIMESTAMPS", 7, 3, 50, "/tmp/t.json")
    assert parse_trace_config([]) == TraceSettings()  # off


@pytest.mark.parametrize("entries, named", [
    (["rate=0"], "'rate=0'"), (["rate=x"], "rate must be an integer"), (["count=-2"], "count must be >= -1"),
    (["level=TENSORS", "triton,file=t"], "TENSORS is not supported"), (["level=LOUD"], "OFF or TIMESTAMPS"),
    (["mode=opentelemetry"], "'opentelemetry' is not supported"), (["bogus=1"], "unknown setting 'bogus'"),
    (["triton,bogus=1"], "unknown triton setting 'bogus'"), (["rate"], "expected SETTING=VALUE"),
    (["level=TIMESTAMPS"], "needs a file"), (["opentelemetry,url=x"], "mode 'opentelemetry'"),
    # a file the server could not write when it stops is refused when it starts
    (["level=TIMESTAMPS", "triton,file=/no/such/folder/t.json"], "folder '/no/such/folder' does not exist"),
    (["level=TIMESTAMPS", "triton,file=/"], "file '/' is a directory"),
])
def test_trace_config_errors_name_the_entry(entries, named):
    with pytest.raises(ValueError, match=named):
        parse_trace_config(entries)


def test_serve_refuses_a_bad_trace_config_with_exit_2(capsys):
    from cellserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--trace-config", "rate=0"])
    assert exc.value.code == 2
    assert "--trace-config entry 'rate=0': rate must be >= 1, got 0" in capsys.readouterr().err


# ---- sampling and settings (no server) ----

def _on(tmp_path, **kw) -> Tracer:
    return Tracer(TraceSettings("TIMESTAMPS", file=str(tmp_path / "t.json"), **kw))


def test_rate_traces_every_nth_request_and_count_stops_it(tmp_path):
    tracer = _on(tmp_path, rate=3, count=2)
    taken = [tracer.start(MODEL, "1") is not None for _ in range(12)]
    assert taken == [False, False, True, False, False, True] + [False] * 6
    assert tracer.get()["trace_count"] == "0"
    assert Tracer().on is False and Tracer().start(MODEL, "1") is None  # off by default


def test_a_models_own_settings_and_clearing_them(tmp_path):
    tracer = _on(tmp_path, rate=1)
    tracer.update({"trace_level": ["OFF"], "trace_rate": "2"}, model=MODEL)
    assert tracer.get(MODEL)["trace_level"] == ["OFF"] and tracer.get()["trace_level"] == ["TIMESTAMPS"]
    assert tracer.start(MODEL, "1") is None and tracer.start("other", "1") is not None
    tracer.update({"trace_level": None}, model=MODEL)  # rate 2 stays the model's own
    assert [tracer.start(MODEL, "1") is not None for _ in range(4)] == [False, True, False, True]
    tracer.update({"trace_rate": None}, model=MODEL)  # nothing of its own left: the server's again
    assert tracer.get(MODEL) == tracer.get()


@pytest.mark.parametrize("changes, model, named", [
    ({"trace_rate": "0"}, None, "'trace_rate' must be >= 1"), ({"trace_rate": "x"}, None, "'trace_rate' must be"),
    ({"trace_count": "-5"}, None, "'trace_count' must be >= -1"), ({"trace_level": ["TENSORS"]}, None, "TENSORS"),
    ({"trace_level": "LOUD"}, None, "'trace_level' must be OFF or TIMESTAMPS"),
    ({"trace_file": "/tmp/x"}, None, "'trace_file' is set when the server starts"),
    ({"log_frequency": "5"}, MODEL, "'log_frequency' is server-wide"), ({"trace_mode": "opentelemetry"}, None,
                                                                          "'trace_mode'"),
    ({"trace_bogus": "1"}, None, "unknown trace setting 'trace_bogus'"), ({"trace_rate": None}, None, "cleared"),
    ({"trace_rate": True}, None, "'trace_rate' must be a string"), ({"trace_rate": ["1", "2"]}, None, "one value"),
])
def test_bad_settings_name_the_setting_and_change_nothing(tmp_path, changes, model, named):
    tracer = _on(tmp_path, rate=4)
    before = tracer.get(model)
    with pytest.raises(TraceSettingError, match=named):
        tracer.update({"trace_level": "OFF", **changes}, model)
    assert tracer.get(model) == before


def test_timestamps_need_a_file_given_at_start():
    with pytest.raises(TraceSettingError, match="'trace_level' TIMESTAMPS needs a trace file"):
        Tracer().update({"trace_level": "TIMESTAMPS"})


def test_log_frequency_writes_numbered_files_and_close_the_rest(tmp_path):
    path = tmp_path / "t.json"
    tracer = Tracer(TraceSettings("TIMESTAMPS", rate=1, log_frequency=2, file=str(path)))
    for i in range(5):
        trace = tracer.start(MODEL, "1", str(i))
        trace.stamp("REQUEST_START")
        tracer.finish(trace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json.0", "t.json.1"]
    tracer.close()
    assert [len(json.loads((tmp_path / f"t.json.{i}").read_text())) for i in range(3)] == [2, 2, 1]
    assert [t["request_id"] for t in read_trace_files(path)] == ["0", "1", "2", "3", "4"]


def test_trace_json_is_tritons_with_stamps_in_their_order():
    trace = Trace(7, MODEL, "1", "abc")
    trace.stamp_s("HTTP_SEND_END", 3e-6)
    trace.stamp_s("HTTP_RECV_START", 1e-6)
    assert trace.to_json() == {"id": 7, "model_name": MODEL, "model_version": 1, "request_id": "abc",
                               "timestamps": [{"name": "HTTP_RECV_START", "ns": 1000},
                                              {"name": "HTTP_SEND_END", "ns": 3000}]}


def test_reads_tritons_newer_layout_of_one_object_per_stamp(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"id": 1, "model_name": "m", "model_version": 1},
                                {"id": 1, "timestamps": [{"name": "REQUEST_START", "ns": 5}]},
                                {"id": 1, "timestamps": [{"name": "REQUEST_END", "ns": 9}]}]))
    assert read_trace_files(path) == [{"id": 1, "model_name": "m", "model_version": 1, "timestamps": [
        {"name": "REQUEST_START", "ns": 5}, {"name": "REQUEST_END", "ns": 9}]}]


# ---- a real server ----

def _tokens() -> np.ndarray:
    return np.arange(1, 16, dtype=np.int64).reshape(1, -1)


def _http_infer(client, request_id: str) -> None:
    inp = httpclient.InferInput("tokens", [1, 15], "INT64")
    inp.set_data_from_numpy(_tokens(), binary_data=False)
    client.infer(MODEL, [inp], request_id=request_id)


def _grpc_infer(client, request_id: str) -> None:
    inp = grpcclient.InferInput("tokens", [1, 15], "INT64")
    inp.set_data_from_numpy(_tokens())
    client.infer(MODEL, [inp], request_id=request_id)


@pytest.mark.slow
def test_a_real_server_traces_by_its_settings_and_writes_tritons_file(tmp_path):
    path = tmp_path / "trace.json"
    server = start_server("--model", MODEL, "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1",
                          "--trace-config", f"triton,file={path}")
    try:
        http = httpclient.InferenceServerClient(server.http)
        grpc_client = grpcclient.InferenceServerClient(server.grpc)
        assert "trace" in http.get_server_metadata()["extensions"]
        assert http.get_trace_settings() == {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "-1",
                                             "log_frequency": "0", "trace_file": str(path), "trace_mode": "triton"}
        for i in range(3):
            _http_infer(http, f"h{i}")
        for i in range(2):
            _grpc_infer(grpc_client, f"g{i}")
        # rate 3 over gRPC: the count of requests seen goes on (5 so far): the 6th and 9th
        got = grpc_client.update_trace_settings(settings={"trace_rate": "3"}, as_json=True)
        assert got["settings"]["trace_rate"]["value"] == ["3"]
        for i in range(6):
            _http_infer(http, f"r{i}")
        # a count over HTTP: two more traces, then none
        assert http.update_trace_settings(settings={"trace_rate": "1", "trace_count": "2"})["trace_count"] == "2"
        for i in range(4):
            _http_infer(http, f"c{i}")
        assert http.get_trace_settings()["trace_count"] == "0"
        # the model's own level, then cleared (tritonclient sends None): it follows the server's again
        http.update_trace_settings(settings={"trace_count": "-1"})
        assert http.update_trace_settings(MODEL, {"trace_level": ["OFF"]})["trace_level"] == ["OFF"]
        _http_infer(http, "m0")
        grpc_client.update_trace_settings(MODEL, {"trace_level": None})
        assert http.get_trace_settings(MODEL) == http.get_trace_settings()
        _http_infer(http, "m1")
    finally:
        assert server.stop() == 0
    traces = read_trace_files(path)
    assert sorted(t["request_id"] for t in traces) == ["c0", "c1", "g0", "g1", "h0", "h1", "h2", "m1", "r0", "r3"]
    assert len({t["id"] for t in traces}) == len(traces)
    for t in traces:
        assert (t["model_name"], t["model_version"]) == (MODEL, 1)
        names = [s["name"] for s in t["timestamps"]]
        assert names == (GRPC_STAMPS if t["request_id"].startswith("g") else HTTP_STAMPS), t
        ns = [s["ns"] for s in t["timestamps"]]
        assert ns == sorted(ns), f"stamps out of order in {t}"
        assert set(names) <= set(STAMPS)


@pytest.mark.slow
def test_bad_trace_settings_are_refused_naming_the_setting(zoo_server):
    http = httpclient.InferenceServerClient(zoo_server.http)
    for settings, named in (({"trace_rate": "0"}, "'trace_rate' must be >= 1"),
                            ({"trace_level": ["TIMESTAMPS"]}, "'trace_level' TIMESTAMPS needs a trace file"),
                            ({"trace_nonsense": "1"}, "unknown trace setting 'trace_nonsense'")):
        with pytest.raises(InferenceServerException, match=named) as exc:
            http.update_trace_settings(settings=settings)
        assert exc.value.status() == "400"
    with pytest.raises(InferenceServerException) as exc:
        http.get_trace_settings("no-such-model")
    assert exc.value.status() == "404"
    client = grpcclient.InferenceServerClient(zoo_server.grpc)
    with pytest.raises(InferenceServerException, match="'trace_count' must be >= -1") as exc:
        client.update_trace_settings(settings={"trace_count": "-3"})
    assert exc.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert http.get_trace_settings()["trace_level"] == ["OFF"]
