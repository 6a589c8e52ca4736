"""One simulation in several processes (sim/parallel.py) gives the one-process outcomes,
request for request: the same engine, status, arrival and finish time for every request, and
the same statistics for every engine, whatever the router and the number of workers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cellserve.bench.profiler import model_trace
from cellserve.engine.config import EngineConfig
from cellserve.plan.profile import ModelProfile, Timing, synthetic_profile
from cellserve.sim.loop import SimArrival, Simulation
from cellserve.sim.parallel import ParallelSimulation
from cellserve.sim.router import LeastPredictedFinish, RoundRobin, Router, ScoredRouter, TwoChoices, make_router
from cellserve.sim.run import SimulateConfig, arrivals, load_models, simulate

MS = 1e-3
RESULTS = Path(__file__).parents[2] / "docs" / "results" / "sim"
# admission, drop checks and learnt costs on, as `cellserve simulate` runs them: the engines'
# own decisions must come out the same too
CONFIG = EngineConfig(policy="cellular", pin_threads=False, profile=True)


def key(outcome):
    return outcome.tag, outcome.model, outcome.engine, outcome.status, outcome.arrival_s, outcome.finish_s, outcome.reason


def stats_key(stats):
    return (stats.cell_steps, stats.batch_size_sum, stats.busy_s, stats.lanes_started, stats.requests_taken,
            stats.requests_answered, list(stats.overhead_s))


def run_both(build, trace, workers):
    one = build(Simulation)
    many = build(lambda router, seed: ParallelSimulation(router, seed=seed, workers=workers))
    out_one, out_many = one.run(trace), many.run(trace)
    return one, many, out_one, out_many


def spread_gru(models):
    """The small GRU with step costs that vary (seeded), so the engines' random streams matter."""
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    return replace(profile, cell_types={t: replace(c, step_s={b: Timing(0.2 * MS * (1 + b / 8), 0.05 * MS, 1 * MS, 30)
                                                               for b in c.step_s})
                                        for t, c in profile.cell_types.items()})


@pytest.mark.parametrize("router", ["two-choices", "least-finish", "round-robin"])
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_the_one_process_outcomes(models, router, workers):
    profile = spread_gru(models)
    rng = np.random.default_rng(5)
    times = np.cumsum(rng.exponential(0.15 * MS, 1500))  # past what five engines serve: refusals and drops too
    trace = [SimArrival(float(t), "gru", {"tokens": (np.arange(int(n)).reshape(1, -1) % 40 + 1).astype(np.int64)},
                        timeout_s=0.02, tag=i)
             for i, (t, n) in enumerate(zip(times, rng.integers(1, 40, len(times))))]

    def build(make):
        sim = make(make_router(router), seed=11)
        for i in range(5):
            sim.add_engine([models.models["gru"]], {"gru": profile}, CONFIG, name=f"e{i}")
        return sim

    one, many, out_one, out_many = run_both(build, trace, workers)
    assert len(out_many) == len(trace)
    assert sorted(map(key, out_one)) == sorted(map(key, out_many))
    statuses = {o.status.value for o in out_one}
    assert "ok" in statuses and statuses - {"ok"}, statuses  # the case has refusals or drops to agree on
    assert len({o.engine for o in out_one}) == 5
    assert [stats_key(s) for s in one.engine_stats] == [stats_key(s) for s in many.engine_stats]
    assert many.stats.virtual_s == one.stats.virtual_s
    assert [w["engines"] for w in many.worker_stats] == [len(range(w, 5, workers)) for w in range(workers)]


