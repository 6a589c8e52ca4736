"""The Nexus planner on cases small enough to check by hand: interpolation, the largest batch
under an SLO, saturate and residual, squishy bin packing and merging, prefix batching, the
query split, and the cellular engine's l(b). Every expected figure is worked out in the
comments from the rules in docs/planning.md."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from helpers_nexus import chain, linear, profiles, workload

from cellserve.plan.nexus import Costs, LatencyProfile, Query, QueryNode, max_batch_for_slo
from cellserve.plan.nexus_cellular import cellular_latency
from cellserve.plan.nexus_check import check_plan
from cellserve.plan import nexus_pack
from cellserve.plan.nexus_pack import plan
from cellserve.plan.nexus_query import split_query
from cellserve.plan.profile import CellTypeProfile, HostProfile, Machine, ModelProfile, Timing

A = LatencyProfile(((1, 10.0), (4, 25.0), (8, 40.0), (16, 70.0)))


def test_latency_is_interpolated_linearly_between_profiled_batches():
    assert A.ms(1) == 10.0 and A.ms(4) == 25.0 and A.ms(16) == 70.0
    assert A.ms(2) == pytest.approx(15.0) and A.ms(3) == pytest.approx(20.0)
    assert A.ms(5) == pytest.approx(28.75) and A.ms(10) == pytest.approx(47.5)
    assert A.max_batch == 16


def test_below_the_smallest_profiled_batch_and_never_falling():
    late = LatencyProfile(((4, 20.0), (8, 30.0)))
    assert [late.ms(b) for b in (1, 2, 3, 4, 6)] == [20.0, 20.0, 20.0, 20.0, 25.0]
    noisy = LatencyProfile(((1, 10.0), (2, 8.0), (4, 12.0)))  # batch 2 measured faster than batch 1
    assert [noisy.ms(b) for b in (1, 2, 3, 4)] == [10.0, 10.0, 10.0, 12.0]


def test_largest_batch_meeting_an_slo_leaves_half_for_waiting():
    # 2 * l(b) <= SLO: l(10) = 47.5 <= 50 < l(11) = 51.25
    assert max_batch_for_slo(A, 100.0) == 10
    assert max_batch_for_slo(A, 20.0) == 1 and max_batch_for_slo(A, 19.9) == 0
    assert max_batch_for_slo(A, 1000.0) == 16


def test_saturate_then_residual():
    """A at SLO 100 ms, 500 req/s. Best batch 10 (47.5 ms): 210.53 req/s per device, so two
    whole devices (421.05) and a residual of 78.95 req/s. Residual duty cycles d = B / 78.95:
    B = 5 gives d = 63.33 ms, l(5) = 28.75, worst case 92.08 <= 100, occupancy 0.454, the
    lowest (B = 4: 0.493; B = 6: worst case 108.5 > 100)."""
    p = profiles({"a": A})
    w = workload([("a", 100.0, 500.0)])
    result = plan(w, p)
    assert check_plan(result, p, w) == []
    assert result.devices_used == 3
    full = [d for d in result.devices if d.sessions[0].batch == 10]
    assert len(full) == 2
    for d in full:
        assert d.duty_cycle_ms == pytest.approx(47.5) and d.occupancy == pytest.approx(1.0)
        assert d.sessions[0].rate_rps == pytest.approx(10_000 / 47.5)
        assert d.sessions[0].worst_case_ms == pytest.approx(95.0)
    (rest,) = [d for d in result.devices if d.sessions[0].batch != 10]
    assert rest.sessions[0].batch == 5
    assert rest.sessions[0].rate_rps == pytest.approx(500 - 2 * 10_000 / 47.5)
    assert rest.duty_cycle_ms == pytest.approx(5 * 1000 / (500 - 2 * 10_000 / 47.5))
    assert rest.occupancy == pytest.approx(28.75 / rest.duty_cycle_ms)


L = linear(10.0, 5.0)  # l(b) = 10 + 5b, b <= 16


def test_residuals_merge_onto_one_device_at_the_smaller_duty_cycle():
    """B (SLO 100, 40 req/s): best residual d = 75 ms (batch 3, l = 25, worst case 100).
    C (SLO 200, 20 req/s): d = 150 (batch 3, l = 25, worst 175). Merged at d = 75: B's batch
    ceil(40 * 0.075) = 3 (25 ms), C's ceil(20 * 0.075) = 2 (20 ms): 45 <= 75, worst cases 100
    and 95: one device, occupancy 0.6."""
    p = profiles({"l": L})
    w = workload([("l", 100.0, 40.0), ("l", 200.0, 20.0)])
    result = plan(w, p)
    assert check_plan(result, p, w) == []
    (dev,) = result.devices
    assert dev.duty_cycle_ms == pytest.approx(75.0) and dev.occupancy == pytest.approx(0.6)
    got = {a.id: (a.batch, a.latency_ms, a.worst_case_ms) for a in dev.sessions}
    assert got == {"s0": (3, pytest.approx(25.0), pytest.approx(100.0)), "s1": (2, pytest.approx(20.0), pytest.approx(95.0))}


def test_a_merge_that_breaks_the_cycle_opens_a_device():
    """E (SLO 60, 40 req/s) runs at d = 25 (batch 1, 15 ms, occupancy 0.6). B at d = 25 would
    also need 15 ms: 30 > 25, so B gets a device and C (see above) joins B there."""
    p = profiles({"l": L})
    w = workload([("l", 100.0, 40.0), ("l", 200.0, 20.0), ("l", 60.0, 40.0)])
    result = plan(w, p)
    assert check_plan(result, p, w) == []
    assert sorted(sorted(a.id for a in d.sessions) for d in result.devices) == [["s0", "s1"], ["s2"]]
    (alone,) = [d for d in result.devices if len(d.sessions) == 1]
    assert alone.duty_cycle_ms == pytest.approx(25.0) and alone.sessions[0].batch == 1


def test_worked_example_in_the_manner_of_the_nexus_paper():
    """Three sessions that a batch-oblivious allocation gives a device each. A and B (l = 10 + 10b,
    batch 4 in 50 ms, SLO 100, 20 req/s each) each run at d = 50 with batch 1 (20 ms; d = 100
    would make the worst case 130). Merged at d = 50: 20 + 20 = 40 <= 50, worst cases 70.
    C (l = 12 + 12b, SLO 200, 10 req/s) runs at d = 100 with batch 1 (24 ms); on A and B's
    device at d = 50 its batch is ceil(0.5) = 1: 64 > 50, so it takes a second device.
    (The figures are worked out here under these rules, not copied from the paper.)"""
    p = profiles({"a": linear(10, 10), "b": linear(10, 10), "c": linear(12, 12)})
    w = workload([("a", 100.0, 20.0), ("b", 100.0, 20.0), ("c", 200.0, 10.0)])
    result = plan(w, p)
    assert check_plan(result, p, w) == []
    shape = sorted((sorted(a.model for a in d.sessions), round(d.duty_cycle_ms, 6), round(d.occupancy, 6))
                   for d in result.devices)
    assert shape == [(["a", "b"], 50.0, 0.8), (["c"], 100.0, 0.24)]


def test_merging_dissolves_a_device_whose_sessions_fit_elsewhere(monkeypatch):
    """l = 10 + 5b and k = 4 + 8b; own duty cycles: s0 (l, SLO 60, 5 req/s) 30 ms, batch 1,
    15 ms; s1 (l, SLO 100, 5) 50 ms; s2 (k, SLO 60, 5) 28 ms, 12 ms; s3 (k, SLO 60, 40) 25 ms,
    12 ms. Best fit, largest occupancy first: s0 -> D0; s3 -> D1 (with s0 at 25 ms: 27 > 25);
    s2 -> D0 (at 28 ms: 27, occupancy 0.96, beats D1's 0.96 at 25); s1 fits neither -> D2.
    Merging then empties D0: s0 joins s1 at 30 ms (15 + 15 <= 30, worst cases 45), s2 joins s3
    at 25 ms (12 + 12 <= 25)."""
    p = profiles({"l": L, "k": linear(4.0, 8.0)})
    w = workload([("l", 60.0, 5.0), ("l", 100.0, 5.0), ("k", 60.0, 5.0), ("k", 60.0, 40.0)])
    merged = plan(w, p)
    assert check_plan(merged, p, w) == []
    assert sorted(sorted(a.id for a in d.sessions) for d in merged.devices) == [["s0", "s1"], ["s2", "s3"]]
    monkeypatch.setattr(nexus_pack._Packer, "merge_devices", lambda self: None)
    assert plan(w, p).devices_used == 3


def test_unservable_slo_and_budget_are_listed_never_dropped():
    p = profiles({"l": L})
    w = workload([("l", 20.0, 10.0), ("l", 100.0, 1000.0)], max_devices=3)
    result = plan(w, p)
    assert check_plan(result, p, w) == []
    reasons = {u.id: u.reason for u in result.unserved}
    assert "below 2 x the latency of batch 1 (30 ms)" in reasons["s0"]
    assert "max_devices (3)" in reasons["s1"]
    # 1000 req/s at 160 req/s a device: 3 whole devices carry 480, the rest is unserved
    assert result.devices_used == 3
    assert sum(u.rate_rps for u in result.unserved if u.id == "s1") == pytest.approx(1000 - 3 * 160)


def test_prefix_batching_saves_a_device():
    """h1 and h2 share an encoder (20 + b ms) and add a small head (1 + 0.1b). Apart, each at
    200 req/s needs most of a device (SLO 100: d = 60, l = 34.2; together 68.4 > 60). Through
    one prefix batch: 400 req/s, d = 50 with batches 10 + 10: l = 20 + 20 + 2 * 2 = 44 <= 50."""
    enc = linear(20.0, 1.0, 64)
    head = linear(21.0, 1.1, 64)
    shared = profiles({"h1": (head, "enc"), "h2": (head, "enc")}, {"enc": enc})
    apart = profiles({"h1": head, "h2": head})
    w = workload([("h1", 100.0, 200.0), ("h2", 100.0, 200.0)])
    with_prefix, without = plan(w, shared), plan(w, apart)
    assert check_plan(with_prefix, shared, w) == [] and check_plan(without, apart, w) == []
    assert (with_prefix.devices_used, without.devices_used) == (1, 2)
    (dev,) = with_prefix.devices
    group = dev.sessions[0].latency_ms
    assert all(a.latency_ms == group and a.prefix == "enc" for a in dev.sessions)
    total = sum(a.batch for a in dev.sessions)
    assert group == pytest.approx(enc.ms(total) + sum(0.1 * a.batch + 1.0 for a in dev.sessions))
    assert dev.occupancy == pytest.approx(group / dev.duty_cycle_ms)


def test_prefix_sessions_with_different_slos_are_planned_apart():
    enc = linear(20.0, 1.0, 64)
    head = linear(21.0, 1.1, 64)
    p = profiles({"h1": (head, "enc"), "h2": (head, "enc")}, {"enc": enc})
    w = workload([("h1", 100.0, 200.0), ("h2", 300.0, 200.0)])
    result = plan(w, p)
    assert check_plan(result, p, w) == []  # the checker batches them through the prefix where they share a device


X, Y = linear(10.0, 5.0), linear(20.0, 10.0)


def test_query_split_by_hand():
    """X -> Y, SLO 200, 100 req/s each, grid of 4 (50 ms steps). Throughput at a share L: the
    best batch with 2 l(b) <= L. X: 120 req/s at 50, 160 at 100. Y: none at 50, 60 at 100,
    71.4 at 150. Devices: (50, 150) 0.833 + 1.4 = 2.23; (100, 100) 0.625 + 1.667 = 2.29;
    (150, 50) impossible."""
    costs = Costs(profiles({"x": X, "y": Y}).device_types["gpu"])
    q = chain("q", 200.0, ("x", 100.0), ("y", 100.0))
    assert split_query(q, costs, grid=4) == {"x": 50.0, "y": 150.0}
    assert split_query(chain("q", 50.0, ("x", 100.0), ("y", 100.0)), costs, grid=4) is None


def _devices(table, rate, share_ms):
    best = max((b * 1000 / table[b] for b in range(1, len(table)) if 2 * table[b] <= share_ms + 1e-9), default=0.0)
    return rate / best if best else float("inf")


def test_query_split_matches_brute_force_on_a_tree():
    """A root fanning out to two children (both paths bounded): the DP's total equals the best
    of every split on the grid."""
    p = profiles({"r": linear(4.0, 2.0, 32), "c1": X, "c2": linear(6.0, 3.0, 32)})
    costs = Costs(p.device_types["gpu"])
    q = Query("q", 240.0, QueryNode("r", 300.0, (QueryNode("c1", 150.0), QueryNode("c2", 90.0))))
    grid = 12
    step = 240.0 / grid
    split = split_query(q, costs, grid)
    assert split["r"] + split["c1"] <= 240 + 1e-9 and split["r"] + split["c2"] <= 240 + 1e-9

    def total(s):
        return sum(_devices(costs.table(n.model), n.rate_rps, s[n.model]) for n in q.root.walk())
    brute = min(total({"r": r * step, "c1": a * step, "c2": b * step})
                for r, a, b in itertools.product(range(1, grid + 1), repeat=3) if r + a <= grid and r + b <= grid)
    assert total(split) == pytest.approx(brute)


def test_queries_plan_their_nodes_at_their_shares():
    p = profiles({"x": X, "y": Y})
    w = workload([], queries=(chain("q0", 200.0, ("x", 100.0), ("y", 100.0)),))
    result = plan(w, p, grid=4)
    assert check_plan(result, p, w) == []
    assert result.queries[0].split_ms == {"x": 50.0, "y": 150.0}
    slos = {a.id: a.slo_ms for d in result.devices for a in d.sessions}
    assert slos == {"q0/x": 50.0, "q0/y": 150.0}


# ---- cellular engines ----

def _cell(kind: str, step) -> CellTypeProfile:
    return CellTypeProfile(kind, 0, {b: Timing.fixed(step(b)) for b in range(1, 9)}, None, 1e-5, 0.0)


def _model_profile(cells: dict[str, CellTypeProfile]) -> ModelProfile:
    return ModelProfile("m", Machine("cpu", "test", 1, "none"), 8, True, cells, {"head": Timing.fixed(2e-4)},
                        HostProfile(1e-4, 0.0, 0.0, 0.0), Timing.fixed(0.0), Timing.fixed(0.0), {})


def test_cellular_latency_is_rounds_times_round_time_plus_per_request_work():
    """One stack, 20 tokens: 20 rounds of (1 ms + 0.1 ms * b + 0.1 ms host), and per request
    20 tokens * 0.01 ms of projection + 0.2 ms head: l(b) = 22 + 2.4b ms."""
    prof = _model_profile({"stack0": _cell("stack", lambda b: 1e-3 + 1e-4 * b)})
    lat = cellular_latency(prof, 20.0)
    assert lat.max_batch == 8
    for b in range(1, 9):
        assert lat.ms(b) == pytest.approx(22.0 + 2.4 * b)
    assert cellular_latency(prof, 20.0, margin=1.15).ms(4) == pytest.approx(1.15 * (22.0 + 9.6))


def test_cellular_latency_of_two_cell_types_and_of_a_prefix():
    """Two layers taken in turn: 40 rounds of (two steps + two host steps); the prefix (layer 0
    alone) has 20 rounds and no head."""
    step = lambda b: 1e-3 + 1e-4 * b  # noqa: E731
    prof = _model_profile({"l0": _cell("layer", step), "l1": _cell("layer", step)})
    whole = cellular_latency(prof, 20.0)
    # round = 2 * (1.1 + 0.1b) ms; per request 2 * 0.2 + 0.2 ms
    assert whole.ms(3) == pytest.approx(40 * 2 * (1.1 + 0.3) + 3 * 0.6)
    prefix = cellular_latency(prof, 20.0, cell_types=["l0"])
    assert prefix.ms(3) == pytest.approx(20 * (1.1 + 0.3) + 3 * 0.2)
    side_by_side = cellular_latency(prof, 20.0, rounds_per_request=20)
    assert side_by_side.ms(3) == pytest.approx(20 * 2 * (1.1 + 0.3) + 3 * 0.6)
    with pytest.raises(ValueError, match="no cell type 'nope'"):
        cellular_latency(prof, 20.0, cell_types=["nope"])


def test_a_decoders_steps_come_from_the_profiles_histogram():
    """Decoder lanes profiled: 3 lanes of 10 source tokens that ran 20 steps, 1 lane of 5 that
    ran 5 (steps per source token: 2, 2, 2, 1; mean 1.75): a 20-token request takes 35 decoder
    rounds on top of the encoder's 20."""
    step = lambda b: 1e-3  # noqa: E731
    prof = _model_profile({"enc": _cell("stack", step), "dec": _cell("decoder", step)})
    prof = replace(prof, decode_steps={"dec": {10: {20: 3}, 5: {5: 1}}})
    rounds = cellular_latency(prof, 20.0, rounds_per_request=None)
    one_rounds = cellular_latency(prof, 20.0, rounds_per_request=1)
    # l(1) = rounds * round time + per-request work; the difference of the two isolates rounds
    round_ms = 2 * (1.0 + 0.1)  # two cell types' steps + host steps per round
    assert rounds.ms(1) - one_rounds.ms(1) == pytest.approx((20 + 35 - 1) * round_ms)
