"""The accuracy-scaling planner (plan/accuracy_milp.py): on random small instances its plan
equals a brute-force optimum (every placement of variants on devices enumerated, each
family's routing filled most accurate first), every plan passes the independent checker, the
headroom ladder is walked in 0.05 steps, and what cannot be served is reported per family."""

from __future__ import annotations

import itertools
import random

import pytest

from cellserve.plan.accuracy import AccuracyProblem, Device, Family, LatencyPoints, Variant, headroom_ladder
from cellserve.plan.accuracy_check import check_plan
from cellserve.plan.accuracy_milp import plan_accuracy


def _random_problem(seed: int) -> AccuracyProblem:
    rng = random.Random(seed)
    types = ["a", "b"][: rng.randint(1, 2)]
    devices = tuple(Device(str(i), rng.choice(types)) for i in range(rng.randint(1, 4)))
    families, capacity, k = {}, {t: {} for t in types}, 0
    for f in range(rng.randint(1, 2)):
        vs = []
        for _ in range(rng.randint(1, 3)):
            vs.append(Variant(f"v{k}", round(rng.uniform(0.5, 1.0), 3)))
            for t in types:
                if rng.random() < 0.85:  # sometimes a variant cannot run on a type
                    capacity[t][f"v{k}"] = float(rng.randint(10, 100))
            k += 1
        families[f"f{f}"] = Family(f"f{f}", float(rng.randint(0, 160)), tuple(vs))
    return AccuracyProblem(families, devices, capacity, {}, rng.choice((1.0, 1.05, 1.1, 1.12, 1.2)))


def _brute_force(p: AccuracyProblem) -> tuple[float, float, float]:
    """(headroom, effective accuracy, total unserved) of the best plan, by enumeration: the
    first headroom of the ladder at which some placement covers every family's demand, the
    most accurate such placement; else at 1.0 the most demand served, then the most accurate."""
    options = [[None] + [v.name for f in p.families.values() for v in f.variants
                         if p.capacity_rps.get(d.type, {}).get(v.name, 0) > 0] for d in p.devices]
    acc = {v.name: (f.name, v.accuracy) for f in p.families.values() for v in f.variants}

    def serve(placement, h):  # per family: (served, accuracy-weighted served), most accurate first
        out = {}
        for name, f in p.families.items():
            caps = sorted(((acc[v][1], p.capacity_rps[d.type][v] / h) for d, v in zip(p.devices, placement)
                           if v is not None and acc[v][0] == name), reverse=True)
            left, weighted = f.demand_rps, 0.0
            for a, c in caps:
                take = min(c, left)
                weighted, left = weighted + a * take, left - take
            out[name] = (f.demand_rps - left, weighted)
        return out

    total = p.total_demand()
    for h in headroom_ladder(p.headroom):
        best = None
        for placement in itertools.product(*options):
            s = serve(placement, h)
            if all(s[n][0] >= f.demand_rps - 1e-9 for n, f in p.families.items()):
                w = sum(x[1] for x in s.values())
                best = w if best is None else max(best, w)
        if best is not None:
            return h, (best / total if total else 0.0), 0.0
    best = (-1.0, -1.0)
    for placement in itertools.product(*options):
        s = serve(placement, 1.0)
        cand = (sum(x[0] for x in s.values()), sum(x[1] for x in s.values()))
        if cand[0] > best[0] + 1e-9 or (abs(cand[0] - best[0]) <= 1e-9 and cand[1] > best[1]):
            best = cand
    return 1.0, (best[1] / best[0] if best[0] > 0 else 0.0), total - best[0]


@pytest.mark.parametrize("seed", range(80))
def test_the_plan_equals_a_brute_force_optimum_and_passes_the_checker(seed):
    p = _random_problem(seed)
    plan = plan_accuracy(p)
    assert check_plan(plan, p) == []
    h, accuracy, unserved = _brute_force(p)
    assert plan.headroom == pytest.approx(h)
    assert plan.effective_accuracy == pytest.approx(accuracy, abs=1e-6)
    assert sum(plan.unserved_rps.values()) == pytest.approx(unserved, abs=1e-6)


def _two_variants(demand: float, devices: int = 2, headroom: float = 1.05) -> AccuracyProblem:
    fam = Family("cls", demand, (Variant("big", 0.9), Variant("small", 0.7)))
    return AccuracyProblem({"cls": fam}, tuple(Device(str(i), "cpu") for i in range(devices)),
                           {"cpu": {"big": 100.0, "small": 300.0}}, {}, headroom)


