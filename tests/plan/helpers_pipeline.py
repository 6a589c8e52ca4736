"""The pipeline planner's test helpers: random small instances and a brute-force optimum.

The brute force shares nothing with the planner but the input data classes: it lists every
single pipeline (every cut of the blocks into stages, every device type per stage, every
batch, every device count per stage that fits the pools), keeps those meeting the SLO at
their own throughput, then takes, per model, the best total throughput of any multiset of
them within each vector of device counts (an unbounded knapsack over the pools), and splits
the pools between models to maximise the minimum of throughput / weight.
"""

from __future__ import annotations

import itertools
import random

from cellserve.plan.pipeline import Block, Blocks, Link, ModelBlocks, Pools

TYPES = ("fast", "slow")


def random_instance(rng: random.Random, max_models: int = 2, max_blocks: int = 3, max_pool: int = 3
                    ) -> tuple[Blocks, Pools]:
    """1..max_models models of 1..max_blocks blocks on two device types; a block may lack a
    type or a batch; SLOs from tight (few shapes feasible) to loose."""
    models = {}
    for m in range(rng.randint(1, max_models)):
        batches = sorted(rng.sample([1, 2, 4, 8], rng.randint(1, 3)))
        blocks = []
        for _ in range(rng.randint(1, max_blocks)):
            table = {}
            for dt, speed in zip(TYPES, (1.0, rng.uniform(1.5, 4.0))):
                if rng.random() < 0.15 and table:
                    continue  # this block does not run on the slow type
                base = rng.uniform(1, 10) * speed
                per = rng.uniform(0.1, 2) * speed
                table[dt] = {b: base + per * b ** rng.uniform(0.6, 1.0) for b in batches
                             if b == batches[0] or rng.random() > 0.1}
            blocks.append(Block(table, rng.choice([0.0, rng.uniform(0.01, 1.0)])))
        total_fast = sum(min(b.latency_ms.get("fast", {1: 10}).values()) for b in blocks)
        models[f"m{m}"] = ModelBlocks(total_fast * rng.uniform(1.2, 6.0), rng.choice([1.0, 2.0, 0.5]), tuple(blocks))
    pools = Pools({"fast": rng.randint(0, max_pool), "slow": rng.randint(0, max_pool)},
                  Link(rng.uniform(0, 2), rng.uniform(0, 3)))
    return Blocks(models), pools


def _cuts(n: int):
    """Every contiguous cut of 0..n-1, from bit masks of the n-1 places a cut may go."""
    for mask in range(1 << max(n - 1, 0)):
        stages, first = [], 0
        for i in range(n - 1):
            if mask >> i & 1:
                stages.append((first, i))
                first = i + 1
        stages.append((first, n - 1))
        yield stages


def single_pipelines(model: ModelBlocks, pools: Pools, max_stages: int | None = None):
    """(devices used per type, throughput) of every pipeline of `model` meeting its SLO."""
    out = []
    types = [dt for dt in TYPES if pools.pools.get(dt, 0) > 0]
    batches = sorted({b for blk in model.blocks for t in blk.latency_ms.values() for b in t})
    for cuts in _cuts(len(model.blocks)):
        if max_stages is not None and len(cuts) > max_stages:
            continue
        for assign in itertools.product(types, repeat=len(cuts)):
            for b in batches:
                lat = []
                for (f, l), dt in zip(cuts, assign):
                    vals = [model.blocks[k].latency_ms.get(dt, {}).get(b) for k in range(f, l + 1)]
                    if any(v is None for v in vals):
                        break
                    lat.append(sum(vals))
                else:
                    xfer = sum(pools.link.latency_ms + b * model.blocks[l].out_mb * pools.link.ms_per_mb
                               for (_, l) in cuts[:-1])
                    for counts in itertools.product(*(range(1, pools.pools[dt] + 1) for dt in assign)):
                        use = tuple(sum(c for c, a in zip(counts, assign) if a == dt) for dt in TYPES)
                        if any(u > pools.pools.get(dt, 0) for u, dt in zip(use, TYPES)):
                            continue
                        thr = min(c * b * 1000.0 / x for c, x in zip(counts, lat))
                        e2e = sum(lat) + xfer + (b - 1) * 1000.0 / thr
                        if e2e <= model.slo_ms + 1e-9:
                            out.append((use, thr))
    return out


def brute_force(blocks: Blocks, pools: Pools, max_stages: int | None = None) -> float:
    """The optimum of min over models of throughput / weight (the module's docstring)."""
    caps = tuple(pools.pools.get(dt, 0) for dt in TYPES)
    grid = list(itertools.product(*(range(c + 1) for c in caps)))
    best_of = {}
    for name, model in blocks.models.items():
        configs = single_pipelines(model, pools, max_stages)
        best = {}
        for u in grid:  # itertools.product lists a vector after every vector below it
            value = 0.0
            for i in range(len(u)):
                if u[i] > 0:
                    value = max(value, best[u[:i] + (u[i] - 1,) + u[i + 1:]])
            for use, thr in configs:
                if all(a <= b for a, b in zip(use, u)):
                    rest = tuple(b - a for a, b in zip(use, u))
                    value = max(value, thr + best[rest])
            best[u] = value
        best_of[name] = (best, model.weight)
    names = list(best_of)

    def split(i: int, left: tuple) -> float:
        best, weight = best_of[names[i]]
        if i == len(names) - 1:
            return best[left] / weight
        result = 0.0
        for u in grid:
            if all(a <= b for a, b in zip(u, left)):
                rest = tuple(b - a for a, b in zip(u, left))
                result = max(result, min(best[u] / weight, split(i + 1, rest)))
        return result

    return split(0, caps)
