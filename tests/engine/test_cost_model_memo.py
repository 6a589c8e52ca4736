"""The cost model keeps its estimates between observations and forgets only those a new
sample changes (cost_model.StepCost._forget): what it answers is what it would compute from
its tables afresh, whatever the order of samples and questions."""

from __future__ import annotations

import random

import pytest

from cellserve.engine.cost_model import StepCost


@pytest.mark.parametrize("seed", range(20))
def test_kept_estimates_equal_estimates_computed_afresh(seed):
    rng = random.Random(seed)
    cost = StepCost()
    for _ in range(300):
        if rng.random() < 0.5:  # mostly batches of every size; sometimes a gap in the buckets
            batch = rng.randint(1, 64) if rng.random() < 0.8 else rng.choice([1, 2, 3, 33, 64])
            cost.observe(batch, rng.uniform(1e-4, 5e-3))
        for _ in range(5):
            batch, best = rng.randint(1, 80), rng.random() < 0.3
            assert cost(batch, best) == cost._estimate(batch, cost._best if best else cost._mean)


def test_a_sample_in_a_large_bucket_keeps_the_small_batches_estimates():
    cost = StepCost()
    for batch in (1, 2, 4, 8, 16, 32, 64):  # every bucket measured, as after a profile
        cost.observe(batch, 1e-4 * batch ** 0.5)
    small, large = cost(3), cost(64)
    cost.observe(64, 1e-2)
    assert 3 in cost._memo[0] and cost(3) == small  # bucket 2 reads nothing above it
    assert 64 not in cost._memo[0] and cost(64) > large