def test_workers_give_the_one_process_outcomes_for_the_zoo_mix():
    """Three zoo models (an encoder-decoder among them) on four engines, from the committed
    profiles, through `cellserve simulate`'s own trace: identical outcomes with three workers."""
    profiles = [ModelProfile.from_json(RESULTS / f"{m}-poisson-profile.json")
                for m in ("lstm-512", "gru-256", "seq2seq-reverse")]
    zoo_models = load_models(profiles, None)
    by_name = {p.model: p for p in profiles}
    config = EngineConfig(policy="cellular", profile=True, stack_layers=profiles[0].stack_layers, pin_threads=False)
    trace = []
    for i, model in enumerate(zoo_models):
        trace += arrivals(model_trace(model, i, 1500.0, 0.5, False), model, 0.2)
    trace = [replace(a, tag=n) for n, a in enumerate(trace)]

    def build(make):
        sim = make(TwoChoices(seed=2), seed=4)
        for i in range(4):
            sim.add_engine(zoo_models, by_name, config)
        return sim

    one, many, out_one, out_many = run_both(build, trace, 3)
    assert sorted(map(key, out_one)) == sorted(map(key, out_many))
    assert {o.model for o in out_many} == {"lstm-512", "gru-256", "seq2seq-reverse"}


class FirstByName(Router):
    name = "first-by-name"

    def choose(self, request, candidates, now):
        return min(candidates, key=lambda e: e.name)


def test_a_router_that_does_not_score_engines_is_refused_for_workers(models):
    assert all(isinstance(r, ScoredRouter) for r in (RoundRobin(), LeastPredictedFinish(), TwoChoices()))
    with pytest.raises(ValueError, match="router 'first-by-name' does not choose by a score per engine"):
        ParallelSimulation(FirstByName(), workers=2)


def test_a_broken_engine_is_refused_when_added_not_in_a_worker(models):
    profile = synthetic_profile(models.models["gru"], 1 * MS)
    sim = ParallelSimulation(RoundRobin(), workers=2)
    with pytest.raises(Exception, match="no profile for models"):
        sim.add_engine([models.models["gru"]], {"lstm": profile}, CONFIG)


def test_simulate_with_workers_writes_the_one_process_figures(models, tmp_path):
    profile_path = tmp_path / "gru.json"
    from cellserve.graph import zoo
    synthetic_profile(zoo.load("gru-256"), lambda b: 2e-4 + 2e-5 * b, lone_lanes=1, lone_step_s=1e-4).to_json(profile_path)
    reports = [simulate(SimulateConfig(profiles=[profile_path], engines=4, router="two-choices", rates=[4000.0],
                                       seconds=0.5, workers=w, json_path=tmp_path / f"w{w}.json"), log=lambda _: None)
               for w in (1, 2)]
    one, two = (r["runs"][0] for r in reports)
    assert reports[1]["workers"] == 2 and two["workers"][0]["engines"] == 2
    for field in ("requests", "counts", "goodput_rps", "p50_ms", "p99_ms", "per_model", "engine_steps"):
        assert json.dumps(one[field], sort_keys=True) == json.dumps(two[field], sort_keys=True), field  # NaN too


class FailsOnE1(LeastPredictedFinish):
    name = "fails-on-e1"

    def score(self, request, engine, now):
        if engine.name == "e1" and now > 0.01:
            raise ValueError("a scoring bug")
        return super().score(request, engine, now)


def test_a_worker_that_fails_stops_the_simulation_with_its_error(models):
    """Worker 1 (engine e1) fails mid-run; worker 0, waiting for its scores, must not hang:
    the run raises, naming the failure first."""
    import signal

    profile = spread_gru(models)
    trace = [SimArrival(i * 0.2 * MS, "gru", {"tokens": np.arange(1, 9, dtype=np.int64).reshape(1, -1)}, tag=i)
             for i in range(400)]
    sim = ParallelSimulation(FailsOnE1(), seed=1, workers=2)
    for i in range(2):
        sim.add_engine([models.models["gru"]], {"gru": profile}, CONFIG, name=f"e{i}")
    # real processes: a hang is the failure to catch, so a real timer, far beyond the second it takes
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the simulation hung after a worker failed"))
    signal.alarm(60)
    try:
        with pytest.raises(RuntimeError, match=r"^simulation worker 1: ValueError: a scoring bug"):
            sim.run(trace)
    finally:
        signal.alarm(0)
