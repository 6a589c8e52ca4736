"""Cores shared by models (plan/tenancy.py) and the simulated benchmark's event loop
(bench/tenancy_sim.py), on cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.bench.tenancy_sim import simulate
from cellserve.plan.tenancy import NOMINAL_BATCH, Block, Tenant, allocate, place_cores, predicted_share, units_of


def block(one=1e-3, two=0.6e-3, name="b", max_threads=1024):
    return Block(name, (1, 64), (one, one * 64), (two, two * 64), max_threads)


def test_amdahl_from_one_and_two_threads():
    b = block(one=1e-3, two=0.6e-3)  # p = 2 (1 - 0.6) = 0.8
    assert b.step_s(1, 1) == pytest.approx(1e-3)
    assert b.step_s(1, 2) == pytest.approx(0.6e-3)
    assert b.step_s(1, 4) == pytest.approx(1e-3 * (0.2 + 0.8 / 4))
    assert b.step_s(1, 1000) == pytest.approx(1e-3 * (0.2 + 0.8 / 1000))
    assert block(max_threads=4).step_s(1, 32) == pytest.approx(b.step_s(1, 4))  # no more threads than panels
    assert b.step_s(128, 1) == pytest.approx(2 * 64e-3)  # past the largest batch: per lane as there
    assert block(one=1e-3, two=1.2e-3).step_s(1, 8) == pytest.approx(1e-3)  # slower on two: no parallel part


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="one step time per batch size"):
        Block("x", (1, 2), (1e-3,), (1e-3, 1e-3))
    with pytest.raises(ValueError, match="must be > 0"):
        Block("x", (1,), (0.0,), (1e-3,))


def test_every_unit_gets_a_core_and_all_cores_are_given():
    tenants = [Tenant("a", (block(), block()), 0.05, 10), Tenant("b", (block(),), 0.05, 10)]
    units = units_of(tenants, "block")
    assert len(units) == 3 and len(units_of(tenants, "model")) == 2
    given = allocate(tenants, units, [100.0, 100.0], 16)
    assert sum(given) == 16 and min(given) >= 1
    with pytest.raises(ValueError, match="2 cores for 3 units"):
        allocate(tenants, units, [1.0, 1.0], 2)


def test_a_tighter_slo_gets_more_cores():
    tight, loose = Tenant("tight", (block(),), 0.01, 10), Tenant("loose", (block(),), 0.1, 10)
    given = allocate([tight, loose], units_of([tight, loose], "model"), [50.0, 50.0], 10)
    assert given[0] > given[1]


def test_cores_that_would_be_wasted_go_where_they_help():
    """A block with no parallel part gains nothing from a second core: the cores go to the other."""
    serial = Tenant("serial", (block(one=1e-3, two=1e-3),), 0.001, 10)  # always over its SLO
    parallel = Tenant("parallel", (block(one=1e-3, two=0.5e-3),), 0.05, 10)
    given = allocate([serial, parallel], units_of([serial, parallel], "model"), [10.0, 10.0], 8)
    assert given == [1, 7]
    # a step of the nominal batch (8 lanes) takes 8 ms: 10 tokens take 80 ms, stretched by the
    # utilisation (10 req/s x 10 tokens x 8 ms / 8 lanes = 0.1), over the 1 ms SLO
    step = 1e-3 * NOMINAL_BATCH
    share = predicted_share(serial, units_of([serial], "model")[0], 10.0, 1)
    assert share == pytest.approx(10 * step / (1 - 10 * 10 * step / NOMINAL_BATCH) / 0.001)


def _one_tenant(slo_s=0.01):
    constant = Block("b", (1, 64), (1e-3, 1e-3), (1e-3, 1e-3))  # 1 ms a step, whatever the batch or cores
    return [Tenant("t", (constant,), slo_s, 5)]


@pytest.mark.parametrize("policy", ["round-robin", "model-wise", "layer-block"])
def test_cellular_steps_by_hand(policy):
    """Two requests of 3 tokens at 0 share every step: both done at 3 ms; one of 4 tokens at
    1 ms joins the batch at the next step (1 ms) and is done at 5 ms; one of 20 tokens is
    dropped at the first step that starts past its 10 ms deadline."""
    arrivals = [np.array([0.0, 0.0, 0.001, 0.002])]
    lengths = [np.array([3, 3, 4, 20])]
    r = simulate(_one_tenant(), policy, 2, arrivals, lengths, [1.0], 1.0, 64)
    t = r["tenants"]["t"]
    assert t == {"offered": 4, "within_slo": 3, "late": 0, "dropped": 1}
    assert r["units"][0]["steps"] == 12  # steps at 0, 1, ..., 11 ms: the last one starts at 11 ms
    assert r["units"][0]["busy_s"] == pytest.approx(12e-3)


def test_a_late_finish_counts_as_late_not_within():
    r = simulate(_one_tenant(slo_s=0.0045), "round-robin", 1, [np.array([0.0])], [np.array([5])], [1.0], 1.0, 64)
    assert r["tenants"]["t"] == {"offered": 1, "within_slo": 0, "late": 1, "dropped": 0}


def test_blocks_of_a_tenant_run_in_order_and_units_run_at_once():
    """Two blocks of 1 ms steps: a 2-token request takes 2 ms in each. Layer-block units step at
    once: the first request is done at 4 ms, the second (at 2 ms) runs block 0 while the first
    runs block 1, done at 6 ms: 4 ms each. Round-robin's one unit alternates the blocks from 2
    ms on: the first is done at 5 ms, past its 4.5 ms SLO; the second still has a step of block
    1 to run at 7 ms, past its deadline (6.5 ms), and is dropped there."""
    constant = Block("b", (1, 64), (1e-3, 1e-3), (1e-3, 1e-3))
    tenants = [Tenant("t", (constant, constant), 0.0045, 2)]
    arrivals, lengths = [np.array([0.0, 0.002])], [np.array([2, 2])]
    layered = simulate(tenants, "layer-block", 2, arrivals, lengths, [1.0], 1.0, 64)
    single = simulate(tenants, "round-robin", 2, arrivals, lengths, [1.0], 1.0, 64)
    assert layered["tenants"]["t"] == {"offered": 2, "within_slo": 2, "late": 0, "dropped": 0}
    assert single["tenants"]["t"] == {"offered": 2, "within_slo": 0, "late": 1, "dropped": 1}


def test_the_tightest_unit_takes_the_quietest_cores():
    # unit 1 is the tightest; core 1 is the neighbour's, so unit 1 gets core 0
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.0, 1: 0.5}) == [(1,), (0,)]
    # the neighbour moves to core 0: unit 1 follows the quiet core
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.5, 1: 0.0}) == [(0,), (1,)]
    # sizes from the allocator: the tight unit's two cores are the two quietest
    assert place_cores([2, 1, 1], [0.9, 0.5, 0.1], {0: 0.3, 1: 0.0, 2: 0.9, 3: 0.1}) == [(1, 3), (0,), (2,)]


def test_more_units_than_cores_share_the_least_loaded_core():
    # units 0 and 2 (the tightest) take a core each, unit 0 the quiet one; unit 1 (the
    # loosest) joins the core with the least load: core 1 holds unit 0 (1.0), core 0 unit 2
    # and the neighbour (1.6)
    assert place_cores([1, 1, 1], [0.8, 0.1, 0.5], {0: 0.6, 1: 0.0}) == [(1,), (1,), (0,)]
    # with no neighbour, ties go to the lower core
    assert place_cores([1, 1, 1], [0.8, 0.1, 0.5], {0: 0.0, 1: 0.0}) == [(0,), (0,), (1,)]


def test_measured_demand_and_a_margin_decide_where_the_loosest_goes():
    # the tightest (0) on the quiet core 0; unit 1 on core 1; unit 2 joins the core whose unit
    # uses less CPU: core 1 (0.2 + 0.3 neighbour) against core 0 (0.9)
    assert place_cores([1, 1, 1], [0.9, 0.5, 0.1], {0: 0.0, 1: 0.3}, demand=[0.9, 0.2, 0.4]) == [(0,), (1,), (1,)]
    # a unit stays where it is unless another core is quieter by more than the margin
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.0, 1: 0.05}, current=[(0,), (1,)], margin=0.1) == [(0,), (1,)]
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.0, 1: 0.15}, current=[(0,), (1,)], margin=0.1) == [(1,), (0,)]


@pytest.mark.parametrize("args, says", [
    (([1], [0.1, 0.2], {0: 0.0}), "one each"),
    (([1], [0.1], {}), "at least one core"),
    (([0], [0.1], {0: 0.0}), "one core or more"),
    (([1], [0.1], {0: 1.5}), "0 to 1 cores"),
    (([2, 1], [0.1, 0.2], {0: 0.0, 1: 0.0}), "3 cores asked of 2"),
    (([1], [0.1], {0: 0.0}, None, [-1.0]), "one load >= 0 per unit"),
    (([1], [0.1], {0: 0.0}, None, None, -0.1), "margin must be >= 0"),
])
def test_bad_placements_are_refused(args, says):
    with pytest.raises(ValueError, match=says):
        place_cores(*args)


def test_alike_choices_keep_the_current_cores():
    # no neighbour: the tight unit keeps core 1 rather than move to the lower core
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.0, 1: 0.0}, current=[(0,), (1,)]) == [(0,), (1,)]
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.0, 1: 0.0}) == [(1,), (0,)]
    # a real difference still moves it
    assert place_cores([1, 1], [0.2, 0.9], {0: 0.0, 1: 0.4}, current=[(0,), (1,)]) == [(1,), (0,)]
