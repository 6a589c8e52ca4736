"""Candidate pipeline *shapes* for the MILP: every cut of a model into at most `max_stages`
contiguous stages, a device type per stage and one batch size, less those that cannot be
part of an optimal plan.

A shape fixes everything but the device counts: its stages' latencies L_s, so a device of
stage s serves c_s = b * 1000 / L_s requests/s; its fixed latency F (stages + transfers); so
the SLO asks of its pipeline throughput T >= T_min = (b - 1) * 1000 / (SLO - F). The MILP
chooses the counts. One pipeline per shape suffices: two pipelines of one shape merged into
one (counts added) have at least the sum of their throughputs and so still meet the SLO.

Removed, each exactly (no optimal value is lost):
- shapes with two adjacent stages on one device type: the shape with the two made one stage
  dominates it. That stage serves c = 1 / (1/c1 + 1/c2) per device, so throughput T needs
  ceil(T/c) = ceil(T/c1 + T/c2) <= ceil(T/c1) + ceil(T/c2) devices, and it saves a transfer
  (T_min no higher);
- shapes whose F exceeds the SLO (or reaches it at b > 1), or whose T_min the whole pools
  could not give (sum over its stages on a type of ceil(T_min / c_s) > that pool);
- shapes *dominated* by another of the same model: S dominates S' when T_min(S) <= T_min(S')
  and, for every device type, S's stages on it can be matched one to one with some of S''s
  stages on it, each at least as fast (c >= c'). Whatever counts S' runs with, S runs with
  the matched counts, no more devices, at least the throughput. The test, for each type,
  compares both shapes' per-stage capacities sorted ascending, missing stages counted as
  infinitely fast; identical shapes keep the first. One-stage shapes are never removed (they
  are the no-pipelining baseline, which seeds the full solve).

The dominance test compares every pair of a model's shapes; with a `deadline` it stops there
and keeps the shapes it has not yet tested (keeping a dominated shape costs the MILP time,
never a plan), so a large instance keeps the planner's time limit.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from cellserve.plan.pipeline import Blocks, ModelBlocks, Pools, min_throughput_rps, partitions, transfer_ms

SLACK = 1e-6  # T_min is asked with this relative margin, so float round-off never lets the SLO slip


@dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    cuts: tuple[tuple[int, int], ...]  # (first, last) blocks per stage
    types: tuple[str, ...]  # device type per stage
    latencies_ms: tuple[float, ...]  # per stage
    fixed_ms: float  # stages + transfers
    min_rps: float  # T_min, with SLACK

    def capacity(self, s: int) -> float:
        """Requests/s one device of stage s serves."""
        return self.batch * 1000.0 / self.latencies_ms[s]


def _prefix_sums(model: ModelBlocks, dt: str, batch: int) -> tuple[list[float], list[int]]:
    """cum[i] = latency of blocks 0..i-1 on dt at batch (a missing one counted 0), and
    lacking[i] = how many of them lack that batch: stage first..last runs iff none lacks it."""
    cum, lacking = [0.0], [0]
    for blk in model.blocks:
        ms = blk.ms(dt, batch)
        cum.append(cum[-1] + (0.0 if ms is None else ms))
        lacking.append(lacking[-1] + (ms is None))
    return cum, lacking


def model_shapes(name: str, model: ModelBlocks, pools: Pools, max_stages: int) -> list[Shape]:
    """Every feasible shape of one model (before dominance)."""
    types = [dt for dt, n in pools.pools.items() if n > 0]
    out: list[Shape] = []
    cuts_all = list(partitions(len(model.blocks), max_stages))
    for batch in model.batches():
        cum = {dt: _prefix_sums(model, dt, batch) for dt in types}
        for cuts in cuts_all:
            transfers = sum(transfer_ms(model, last, batch, pools.link) for _, last in cuts[:-1])
            per_stage = [[(dt, cum[dt][0][last + 1] - cum[dt][0][first]) for dt in types
                          if cum[dt][1][last + 1] == cum[dt][1][first]] for first, last in cuts]
            for choice in itertools.product(*per_stage):
                if any(choice[s][0] == choice[s + 1][0] for s in range(len(choice) - 1)):
                    continue  # two adjacent stages on one type: the one stage they make dominates
                lat = tuple(ms for _, ms in choice)
                fixed = sum(lat) + transfers
                t_min = min_throughput_rps(fixed, batch, model.slo_ms)
                if t_min is None:
                    continue
                shape = Shape(name, batch, cuts, tuple(dt for dt, _ in choice), lat, fixed, t_min * (1 + SLACK))
                if _fits(shape, pools):
                    out.append(shape)
    return out


def _fits(shape: Shape, pools: Pools) -> bool:
    need: dict[str, int] = {}
    for s, dt in enumerate(shape.types):
        need[dt] = need.get(dt, 0) + max(1, math.ceil(shape.min_rps / shape.capacity(s) - 1e-12))
    return all(n <= pools.pools[dt] for dt, n in need.items())


def undominated(shapes: list[Shape], device_types: list[str], max_stages: int,
                deadline: float = math.inf) -> tuple[list[Shape], bool]:
    """(`shapes` (of one model) less those another dominates, whether every shape was tested):
    shapes not tested by `deadline` (a `time.perf_counter()` time) are kept (module docstring)."""
    n = len(shapes)
    if n <= 1:
        return shapes, True
    k = max_stages
    vec = np.full((n, len(device_types) * k + 1), np.inf)
    for i, sh in enumerate(shapes):
        for t, dt in enumerate(device_types):
            caps = sorted(sh.capacity(s) for s in range(len(sh.types)) if sh.types[s] == dt)
            vec[i, t * k:t * k + len(caps)] = caps
        vec[i, -1] = -sh.min_rps
    keep = np.ones(n, dtype=bool)
    single = np.array([len(sh.types) == 1 for sh in shapes])
    chunk = max(1, 4_000_000 // (n * vec.shape[1]))
    complete = True
    for start in range(0, n, chunk):
        if time.perf_counter() > deadline:
            complete = False
            break
        rows = vec[start:start + chunk]  # candidates to be dominated
        ge = (vec[None, :, :] >= rows[:, None, :]).all(axis=2)  # ge[i, j]: j is at least as good as i everywhere
        gt = (vec[None, :, :] > rows[:, None, :]).any(axis=2)
        idx = np.arange(start, start + len(rows))
        earlier = np.arange(n)[None, :] < idx[:, None]
        dominated = (ge & (gt | earlier)).any(axis=1)
        keep[start:start + len(rows)] &= ~dominated
    keep |= single
    return [sh for sh, kept in zip(shapes, keep) if kept], complete


def all_shapes(blocks: Blocks, pools: Pools, max_stages: int, prune: bool = True,
               deadline: float = math.inf) -> tuple[dict[str, list[Shape]], bool]:
    """(per model, its candidate shapes, dominated ones removed unless `prune` is False; whether
    the pruning finished by `deadline`, a `time.perf_counter()` time)."""
    types = sorted(pools.pools)
    out, complete = {}, True
    for name, model in blocks.models.items():
        shapes = model_shapes(name, model, pools, max_stages)
        if prune:
            shapes, done = undominated(shapes, types, max_stages, deadline)
            complete = complete and done
        out[name] = shapes
    return out, complete

