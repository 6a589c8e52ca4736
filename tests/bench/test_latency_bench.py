"""`cellserve bench latency`: the breakdown's arithmetic on a hand-made Triton trace file, and a
tiny real run (slow)."""

from __future__ import annotations

import json

import pytest

from cellserve.bench.latency_breakdown import breakdown, format_markdown, format_table, stages
from cellserve.server.tracing import read_trace_files

# one HTTP request, stamps 10 us apart except the steps (1000 us) and the hand-back (300 us),
# all times `scale`
_NAMES = [b for _, _, b in stages("http")]


def _trace(trace_id: int, request_id: str, scale: int = 1, steps_us: int = 1000) -> dict:
    t, stamps = 0, [{"name": "HTTP_RECV_START", "ns": 0}]
    for name in _NAMES:
        t += {"LAST_STEP_END": steps_us, "RESPONSE_ON_LOOP": 300}.get(name, 10) * 1000 * scale
        stamps.append({"name": name, "ns": t})
    return {"id": trace_id, "model_name": "m", "model_version": 1, "request_id": request_id, "timestamps": stamps}


def _rows(rows):
    return {r.stage: r for r in rows}


def test_stages_tile_the_server_time_and_shares_are_of_the_client_mean(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([_trace(1, "0"), _trace(2, "1", scale=3)]))
    traces = read_trace_files(path)
    # the client saw each request 100 us longer than the server held it
    server_us = {"0": 14 * 10 + 1000 + 300, "1": 3 * (14 * 10 + 1000 + 300)}  # 16 stages
    rows = _rows(breakdown(traces, {rid: (us + 100) / 1e6 for rid, us in server_us.items()}, "http"))
    steps = rows["steps"]
    assert steps.count == 2 and steps.p50_us == pytest.approx(2000.0) and steps.mean_us == pytest.approx(2000.0)
    assert steps.p99_us == pytest.approx(1000 + 0.99 * 2000)  # numpy's linear interpolation
    assert rows["hand-back"].mean_us == pytest.approx(600.0)
    client_mean = (1440 + 4320) / 2 + 100
    assert steps.share == pytest.approx(2000.0 / client_mean)
    stage_rows = [rows[name] for name, _, _ in stages("http")]
    server = rows["server (HTTP_RECV_START -> HTTP_SEND_END)"]
    assert sum(r.mean_us for r in stage_rows) == pytest.approx(server.mean_us)
    assert server.mean_us == pytest.approx((1440 + 4320) / 2)
    assert rows["outside the server (client - server)"].mean_us == pytest.approx(100.0)
    assert rows["client end-to-end"].share == pytest.approx(1.0)


def test_missing_stamps_and_other_protocols_are_left_out_of_a_stage():
    partial = _trace(1, "0")
    partial["timestamps"] = [s for s in partial["timestamps"] if s["name"] != "FIRST_STEP_START"]
    grpc_trace = {"id": 3, "request_id": "9", "timestamps": [{"name": "GRPC_WAITREAD_END", "ns": 0},
                                                              {"name": "REQUEST_START", "ns": 5000}]}
    rows = _rows(breakdown([partial, _trace(2, "1"), grpc_trace], {}, "http"))
    assert rows["steps"].count == 1 and rows["wait for a batch"].count == 1 and rows["decode"].count == 2
    assert "client end-to-end" not in rows  # no client times: shares are of the server's mean
    assert rows["server (HTTP_RECV_START -> HTTP_SEND_END)"].share == pytest.approx(1.0)
    grpc_rows = _rows(breakdown([grpc_trace], {}, "grpc"))
    assert grpc_rows["decode"].mean_us == pytest.approx(5.0) and "receive" not in grpc_rows


def test_tables_print_every_row():
    rows = breakdown([_trace(1, "0")], {"0": 0.002}, "http")
    text, markdown = format_table(rows), format_markdown(rows)
    for r in rows:
        assert r.stage in text and r.stage in markdown
    assert "| steps | FIRST_STEP_START -> LAST_STEP_END | 1 | 1000 |" in markdown
    with pytest.raises(ValueError, match="protocol"):
        stages("smtp")


@pytest.mark.slow
def test_a_tiny_real_run_traces_every_measured_request(tmp_path):
    from cellserve.bench.latency import LatencyConfig, run

    report = run(LatencyConfig("gru-256", "http", rate=50.0, requests=12, warm_up=2), log=lambda *_: None)
    assert report["sent"] == 12 and report["answered"] == 12 and report["traced"] == 12 and not report["failed"]
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["steps"]["count"] == 12 and rows["client end-to-end"]["count"] == 12
    # the client's time holds the server's
    assert rows["client end-to-end"]["mean_us"] > rows["server (HTTP_RECV_START -> HTTP_SEND_END)"]["mean_us"] > 0
    json.dumps(report)  # plain data
