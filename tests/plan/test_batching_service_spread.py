"""A service time with a spread (measured times per batch size, `Service.measured`): its
distribution, the single-server model that takes it, against the discrete-event simulation
drawing each batch's time from the same distribution, and SERVICE files that give one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellserve.plan.batching import Service
from cellserve.plan.batching_des import sample_arrivals, simulate
from cellserve.plan.batching_io import load_service
from cellserve.plan.batching_map import BatchingError, Map
from cellserve.plan.batching_queue import evaluate_single_server

# service times spread as a machine's are (gamma, shape 4: p90 about 1.6x the mean), seeded
_RNG = np.random.default_rng(1)
SPREAD = Service.measured({n: list(_RNG.gamma(4.0, mean / 4.0, size=200)) for n, mean in
                           ((1, 0.8), (2, 1.6), (4, 2.0), (8, 3.3))})


def test_each_sizes_mean_is_its_samples_and_sizes_between_interpolate():
    s = Service.measured({1: [1.0, 2.0, 3.0, 10.0], 4: 5.0})
    assert s.points == ((1, 4.0), (4, 5.0))
    assert s.ms(2) == pytest.approx(4.0 + 1.0 / 3.0)
    assert s.bins(1, 4) == pytest.approx([1.0, 2.0, 3.0, 10.0])
    assert s.bins(4, 3) == pytest.approx([5.0, 5.0, 5.0])  # a number is a point mass
    for n in (1, 2, 3, 4):
        for k in (1, 3, 4, 7):
            assert s.bins(n, k).mean() == pytest.approx(s.ms(n))  # the bins keep the mean
    # between two sizes the quantile functions mix: at n = 2, a third of the way to size 4
    assert s.draw(2, 0.99) == pytest.approx(10.0 * 2 / 3 + 5.0 / 3)
    assert s.draw(1, 0.0) == 1.0 and s.draw(1, 0.5) == 3.0


def test_a_service_without_samples_is_unchanged():
    plain = Service(((1, 4.0), (8, 9.0)))
    assert plain.samples == () and plain.bins(8, 1).tolist() == [9.0] and plain.draw(8, 0.7) == 9.0


@pytest.mark.parametrize("rate,B,T", [(580.0, 8, 2.0), (1160.0, 8, 2.0), (400.0, 4, 10.0)])
def test_the_single_server_model_with_a_spread_matches_the_simulation(rate, B, T):
    arrivals = Map.poisson(rate)
    ev = evaluate_single_server(arrivals, SPREAD, B, T, 95.0)
    sim = simulate(sample_arrivals(arrivals, 300_000, np.random.default_rng(2)), SPREAD, B, T, "queue",
                   np.random.default_rng(3))
    assert ev.mean_batch == pytest.approx(sim.mean_batch, rel=0.03)
    assert ev.latency_percentile_ms == pytest.approx(sim.percentile_ms(95.0), rel=0.04)


def test_the_spread_moves_the_tail_the_means_alone_miss():
    """The same means without the spread: the p95 falls well short of the simulated one."""
    arrivals, B, T = Map.poisson(1160.0), 8, 2.0
    sim = simulate(sample_arrivals(arrivals, 300_000, np.random.default_rng(2)), SPREAD, B, T, "queue",
                   np.random.default_rng(3))
    means_only = evaluate_single_server(arrivals, Service(SPREAD.points), B, T, 95.0)
    assert means_only.latency_percentile_ms < 0.85 * sim.percentile_ms(95.0)


def test_a_service_file_may_give_measured_times(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"latency_ms": {"1": [0.8, 1.2, 1.0], "8": 4.0}}))
    s = load_service(path)
    assert s.points == ((1, 1.0), (8, 4.0)) and s.samples == ((1, (0.8, 1.0, 1.2)),)


def test_a_spread_far_wider_than_the_shortest_batch_is_refused_not_ground_through():
    """One batch of two in sixteen takes a second, against 1-ms batches: the grid that resolves
    the 1-ms batches cannot span it, and the model says so instead of building a huge chain."""
    wide = Service.measured({1: 1.0, 2: [1.0] * 15 + [1000.0]})
    with pytest.raises(BatchingError, match="the service's spread is too wide against its shortest mean"):
        evaluate_single_server(Map.poisson(10.0), wide, 2, 1.0, 95.0)
