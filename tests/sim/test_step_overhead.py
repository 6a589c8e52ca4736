"""The engine prices its own per-step work (Python off the device) as a cost per batch, not
as a factor on kernel time. Learnt where that work dominates (lone requests, one-lane
batches), a factor would overstate a full batch's step many times over and refuse requests
the engine serves in time. Driven on the simulator, so the true costs are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.cost_model import CostModel
from cellserve.engine.request import Request, Status
from cellserve.executor.batch import StepBatch
from cellserve.plan.profile import HostProfile, synthetic_profile
from cellserve.sim.loop import SimArrival, Simulation

MS = 1e-3
KERNEL_S = lambda b: 0.05 * MS + 0.01 * MS * b  # noqa: E731  a step of b lanes on the device
HOST_STEP_S = 0.5 * MS  # the engine's own work per step, off the device


def _engine(models):
    model = models.models["gru"]
    profile = synthetic_profile(model, KERNEL_S, host=HostProfile(HOST_STEP_S, 0.0, 0.0, 0.0))
    sim = Simulation()
    engine = sim.add_engine([model], {"gru": profile},
                            EngineConfig(policy="cellular", profile=False, pin_threads=False)).engine
    for cell_type in engine.cell_types:
        for b in (1, 2, 4, 8, 16, 32, 64):
            engine.costs.observe(cell_type, b, KERNEL_S(b))
    return sim, engine


def test_batches_per_round_count_max_batch_lanes_of_each_type_and_the_busiest_executor():
    costs = CostModel(max_batch=4)
    assert costs.batches({"a": 8, "b": 1, "c": 0}) == 3
    costs.group_of = {"a": 0, "b": 1, "c": 1}
    assert costs.batches({"a": 8, "b": 5, "c": 1}) == 3  # b's two batches and c's one, one after another


def test_the_engine_learns_its_off_device_time_per_step(models):
    sim, engine = _engine(models)
    tokens = {"tokens": np.ones((1, 30), np.int64)}
    sim.run([SimArrival(i * 0.1, "gru", tokens, tag=i) for i in range(60)])  # lone requests
    assert engine.step_overhead_s == pytest.approx(HOST_STEP_S, rel=0.05)


def test_a_burst_that_fills_a_batch_is_priced_at_kernel_time_plus_overhead_and_admitted(models):
    sim, engine = _engine(models)
    tokens = {"tokens": np.ones((1, 30), np.int64)}
    sim.run([SimArrival(i * 0.1, "gru", tokens, tag=i) for i in range(60)])  # learn the overhead alone
    start = 7.0
    # 64 requests at once: one full batch per round; 30 rounds of (kernel(64) + overhead) each
    # is about 36 ms. A factor learnt from the lone requests (elapsed over kernel time, about
    # 9x) would price it near 170 ms and refuse them all against a 100 ms deadline.
    burst = [SimArrival(start, "gru", tokens, timeout_s=0.1, tag=100 + i) for i in range(64)]
    outcomes = sim.run(burst)
    assert [o.status for o in outcomes] == [Status.OK] * 64
    assert max(o.finish_s - o.arrival_s for o in outcomes) < 0.05


def test_one_slow_spell_does_not_move_the_overhead_but_a_lasting_change_does(models):
    _, engine = _engine(models)
    (cell_type,) = engine.cell_types
    batch = StepBatch(cell_type, tuple(range(1, 9)), tuple(range(1, 9)), (1,) * 8, (1,) * 8)
    price = KERNEL_S(8)  # what the cost model prices a step of this batch at

    def spell(per_step_s: float, steps: int = 300) -> None:  # one spell of 60 ms at least
        for _ in range(steps):
            engine._learn_overhead(price + per_step_s, batch, 1)

    for _ in range(20):  # steady: 100 us beyond the price per step
        spell(100e-6)
    assert engine.step_overhead_s == pytest.approx(100e-6)
    spell(5e-3, 12)  # a collector pass: 5 ms per step for one spell
    assert engine.step_overhead_s == pytest.approx(100e-6)
    for _ in range(5):  # the machine got busier for good
        spell(300e-6, 200)
    assert engine.step_overhead_s == pytest.approx(300e-6)


def test_the_overhead_follows_a_fall_in_load_within_two_seconds_of_light_load(models):
    # A burst's lane starts spread over its steps price each step high; lone requests at
    # light load cost far less per step. Spells of 50 ms of busy time took seconds each at
    # light load, so the burst's figure priced every request for seconds after it: the 2 s of
    # light load below hold 40 ms of busy time, not one spell's. A spell also ends after
    # SPELL_SPAN_S of wall time.
    _, engine = _engine(models)
    clock = engine.clock
    (cell_type,) = engine.cell_types
    full = StepBatch(cell_type, tuple(range(1, 65)), tuple(range(1, 65)), (1,) * 64, (1,) * 64)
    lone = StepBatch(cell_type, (1,), (1,), (1,), (1,))
    for _ in range(20 * 100):  # a burst: 500 us beyond the price on every step, back to back
        step_s = KERNEL_S(64) + 500e-6
        clock.advance(step_s)
        engine._learn_overhead(step_s, full, 1)
    assert engine.step_overhead_s == pytest.approx(500e-6)
    for _ in range(20):  # 2 s of lone 25-step requests, 10 a second, 20 us beyond the price a step
        for _ in range(25):
            step_s = KERNEL_S(1) + 20e-6
            clock.advance(step_s)
            engine._learn_overhead(step_s, lone, 1)
        clock.advance(0.1)
    assert engine.step_overhead_s == pytest.approx(20e-6)


def test_a_lone_request_is_not_dropped_on_an_overhead_learnt_under_earlier_load(models):
    # Admission prices a request on an idle engine at the fastest steps measured; the drop
    # check prices a lone run the same way, so an overhead left by a burst (here 20 ms a
    # step, 600 ms for the request's 30 steps) does not drop what admission just let in.
    sim, engine = _engine(models)
    engine.step_overhead_s = 20 * MS
    tokens = {"tokens": np.ones((1, 30), np.int64)}
    (outcome,) = sim.run([SimArrival(0.0, "gru", tokens, timeout_s=50 * MS, tag=0)])
    assert outcome.status is Status.OK, outcome.reason
    assert outcome.finish_s - outcome.arrival_s < 50 * MS


def test_admitting_is_a_share_of_the_engines_time_not_an_overhead_of_the_steps_left(models):
    # A flood refused while few lanes run: admitting (refusing) takes most of each batch's
    # time. Counted per step, that work landed on the few steps still running, the priced
    # round grew with it, and the next arrivals were refused too. As a share of the engine's
    # time it stretches a round by at most 1 / (1 - MAX_ADMITTING_SHARE).
    from cellserve.engine.cost_model import MAX_ADMITTING_SHARE

    _, engine = _engine(models)
    (cell_type,) = engine.cell_types
    batch = StepBatch(cell_type, (1,), (1,), (1,), (1,))
    price = KERNEL_S(1)
    load = {cell_type: 1}
    for _ in range(20 * 400):  # steady and quiet: 100 us beyond the price per step, nothing admitted
        engine._learn_overhead(price + 100e-6, batch, 1)
    quiet_round = engine._round_time(load, shared=True)
    assert engine.admitting_share == 0.0
    assert quiet_round == pytest.approx(price + 100e-6)

    for _ in range(20 * 300):  # each one-lane step now follows 0.1 ms of admitting arrivals
        engine._learn_overhead(price + 100e-6 + 0.1e-3, batch, 1, admitting=0.1e-3)
    assert engine.step_overhead_s == pytest.approx(100e-6)  # the steps themselves did not slow
    assert engine.admitting_share == pytest.approx(0.1e-3 / (price + 0.2e-3))
    assert engine._round_time(load, shared=True) == pytest.approx(quiet_round / (1 - engine.admitting_share))

    for _ in range(20 * 10):  # refusing a flood: 20 ms of admitting before each step
        engine._learn_overhead(price + 100e-6 + 20e-3, batch, 1, admitting=20e-3)
    assert engine.step_overhead_s == pytest.approx(100e-6)
    assert engine._round_time(load, shared=True) == pytest.approx(quiet_round / (1 - MAX_ADMITTING_SHARE))


@pytest.mark.parametrize("took_s, slack_s, gap_s", [
    (5 * MS, 0.0, 50 * MS),  # a dear check (it walks every run in flight): its share of the time, 10%
    (0.0, 0.0, 10 * MS),  # a run was late: the usual gap
    (0.0, 60 * MS, 30 * MS),  # every run 60 ms from late: half of that
    (0.0, 1.0, 100 * MS),  # far from late: no more than 100 ms
    (0.0, math.inf, 100 * MS),  # no run with a deadline
    (30 * MS, 1.0, 300 * MS),  # the share still bounds the pace
])
def test_the_next_drop_check_comes_after_its_share_of_the_time_or_half_the_least_spare_time(
        models, took_s, slack_s, gap_s):
    _, engine = _engine(models)
    clock = engine.clock
    engine._find_late = lambda now: (clock.advance(took_s), slack_s)[1]
    now = clock.now()
    engine._drop_late(now)
    assert engine._next_drop_check == pytest.approx(now + gap_s)


def test_the_drop_checks_spare_time_is_the_least_of_the_runs_priced(models):
    _, engine = _engine(models)
    tokens = {"tokens": np.ones((1, 30), np.int64)}
    now = engine.clock.now()
    for timeout in (200 * MS, 80 * MS, 500 * MS):
        engine.submit(Request("gru", tokens, timeout_s=timeout, arrival=now))
    engine._take_arrivals(now)  # admitted, not run
    runs = list(engine._runs.values())
    lanes = {t: engine.policy.lanes_of(t) for t in engine._placed}
    round_s = engine._round_time(lanes, shared=True)
    spare = min(r.deadline - engine._rounds_left(r) * round_s for r in runs) - now
    assert 0 < spare < 80 * MS
    assert engine._find_late(now) == pytest.approx(spare)
    assert engine._find_late(now + 1.0) == 0.0  # a second on, every one is late (and dropped)
    assert not engine._runs


def test_a_request_admitted_brings_the_drop_check_forward_by_its_spare_time(models):
    """A check that found plenty of spare time put the next one 100 ms ahead; a request with
    a 40 ms deadline admitted meanwhile must not wait for it: the check comes within half of
    the time its admission priced it to have spare."""
    _, engine = _engine(models)
    now = engine.clock.now()
    engine._next_drop_check = now + 100 * MS
    engine.submit(Request("gru", {"tokens": np.ones((1, 10), np.int64)}, timeout_s=40 * MS, arrival=now))
    engine._take_arrivals(now)  # admitted, not run
    (run,) = engine._runs.values()
    assert 0 < run.priced_s < 40 * MS
    assert engine._next_drop_check == pytest.approx(now + max(10 * MS, 0.5 * (40 * MS - run.priced_s)))
