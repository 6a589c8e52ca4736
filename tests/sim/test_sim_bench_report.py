"""`bench sim`'s report arithmetic on given figures (no timing): repeated real runs pooled,
how far apart they stood, and the errors taken against them."""

from __future__ import annotations

import pytest

from cellserve.bench.ramp import RampPlan, RampSearch
from cellserve.bench.sim_bench import SimBenchConfig, _errors, pooled, table
from tests.sim.test_sim_cli import cellserve_here


def figures(goodput: float, p50: float, p99: float, ok: int = 100) -> dict:
    return {"goodput_rps": goodput, "throughput_rps": goodput, "p50_ms": p50, "p99_ms": p99, "mean_batch": 2.0,
            "requests": ok, "slo_misses": 0, "counts": {"ok": ok, "rejected": 0, "dropped": 0, "error": 0}}


def test_repeated_runs_pool_to_their_mean_with_counts_summed():
    a, b = figures(100.0, 2.0, 10.0, ok=500), figures(120.0, 3.0, 14.0, ok=600)
    p = pooled([a, b])
    assert (p["goodput_rps"], p["p50_ms"], p["p99_ms"]) == (110.0, 2.5, 12.0)
    assert p["requests"] == 1100 and p["counts"]["ok"] == 1100
    assert pooled([a]) is a


def test_the_report_gives_how_far_the_real_runs_stood_apart_beside_the_errors():
    # two rates under capacity (both count for latency); the real runs' p50 at the first rate
    # were 2 and 3 ms (mean 2.5: each 20% from it), the simulated 3 ms (20% off the mean)
    rows = [{"rate_rps": 100.0, "real": pooled([figures(100.0, 2.0, 10.0), figures(100.0, 3.0, 10.0)]),
             "real_runs": [figures(100.0, 2.0, 10.0), figures(100.0, 3.0, 10.0)], "sim": figures(100.0, 3.0, 11.0)},
            {"rate_rps": 200.0, "real": pooled([figures(190.0, 4.0, 20.0), figures(210.0, 4.0, 20.0)]),
             "real_runs": [figures(190.0, 4.0, 20.0), figures(210.0, 4.0, 20.0)], "sim": figures(200.0, 4.0, 20.0)}]
    search = RampSearch(RampPlan(start_rps=100.0, factor=2.0, refine_steps=0, max_rps=200.0, tries=1),
                        lambda s: True)
    search.record(rows[0]["real"])
    search.record(rows[1]["real"])
    report = _errors(rows, search.result(), 200.0)
    assert report["p50_error"] == pytest.approx(0.2) and report["p99_error"] == pytest.approx(0.1)
    assert report["real_spread"]["p50"] == pytest.approx(0.2)
    assert report["real_spread"]["p99"] == pytest.approx(0.0)
    assert report["real_spread"]["max_goodput"] == pytest.approx(0.05)  # max goodputs 190 and 210
    assert report["real_spread"]["goodput_at_a_rate"] == pytest.approx(0.05)
    # one run collapsing at a rate past capacity (956 and 84 req/s: each 84% from their mean)
    # leaves the runs' maxima equal, and shows at that rate
    collapsed = [figures(300.0, 50.0, 99.0), figures(300.0, 50.0, 99.0)]
    rows.append({"rate_rps": 1000.0, "real": pooled([figures(956.0, 9.0, 90.0), figures(84.0, 900.0, 990.0)]),
                 "real_runs": [figures(956.0, 9.0, 90.0), figures(84.0, 900.0, 990.0)], "sim": collapsed[0]})
    rows.append({"rate_rps": 1100.0, "real": pooled([figures(84.0, 9.0, 90.0), figures(956.0, 900.0, 990.0)]),
                 "real_runs": [figures(84.0, 9.0, 90.0), figures(956.0, 900.0, 990.0)], "sim": collapsed[1]})
    both = _errors(rows, search.result(), 200.0)["real_spread"]
    assert both["max_goodput"] == pytest.approx(0.0) and both["goodput_at_a_rate"] == pytest.approx(436 / 520)
    rows[2:] = []
    text = table({"model": "m", "arrivals": "poisson", "slo_ms": 200.0, "sim_speedup": 3.0,
                  "capacity_rps": {"before": 2000.0, "after": 1500.0}, "policies": {"cellular": report}})
    assert "real runs apart" in text and "20%" in text
    assert "capacity 2000 req/s before the ramps, 1500 after (-25%)" in text
    # every rate of that ramp met the SLO: its max goodput is marked a lower bound, not printed as a capacity
    assert "200+r/s" in text and "+ cellular: no real rate past capacity was tried" in text


def test_repeats_must_be_at_least_one(capsys):
    with pytest.raises(ValueError, match="--repeats must be >= 1, got 0"):
        SimBenchConfig(repeats=0)
    done = cellserve_here(capsys, "bench", "sim", "--repeats", "0")
    assert done.returncode == 2 and "--repeats" in done.stderr
