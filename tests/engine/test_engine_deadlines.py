"""Deadlines and load bounds: admission rejects, drop_late drops, and every request still gets
exactly one response. Time comes from a fake clock, so nothing here depends on machine speed."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Status
from helpers_engine import FakeClock, Responses, assert_same_outputs, make_request, seq2seq_reference
from strategies_engine import MIX, timed_requests

TICK = 1e-3  # every clock reading advances the fake clock by this much
TOKENS = np.array([[5, 4, 3, 2, 1, 0, 9, 8, 7, 6, 5, 4]], np.int64)  # 12 steps (the two layers step together)


def make_engine(models, clock, **config) -> Engine:
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False, **config), clock=clock)
    for cell_type in engine.cell_types:  # a known step cost: one tick per step, whatever the batch
        engine.costs.observe(cell_type, 1, TICK)
    return engine


def check_ok(models, responses, indices):
    want = models.reference("lstm", {"tokens": TOKENS})
    for i in indices:
        response = responses.one(i)
        assert response.status is Status.OK, f"request {i}: {response.status} {response.reason}"
        assert_same_outputs(response.outputs, want)


def test_admission_rejects_a_request_whose_timeout_is_far_below_its_predicted_time(models):
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=1e-4))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS}, timeout_s=1000.0))
    engine.submit(make_request(responses, 2, "lstm", {"tokens": TOKENS}))  # no deadline
    engine.run_until_idle(timeout_s=10)
    rejected = responses.one(0)
    assert rejected.status is Status.REJECTED
    assert "deadline" in rejected.reason and "predicted" in rejected.reason
    assert rejected.outputs == {}
    check_ok(models, responses, [1, 2])


def test_a_refusal_says_whether_other_requests_work_caused_it(models):
    """The server's admission bound learns only from refusals that load caused: a deadline
    the request alone would meet, refused because ten requests are ahead of it, is marked
    congestion; one too short even for an idle engine is not."""
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False, max_batch=1)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=1e-4))
    engine.run_until_idle(timeout_s=10)
    for i in range(1, 11):
        engine.submit(make_request(responses, i, "lstm", {"tokens": TOKENS}, timeout_s=1000.0))
    # alone: 12 rounds of one tick, well within 40 ms; behind ten lanes stepped one at a time: not
    engine.submit(make_request(responses, 11, "lstm", {"tokens": TOKENS}, timeout_s=40 * TICK))
    engine.run_until_idle(timeout_s=10)
    alone, loaded = responses.one(0), responses.one(11)
    assert alone.status is Status.REJECTED and not alone.congestion
    assert loaded.status is Status.REJECTED and loaded.congestion, loaded.reason
    check_ok(models, responses, range(1, 11))


def test_a_refusal_within_the_deadline_names_the_headroom_that_refused_it(models):
    """Predicted to finish before its deadline, but past the share of it admission may use:
    the message says why, not just that the prediction "misses" (it does not)."""
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False, admission_headroom=0.1)
    responses = Responses()
    # with a request in flight the estimates are used as they are (an idle engine may admit to measure)
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS}, timeout_s=100 * TICK))
    engine.run_until_idle(timeout_s=10)
    refused = responses.one(1)
    assert refused.status is Status.REJECTED, refused.reason
    predicted, left = map(float, re.search(r"predicted finish in ([\d.]+) ms .* \(([\d.]+) ms left", refused.reason)
                          .groups())
    assert predicted <= left and refused.reason.endswith(
        "admission keeps 90% of it spare for requests admitted later: --admission-headroom 0.1)")


def test_admission_uses_the_configured_default_timeout_for_requests_that_set_none(models):
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False, default_timeout_s=1e-4)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS}, timeout_s=1000.0))
    engine.run_until_idle(timeout_s=10)
    assert responses.one(0).status is Status.REJECTED and "deadline" in responses.one(0).reason
    check_ok(models, responses, [1])


def test_admission_with_profiled_step_costs_rejects_an_impossible_deadline(models):
    engine = Engine([models.models["lstm"]], EngineConfig(admission=True, drop_late=False, profile=True))
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=1e-9))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS}, timeout_s=60.0))
    engine.run_until_idle(timeout_s=10)
    assert responses.one(0).status is Status.REJECTED and "deadline" in responses.one(0).reason
    check_ok(models, responses, [1])


def test_an_idle_engine_prices_at_the_fastest_steps_after_a_slow_spell(models):
    """Steps measured slow (another process had the CPU) must not lock the engine into
    refusing everything: with nothing running it prices a request at the fastest steps seen."""
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False)
    for cell_type in engine.cell_types:
        for _ in range(200):
            engine.costs.observe(cell_type, 1, 100 * TICK)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=1.0))
    engine.run_until_idle(timeout_s=10)
    check_ok(models, responses, [0])


@pytest.mark.parametrize("policy", ["cellular", "padded"])
def test_drop_late_drops_an_admitted_request_that_falls_behind(models, policy):
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=False, drop_late=True, policy=policy, batch_timeout_s=0.0)
    responses = Responses()
    for i in range(1, 9):  # background load with no deadline
        engine.submit(make_request(responses, i, "lstm", {"tokens": TOKENS}))
    # 12 steps at several clock readings each cannot fit in 30 ms of a 1 ms-per-reading clock
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=0.03))
    engine.run_until_idle(timeout_s=10)
    dropped = responses.one(0)
    assert dropped.status is Status.DROPPED
    assert "deadline" in dropped.reason and dropped.outputs == {}
    # the reason gives what the drop was decided on: the time still needed against the time left
    needed, left = map(float, re.search(r"need ([\d.]+) ms more, ([\d.]+) ms left", dropped.reason).groups())
    assert needed > left >= 0.0, dropped.reason
    check_ok(models, responses, range(1, 9))
    assert engine.idle()
    for kernel in engine.executors["default"].kernels.values():
        assert kernel.slots.in_use == 0  # the dropped request's lanes were released


def test_drop_late_drops_a_lone_request_that_cannot_finish_even_at_its_fastest_steps(models):
    # alone, a run is priced at the fastest steps measured (as on an idle engine's admission):
    # still dropped once even they cannot finish it in time
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=False, drop_late=True)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=0.005))
    engine.run_until_idle(timeout_s=10)
    dropped = responses.one(0)
    assert dropped.status is Status.DROPPED, dropped.reason
    assert "predicted to need" in dropped.reason
    assert engine.idle()


def test_drop_late_drops_a_request_still_running_at_its_deadline(models, clock):
    engine = make_engine(models, clock, admission=False, drop_late=True)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=0.5))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS}, timeout_s=50.0))
    engine.submit(make_request(responses, 2, "lstm", {"tokens": TOKENS[:, :1]}))
    assert engine.step()  # all admitted; steps until the one-token request is done
    assert set(responses.by_index) == {2} and engine.active_requests == 2
    clock.advance(1.0)  # the first request's deadline has passed
    engine.run_until_idle(timeout_s=10)
    assert responses.one(0).status is Status.DROPPED and "deadline" in responses.one(0).reason
    check_ok(models, responses, [1])


@pytest.mark.parametrize("policy", ["cellular", "padded", "none"])
def test_nothing_is_rejected_or_dropped_when_deadlines_are_generous(models, policy):
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=True, policy=policy, batch_timeout_s=0.0)
    responses = Responses()
    for i in range(10):
        engine.submit(make_request(responses, i, "lstm", {"tokens": TOKENS}, timeout_s=1000.0))
        engine.step()
    engine.run_until_idle(timeout_s=10)
    check_ok(models, responses, range(10))


def test_max_active_rejects_with_queue_full_and_accepts_again_once_there_is_room(models, clock):
    engine = make_engine(models, clock, max_active=2)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS[:, :1]}))
    engine.submit(make_request(responses, 2, "lstm", {"tokens": TOKENS}))
    engine.step()  # admits two, refuses the third, steps until the one-token request is done
    assert responses.one(2).status is Status.REJECTED and "queue full" in responses.one(2).reason
    assert responses.one(1).status is Status.OK and engine.active_requests == 1
    engine.run_until_idle(timeout_s=10)
    engine.submit(make_request(responses, 3, "lstm", {"tokens": TOKENS}))
    engine.run_until_idle(timeout_s=10)
    check_ok(models, responses, [0, 3])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["cellular", "cellular-edf", "padded", "none"]), admission=st.booleans(),
       specs=st.lists(timed_requests(), min_size=1, max_size=8))
def test_under_deadline_pressure_every_request_gets_exactly_one_response_and_ok_means_correct(
        models, policy, admission, specs):
    clock = FakeClock(tick=TICK)
    engine = Engine([models.models[n] for n in MIX], EngineConfig(policy=policy, admission=admission, drop_late=True,
                                                                 batch_timeout_s=0.0, profile=False), clock=clock)
    for cell_type in engine.cell_types:
        engine.costs.observe(cell_type, 1, TICK)
    responses = Responses()
    for i, (name, inputs, timeout, steps_before) in enumerate(specs):
        for _ in range(steps_before):
            engine.step()
        engine.submit(make_request(responses, i, name, inputs, timeout_s=timeout))
    engine.run_until_idle(timeout_s=30)
    assert engine.idle()
    allowed = {Status.OK, Status.DROPPED} | ({Status.REJECTED} if admission else set())
    for i, (name, inputs, timeout, _) in enumerate(specs):
        response = responses.one(i)
        assert response.status in allowed, f"{response.status}: {response.reason}"
        if timeout is None:
            assert response.status is Status.OK, response.reason
        if response.status is Status.OK:
            if name == "seq2seq-reverse":
                np.testing.assert_array_equal(response.outputs["reversed"], seq2seq_reference(models, inputs["digits"]))
            else:
                assert_same_outputs(response.outputs, models.reference(name, inputs), name)
        else:
            assert "deadline" in response.reason and response.outputs == {}
    for kernel in engine.executors["default"].kernels.values():
        assert kernel.slots.in_use == 0


def test_each_answered_request_admission_priced_records_its_latency_over_the_price(models):
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": TOKENS}, timeout_s=1000.0))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": TOKENS}))  # no deadline: not priced
    engine.submit(make_request(responses, 2, "lstm", {"tokens": TOKENS}, timeout_s=1e-4))  # refused
    engine.run_until_idle(timeout_s=10)
    assert responses.one(2).status is Status.REJECTED
    [ratio] = engine.stats.price_ratios  # only the priced request that was answered OK
    answered = responses.one(0)
    # an idle engine prices at the fastest steps: 12 rounds of one lane in each cell type
    priced = len(TOKENS[0]) * engine.costs.round_time({t: 1 for t in engine.cell_types}, best=True)
    took = ratio * priced  # from admission to the answer (the fake clock ticks at each reading)
    assert answered.finish - 2 * TICK <= answered.admitted + took <= answered.finish
    assert ratio > 1  # the ticks of every reading make it slower than the price


def test_a_burst_that_is_late_together_loses_only_its_least_urgent_requests(models):
    """Eight requests admitted together, each step priced at 10 ms a lane: together every one
    is late, but once the least urgent (the last to arrive) leave, the rest make their
    deadline. The drop check drops the fewest such (here four), not the whole burst."""
    clock = FakeClock(tick=TICK)
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False, admission=False, drop_late=True), clock=clock)
    for cell_type in engine.cell_types:  # priced at 10 ms a step per lane it holds
        for b in (1, 2, 4, 8, 16, 32, 64):
            engine.costs.observe(cell_type, b, 10e-3 * b)
    responses = Responses()
    for i in range(8):  # 12 rounds: 8 lanes need 960 ms, 4 need 480 ms
        engine.submit(make_request(responses, i, "lstm", {"tokens": TOKENS}, timeout_s=0.5))
    engine.run_until_idle(timeout_s=10)
    statuses = [responses.one(i).status for i in range(8)]
    assert statuses == [Status.OK] * 4 + [Status.DROPPED] * 4, [r.reason for r in map(responses.one, range(8))]
    check_ok(models, responses, range(4))


def test_admission_counts_less_urgent_lanes_only_as_far_as_they_fill_a_batch(models):
    """Requests with no deadline hold lanes in every cell type. The policy steps a type's
    most urgent batch first, so a request with a deadline is priced as if they only filled
    its batch (2 lanes here); one with no deadline, or of a lower priority, waits behind
    them and is priced with all of them."""
    clock = FakeClock(tick=TICK)
    engine = make_engine(models, clock, admission=True, drop_late=False, max_batch=2)
    responses = Responses()
    for i in range(6):
        engine.submit(make_request(responses, i, "lstm", {"tokens": TOKENS}))
    engine.step()  # admits them, and runs a batch (whose lanes may run to their end alone)
    [held] = set(engine._committed.values())
    assert held > 2  # more lanes than a batch holds, all without a deadline

    def price(**kw) -> float:
        return engine.predicted_latency(make_request(responses, 99, "lstm", {"tokens": TOKENS}, **kw))

    def rounds_of(lanes: int) -> float:
        return len(TOKENS[0]) * engine._round_time({t: lanes for t in engine.cell_types}, shared=True)

    assert price(timeout_s=10.0) == pytest.approx(rounds_of(2))  # its own lane and one behind it
    assert price() == pytest.approx(rounds_of(held + 1))  # no deadline: behind them all
    assert price(timeout_s=10.0, priority=1) == pytest.approx(rounds_of(held + 1))  # a lower priority: the same
    assert rounds_of(2) < rounds_of(held + 1)
