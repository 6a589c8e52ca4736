"""The simulator against hand-computed cases: one engine or a few, costs fixed by a given
profile, so every finish time is exact; and what it must refuse."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Status
from cellserve.plan.profile import (HostProfile, IdleBucket, ModelProfile, ProfileError, ProfileWarning, Timing,
                                    synthetic_profile)
from cellserve.sim.clock import VirtualClock
from cellserve.sim.executor import SimExecutor
from cellserve.sim.loop import SimArrival, Simulation
from cellserve.sim.router import LeastPredictedFinish, RoundRobin

MS = 1e-3
CONFIG = EngineConfig(policy="cellular", admission=False, drop_late=False, pin_threads=False, profile=False)
CONFIG_PRICED = replace(CONFIG, profile=True)  # costs seeded from the profile, as a router needs


def tokens(n: int) -> dict:
    return {"tokens": np.arange(1, n + 1, dtype=np.int64).reshape(1, -1) % 40 + 1}


def one_engine(models, profile, config=CONFIG, router=None, engines=1, seed=0) -> Simulation:
    sim = Simulation(router or RoundRobin(), seed=seed)
    for _ in range(engines):
        sim.add_engine([models.models["gru"]], {"gru": profile}, config)
    return sim


def finishes(outcomes) -> dict[int, float]:
    return {o.tag: round(o.finish_s, 9) for o in outcomes}


def test_batched_steps_at_a_fixed_cost_give_exact_finish_times(models):
    # A (3 tokens) runs alone from 0; B (2 tokens) arrives at 1.5 ms, mid-step, and joins at
    # the step boundary at 2 ms. Every step costs 1 ms whatever its batch:
    # 0-1 A, 1-2 A, 2-3 A+B (A done at 3), 3-4 B (done at 4).
    sim = one_engine(models, synthetic_profile(models.models["gru"], 1 * MS))
    out = sim.run([SimArrival(0.0, "gru", tokens(3), tag=0), SimArrival(1.5 * MS, "gru", tokens(2), tag=1)])
    assert [o.status for o in out] == [Status.OK, Status.OK]
    assert finishes(out) == {0: 0.003, 1: 0.004}


def test_a_lone_lane_stops_at_the_first_step_after_an_arrival(models):
    # Lone steps of 1 ms: A (10 tokens) runs alone, stops after its third step (B arrived at
    # 2.5 ms), runs two batched steps (2 ms each) with B (2 tokens, done at 7 ms), then its
    # last 5 steps alone: 7 + 5 = 12 ms.
    profile = synthetic_profile(models.models["gru"], 2 * MS, lone_lanes=1, lone_step_s=1 * MS)
    sim = one_engine(models, profile)
    out = sim.run([SimArrival(0.0, "gru", tokens(10), tag=0), SimArrival(2.5 * MS, "gru", tokens(2), tag=1)])
    assert finishes(out) == {0: 0.012, 1: 0.007}


def test_a_lone_decoder_lane_runs_its_tokens_in_one_call_and_stops_for_an_arrival(models):
    # seq2seq-reverse, lone steps 1 ms, batched 2 ms, nothing else charged; a decoder lane
    # runs its source length + 1 steps. A (4 digits) alone: the encoder's 4 lone steps, then
    # its decoder's 5 in one call: done at 9 ms. With B (2 digits) arriving at 5.5 ms, A's
    # decoder stops after its step in progress (at 6 ms, 2 tokens made), B's encoder runs 2
    # lone steps (6-8), then A's last 3 decoder steps and B's 3 are batched (8-14).
    model = models.models["seq2seq-reverse"]
    profile = synthetic_profile(model, 2 * MS, max_batch=8, lone_lanes=1, lone_step_s=1 * MS)
    digits = lambda n: {model.inputs[0].name: np.arange(1, n + 1, dtype=np.int64).reshape(1, -1)}  # noqa: E731

    def run(trace):
        sim = Simulation(RoundRobin())
        sim.add_engine([model], {model.name: profile}, replace(CONFIG, max_batch=8))
        out = sim.run(trace)
        assert all(o.status is Status.OK for o in out), [o.reason for o in out]
        return finishes(out), sim.stats.engine_steps

    alone, steps = run([SimArrival(0.0, model.name, digits(4), tag=0)])
    assert alone == {0: 0.009}
    assert steps <= 3  # the encoder's run and the decoder's, not a step per token
    assert run([SimArrival(0.0, model.name, digits(4), tag=0),
                SimArrival(5.5 * MS, model.name, digits(2), tag=1)])[0] == {0: 0.014, 1: 0.014}


def test_host_costs_and_plain_ops_are_charged(models):
    # One 2-token request: its plain ops (gru's stacked program has several, 0.1 ms each), a
    # lane start (0.2 ms host + 2 x 0.05 ms projection), two steps (1 ms + 0.3 ms host + 0.01 ms
    # per lane each) and the lane's finish (0.4 ms host + 2 x 0.025 ms).
    model = models.models["gru"]
    host = HostProfile(step_s=0.3 * MS, step_s_per_lane=0.01 * MS, lane_start_s=0.2 * MS, lane_finish_s=0.4 * MS)
    profile = synthetic_profile(model, 1 * MS, plain_op_s=0.1 * MS, start_s_per_token=0.05 * MS,
                                finish_s_per_token=0.025 * MS, host=host)
    sim = one_engine(models, profile)
    (out,) = sim.run([SimArrival(0.0, "gru", tokens(2))])
    plain = len(profile.plain_ops_s) * 0.1 * MS
    want = plain + 0.2 * MS + 0.1 * MS + 2 * (1 * MS + 0.3 * MS + 0.01 * MS) + 0.4 * MS + 0.05 * MS
    assert out.finish_s == pytest.approx(want, abs=1e-12)


def test_requests_taken_in_and_drop_checks_are_charged_as_the_profile_prices_them(models):
    # Four 2-token requests at 0 to an idle engine that holds 3 at once: its first step takes
    # all four in (0.5 ms each; the fourth is refused, queue full, and costs as much) and
    # checks the three admitted for lateness (0.2 ms a run), 2.6 ms in all; then two steps of
    # 1 ms: done at 4.6 ms. The engine counts what it charged.
    host = HostProfile(0.0, 0.0, 0.0, 0.0, request_s=0.5 * MS, check_s_per_run=0.2 * MS)
    sim = one_engine(models, synthetic_profile(models.models["gru"], 1 * MS, host=host),
                     replace(CONFIG, drop_late=True, max_active=3))
    out = sim.run([SimArrival(0.0, "gru", tokens(2), timeout_s=1.0, tag=i) for i in range(4)])
    assert {o.tag: o.status for o in out} == {0: Status.OK, 1: Status.OK, 2: Status.OK, 3: Status.REJECTED}
    assert {t: f for t, f in finishes(out).items() if t != 3} == {0: 0.0046, 1: 0.0046, 2: 0.0046}
    stats = sim.engines[0].engine.stats
    assert (stats.requests_taken, stats.runs_checked) == (4, 3)
    assert stats.step_records[0][4:] == (4, 3)  # the first step's record: what its time off the device paid for


def test_round_robin_alternates_and_least_finish_picks_the_idle_engine(models):
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    trace = [SimArrival(0.0, "gru", tokens(20), tag=i) for i in range(4)]
    out = one_engine(models, profile, engines=2, router=RoundRobin()).run(trace)
    assert sorted(o.engine for o in out) == ["engine-0", "engine-0", "engine-1", "engine-1"]
    # least-finish, steps priced by their batch: a short request joining the long one's engine
    # would pay for two lanes a step, so it goes to the idle one
    by_batch = synthetic_profile(models.models["gru"], lambda b: b * MS)
    trace = [SimArrival(0.0, "gru", tokens(60), tag=0), SimArrival(1 * MS, "gru", tokens(2), tag=1)]
    out = one_engine(models, by_batch, CONFIG_PRICED, engines=2, router=LeastPredictedFinish()).run(trace)
    where = {o.tag: o.engine for o in out}
    assert where == {0: "engine-0", 1: "engine-1"}


def test_a_simulation_is_deterministic_for_a_seed(models):
    spread = synthetic_profile(models.models["gru"], 1 * MS)
    spread = replace(spread, cell_types={t: replace(c, step_s={b: Timing(1 * MS, 0.3 * MS, 2 * MS, 30)
                                                               for b in c.step_s})
                                         for t, c in spread.cell_types.items()})
    rng = np.random.default_rng(1)
    trace = [SimArrival(float(t), "gru", tokens(int(n)), tag=i)
             for i, (t, n) in enumerate(zip(np.cumsum(rng.exponential(2 * MS, 60)), rng.integers(1, 30, 60)))]
    runs = [finishes(one_engine(models, spread, seed=s).run(trace)) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed does reach the sampled step costs


def test_every_request_is_answered_once_even_past_the_drain(models):
    sim = one_engine(models, synthetic_profile(models.models["gru"], 10 * MS))
    trace = [SimArrival(0.0, "gru", tokens(50), tag=i) for i in range(5)]  # 50 steps x 10 ms: 0.5 s
    out = sim.run(trace, drain_s=0.1)
    assert sorted(o.tag for o in out) == list(range(5))
    assert {o.status for o in out} == {Status.ERROR}
    assert all("simulation ended" in o.reason for o in out)


# ---- what is refused ----

def test_a_profile_round_trips_through_json(models, tmp_path):
    profile = synthetic_profile(models.models["seq2seq-reverse"], lambda b: 1e-4 * b, max_batch=8)
    buckets = (IdleBucket(2.5e-4, 0.0), IdleBucket(1e-3, 1e-4, (-1e-5, 0.0, 3.1e-4)), IdleBucket(0.05, 3e-4))
    profile = replace(profile, cell_types={t: replace(c, idle_extra_s=buckets) for t, c in profile.cell_types.items()},
                      plain_idle_extra_s={next(iter(profile.plain_ops_s)): (IdleBucket(2.5e-4, 0.0),
                                                                           IdleBucket(0.01, 2e-5))})
    profile.to_json(tmp_path / "p.json")
    assert ModelProfile.from_json(tmp_path / "p.json") == profile


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "profile.schema_version is 99"),
    (lambda d: d.update(schema_version="3"), "profile.schema_version must be an integer, got '3'"),
    (lambda d: next(iter(d["cell_types"].values()))["step_s"]["3"].update(mean=-1.0), "step_s[3].mean must be >= 0"),
    (lambda d: next(iter(d["cell_types"].values()))["step_s"].pop("5"), "lacks batch sizes [5]"),
    (lambda d: d["host"].pop("lane_start_s"), "profile.host.lane_start_s is missing"),
    (lambda d: d.update(max_batch=0), "profile.max_batch must be an integer >= 1"),
    (lambda d: next(iter(d["cell_types"].values())).update(kind="lstm"), "kind must be one of layer, stack, decoder"),
    (lambda d: d.update(decode_steps={}), "profile.decode_steps lacks decoders"),
    (lambda d: d.update(schema_version=1), "profile.schema_version is 1, whose profile.decode_steps"),
    (lambda d: next(iter(d["decode_steps"].values())).update({"3": {"4": 0}}), "['3']['4'] must be an integer >= 1"),
    (lambda d: next(iter(d["decode_steps"].values())).update({"x": {"4": 1}}), "has key 'x'; keys are memory lengths"),
    (lambda d: next(iter(d["decode_steps"].values())).update({"3": {}}), "['3'] must be a non-empty object"),
    (lambda d: next(iter(d["cell_types"].values())).update(idle_extra_s=[[1e-3, 1e-4], [5e-4, 2e-4]]),
     "idle_extra_s[1][0] (up_to_s) is 0.0005, not above the bucket before it"),
    (lambda d: next(iter(d["cell_types"].values())).update(idle_extra_s=[[1e-3, -1e-4]]),
     "idle_extra_s[0][1] (extra_s) must be >= 0"),
    (lambda d: next(iter(d["cell_types"].values())).update(idle_extra_s=[1e-3]),
     "idle_extra_s[0] must be a pair [up_to_s, extra_s] or a triple [up_to_s, extra_s, [draw_s, ...]]"),
    (lambda d: next(iter(d["cell_types"].values())).update(idle_extra_s=[[1e-3, 1e-4, [0.0, 1e-4]]]),
     "idle_extra_s[0][2] (draws_s) average 5e-05, not the bucket's extra_s 0.0001"),
    (lambda d: next(iter(d["cell_types"].values())).update(idle_extra_s=[[1e-3, 1e-4, []]]),
     "idle_extra_s[0][2] (draws_s) must be a non-empty list of finite numbers, got []"),
    (lambda d: next(iter(d["cell_types"].values())).update(idle_extra_s=[[1e-3, 1e-4, [1e-4, "x"]]]),
     "idle_extra_s[0][2] (draws_s) must be a non-empty list of finite numbers"),
    (lambda d: d.update(plain_idle_extra_s={"no-such-op": [[1e-3, 1e-5]]}),
     "profile.plain_idle_extra_s names 'no-such-op', which is not in profile.plain_ops_s"),
    (lambda d: d.update(plain_idle_extra_s={next(iter(d["plain_ops_s"])): [[1e-3, -1e-5]]}),
     "plain_idle_extra_s['"),
])
def test_a_broken_profile_is_refused_naming_the_field(models, edit, message):
    d = synthetic_profile(models.models["seq2seq-reverse"], 1 * MS, max_batch=8).to_dict()
    edit(d)
    with pytest.raises(ProfileError, match=re.escape(message)):
        ModelProfile.from_dict(d)


def test_a_version_2_profile_is_read_with_a_warning_and_no_charge_for_arrivals_or_drop_checks(models):
    d = synthetic_profile(models.models["gru"], 1 * MS, host=HostProfile(1e-5, 0.0, 0.0, 0.0, 3e-5, 1e-6)).to_dict()
    d["schema_version"] = 2
    for key in ("request_s", "check_s_per_run"):
        d["host"].pop(key)
    with pytest.warns(ProfileWarning, match="schema version 2: it has no host.request_s"):
        profile = ModelProfile.from_dict(d)
    assert (profile.host.request_s, profile.host.check_s_per_run, profile.schema_version) == (0.0, 0.0, 2)
    d["schema_version"] = 3  # a current profile must have them
    with pytest.raises(ProfileError, match=re.escape("profile.host.request_s is missing")):
        ModelProfile.from_dict(d)


def test_a_profile_of_another_width_of_the_model_is_refused_naming_its_cell_type(models):
    from helpers_engine import EXAMPLE, TOKEN_AXES, VOCAB

    from cellserve.graph.torch_import import load_torch
    from cellserve.graph.zoo.modules import RNNClassifier, seeded

    wider = load_torch(seeded(RNNClassifier("gru", vocab=VOCAB, embed=8, hidden=16, layers=2, classes=3), 1), "gru",
                       EXAMPLE, ["tokens"], ["probabilities", "label"], TOKEN_AXES)
    profile = synthetic_profile(models.models["gru"], 1 * MS)  # of the width-8 model of this name
    with pytest.raises(ProfileError, match=r"profile.cell_types\['gru/.*'\] was measured on a cell of 1152 FLOPs "
                                           r"per step, but model 'gru' has 4608: a profile of another version"):
        Simulation().add_engine([wider], {"gru": profile}, CONFIG)
    Simulation().add_engine([models.models["gru"]], {"gru": profile}, CONFIG)  # its own model: served
    old = ModelProfile.from_dict({**profile.to_dict(), "cell_types": {
        t: {k: v for k, v in c.items() if k != "flops_per_step"} for t, c in profile.to_dict()["cell_types"].items()}})
    assert all(c.flops_per_step is None for c in old.cell_types.values())  # made before it was recorded: not checked
    Simulation().add_engine([wider], {"gru": old}, CONFIG)


def test_a_step_table_that_looks_like_noise_is_named(models):
    clean = synthetic_profile(models.models["gru"], lambda b: (10 + b) * 1e-6, max_batch=8)
    assert clean.suspect() == []
    (name, cell), = clean.cell_types.items()
    steps = dict(cell.step_s)
    steps[3] = Timing(40e-6, 1e-6, 45e-6, 20)  # a spike: larger batches step in 14-18 us
    steps[5] = Timing(15e-6, 30e-6, 90e-6, 20)  # a spread beyond its mean
    noisy = replace(clean, cell_types={name: replace(cell, step_s=steps)})
    assert noisy.suspect() == [f"{name}: batch 3 steps in 40.0 us, more than the 14.0 us of batch 4, a larger one",
                               f"{name}: batch 5's spread (30.0 us) exceeds its mean (15.0 us)"]


def test_a_profile_of_another_model_or_too_small_a_batch_is_refused(models):
    lstm = synthetic_profile(models.models["lstm"], 1 * MS)
    with pytest.raises(ProfileError, match="no profile for models"):
        Simulation().add_engine([models.models["gru"]], {"lstm": lstm}, CONFIG)
    renamed = replace(lstm, model="gru")  # the right name, another model's cell types
    with pytest.raises(ProfileError, match="has no cell type 'gru/"):
        Simulation().add_engine([models.models["gru"]], {"gru": renamed}, CONFIG)
    small = synthetic_profile(models.models["gru"], 1 * MS, max_batch=8)
    with pytest.raises(ProfileError, match="up to 64 lanes, but its profile's step_s stops at 8"):
        Simulation().add_engine([models.models["gru"]], {"gru": small}, CONFIG_PRICED)
    unstacked = synthetic_profile(models.models["gru"], 1 * MS, stack_layers=False)
    with pytest.raises(ProfileError, match="stack_layers"):
        Simulation().add_engine([models.models["gru"]], {"gru": unstacked}, CONFIG)


def test_a_plain_op_missing_from_the_profile_is_refused_at_start(models):
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    first = next(iter(profile.plain_ops_s))
    profile = replace(profile, plain_ops_s=dict(list(profile.plain_ops_s.items())[1:]))
    with pytest.raises(ProfileError, match=re.escape(f"profile of model 'gru' has no plain_ops_s[{first!r}]")):
        one_engine(models, profile)


def test_two_choices_spreads_a_burst_over_many_engines(models):
    from cellserve.sim.router import TwoChoices
    profile = synthetic_profile(models.models["gru"], lambda b: b * MS)
    sim = one_engine(models, profile, CONFIG_PRICED, engines=8, router=TwoChoices(seed=3))
    out = sim.run([SimArrival(i * 0.1 * MS, "gru", tokens(30), tag=i) for i in range(32)])
    per_engine = [sum(o.engine == e.name for o in out) for e in sim.engines]
    assert sum(per_engine) == 32 and max(per_engine) <= 8  # no engine takes a quarter of the burst


def test_a_step_after_other_work_pays_the_cold_surcharge(models):
    # A (3 tokens) alone: its first step follows its lane's start (cold: 1 + 0.5 ms), the next
    # two follow steps of the same cell type (1 ms each): done at 3.5 ms.
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    profile = replace(profile, cell_types={t: replace(c, cold_s=0.5 * MS) for t, c in profile.cell_types.items()})
    (out,) = one_engine(models, profile).run([SimArrival(0.0, "gru", tokens(3))])
    assert out.finish_s == pytest.approx(0.0035, abs=1e-12)


def test_a_step_after_an_idle_spell_pays_that_spells_extra(models):
    # Steps of 1 ms; a step whose executor's last step ended over 0.25 ms before costs 0.3 ms
    # more up to 2 ms of idle, 0.7 ms beyond. A (2 tokens) arrives at an engine that never
    # stepped (idle forever: +0.7): 0-1.7, 1.7-2.7. B (2 tokens) arrives at 3.7 ms, 1 ms after
    # A's last step ended (+0.3): 3.7-5.0, 5.0-6.0. C (1 token) at 9 ms, 3 ms idle (+0.7): 9-10.7.
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    buckets = (IdleBucket(0.25 * MS, 0.0), IdleBucket(2 * MS, 0.3 * MS), IdleBucket(8 * MS, 0.7 * MS))
    profile = replace(profile, cell_types={t: replace(c, idle_extra_s=buckets) for t, c in profile.cell_types.items()})
    out = one_engine(models, profile).run([SimArrival(0.0, "gru", tokens(2), tag=0),
                                           SimArrival(3.7 * MS, "gru", tokens(2), tag=1),
                                           SimArrival(9 * MS, "gru", tokens(1), tag=2)])
    assert finishes(out) == pytest.approx({0: 0.0027, 1: 0.006, 2: 0.0107}, abs=1e-12)


def test_a_step_after_an_idle_spell_draws_its_extra_from_the_buckets_draws(models):
    # Steps of 1 ms; after a spell of over 0.25 ms a step costs 0 or 3 ms more, equally
    # likely draws (0, 0, 0, 3 ms: a stall in four, 0.75 ms on average). Requests of one
    # token 50 ms apart: each one step after a spell, so each takes 1 or 4 ms, about one in
    # four 4 ms; the drawn mean is the bucket's.
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    buckets = (IdleBucket(0.25 * MS, 0.0), IdleBucket(1.0, 0.75 * MS, (0.0, 0.0, 0.0, 3 * MS)))
    profile = replace(profile, cell_types={t: replace(c, idle_extra_s=buckets) for t, c in profile.cell_types.items()})
    out = one_engine(models, profile).run([SimArrival(0.05 * i, "gru", tokens(1), tag=i) for i in range(400)])
    took = np.array([f - 0.05 * t for t, f in finishes(out).items()])
    assert np.all(np.isclose(took, 1 * MS, atol=1e-12) | np.isclose(took, 4 * MS, atol=1e-12))
    assert 0.18 < np.mean(took > 2 * MS) < 0.32
    # with no draws every step pays the mean: 1.75 ms each
    mean_only = replace(profile, cell_types={t: replace(c, idle_extra_s=(buckets[0], IdleBucket(1.0, 0.75 * MS)))
                                             for t, c in profile.cell_types.items()})
    out = one_engine(models, mean_only).run([SimArrival(0.05 * i, "gru", tokens(1), tag=i) for i in range(4)])
    assert [f - 0.05 * t for t, f in sorted(finishes(out).items())] == pytest.approx([1.75 * MS] * 4, abs=1e-12)


def test_a_plain_op_that_last_ran_a_while_ago_pays_its_buckets_extra(models):
    # Plain ops of 0.1 ms; one that last ran over 0.25 ms before costs 0.05 ms more (its first
    # run too: it never ran). A at 0 and B at 0.5 s each run every op once, long after its last
    # run: each finishes n_ops x 0.05 ms later than with no buckets, and nothing else moves.
    plain = synthetic_profile(models.models["gru"], 1 * MS, plain_op_s=0.1 * MS)
    extra = replace(plain, plain_idle_extra_s={op: (IdleBucket(0.25 * MS, 0.0), IdleBucket(1.0, 0.05 * MS))
                                               for op in plain.plain_ops_s})
    trace = [SimArrival(0.0, "gru", tokens(3), tag=0), SimArrival(0.5, "gru", tokens(3), tag=1)]
    before, after = finishes(one_engine(models, plain).run(trace)), finishes(one_engine(models, extra).run(trace))
    n_ops = len(plain.plain_ops_s)
    assert after == pytest.approx({t: f + n_ops * 0.05 * MS for t, f in before.items()}, abs=1e-12)


def test_decoder_lanes_draw_their_steps_from_the_profiles_histogram(models):
    model = models.models["seq2seq-reverse"]
    profile = synthetic_profile(model, 1 * MS, max_batch=8)
    (decoder,) = profile.decode_steps
    hist = {n: ({2: 1, 9: 3} if n == 4 else {n + 1: 1}) for n in profile.decode_steps[decoder]}
    profile = replace(profile, decode_steps={decoder: hist})
    executor = SimExecutor({model.name: profile}, VirtualClock(), np.random.default_rng(0))
    Engine([model], replace(CONFIG, max_batch=8), executor.clock, executors={"sim": executor})  # places its cell types
    drawn = [executor._decode_steps(decoder, 4) for _ in range(2000)]
    assert set(drawn) == {2, 9}
    assert 0.2 < drawn.count(2) / len(drawn) < 0.3  # one lane in four


def test_a_profiles_summary_is_small_and_names_its_machine(models):
    import json
    profile = synthetic_profile(models.models["seq2seq-reverse"], lambda b: 1e-4 * b)
    summary = json.dumps(profile.summary())
    assert len(summary) < 2000 and '"machine"' in summary and "seq2seq-reverse/decoder" in summary


def test_each_engine_keeps_at_most_its_window_of_per_step_samples(models):
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    sim = Simulation(RoundRobin(), step_samples=5)
    sim.add_engine([models.models["gru"]], {"gru": profile}, CONFIG)
    outcomes = sim.run([SimArrival(i * 10 * MS, "gru", tokens(4), tag=i) for i in range(6)])
    assert len(outcomes) == 6
    stats = sim.engine_stats[0]
    assert stats.cell_steps >= 24 and len(stats.overhead_s) == len(stats.step_records) == 5
