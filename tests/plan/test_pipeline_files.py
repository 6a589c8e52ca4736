"""The pipeline planner's files: BLOCKS, POOLS and PLAN round-trip through JSON, and broken
ones are refused with an error naming the file and the field; the parsers import no torch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from cellserve.plan.pipeline import PipelineError
from cellserve.plan.pipeline_io import (blocks_to_dict, load_blocks, load_plan, load_pools, parse_blocks, parse_plan,
                                        parse_pools, plan_to_dict, pools_to_dict)
from cellserve.plan.pipeline_milp import plan

BLOCKS = {"models": {
    "lstm": {"slo_ms": 100, "weight": 1, "blocks": [
        {"name": "embed", "latency_ms": {"fast": {"1": 1.0, "8": 2.0}, "slow": {"1": 4.0, "8": 9.0}}, "out_mb": 0.1},
        {"name": "stack", "latency_ms": {"fast": {"1": 5.0, "8": 9.0}, "slow": {"1": 8.0, "8": 14.0}}, "out_mb": 0.01}]},
    "gru": {"slo_ms": 50, "weight": 2, "blocks": [
        {"latency_ms": {"fast": {"1": 3.0, "4": 6.0}}, "out_mb": 0.0}]}}}
POOLS = {"pools": {"fast": 2, "slow": 4}, "link": {"latency_ms": 0.5, "ms_per_mb": 1.0}}


def _broken(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def test_blocks_and_pools_round_trip():
    blocks, pools = parse_blocks(BLOCKS), parse_pools(POOLS)
    assert parse_blocks(blocks_to_dict(blocks)) == blocks
    assert parse_pools(pools_to_dict(pools)) == pools
    assert blocks.models["lstm"].blocks[1].name == "stack" and blocks.models["lstm"].batches() == [1, 8]


def test_a_plan_round_trips_with_the_issues_fields(tmp_path):
    result = plan(parse_blocks(BLOCKS), parse_pools(POOLS))
    d = plan_to_dict(result)
    assert {"models", "objective", "baseline_objective", "solver", "gap"} <= set(d)
    for m in d["models"].values():
        assert {"throughput_rps", "pipelines"} <= set(m)
        for p in m["pipelines"]:
            assert {"batch", "throughput_rps", "stages"} <= set(p)
            assert all(set(s) == {"blocks", "device_type", "devices"} for s in p["stages"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    assert load_plan(path) == parse_plan(d)
    assert plan_to_dict(parse_plan(json.loads(json.dumps(d)))) == d


@pytest.mark.parametrize("path, value, message", [
    (["models"], {}, "models is empty"),
    (["models", "lstm", "slo_ms"], -5, "models['lstm'].slo_ms must be > 0, got -5"),
    (["models", "lstm", "weight"], 0, "models['lstm'].weight must be > 0, got 0"),
    (["models", "lstm", "blocks"], [], "models['lstm'].blocks is empty"),
    (["models", "lstm", "blocks", 0, "out_mb"], KeyError, "models['lstm'].blocks[0].out_mb is missing"),
    (["models", "lstm", "blocks", 0, "out_mb"], "big", "models['lstm'].blocks[0].out_mb must be a finite number"),
    (["models", "lstm", "blocks", 1, "latency_ms", "fast", "8"], -1,
     "models['lstm'].blocks[1].latency_ms['fast']['8'] must be > 0, got -1"),
    (["models", "lstm", "blocks", 1, "latency_ms", "fast"], {"0": 1.0},
     "models['lstm'].blocks[1].latency_ms['fast'] has key '0'"),
    (["models", "lstm", "blocks", 1, "latency_ms"], {}, "models['lstm'].blocks[1].latency_ms is empty"),
    (["schema_version"], 2, "blocks file.schema_version is 2"),
])
def test_a_broken_blocks_file_names_the_file_and_field(tmp_path, path, value, message):
    f = tmp_path / "B.json"
    f.write_text(json.dumps(_broken(BLOCKS, path, value)))
    with pytest.raises(PipelineError) as err:
        load_blocks(f)
    assert str(f) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("path, value, message", [
    (["pools"], {}, "pools is empty"),
    (["pools", "fast"], -1, "pools['fast'] must be an integer >= 0, got -1"),
    (["pools", "fast"], 1.5, "pools['fast'] must be an integer >= 0, got 1.5"),
    (["link"], KeyError, "pools file.link is missing"),
    (["link", "ms_per_mb"], -2, "link.ms_per_mb must be >= 0, got -2"),
])
def test_a_broken_pools_file_names_the_file_and_field(tmp_path, path, value, message):
    f = tmp_path / "P.json"
    f.write_text(json.dumps(_broken(POOLS, path, value)))
    with pytest.raises(PipelineError) as err:
        load_pools(f)
    assert str(f) in str(err.value) and message in str(err.value)


def test_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(PipelineError, match="cannot read blocks file"):
        load_blocks(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PipelineError, match="pools file .* is not JSON"):
        load_pools(bad)


def test_a_plan_with_a_backwards_stage_is_refused():
    d = plan_to_dict(plan(parse_blocks(BLOCKS), parse_pools(POOLS)))
    d["models"]["lstm"]["pipelines"][0]["stages"][0]["blocks"] = [1, 0]
    with pytest.raises(PipelineError, match=r"models\['lstm'\].pipelines\[0\].stages\[0\].blocks"):
        parse_plan(d)


def test_the_parsers_import_no_torch():
    code = ("import sys; import cellserve.plan.pipeline_io, cellserve.plan.pipeline_milp, "
            "cellserve.plan.pipeline_check, cellserve.cli_pipeline; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
