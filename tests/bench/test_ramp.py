"""The ramp-and-bracket search on synthetic systems of known capacity: no timing."""

from __future__ import annotations

import math

import pytest

from cellserve.bench.ramp import Point, RampPlan, RampSearch, bracket, ramp
from cellserve.bench.results import meets_slo


def system(capacity: float, collapses: bool = True, stalls: set[float] = frozenset()):
    """A system that serves everything up to `capacity` req/s. Past it, either goodput
    collapses (a FIFO queue that grows without bound) or stays at capacity (a server that
    refuses the excess). A rate in `stalls` fails on its first run only."""
    runs: list[float] = []

    def measure(rate: float) -> dict:
        stalled = rate in stalls and rate not in runs
        runs.append(rate)
        ok = rate <= capacity and not stalled
        goodput = rate if ok else (0.2 * capacity if collapses else capacity)
        return {"goodput_rps": goodput, "ok": ok}

    return measure, runs


def passes(summary: dict) -> bool:
    return summary["ok"]


@pytest.mark.parametrize("capacity", [95.0, 300.0, 333.0, 890.0, 1234.5])
@pytest.mark.parametrize("collapses", [True, False])
def test_capacity_is_bracketed_within_the_refined_ratio(capacity, collapses):
    plan = RampPlan(start_rps=89.0, factor=1.5, refine_steps=3, max_rps=3000.0)
    measure, _ = system(capacity, collapses)
    result = ramp(measure, passes, plan)
    b = result.bracket
    assert b.bracketed and not b.below_start and b.marker == ""
    assert b.highest_pass_rps <= capacity < b.lowest_fail_rps
    assert b.lowest_fail_rps / b.highest_pass_rps <= 1.5 ** (1 / 8) * 1.001
    # the max goodput is within the bracket's ratio of the capacity, never above it
    assert capacity / 1.5 ** (1 / 8) <= b.max_goodput_rps <= capacity + 1e-9


def test_coarse_then_refined_rates_and_each_failure_tried_twice():
    measure, runs = system(capacity=300.0)
    result = ramp(measure, passes, RampPlan(start_rps=100.0, factor=2.0, refine_steps=2))
    # coarse 100, 200, 400 (fails); refine sqrt(200*400)=282.8 (passes), sqrt(282.8*400)=336.3 (fails)
    assert result.rates_rps == [100.0, 200.0, 400.0, 282.8, 336.3]
    assert runs == [100.0, 200.0, 400.0, 400.0, 282.8, 336.3, 336.3]
    assert [p.passed for p in result.points] == [True, True, False, True, False]
    assert result.points[2].goodput_of_each_try == [60.0, 60.0]
    assert (result.bracket.highest_pass_rps, result.bracket.lowest_fail_rps) == (282.8, 336.3)


def test_one_stall_below_capacity_is_not_taken_for_the_capacity():
    measure, runs = system(capacity=300.0, stalls={200.0})
    result = ramp(measure, passes, RampPlan(start_rps=100.0, factor=2.0, refine_steps=0))
    assert runs.count(200.0) == 2 and result.points[1].passed
    assert result.bracket.highest_pass_rps == 200.0 and result.bracket.lowest_fail_rps == 400.0


def test_a_system_that_never_fails_is_a_lower_bound():
    measure, _ = system(capacity=10_000.0)
    result = ramp(measure, passes, RampPlan(start_rps=100.0, factor=2.0, max_rps=500.0))
    assert result.rates_rps == [100.0, 200.0, 400.0, 500.0]  # the last coarse rate is the cap
    b = result.bracket
    assert not b.bracketed and not b.below_start and b.marker == ">="
    assert b.max_goodput_rps == 500.0 and b.lowest_fail_rps is None and b.describe() == ">500"


def test_a_system_that_fails_at_the_start_is_below_it():
    measure, runs = system(capacity=50.0, collapses=False)
    result = ramp(measure, passes, RampPlan(start_rps=100.0, factor=2.0))
    assert runs == [100.0, 100.0]  # confirmed, then nothing more to learn upwards
    b = result.bracket
    assert b.below_start and not b.bracketed and b.marker == "*"
    assert b.highest_pass_rps is None and b.lowest_fail_rps == 100.0 and b.describe() == "<100"
    assert b.max_goodput_rps == 50.0


def test_fixed_rates_are_run_in_order_and_bracketed_after():
    measure, runs = system(capacity=300.0)
    result = ramp(measure, passes, RampPlan(rates=(100.0, 250.0, 350.0, 500.0), tries=1))
    assert runs == [100.0, 250.0, 350.0, 500.0]
    assert result.bracket.bracketed and result.bracket.describe() == "250-350"


def test_interleaved_searches_give_the_same_points_as_one_at_a_time():
    plan = RampPlan(start_rps=89.0, factor=1.5, refine_steps=2)
    systems = {"fast": system(900.0, collapses=False)[0], "slow": system(310.0)[0]}
    searches = {name: RampSearch(plan, passes) for name in systems}
    while pending := [(n, s) for n, s in searches.items() if s.next_rate() is not None]:
        for name, search in pending:
            search.record(systems[name](search.next_rate()))
    for name, capacity, collapses in (("fast", 900.0, False), ("slow", 310.0, True)):
        alone = ramp(system(capacity, collapses)[0], passes, plan)
        assert searches[name].result().rates_rps == alone.rates_rps
        assert searches[name].result().bracket == alone.bracket


def test_bracket_judges_points_in_any_order():
    points = [Point(400.0, 80.0, False), Point(100.0, 100.0, True), Point(300.0, 290.0, True),
              Point(350.0, 310.0, False)]
    b = bracket(points)
    assert (b.max_goodput_rps, b.at_rate_rps) == (310.0, 350.0)
    assert (b.highest_pass_rps, b.lowest_fail_rps, b.bracketed) == (300.0, 350.0, True)
    assert b.to_dict() == {"bracketed": True, "capacity_below_start": False,
                           "capacity_bracket_rps": [300.0, 350.0], "max_goodput_at_rps": 350.0}
    assert bracket([]).max_goodput_rps == 0.0 and not bracket([]).bracketed


def test_a_lowest_rate_that_failed_is_below_start_even_if_a_higher_one_passed():
    b = bracket([Point(100.0, 10.0, False), Point(200.0, 190.0, True), Point(300.0, 50.0, False)])
    assert b.below_start and not b.bracketed


def test_plans_that_cannot_ramp_are_refused():
    with pytest.raises(ValueError):
        RampPlan(start_rps=10.0, factor=1.0)
    with pytest.raises(ValueError):
        RampPlan(start_rps=10.0, tries=0)


def _summary(requests: int, misses: int, p99_ms: float) -> dict:
    return {"requests": requests, "slo_misses": misses, "p99_ms": p99_ms}


def test_meets_slo_needs_p99_within_and_most_requests_answered_in_time():
    assert meets_slo(_summary(100, 5, 150.0), 200.0)
    assert not meets_slo(_summary(100, 5, 250.0), 200.0)  # late
    assert not meets_slo(_summary(100, 20, 50.0), 200.0)  # refusing a fifth keeps p99 down
    assert not meets_slo(_summary(100, 100, math.nan), 200.0)  # nothing answered
    assert not meets_slo(_summary(0, 0, math.nan), 200.0)