def test_light_demand_is_served_by_the_most_accurate_variant_at_full_headroom():
    plan = plan_accuracy(_two_variants(150))
    assert plan.headroom == 1.05 and plan.effective_accuracy == pytest.approx(0.9)
    assert set(plan.placement.values()) == {"big"}  # the spare device shares the load
    assert plan.routing["cls"] == pytest.approx({"0": 0.5, "1": 0.5})


def test_heavier_demand_mixes_variants_to_keep_the_most_accuracy():
    # 2 x big = 190.5 req/s at 1.05; 300 req/s needs one small: big 95.24 + small 204.76
    plan = plan_accuracy(_two_variants(300))
    assert check_plan(plan, _two_variants(300)) == []
    assert sorted(plan.placement.values()) == ["big", "small"]
    big = 100 / 1.05
    assert plan.effective_accuracy == pytest.approx((0.9 * big + 0.7 * (300 - big)) / 300)


def test_the_ladder_lowers_headroom_in_005_steps_before_leaving_demand_unserved():
    assert headroom_ladder(1.05) == [1.05, 1.0]
    assert headroom_ladder(1.17) == [1.17, 1.12, 1.07, 1.02, 1.0]
    assert headroom_ladder(1.0) == [1.0]
    # 2 x small = 600 req/s at most: 590 fits only at 1.0 (600/1.02 = 588 < 590)
    p = _two_variants(590, headroom=1.12)
    plan = plan_accuracy(p)
    assert plan.headroom == 1.0 and sum(plan.unserved_rps.values()) == 0 and check_plan(plan, p) == []
    p = _two_variants(560, headroom=1.12)  # 600/1.07 = 560.7 >= 560
    assert plan_accuracy(p).headroom == 1.07


def test_demand_beyond_every_device_is_reported_unserved_per_family():
    fams = {"a": Family("a", 1000.0, (Variant("a1", 0.8),)), "b": Family("b", 50.0, (Variant("b1", 0.6),))}
    p = AccuracyProblem(fams, (Device("0", "cpu"), Device("1", "cpu")), {"cpu": {"a1": 300.0, "b1": 100.0}}, {})
    plan = plan_accuracy(p)
    assert check_plan(plan, p) == [] and plan.headroom == 1.0
    # the most demand served: both devices on a (600 req/s) rather than one on b (300 + 50)
    assert plan.unserved_rps == pytest.approx({"a": 400.0, "b": 50.0})
    assert plan.routing["b"] == {} and plan.effective_accuracy == pytest.approx(0.8)


def test_a_family_no_device_can_run_is_unserved_and_the_rest_is_planned():
    fams = {"a": Family("a", 10.0, (Variant("a1", 0.8),)), "b": Family("b", 5.0, (Variant("b1", 0.6),))}
    p = AccuracyProblem(fams, (Device("0", "cpu"),), {"cpu": {"a1": 300.0}}, {})
    plan = plan_accuracy(p)
    assert plan.unserved_rps == {"a": 0.0, "b": 5.0} and plan.placement == {"0": "a1"}
    assert check_plan(plan, p) == []


def test_capacity_from_a_latency_profile_is_the_best_batch_under_half_the_slo():
    lat = LatencyPoints(((1, 10.0), (4, 30.0), (8, 55.0)))
    assert lat.best_batch(100.0) == (4, pytest.approx(4000 / 30))  # 8 takes 55 > 50
    assert lat.best_batch(110.0) == (8, pytest.approx(8000 / 55))
    assert lat.best_batch(19.0) is None  # even one takes over half
    fam = Family("s", 100.0, (Variant("v", 0.9),), slo_ms=100.0)
    p = AccuracyProblem({"s": fam}, (Device("0", "cpu"),), {}, {"cpu": {"v": lat}})
    assert p.capacity("cpu", "v") == pytest.approx(4000 / 30)
    plan = plan_accuracy(p)
    assert plan.headroom == 1.25 and check_plan(plan, p) == []  # the default: 133 / 1.25 = 107 >= 100


def test_the_checker_finds_broken_plans():
    p = _two_variants(300)
    good = plan_accuracy(p)
    from dataclasses import replace
    over = replace(good, routing={"cls": {d: 1.0 if i == 0 else 0.0 for i, d in enumerate(good.routing["cls"])}})
    assert any("over its capacity" in x for x in check_plan(over, p))
    wrong = replace(good, effective_accuracy=0.99)
    assert any("effective_accuracy" in x for x in check_plan(wrong, p))
    early = replace(good, headroom=1.05, unserved_rps={"cls": 1.0})
    assert any("ladder goes to 1.0 first" in x for x in check_plan(early, p))
    odd = replace(good, headroom=1.03)
    assert any("not a step of the ladder" in x for x in check_plan(odd, p))
    idle = replace(good, placement={"0": None, "1": None})
    assert any("no variant of that family" in x for x in check_plan(idle, p))
