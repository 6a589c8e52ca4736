"""Admission never locks itself shut: an engine whose cost estimates are far too slow (a
start-up profile taken on a loaded machine) still admits, measures and recovers. Driven on
the simulator, so the device's true speed is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.cost_model import PREDICTION_BOUND
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request, Status
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.clock import VirtualClock
from cellserve.sim.executor import SimExecutor
from cellserve.sim.loop import SimArrival, Simulation

MS = 1e-3


def test_an_engine_profiled_as_100x_slower_admits_measures_and_then_serves_everything(models):
    model = models.models["gru"]
    sim = Simulation()
    engine = sim.add_engine([model], {"gru": synthetic_profile(model, 0.2 * MS)},
                            EngineConfig(policy="cellular", profile=False, pin_threads=False)).engine
    for cell_type in engine.cell_types:  # what a start-up profile under a noisy neighbour might say
        for b in (1, 2, 4, 8, 16, 32, 64):
            engine.costs.observe(cell_type, b, 20 * MS)
    # 40 steps at 20 ms is 800 ms, past the 500 ms deadline: the stale estimate would refuse
    # every request; the device does each step in 0.2 ms.
    tokens = {"tokens": (np.arange(40, dtype=np.int64) % 40 + 1).reshape(1, -1)}
    trace = [SimArrival(i * 5 * MS, "gru", tokens, timeout_s=0.5, tag=i) for i in range(40)]
    out = sim.run(trace)
    status = {o.tag: o.status for o in out}
    assert status[0] is Status.OK  # the idle engine admitted the first to measure
    assert [t for t, s in status.items() if s is not Status.OK] == []
    assert all(o.finish_s - o.arrival_s <= 0.5 for o in out)


def test_a_busy_engine_prices_within_a_bound_of_the_fastest_steps_seen(models):
    model = models.models["gru"]
    profiles = {"gru": synthetic_profile(model, 1 * MS)}
    engine = Engine([model], EngineConfig(policy="padded", batch_timeout_s=10.0, profile=False, pin_threads=False),
                    VirtualClock(), executors={"sim": SimExecutor(profiles, VirtualClock(), np.random.default_rng(0))})
    (cell_type,) = engine.cell_types
    engine.costs.observe(cell_type, 1, 1 * MS)  # the fastest seen
    for _ in range(200):
        engine.costs.observe(cell_type, 1, 10_000 * MS)  # then a long slow spell
    engine.submit(Request("gru", {"tokens": np.ones((1, 50), np.int64)}))
    engine.step()  # admitted; its padded cohort waits: the engine is busy
    assert engine.active_requests == 1
    slow = 10 * engine.costs.round_time({cell_type: 2})
    fast = 10 * engine.costs.round_time({cell_type: 2}, best=True)
    assert slow > 100 * PREDICTION_BOUND * fast
    assert engine.predicted_latency(Request("gru", {"tokens": np.ones((1, 10), np.int64)})) == \
        pytest.approx(PREDICTION_BOUND * fast + 10 * engine.step_overhead_s)
