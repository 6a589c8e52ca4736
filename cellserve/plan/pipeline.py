"""Pipelines over heterogeneous device pools (after PPipe): the problem, the plan, and the rules.

A model is a chain of *blocks* (embedding/projection, layers, encoder, decoder, head), each
with a latency per device type and batch size and the megabytes it passes on. Pools hold
devices of several types, joined by one link. A *pipeline* of a model cuts its blocks into
contiguous *stages*, each on `devices` devices of one type, all at one batch size b. The rules
(docs/pipelines.md), kept by the planner (plan/pipeline_milp.py) and re-derived independently
by the checker (plan/pipeline_check.py):

- a stage's latency at b is the sum of its blocks' latencies on its device type at b; the
  batch must be one the profile gives for every block of the stage on that type;
- stage throughput = devices * b / latency(b); pipeline throughput = its slowest stage's;
- end-to-end latency = the stages' latencies + at each boundary between stages (link
  latency + b * out_mb of the stage's last block * ms_per_mb) + the batch-building wait
  (b - 1) / pipeline throughput; it must be <= the model's SLO;
- the devices of every pipeline of every model, per type, fit in that type's pool;
- objective: the minimum over models of (sum of its pipelines' throughput) / weight.

Units: milliseconds, megabytes, requests per second. Everything here is plain data; the
solver lives in pipeline_milp.py, the files in pipeline_io.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 1


class PipelineError(ValueError):
    """A blocks, pools or plan file (or argument) that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Block:
    """One block: latency_ms[device type][batch] in ms, and the MB it hands to the next block."""

    latency_ms: dict[str, dict[int, float]]
    out_mb: float
    name: str = ""

    def ms(self, device_type: str, batch: int) -> float | None:
        """Latency on `device_type` at `batch`, or None where the profile does not give it."""
        return self.latency_ms.get(device_type, {}).get(batch)


@dataclass(frozen=True)
class ModelBlocks:
    slo_ms: float
    weight: float
    blocks: tuple[Block, ...]

    def batches(self) -> list[int]:
        """Every batch size some block gives on some device type, ascending."""
        return sorted({b for blk in self.blocks for table in blk.latency_ms.values() for b in table})


@dataclass(frozen=True)
class Blocks:
    models: dict[str, ModelBlocks]
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Link:
    latency_ms: float
    ms_per_mb: float


@dataclass(frozen=True)
class Pools:
    pools: dict[str, int]  # device type -> devices
    link: Link
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Stage:
    first: int  # index of the stage's first block (0-based, inclusive)
    last: int  # index of its last block (inclusive)
    device_type: str
    devices: int


@dataclass(frozen=True)
class Pipeline:
    batch: int
    throughput_rps: float
    stages: tuple[Stage, ...]
    latency_ms: float = 0.0  # end-to-end, wait included (written for the reader; the checker re-derives it)


@dataclass(frozen=True)
class ModelPlan:
    throughput_rps: float
    pipelines: tuple[Pipeline, ...]


@dataclass(frozen=True)
class PipelinePlan:
    models: dict[str, ModelPlan]
    objective: float
    baseline_objective: float
    solver: str
    gap: float
    schema_version: int = SCHEMA_VERSION
    stats: dict = field(default_factory=dict)  # candidates, solve seconds: informative, not checked


# ---- the rules, shared by the planner (the checker re-derives them on its own) ----

def stage_latency_ms(model: ModelBlocks, first: int, last: int, device_type: str, batch: int) -> float | None:
    """Sum of blocks first..last on `device_type` at `batch`; None if any block lacks that batch."""
    total = 0.0
    for blk in model.blocks[first:last + 1]:
        ms = blk.ms(device_type, batch)
        if ms is None:
            return None
        total += ms
    return total


def transfer_ms(model: ModelBlocks, last: int, batch: int, link: Link) -> float:
    """The hand-over after a stage whose last block is `last`, at `batch`."""
    return link.latency_ms + batch * model.blocks[last].out_mb * link.ms_per_mb


def stage_rps(devices: int, batch: int, latency_ms: float) -> float:
    return devices * batch * 1000.0 / latency_ms


def fixed_latency_ms(model: ModelBlocks, cuts: tuple[tuple[int, int], ...], types: tuple[str, ...], batch: int,
                     link: Link) -> float | None:
    """Stages' latencies plus transfers (no batch-building wait), or None if a stage lacks `batch`."""
    total = 0.0
    for i, ((first, last), dt) in enumerate(zip(cuts, types)):
        ms = stage_latency_ms(model, first, last, dt, batch)
        if ms is None:
            return None
        total += ms + (transfer_ms(model, last, batch, link) if i + 1 < len(cuts) else 0.0)
    return total


def min_throughput_rps(fixed_ms: float, batch: int, slo_ms: float) -> float | None:
    """The pipeline throughput that the SLO asks of a pipeline whose stages and transfers take
    `fixed_ms`: (b - 1) * 1000 / (SLO - fixed); 0 at batch 1; None when nothing meets the SLO."""
    if fixed_ms > slo_ms or (batch > 1 and fixed_ms >= slo_ms):
        return None
    return 0.0 if batch == 1 else (batch - 1) * 1000.0 / (slo_ms - fixed_ms)


def end_to_end_ms(fixed_ms: float, batch: int, throughput_rps: float) -> float:
    if batch == 1:
        return fixed_ms
    return fixed_ms + ((batch - 1) * 1000.0 / throughput_rps if throughput_rps > 0 else float("inf"))


def partitions(n_blocks: int, max_stages: int):
    """Every cut of blocks 0..n-1 into 1..max_stages contiguous stages, as ((first, last), ...)."""
    def rec(start: int, left: int):
        if start == n_blocks:
            yield ()
            return
        if left == 0:
            return
        for last in range(start, n_blocks):
            for rest in rec(last + 1, left - 1):
                yield ((start, last),) + rest
    yield from rec(0, max_stages)
