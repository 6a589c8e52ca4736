"""The pipeline planner's files as JSON: BLOCKS, POOLS and PLAN (docs/pipelines.md).

Each `load_*` refuses a broken file with a PipelineError naming the file and the field (as
`blocks file 'B.json': models['lstm'].blocks[1].latency_ms['t4']['8'] must be > 0, got -1`);
each `*_to_dict` writes what the matching parser reads back, with `schema_version`. A file
may omit schema_version (it is then version 1); unknown fields are ignored.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from cellserve.decimal_text import positive_key
from cellserve.plan.pipeline import (SCHEMA_VERSION, Block, Blocks, Link, ModelBlocks, ModelPlan, Pipeline,
                                     PipelineError, PipelinePlan, Pools, Stage)
from cellserve.plan.json_io import as_list, check_version, read_json, write_json  # noqa: F401 (write_json: this module's API)

_read = functools.partial(read_json, error=PipelineError)
_version = functools.partial(check_version, version=SCHEMA_VERSION, error=PipelineError)
_list = functools.partial(as_list, error=PipelineError)

MAX_BATCH = 65536


def _obj(x: object, where: str) -> dict:
    if not isinstance(x, dict):
        raise PipelineError(f"{where} must be an object, got {type(x).__name__}")
    return x


def _get(d: dict, key: str, where: str):
    if key not in d:
        raise PipelineError(f"{where}.{key} is missing")
    return d[key]


def _num(x: object, where: str, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise PipelineError(f"{where} must be a finite number, got {x!r}")
    if x < 0 or (positive and x == 0):
        raise PipelineError(f"{where} must be {'> 0' if positive else '>= 0'}, got {x!r}")
    return float(x)


def _int(x: object, where: str, minimum: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise PipelineError(f"{where} must be an integer >= {minimum}, got {x!r}")
    return x


def _str(x: object, where: str) -> str:
    if not isinstance(x, str) or not x:
        raise PipelineError(f"{where} must be a non-empty string, got {x!r}")
    return x


def _load(path: str | Path, what: str, parse):
    d = _read(path, what)
    try:
        return parse(d)
    except PipelineError as exc:
        raise PipelineError(f"{what} {str(path)!r}: {exc}") from None


# ---- BLOCKS ----

def _block(x: object, where: str) -> Block:
    d = _obj(x, where)
    table = _obj(_get(d, "latency_ms", where), f"{where}.latency_ms")
    if not table:
        raise PipelineError(f"{where}.latency_ms is empty; it maps device types to {{batch: ms}}")
    latency: dict[str, dict[int, float]] = {}
    for dt, by_batch in table.items():
        w = f"{where}.latency_ms[{dt!r}]"
        by_batch = _obj(by_batch, w)
        if not by_batch:
            raise PipelineError(f"{w} is empty; it maps batch sizes to milliseconds")
        row = {}
        for key, ms in by_batch.items():
            if (batch := positive_key(key)) is None or batch > MAX_BATCH:
                raise PipelineError(f"{w} has key {key!r}; keys are batch sizes 1, 2, ... {MAX_BATCH}")
            row[batch] = _num(ms, f"{w}[{key!r}]", positive=True)
        latency[_str(dt, f"{where}.latency_ms key")] = dict(sorted(row.items()))
    name = d.get("name", "")
    if name != "":
        _str(name, f"{where}.name")
    return Block(latency, _num(_get(d, "out_mb", where), f"{where}.out_mb"), name)


def parse_blocks(x: object) -> Blocks:
    d = _obj(x, "blocks file")
    version = _version(d, "blocks file")
    models_in = _obj(_get(d, "models", "blocks file"), "models")
    if not models_in:
        raise PipelineError("models is empty")
    models = {}
    for m, body in models_in.items():
        where = f"models[{m!r}]"
        body = _obj(body, where)
        blocks = _list(_get(body, "blocks", where), f"{where}.blocks")
        if not blocks:
            raise PipelineError(f"{where}.blocks is empty; a model has at least one block")
        models[_str(m, "models key")] = ModelBlocks(
            _num(_get(body, "slo_ms", where), f"{where}.slo_ms", positive=True),
            _num(_get(body, "weight", where), f"{where}.weight", positive=True),
            tuple(_block(b, f"{where}.blocks[{i}]") for i, b in enumerate(blocks)))
    return Blocks(models, version)


def load_blocks(path: str | Path) -> Blocks:
    return _load(path, "blocks file", parse_blocks)


def blocks_to_dict(blocks: Blocks) -> dict:
    def block(b: Block) -> dict:
        out = {"latency_ms": {dt: {str(k): v for k, v in row.items()} for dt, row in b.latency_ms.items()},
               "out_mb": b.out_mb}
        return {"name": b.name, **out} if b.name else out
    return {"schema_version": blocks.schema_version,
            "models": {m: {"slo_ms": mb.slo_ms, "weight": mb.weight, "blocks": [block(b) for b in mb.blocks]}
                       for m, mb in blocks.models.items()}}


# ---- POOLS ----

def parse_pools(x: object) -> Pools:
    d = _obj(x, "pools file")
    version = _version(d, "pools file")
    pools = _obj(_get(d, "pools", "pools file"), "pools")
    if not pools:
        raise PipelineError("pools is empty; it maps device types to device counts")
    counts = {_str(dt, "pools key"): _int(n, f"pools[{dt!r}]") for dt, n in pools.items()}
    link = _obj(_get(d, "link", "pools file"), "link")
    return Pools(counts, Link(_num(_get(link, "latency_ms", "link"), "link.latency_ms"),
                              _num(_get(link, "ms_per_mb", "link"), "link.ms_per_mb")), version)


def load_pools(path: str | Path) -> Pools:
    return _load(path, "pools file", parse_pools)


def pools_to_dict(pools: Pools) -> dict:
    return {"schema_version": pools.schema_version, "pools": dict(pools.pools),
            "link": {"latency_ms": pools.link.latency_ms, "ms_per_mb": pools.link.ms_per_mb}}


# ---- PLAN ----

def _stage(x: object, where: str) -> Stage:
    d = _obj(x, where)
    span = _list(_get(d, "blocks", where), f"{where}.blocks")
    if len(span) != 2:
        raise PipelineError(f"{where}.blocks must be [FIRST, LAST], got {span!r}")
    first, last = (_int(v, f"{where}.blocks[{i}]") for i, v in enumerate(span))
    if last < first:
        raise PipelineError(f"{where}.blocks is {span!r}: LAST must be >= FIRST")
    return Stage(first, last, _str(_get(d, "device_type", where), f"{where}.device_type"),
                 _int(_get(d, "devices", where), f"{where}.devices", 1))


def _pipeline(x: object, where: str) -> Pipeline:
    d = _obj(x, where)
    stages = _list(_get(d, "stages", where), f"{where}.stages")
    if not stages:
        raise PipelineError(f"{where}.stages is empty")
    return Pipeline(_int(_get(d, "batch", where), f"{where}.batch", 1),
                    _num(_get(d, "throughput_rps", where), f"{where}.throughput_rps"),
                    tuple(_stage(s, f"{where}.stages[{i}]") for i, s in enumerate(stages)),
                    _num(d.get("latency_ms", 0.0), f"{where}.latency_ms"))


def parse_plan(x: object) -> PipelinePlan:
    d = _obj(x, "plan")
    version = _version(d, "plan")
    models = {}
    for m, body in _obj(_get(d, "models", "plan"), "models").items():
        where = f"models[{m!r}]"
        body = _obj(body, where)
        pipes = _list(_get(body, "pipelines", where), f"{where}.pipelines")
        models[_str(m, "models key")] = ModelPlan(
            _num(_get(body, "throughput_rps", where), f"{where}.throughput_rps"),
            tuple(_pipeline(p, f"{where}.pipelines[{i}]") for i, p in enumerate(pipes)))
    gap = _get(d, "gap", "plan")
    return PipelinePlan(models, _num(_get(d, "objective", "plan"), "objective"),
                        _num(_get(d, "baseline_objective", "plan"), "baseline_objective"),
                        _str(_get(d, "solver", "plan"), "solver"), _num(gap, "gap"), version,
                        dict(_obj(d.get("stats", {}), "stats")))


def load_plan(path: str | Path) -> PipelinePlan:
    return _load(path, "plan file", parse_plan)


def plan_to_dict(plan: PipelinePlan) -> dict:
    def pipeline(p: Pipeline) -> dict:
        return {"batch": p.batch, "throughput_rps": p.throughput_rps, "latency_ms": p.latency_ms,
                "stages": [{"blocks": [s.first, s.last], "device_type": s.device_type, "devices": s.devices}
                           for s in p.stages]}
    out = {"schema_version": plan.schema_version,
           "models": {m: {"throughput_rps": mp.throughput_rps, "pipelines": [pipeline(p) for p in mp.pipelines]}
                      for m, mp in plan.models.items()},
           "objective": plan.objective, "baseline_objective": plan.baseline_objective,
           "solver": plan.solver, "gap": plan.gap}
    if plan.stats:
        out["stats"] = plan.stats
    return out


