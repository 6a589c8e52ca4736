"""`bench engine` end to end on a small zoo model and a short ramp: the JSON holds every
policy with the documented fields, each max goodput with its bracket, and the plot is written.
(The ramp's search itself is tested on synthetic systems in test_ramp.py.)"""

import json
import math

import pytest

from cellserve.bench import engine_bench
from cellserve.bench.ramp import Bracket


@pytest.mark.slow  # every policy really served, for seconds
def test_engine_bench_ramps_every_policy_and_brackets_its_max_goodput(tmp_path):
    cfg = engine_bench.BenchConfig(model="gru-256", slo_ms=200, quick=True, json_path=tmp_path / "out.json",
                                   seconds_per_run=0.4, ramp_factor=4.0, refine_steps=1, repeats=1)
    report = engine_bench.run(cfg, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.png").stat().st_size > 1000
    assert on_disk["roofline_gflops"] > 0 and on_disk["capacity_estimate_rps"] > 0
    assert set(on_disk["policies"]) == {"cellular", "padded", "none", "ort", "ort-padded"}
    light = on_disk["ramp"]["start_rps"]
    assert math.isclose(light, round(0.1 * on_disk["capacity_estimate_rps"], 1))
    for policy, d in on_disk["policies"].items():
        for key in ("max_goodput_rps", "light_load_p50_ms", "saturation_gflops", "overhead_us_per_step"):
            assert isinstance(d[key], float) and not math.isnan(d[key]), (policy, key)
        runs = d["runs"]
        rates = [r["rate_rps"] for r in runs]
        assert rates == sorted(rates) and rates[0] == light and set(rates) <= set(on_disk["rates_rps"])
        assert all(sum(r["counts"].values()) == r["requests"] for r in runs)
        assert d["max_goodput_rps"] == max(r["goodput_rps"] for r in runs)
        # the verdict agrees with the runs it was drawn from
        low, high = d["capacity_bracket_rps"]
        passed = [r["rate_rps"] for r in runs if r["passed"]]
        assert d["capacity_below_start"] == (not runs[0]["passed"])
        assert low == (max(passed) if passed else None)
        if d["bracketed"]:
            assert low < high and not next(r for r in runs if r["rate_rps"] == high)["passed"]
        elif not d["capacity_below_start"]:
            assert high is None and low == rates[-1]
    text = engine_bench.table(report)
    assert "cellular" in text
    marked = [Bracket.from_dict(d).marker for d in on_disk["policies"].values()]
    assert (">= no rate above it failed" in text) == (">=" in marked)
    assert ("*  the lowest rate offered already failed" in text) == ("*" in marked)


def test_fixed_rates_are_bracketed_too(tmp_path):
    cfg = engine_bench.BenchConfig(model="gru-256", quick=True, load_fractions=(0.1, 0.5), repeats=1)
    plan = cfg.plan(1000.0)
    assert plan.rates == (100.0, 500.0) and plan.tries == 1
    full = engine_bench.BenchConfig(model="gru-256").plan(1000.0)
    assert (full.start_rps, full.factor, full.refine_steps, full.max_rps, full.tries) == (100.0, 1.25, 3, 3000.0, 2)
