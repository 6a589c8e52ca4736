"""Blocks from the zoo (plan/pipeline_zoo.py) and the benchmark's instances: one block per
recurrent step with a latency per modelled GPU and batch, plans of them pass the checker and
never fall below the no-pipelining baseline."""

from __future__ import annotations

import pytest

from cellserve.plan.pipeline import Pools
from cellserve.plan.pipeline_bench import LINK, speed_instance, table, zoo_blocks
from cellserve.plan.pipeline_check import check_plan
from cellserve.plan.pipeline_milp import Options, plan


@pytest.mark.slow  # loads the zoo (torch) and models four profiles per GPU
def test_zoo_models_cut_into_blocks_plan_and_check():
    blocks = zoo_blocks("h100", "t4", batches=(1, 8, 64))
    assert set(blocks.models) == {"lstm-512", "gru-256", "bilstm-tagger", "seq2seq-reverse"}
    lstm = blocks.models["lstm-512"]
    assert [b.name for b in lstm.blocks] == ["layer0", "layer1"]  # the stack's two layers, apart
    assert [b.name for b in blocks.models["seq2seq-reverse"].blocks][-1] == "decoder"
    for b in lstm.blocks:
        assert set(b.latency_ms) == {"h100", "t4"} and set(b.latency_ms["t4"]) == {1, 8, 64} and b.out_mb > 0
        assert b.latency_ms["t4"][64] >= b.latency_ms["t4"][1]
    pools = Pools({"h100": 2, "t4": 4}, LINK)
    result = plan(blocks, pools, Options(time_limit_s=20.0))
    assert check_plan(result, blocks, pools) == []
    assert result.objective >= result.baseline_objective > 0


def test_the_speed_instance_and_the_table():
    blocks, pools = speed_instance(n_models=2, n_blocks=3)
    result = plan(blocks, pools, Options(time_limit_s=20.0))
    assert check_plan(result, blocks, pools) == [] and result.objective >= result.baseline_objective
    row = {"objective": 2.0, "baseline_objective": 1.0, "ratio": 2.0, "gap": 0.0, "plan_s": 0.1, "feasible": True,
           "stats": {"candidates": 3}}
    plane = {"models": {"m": {"planned_rps": 3200.0, "sustained_load": 1.015625, "search": "found",
                              "run": {"p99_ms": 157.1}, "slo_ms": 200.0}}}
    text = table({"gain": {"a": row}, "speed": {"blocks": 50, "devices": 100, "max_stages=2": row},
                  "data_plane": {"fast head": plane}})
    assert "2.00x" in text and "50 blocks, 100 devices" in text
    assert "data plane (simulated)" in text and "fast head m" in text and "sustained 1.016x" in text
