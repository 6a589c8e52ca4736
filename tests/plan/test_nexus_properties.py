"""Properties of the Nexus planner on random profiles and workloads (hypothesis): every plan is
feasible by the independent checker (nexus_check), uses no more devices than the sessions
would alone, is the same for the same input, round-trips through JSON; a re-plan after some
rates change moves only sessions whose rates changed (with their prefix group), and one after
no change moves none."""

from __future__ import annotations

import math
import os

from helpers_nexus import DT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellserve.plan.nexus import (DeviceProfiles, LatencyProfile, ModelEntry, Profiles, Query, QueryNode, Session,
                                  Workload)
from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_io import (parse_plan, parse_profiles, parse_workload, plan_to_dict, profiles_to_dict,
                                     workload_to_dict)
from cellserve.plan.nexus_epochs import moved_sessions
from cellserve.plan.nexus_pack import plan, replan

# NEXUS_EXAMPLES=2000 for a longer search
SETTINGS = settings(max_examples=int(os.environ.get("NEXUS_EXAMPLES", 120)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def latency(draw, max_batch=None) -> LatencyProfile:
    """A few profiled batch sizes with latency rising (not necessarily linearly)."""
    top = max_batch or draw(st.sampled_from([4, 8, 16, 32, 64]))
    sizes = sorted(set(draw(st.lists(st.integers(1, top), min_size=1, max_size=4))) | {top})
    ms, points = draw(st.floats(1.0, 30.0)), []
    for b in sizes:
        points.append((b, ms))
        ms += draw(st.floats(0.05, 12.0)) * max(1, b // 2)
    return LatencyProfile(tuple(points))


@st.composite
def device(draw, prefixes: bool) -> DeviceProfiles:
    n = draw(st.integers(1, 4))
    models, shared = {}, {}
    if prefixes:
        enc = draw(latency(max_batch=64))
        shared["enc"] = enc
    for i in range(n):
        lat = draw(latency())
        if prefixes and i % 2 == 0:  # the model = the encoder plus a head at the encoder's sizes
            head = draw(st.floats(0.1, 5.0))
            lat = LatencyProfile(tuple((b, ms + head * (1 + b / 16)) for b, ms in enc.points))
            models[f"m{i}"] = ModelEntry(lat, "enc")
        else:
            models[f"m{i}"] = ModelEntry(lat)
    return DeviceProfiles(models, shared)


@st.composite
def case(draw, prefixes: bool = True, queries: bool = True):
    dp = draw(device(prefixes and draw(st.booleans())))
    names = sorted(dp.models)
    slos = st.sampled_from([20.0, 50.0, 80.0, 120.0, 200.0, 350.0, 500.0])
    rates = st.floats(0.2, 3000.0)
    sessions = tuple(Session(f"s{i}", draw(st.sampled_from(names)), draw(slos), draw(rates))
                     for i in range(draw(st.integers(1, 10))))
    qs = []
    if queries and len(names) >= 2:
        for qi in range(draw(st.integers(0, 2))):
            chosen = draw(st.permutations(names))[:draw(st.integers(2, len(names)))]
            kids = tuple(QueryNode(m, draw(rates)) for m in chosen[1:])
            qs.append(Query(f"q{qi}", draw(st.sampled_from([100.0, 300.0, 600.0])),
                            QueryNode(chosen[0], draw(rates), kids)))
    max_devices = draw(st.sampled_from([0, 1, 3, 10, 10_000]))
    return Profiles({DT: dp}), Workload(DT, max_devices, sessions, tuple(qs))


def _alone(table: tuple[float, ...], slo: float) -> float:
    """The most one device carries for a session alone (independent of the planner)."""
    return max((b * 1000 / table[b] for b in range(1, len(table)) if 2 * table[b] <= slo + 1e-9), default=0.0)


@SETTINGS
@given(case())
def test_every_plan_is_feasible_and_accounts_for_every_rate(c):
    profiles, w = c
    result = plan(w, profiles, grid=20)
    assert check_plan(result, profiles, w) == []
    assert all(u.reason for u in result.unserved)


@SETTINGS
@given(case(prefixes=False, queries=False))
def test_no_more_devices_than_the_sessions_would_take_alone(c):
    profiles, w = c
    w = Workload(w.device_type, 10_000, w.sessions)
    result = plan(w, profiles)
    tables = {m: e.latency.table for m, e in profiles.device_types[DT].models.items()}
    alone = [(s, _alone(tables[s.model], s.slo_ms)) for s in w.sessions]
    bound = sum(max(1, math.ceil(s.rate_rps / x - 1e-9)) for s, x in alone if x > 0)
    assert result.devices_used <= bound
    if all(s.rate_rps <= x for s, x in alone):  # one device per session at most
        assert result.devices_used <= len(w.sessions)
    unservable = {s.id for s, x in alone if x == 0}
    assert {u.id for u in result.unserved} == unservable


@SETTINGS
@given(case())
def test_same_input_same_plan_and_json_round_trips(c):
    profiles, w = c
    result = plan(w, profiles, grid=20)
    assert plan_to_dict(plan(w, profiles, grid=20)) == plan_to_dict(result)
    assert parse_plan(plan_to_dict(result)) == result
    assert parse_profiles(profiles_to_dict(profiles)) == profiles
    assert parse_workload(workload_to_dict(w), profiles) == w


@st.composite
def rate_change(draw):
    profiles, w = draw(case(queries=False))
    w = Workload(w.device_type, 10_000, w.sessions)
    changed = draw(st.sets(st.sampled_from([s.id for s in w.sessions])))
    factors = {i: draw(st.floats(0.85, 1.15).filter(lambda f: abs(f - 1) > 1e-3)) for i in sorted(changed)}
    after = Workload(w.device_type, w.max_devices,
                     tuple(Session(s.id, s.model, s.slo_ms, s.rate_rps * factors.get(s.id, 1.0)) for s in w.sessions))
    return profiles, w, after, set(changed)


@SETTINGS
@given(rate_change())
def test_replanning_after_a_rate_change_moves_only_changed_sessions(c):
    profiles, before, after, changed = c
    first = plan(before, profiles)
    second = replan(first, after, profiles)
    assert check_plan(second, profiles, after) == []
    # sessions of one prefix and one SLO are planned as one unit: a changed member moves its unit
    prefix = {m: e.prefix for m, e in profiles.device_types[DT].models.items()}
    unit = {s.id: (prefix[s.model], s.slo_ms) if prefix[s.model] else s.id for s in after.sessions}
    carried = {s.id for s in after.sessions if unit[s.id] in {unit[c] for c in changed}}
    moved = moved_sessions(first, second)
    assert moved <= carried
    assert len({unit[s] for s in moved}) <= len({unit[c] for c in changed})


@SETTINGS
@given(case())
def test_replanning_an_unchanged_workload_keeps_every_placement(c):
    profiles, w = c
    first = plan(w, profiles, grid=20)
    second = replan(first, w, profiles, grid=20)
    assert check_plan(second, profiles, w) == []
    # only rate the budget left out may find a place (a re-plan packs it again)
    short = {u.id for u in first.unserved}
    assert moved_sessions(first, second) <= short

    def placements(p):
        return {(d.id, a.id) for d in p.devices for a in d.sessions if a.id not in short}
    assert placements(second) == placements(first)
    if not first.unserved:
        assert plan_to_dict(second) == plan_to_dict(first)
