"""The independent checker catches broken plans: a mutated plan (a pool overrun, an SLO
missed, a throughput above the slowest stage, a gap in the stages, a batch the profile lacks,
a wrong objective) is reported naming the model and pipeline; an untouched plan passes."""

from __future__ import annotations

import dataclasses
import random

from helpers_pipeline import random_instance

from cellserve.plan.pipeline import Block, Blocks, Link, ModelBlocks, Pipeline, Pools, Stage
from cellserve.plan.pipeline_check import check_plan
from cellserve.plan.pipeline_milp import Options, plan

BLOCKS = Blocks({"m": ModelBlocks(60.0, 1.0, (Block({"fast": {1: 2.0, 8: 4.0}, "slow": {1: 6.0, 8: 12.0}}, 0.5),
                                              Block({"fast": {1: 5.0, 8: 9.0}, "slow": {1: 7.0, 8: 13.0}}, 0.1)))})
POOLS = Pools({"fast": 2, "slow": 3}, Link(0.5, 1.0))


def _plan():
    return plan(BLOCKS, POOLS, Options(mip_gap=0.0))


def _with_pipeline(result, pipeline, throughput=None):
    mp = result.models["m"]
    new = dataclasses.replace(mp, pipelines=(pipeline,), throughput_rps=throughput or pipeline.throughput_rps)
    return dataclasses.replace(result, models={"m": new}, objective=new.throughput_rps)


def test_the_planners_plans_pass():
    assert check_plan(_plan(), BLOCKS, POOLS) == []
    for seed in range(10):
        blocks, pools = random_instance(random.Random(seed))
        assert check_plan(plan(blocks, pools), blocks, pools) == []


def test_over_a_pool():
    p = Pipeline(8, 100.0, (Stage(0, 1, "fast", 3),))
    problems = check_plan(_with_pipeline(_plan(), p), BLOCKS, POOLS)
    assert any("uses 3 devices of 'fast'; the pool has 2" in x for x in problems)


def test_an_slo_missed():
    # on one slow device at batch 8: 25 ms of stages plus a wait of 7 / (8000 / 25) s = 21.9 ms fits 60 ms;
    # on a model whose SLO is 40 ms it does not
    tight = Blocks({"m": dataclasses.replace(BLOCKS.models["m"], slo_ms=40.0)})
    p = Pipeline(8, 320.0, (Stage(0, 1, "slow", 1),))
    assert check_plan(_with_pipeline(_plan(), p), BLOCKS, POOLS) == []
    problems = check_plan(_with_pipeline(_plan(), p), tight, POOLS)
    assert any("models['m'].pipelines[0]: end-to-end latency" in x and "exceeds the SLO 40 ms" in x for x in problems)


def test_a_transfer_counts_toward_the_slo():
    # fast (block 0) then slow (block 1) at batch 8, one device each: stages 4 + 13 ms, the
    # transfer 0.5 + 8 * 0.5 MB * 1 ms/MB = 4.5 ms, the wait 7 / (8000 / 13) s = 11.375 ms
    p = Pipeline(8, 600.0, (Stage(0, 0, "fast", 1), Stage(1, 1, "slow", 1)))
    e2e = 4 + 13 + 4.5 + 7000 / (8000 / 13)

    def problems(slo, link):
        blocks = Blocks({"m": dataclasses.replace(BLOCKS.models["m"], slo_ms=slo)})
        return check_plan(_with_pipeline(_plan(), p), blocks, dataclasses.replace(POOLS, link=link))

    assert problems(e2e + 0.01, POOLS.link) == []
    assert any("exceeds the SLO" in x for x in problems(e2e - 0.01, POOLS.link))
    assert problems(e2e - 0.01, Link(0.0, 0.0)) == []  # without the transfer it would fit


def test_throughput_above_the_slowest_stage():
    p = Pipeline(1, 1000.0, (Stage(0, 1, "fast", 1),))  # one device at batch 1: 1000 / 7 ms = 142.9 req/s
    problems = check_plan(_with_pipeline(_plan(), p), BLOCKS, POOLS)
    assert any("throughput_rps is 1000, above its slowest stage's 142.857" in x for x in problems)


def test_stages_that_skip_or_stop_short_and_a_missing_batch():
    result = _plan()
    skip = Pipeline(1, 10.0, (Stage(1, 1, "fast", 1),))
    short = Pipeline(1, 10.0, (Stage(0, 0, "fast", 1),))
    nobatch = Pipeline(4, 10.0, (Stage(0, 1, "fast", 1),))
    assert any("must cut blocks 0..1 in order" in x for x in check_plan(_with_pipeline(result, skip), BLOCKS, POOLS))
    assert any("stages end at block 0" in x for x in check_plan(_with_pipeline(result, short), BLOCKS, POOLS))
    assert any("block 0 has no latency on 'fast' at batch 4" in x
               for x in check_plan(_with_pipeline(result, nobatch), BLOCKS, POOLS))
    unknown = Pipeline(1, 10.0, (Stage(0, 1, "tpu", 1),))
    assert any("'tpu' is no pool" in x for x in check_plan(_with_pipeline(result, unknown), BLOCKS, POOLS))


def test_a_wrong_objective_or_model_total():
    result = _plan()
    assert any("objective is" in x for x in check_plan(dataclasses.replace(result, objective=result.objective * 2),
                                                       BLOCKS, POOLS))
    mp = dataclasses.replace(result.models["m"], throughput_rps=result.models["m"].throughput_rps + 5)
    assert any("its pipelines sum to" in x for x in check_plan(dataclasses.replace(result, models={"m": mp}),
                                                               BLOCKS, POOLS))
    assert any("have no entry in the plan" in x for x in check_plan(dataclasses.replace(result, models={}),
                                                                    BLOCKS, POOLS))
