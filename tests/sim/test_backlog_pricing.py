"""Admission's price under a backlog past a batch's lanes in a cell type, against what the
requests then take (EngineStats.price_ratios, exported as cellserve_admission_price_ratio).
Driven on the simulator (known step costs, no host time), where what requests take is exact."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.request import Status
from cellserve.plan.profile import HostProfile, synthetic_profile
from cellserve.sim.loop import SimArrival, Simulation

MS = 1e-3
KERNEL_S = lambda b: 0.05 * MS + 0.01 * MS * b  # noqa: E731  a step of b lanes


def _engine(models, max_batch: int):
    model = models.models["gru"]
    profile = synthetic_profile(model, KERNEL_S, host=HostProfile(0.0, 0.0, 0.0, 0.0))
    sim = Simulation()
    engine = sim.add_engine([model], {"gru": profile},
                            EngineConfig(policy="cellular", max_batch=max_batch, profile=False,
                                         pin_threads=False)).engine
    for cell_type in engine.cell_types:
        for b in (1, 2, 4, 8, 16, 32, 64):
            engine.costs.observe(cell_type, b, KERNEL_S(b))
    return sim, engine


def _stream(n: int, every_s: float, lengths, timeout_s: float = 10.0) -> list[SimArrival]:
    return [SimArrival(i * every_s, "gru", {"tokens": np.ones((1, lengths[i % len(lengths)]), np.int64)},
                       timeout_s=timeout_s, tag=i) for i in range(n)]


def test_a_steady_backlog_past_a_batch_is_priced_near_what_requests_take(models):
    sim, engine = _engine(models, max_batch=8)
    # 2,500 arrivals/s of 10-40 steps: 12 lanes in flight at the median step, 15 at most
    # (batches of 8: a cell type past a batch's lanes most of the time)
    outcomes = sim.run(_stream(400, 0.4 * MS, [10, 20, 30, 40]))
    assert all(o.status is Status.OK for o in outcomes)
    ratios = list(engine.stats.price_ratios)[100:]  # past the first requests' ramp
    assert 0.7 <= statistics.median(ratios) <= 1.3


def test_the_last_of_a_burst_is_priced_no_lower_than_it_takes(models):
    sim, engine = _engine(models, max_batch=8)
    burst = _stream(32, 0.0, [30])  # 32 lanes of 30 steps at once: four batches one after another
    outcomes = sim.run(burst)
    assert all(o.status is Status.OK for o in outcomes)
    last = max(outcomes, key=lambda o: o.finish_s)
    assert last.finish_s - last.arrival_s == pytest.approx(4 * 30 * KERNEL_S(8), rel=0.1)
    # the last admitted waits for the 31 lanes ahead and then takes its own 30 turns: admission
    # priced it at its rounds of every committed lane, no lower than it took
    assert min(engine.stats.price_ratios) > 0 and engine.stats.price_ratios[-1] <= 1.05
