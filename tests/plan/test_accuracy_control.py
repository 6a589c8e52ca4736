"""Proteus's adaptive batching rule (plan/accuracy_batching.py) case by case, and the
controller (plan/accuracy_control.py) on an injected clock: weighted random routing, demand
measured per period (peak and mean), a re-plan every 10 s and not before."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cellserve.plan.accuracy import AccuracyPlan, AccuracyProblem, Device, Family, Variant
from cellserve.plan.accuracy_batching import BatchDecision, decide_batch
from cellserve.plan.accuracy_control import AccuracyController, DemandMeter, WeightedRouter
from cellserve.plan.accuracy_milp import plan_accuracy

LAT = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.024}  # seconds per allowed batch size


def test_an_empty_queue_does_nothing():
    assert decide_batch(0.0, [], LAT) == BatchDecision(0, 0)


def test_head_requests_that_cannot_finish_alone_are_dropped():
    # 0.005 + 0.010 > 0.012: dropped; 0.020 can still finish alone (at 0.015)
    d = decide_batch(0.005, [0.012, 0.014, 0.020], LAT)
    assert d.drop == 2 and d.run == 0 and d.wake_at == pytest.approx(0.020 - 0.010)


def test_a_queue_that_fills_the_largest_batch_runs_it_at_once():
    d = decide_batch(0.0, [1.0] * 11, LAT)
    assert d == BatchDecision(0, 8, 8)


def test_a_short_queue_waits_until_the_head_deadline_minus_its_batch_latency():
    d = decide_batch(0.0, [0.100, 0.101, 0.102], LAT)  # 3 queued: a batch of 4 holds them
    assert d.drop == 0 and d.run == 0 and d.wake_at == pytest.approx(0.100 - 0.016)
    d = decide_batch(0.0, [0.100, 0.101], LAT)  # exactly a batch of 2
    assert d.run == 0 and d.wake_at == pytest.approx(0.100 - 0.012)


def test_when_the_wait_is_over_the_whole_queue_runs():
    assert decide_batch(0.084, [0.100, 0.101, 0.102], LAT) == BatchDecision(0, 3, 4)


def test_a_batch_that_would_make_the_head_late_shrinks_to_one_that_does_not():
    # 5 queued fill a batch of 4 (16 ms), but the head has 13 ms left: a batch of 2 (12 ms)
    d = decide_batch(0.0, [0.013, 0.05, 0.05, 0.05, 0.05], LAT)
    assert d == BatchDecision(0, 2, 2)
    # the same when the queue fills the largest batch
    d = decide_batch(0.0, [0.013] + [0.05] * 9, LAT)
    assert d == BatchDecision(0, 2, 2)


def test_a_queue_shorter_than_the_smallest_allowed_batch_runs_at_that_batch_cost():
    d = decide_batch(0.0, [0.05], {4: 0.015, 8: 0.02})
    assert d.run == 0 and d.wake_at == pytest.approx(0.035)
    assert decide_batch(0.035, [0.05], {4: 0.015, 8: 0.02}) == BatchDecision(0, 1, 4)


def _plan(routing: dict[str, dict[str, float]]) -> AccuracyPlan:
    return AccuracyPlan({}, routing, 0.0, 1.05, {f: 0.0 for f in routing})


def test_the_router_picks_devices_in_proportion_to_their_shares():
    router = WeightedRouter(_plan({"a": {"x": 0.25, "y": 0.75, "z": 0.0}, "b": {}}), random.Random(3))
    picks = Counter(router.route("a") for _ in range(20000))
    assert set(picks) == {"x", "y"}
    assert picks["x"] / 20000 == pytest.approx(0.25, abs=0.015)
    assert router.route("b") is None and router.route("unknown") is None


def test_the_meter_measures_the_peak_window_or_the_mean():
    m = DemandMeter(start=100.0)
    for i in range(10):  # 10 per second for 8 s, then 40 in the 9th and 10th seconds
        for k in range(10 if i < 8 else 40):
            m.observe("a", 100.0 + i + k / 50)
    assert m.rates(110.0, "peak")["a"] == pytest.approx(40.0)
    assert m.rates(110.0, "mean")["a"] == pytest.approx(160 / 10)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _problem(demand: float) -> AccuracyProblem:
    fam = Family("cls", demand, (Variant("big", 0.9), Variant("small", 0.7)))
    return AccuracyProblem({"cls": fam}, tuple(Device(str(i), "cpu") for i in range(4)),
                           {"cpu": {"big": 100.0, "small": 300.0}}, {}, 1.05)


def test_the_controller_replans_every_period_on_measured_demand():
    clock, seen = _Clock(), []

    def planner(problem, previous):
        seen.append((clock.t, problem.families["cls"].demand_rps, previous))
        return plan_accuracy(problem, previous)

    ctl = AccuracyController(_problem(100.0), planner, clock, random.Random(0), estimate="mean")
    assert seen[0][:2] == (0.0, 100.0) and seen[0][2] is None  # the first plan: the problem's own demand
    assert set(ctl.plan.placement.values()) == {"big"}
    for i in range(9000):  # 900 req/s for 10 s: more than four "big" devices carry
        clock.t = i / 900
        ctl.observe("cls")
        assert ctl.route("cls") in ctl.plan.routing["cls"]
    clock.t = 9.99
    assert ctl.tick() is None and len(seen) == 1  # not before the period is over
    clock.t = 10.0
    plan = ctl.tick()
    assert plan is ctl.plan and len(seen) == 2 and seen[1][1] == pytest.approx(900.0)
    assert seen[1][2] is not None  # the previous plan is handed on
    assert "small" in plan.placement.values() and ctl.measured["cls"] == pytest.approx(900.0)
    clock.t = 20.0  # a period with no arrivals measures 0
    ctl.tick()
    assert ctl.measured == {"cls": 0.0} and ctl.plans == 3


def test_the_controller_refuses_an_unknown_estimate():
    with pytest.raises(ValueError, match="estimate must be"):
        AccuracyController(_problem(1.0), plan_accuracy, _Clock(), random.Random(0), estimate="max")
