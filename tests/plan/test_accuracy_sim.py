"""The baselines (plan/accuracy_baselines.py) keep the plan rules and their one-variant
promises, and the simulated evaluation (plan/accuracy_sim.py) accounts for every request:
light load is served on time, overload violates, a family routed nowhere is unroutable."""

from __future__ import annotations

import random

import pytest

from cellserve.plan import accuracy_baselines as baselines
from cellserve.plan.accuracy import AccuracyProblem, Device, Family, LatencyPoints, Variant
from cellserve.plan.accuracy_bench import scenario, table
from cellserve.plan.accuracy_check import check_plan
from cellserve.plan.accuracy_sim import mmpp_trace, simulate


def _random_problem(seed: int) -> AccuracyProblem:
    rng = random.Random(seed)
    devices = tuple(Device(str(i), rng.choice("ab")) for i in range(rng.randint(1, 8)))
    fams, cap, k = {}, {"a": {}, "b": {}}, 0
    for f in range(rng.randint(1, 3)):
        vs = []
        for _ in range(rng.randint(1, 3)):
            vs.append(Variant(f"v{k}", round(rng.uniform(0.5, 1.0), 3)))
            for t in "ab":
                if rng.random() < 0.9:
                    cap[t][f"v{k}"] = float(rng.randint(10, 200))
            k += 1
        fams[f"f{f}"] = Family(f"f{f}", float(rng.randint(0, 400)), tuple(vs))
    return AccuracyProblem(fams, devices, cap, {}, rng.choice((1.0, 1.05, 1.2)))


@pytest.mark.parametrize("seed", range(40))
def test_every_baseline_plan_passes_the_checker_and_keeps_its_promise(seed):
    p = _random_problem(seed)
    plans = {name: fn(p, None) for name, fn in
             (("proteus", baselines.proteus), ("ha", baselines.highest_only), ("ht", baselines.lowest_only),
              ("infaas", baselines.infaas_greedy))}
    for name, plan in plans.items():
        assert check_plan(plan, p) == [], name
    best = {f.best().name for f in p.families.values()}
    worst = {f.worst().name for f in p.families.values()}
    assert {v for v in plans["ha"].placement.values() if v} <= best
    assert {v for v in plans["ht"].placement.values() if v} <= worst
    for name in ("ht", "infaas"):  # Proteus is optimal: never less accurate at the same headroom
        other = plans[name]
        if other.headroom == plans["proteus"].headroom and not any(other.unserved_rps.values()):
            assert plans["proteus"].effective_accuracy >= other.effective_accuracy - 1e-9, name
    # a re-plan from the previous plan is a plan too
    again = baselines.infaas_greedy(p.with_demand({f: d * 1.5 for f, d in
                                                   ((n, x.demand_rps) for n, x in p.families.items())}),
                                    plans["infaas"])
    assert check_plan(again, p.with_demand({n: x.demand_rps * 1.5 for n, x in p.families.items()})) == []


def test_a_replan_keeps_devices_on_their_variants_where_the_counts_allow():
    p = scenario(devices=8, calm_rps=800.0)
    first = baselines.proteus(p, None)
    second = baselines.proteus(p.with_demand({f: x.demand_rps * 1.02 for f, x in p.families.items()}), first)
    assert sum(first.placement[d] != second.placement[d] for d in first.placement) <= 2


def test_the_mmpp_trace_is_seeded_sorted_and_at_about_its_rate():
    a = mmpp_trace({"x": 100.0}, 200.0, seed=4, burst=1.0)
    assert a == mmpp_trace({"x": 100.0}, 200.0, seed=4, burst=1.0)
    assert all(t0 <= t1 for (t0, _), (t1, _) in zip(a, a[1:]))
    assert len(a) == pytest.approx(20000, rel=0.05)
    bursty = mmpp_trace({"x": 100.0}, 2000.0, seed=4, burst=3.0, mean_calm_s=10, mean_burst_s=10)
    assert len(bursty) / 2000.0 == pytest.approx(200.0, rel=0.15)  # half the time at 3x


def _one_family(demand: float, devices: int = 2) -> AccuracyProblem:
    lat = {"cpu": {"big": LatencyPoints(((1, 8.0), (4, 20.0), (8, 30.0))),
                   "small": LatencyPoints(((1, 3.0), (4, 6.0), (8, 9.0)))}}
    fam = Family("cls", demand, (Variant("big", 0.9), Variant("small", 0.7)), slo_ms=100.0)
    return AccuracyProblem({"cls": fam}, tuple(Device(str(i), "cpu") for i in range(devices)), {}, lat, 1.05)


def _poisson(rate: float, seconds: float, seed: int = 0) -> list[tuple[float, str]]:
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append((t, "cls"))


def test_light_load_is_served_on_time_by_the_most_accurate_variant():
    p = _one_family(100.0)  # two devices of "big" carry 2 x 266 req/s
    r = simulate(p, _poisson(100.0, 30.0), baselines.proteus, "proteus")
    assert r.requests > 2500 and r.violations == 0 and r.on_time == r.requests
    assert r.to_dict()["effective_accuracy"] == pytest.approx(0.9) and r.plans == 3


def test_overload_violates_and_every_request_is_accounted_for():
    p = _one_family(1500.0)
    trace = _poisson(1500.0, 20.0)
    ha = simulate(p, trace, baselines.highest_only, "ha")
    proteus = simulate(p, trace, baselines.proteus, "proteus")
    for r in (ha, proteus):
        assert r.on_time + r.late + r.dropped + r.unroutable == r.requests == len(trace)
    assert ha.violations > 0.3 * ha.requests  # 1500 req/s on 533 of capacity
    assert proteus.violations < ha.violations / 2 and proteus.to_dict()["accuracy_drop"] > 0


def test_a_family_the_plan_routes_nowhere_is_unroutable():
    p = _one_family(50.0, devices=0)
    r = simulate(p, _poisson(50.0, 5.0), baselines.proteus, "proteus")
    assert r.unroutable == r.requests > 0


def test_the_bench_table_renders_its_results():
    row = {"violations": 10, "violation_ratio": 0.1, "effective_accuracy": 0.8, "accuracy_drop": 0.03,
           "switches": 4}
    results = {"duration_s": 1.0, "requests": 100, "slo_ms": 150.0,
               "runs": [{"headroom": 1.25, "estimate": "peak", "systems": {"proteus": row},
                         "violations_vs_highest": 3.0, "accuracy_drop_vs_lowest": 4.0,
                         "goal_violations_2x": True, "goal_accuracy_drop_2x": False}],
               "planner_speed": {"devices": 100, "families": 20, "variants": 60, "plan_s": 0.5, "plan_cpu_s": 0.4,
                                 "check_problems": []}}
    text = table(results)
    assert "3.00x fewer violations" in text and "goal 2x: NOT met" in text and "check passed" in text
