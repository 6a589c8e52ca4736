"""The bracketed search: the rate it reports as passing passed, the one above failed."""

from __future__ import annotations

import pytest

from cellserve.bench.cluster_bench import TARGET, Point, at_rates, run_point, search
from cellserve.cluster import systems


def threshold(limit):
    calls = []

    def evaluate(rate):
        calls.append(rate)
        return Point(rate, 1.0 if rate <= limit else 0.5, 100, 1, 0.0)
    return evaluate, calls


def test_brackets_from_below_and_above():
    for start in (10.0, 1000.0):
        evaluate, calls = threshold(123.0)
        found = search(evaluate, start, grow=1.5, bisections=4)
        assert found.passed.rate_rps <= 123.0 < found.failed.rate_rps
        assert found.failed.rate_rps / found.passed.rate_rps < 1.5  # bisection narrowed it
        assert [p.rate_rps for p in found.points] == calls


def test_no_passing_rate_reports_none():
    evaluate, _ = threshold(0.0)
    found = search(evaluate, 100.0, max_expand=3)
    assert found.passed is None and found.failed.rate_rps < 100.0


def test_brackets_a_real_simulation(tiny):
    """Nexus on two devices, a short trace: the pass end met 99%, the fail end did not."""
    start = 0.5 * systems.planned_capacity(tiny, 3)

    def evaluate(rate):
        return run_point("nexus", tiny, 3, rate, seconds=0.6, warmup_s=0.1)
    found = search(evaluate, start, grow=2.0, bisections=1)
    assert found.passed is not None and found.failed is not None
    assert found.passed.slo_attainment >= TARGET > found.failed.slo_attainment
    assert found.passed.rate_rps < found.failed.rate_rps


def test_a_search_starts_from_a_known_figure_scaled_by_devices(tmp_path):
    import json

    from cellserve.bench.cluster_bench import _prior, _start

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"devices": {"16": {"static": {"max_rate_rps": 800.0}, "nexus": {"max_rate_rps": 0}}}}))
    prior = _prior(path)
    assert _start(prior, "static", 100, 1.0) == 5000.0  # 800 * 100 / 16
    assert _start(prior, "nexus", 100, 7.0) == 7.0  # no passing figure: the default
    assert _start(_prior(None), "static", 16, 3.0) == 3.0


def test_a_point_over_several_seeds_pools_their_requests(tiny):
    one = [run_point("static", tiny, 3, 400.0, seconds=0.4, warmup_s=0.1, options=systems.Options(seed=s))
           for s in (5, 6)]
    both = run_point("static", tiny, 3, 400.0, seconds=0.4, warmup_s=0.1, options=systems.Options(seed=5), seeds=2)
    assert both.requests == one[0].requests + one[1].requests
    assert both.realised_rps == pytest.approx(both.requests / (0.3 * 2))
    met = sum(p.slo_attainment * p.requests for p in one)
    assert both.slo_attainment == pytest.approx(met / both.requests)
    with pytest.raises(ValueError, match="at least one trace"):
        run_point("static", tiny, 3, 400.0, seconds=0.4, seeds=0)


def test_the_config_refuses_no_seeds(tmp_path):
    from cellserve.bench.cluster_bench import ClusterConfig

    with pytest.raises(ValueError, match="--seeds must be at least 1"):
        ClusterConfig(devices=[4], json_path=tmp_path / "r.json", seeds=0)


def test_given_rates_are_run_as_given_and_bracketed_from_their_points():
    evaluate, calls = threshold(123.0)
    found = at_rates(evaluate, [200.0, 100.0, 120.0, 130.0])
    assert calls == [200.0, 100.0, 120.0, 130.0]  # every rate, in order, nothing else
    assert found.passed.rate_rps == 120.0 and found.failed.rate_rps == 130.0


def test_given_rates_name_no_pass_or_no_fail_when_there_is_none():
    evaluate, _ = threshold(123.0)
    assert at_rates(evaluate, [50.0, 60.0]).failed is None
    assert at_rates(evaluate, [150.0]).passed is None


def test_given_rates_keep_a_failure_below_the_highest_pass():
    """Attainment need not be monotone in the rate: the figure is the highest pass, its bracket
    the lowest failure above it, and a failure below it stays among the points."""
    def evaluate(rate):
        return Point(rate, 0.5 if rate == 110.0 else (1.0 if rate <= 123.0 else 0.5), 100, 1, 0.0)
    found = at_rates(evaluate, [110.0, 120.0, 140.0, 130.0])
    assert found.passed.rate_rps == 120.0 and found.failed.rate_rps == 130.0
    assert [p.rate_rps for p in found.points if not p.passed] == [110.0, 140.0, 130.0]


def test_the_config_refuses_rates_it_cannot_run(tmp_path):
    from cellserve.bench.cluster_bench import ClusterConfig

    path = tmp_path / "r.json"
    for kwargs, message in (({"rates": (100.0, -1.0)}, "--rates must be positive"),
                            ({"rates": ()}, "--rates must be positive"),
                            ({"rates": (100.0,), "start_from": path}, "--start-from has nothing to start"),
                            ({"rates": (100.0,), "bisections": 1}, "--bisections has nothing to narrow")):
        with pytest.raises(ValueError, match=message):
            ClusterConfig(devices=[4], json_path=path, **kwargs)
    assert ClusterConfig(devices=[4], json_path=path, rates=(100.0,), quick=True).rates == (100.0,)
