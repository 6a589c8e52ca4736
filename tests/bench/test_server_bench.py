"""`bench server`: the report and table carry each side's bracket (synthetic ramps, no
timing), and end to end on a short ramp against a real `cellserve serve`."""

from __future__ import annotations

import json
import math

import pytest

from cellserve.bench import server_bench
from cellserve.bench.ramp import RampPlan, ramp


def _side(capacity: float, top: float = 3000.0):
    """A ramp over a system that serves up to `capacity` req/s and collapses past it."""
    def measure(rate: float) -> dict:
        ok = rate <= capacity
        return {"rate_rps": rate, "goodput_rps": rate if ok else 0.1 * capacity, "p50_ms": 5.0, "p99_ms": 20.0,
                "ok": ok}
    return ramp(measure, lambda s: s["ok"], RampPlan(start_rps=100.0, factor=1.5, refine_steps=3, max_rps=top))


def test_report_and_table_say_which_max_goodput_is_bracketed():
    cfg = server_bench.ServerBenchConfig(quick=True)
    plan = cfg.plan(1000.0)
    assert (plan.start_rps, plan.factor, plan.max_rps) == (100.0, 1.5, 3000.0)
    bracketed = server_bench._report(cfg, 1000.0, plan, {"engine": _side(900.0), "server": _side(600.0)})
    assert bracketed["engine"]["bracketed"] and bracketed["server"]["bracketed"]
    assert bracketed["goodput_ratio_bracketed"]
    low, high = bracketed["server"]["capacity_bracket_rps"]
    assert low <= 600.0 < high and bracketed["server"]["max_goodput_rps"] == low
    assert math.isclose(bracketed["goodput_ratio"], low / bracketed["engine"]["max_goodput_rps"])
    text = server_bench.table(bracketed)
    assert ">=" not in text and "not bracketed" not in text

    # the engine never failed below the ramp's top: its figure, and the ratio, are bounds
    open_ended = server_bench._report(cfg, 1000.0, plan, {"engine": _side(5000.0, top=1200.0),
                                                          "server": _side(600.0)})
    assert not open_ended["engine"]["bracketed"] and not open_ended["goodput_ratio_bracketed"]
    assert open_ended["engine"]["capacity_bracket_rps"] == [1200.0, None]
    text = server_bench.table(open_ended)
    assert ">= 1200 r/s" in text and ">1200 r/s" in text and "not bracketed" in text
    assert ">= no rate above it failed" in text


@pytest.mark.slow  # a real server, loaded for seconds
def test_server_bench_ramps_both_sides(tmp_path):
    cfg = server_bench.ServerBenchConfig(model="gru-256", quick=True, seconds_per_run=0.4, ramp_factor=4.0,
                                         refine_steps=1, repeats=1, json_path=tmp_path / "server.json")
    report = server_bench.run(cfg, log=lambda *_: None)
    on_disk = json.loads(cfg.json_path.read_text())
    for side in ("engine", "server"):
        d = on_disk[side]
        assert d["runs"][0]["rate_rps"] == on_disk["ramp"]["start_rps"]
        assert d["max_goodput_rps"] == max(r["goodput_rps"] for r in d["runs"])
        assert isinstance(d["bracketed"], bool) and isinstance(d["capacity_below_start"], bool)
    assert on_disk["goodput_ratio_bracketed"] == (on_disk["engine"]["bracketed"] and on_disk["server"]["bracketed"])
    assert "server" in server_bench.table(report)
    assert cfg.json_path.with_suffix(".png").exists()


@pytest.mark.slow  # a real server, loaded for seconds
def test_server_bench_serves_a_repository_model_of_feature_rows(tmp_path):
    """`bench server --model-repository`: the server started on the repository, both sides sent
    the model's own input (float rows, time-major), every light-load request answered."""
    from feature_model import export_frames

    export_frames(tmp_path / "repo" / "frames" / "1" / "model.onnx")
    cfg = server_bench.ServerBenchConfig(model="frames", model_repository=tmp_path / "repo", quick=True,
                                         seconds_per_run=0.4, ramp_factor=4.0, refine_steps=1, repeats=1,
                                         json_path=tmp_path / "server.json")
    report = server_bench.run(cfg, log=lambda *_: None)
    for side in ("engine", "server"):
        light = report[side]["runs"][0]
        assert light["counts"]["ok"] == light["requests"] > 0, (side, light)
