"""The pipeline planner against a brute-force optimum (tests/plan/helpers_pipeline.py) on
random small instances: the objective equals the optimum, the baseline equals the optimum
with one stage per pipeline, pipelining is never below the baseline, pruning dominated
shapes loses nothing, and every plan passes the independent checker."""

from __future__ import annotations

import random

import pytest
from helpers_pipeline import brute_force, random_instance

from cellserve.plan.pipeline import Block, Blocks, Link, ModelBlocks, Pools
from cellserve.plan.pipeline_check import check_plan
from cellserve.plan.pipeline_milp import Options, plan

EXACT = Options(max_stages=3, mip_gap=0.0, time_limit_s=60.0)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_is_the_brute_force_optimum_and_feasible(seed):
    blocks, pools = random_instance(random.Random(seed))
    result = plan(blocks, pools, EXACT)
    assert check_plan(result, blocks, pools) == []
    assert _close(result.objective, brute_force(blocks, pools))
    assert _close(result.baseline_objective, brute_force(blocks, pools, max_stages=1))
    assert result.objective >= result.baseline_objective * (1 - 1e-9)
    assert result.gap <= 1e-6 and result.solver.startswith("HiGHS")


@pytest.mark.parametrize("seed", range(12))
def test_larger_instances_pruned_or_not_reach_the_optimum(seed):
    blocks, pools = random_instance(random.Random(1000 + seed), max_models=3, max_blocks=4, max_pool=4)
    options = Options(max_stages=4, mip_gap=0.0, time_limit_s=60.0)
    pruned = plan(blocks, pools, options)
    whole = plan(blocks, pools, Options(max_stages=4, mip_gap=0.0, time_limit_s=60.0, prune=False))
    best = brute_force(blocks, pools)
    assert _close(pruned.objective, best) and _close(whole.objective, best)
    assert pruned.stats["candidates"] <= whole.stats["candidates"]
    assert check_plan(pruned, blocks, pools) == [] and check_plan(whole, blocks, pools) == []


def test_pruning_stopped_by_its_deadline_keeps_every_untested_shape():
    from cellserve.plan.pipeline_candidates import all_shapes
    blocks, pools = random_instance(random.Random(1001), max_models=3, max_blocks=4, max_pool=4)  # 12 shapes, 3 dominated
    whole, _ = all_shapes(blocks, pools, 4, prune=False)
    pruned, complete = all_shapes(blocks, pools, 4)
    stopped, stopped_complete = all_shapes(blocks, pools, 4, deadline=0.0)  # long past
    assert complete and not stopped_complete
    assert stopped == whole and sum(map(len, pruned.values())) < sum(map(len, whole.values()))
    result = plan(blocks, pools, Options(max_stages=4, mip_gap=0.0, time_limit_s=60.0))
    assert result.stats["pruning_complete"] is True and result.stats["build_s"] >= 0


def test_max_stages_bounds_the_stages():
    blocks, pools = random_instance(random.Random(7), max_models=2, max_blocks=4, max_pool=4)
    for k in (1, 2):
        result = plan(blocks, pools, Options(max_stages=k, mip_gap=0.0))
        assert all(len(p.stages) <= k for mp in result.models.values() for p in mp.pipelines)
        assert _close(result.objective, brute_force(blocks, pools, max_stages=k))


def test_a_fast_head_and_a_slow_tail_pipeline_beats_either_pool_alone():
    # block 0 is 10x faster on "fast", block 1 runs as well on "slow": one fast device feeding
    # slow ones serves far more than whole models on either type
    blk0 = Block({"fast": {1: 1.0, 8: 2.0}, "slow": {1: 10.0, 8: 20.0}}, 0.01)
    blk1 = Block({"fast": {1: 10.0, 8: 20.0}, "slow": {1: 10.0, 8: 20.0}}, 0.01)
    blocks = Blocks({"m": ModelBlocks(200.0, 1.0, (blk0, blk1))})
    pools = Pools({"fast": 1, "slow": 8}, Link(0.5, 1.0))
    result = plan(blocks, pools, EXACT)
    assert check_plan(result, blocks, pools) == []
    assert result.objective >= 1.5 * result.baseline_objective
    assert _close(result.objective, brute_force(blocks, pools))
    kinds = {tuple(s.device_type for s in p.stages) for p in result.models["m"].pipelines}
    assert ("fast", "slow") in kinds


def test_a_model_no_pipeline_can_serve_makes_the_objective_zero_and_others_still_run():
    fine = ModelBlocks(100.0, 1.0, (Block({"fast": {1: 5.0}}, 0.0),))
    hopeless = ModelBlocks(1.0, 1.0, (Block({"fast": {1: 5.0}}, 0.0),))  # 5 ms > the 1 ms SLO
    blocks = Blocks({"fine": fine, "hopeless": hopeless})
    pools = Pools({"fast": 2}, Link(0.0, 0.0))
    result = plan(blocks, pools, EXACT)
    assert result.objective == 0.0 and result.models["hopeless"].pipelines == ()
    assert result.models["fine"].throughput_rps == pytest.approx(400.0)  # the fill gives it both devices
    assert check_plan(result, blocks, pools) == []
