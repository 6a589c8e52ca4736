"""The pipeline planner's benchmark (pure planner, modelled costs; no simulation): for the lead's
`cellserve bench plan`. `run(quick)` returns JSON-able results, `table(results)` a text table.

1. **Pipelining vs no pipelining**, zoo models cut into blocks (plan/pipeline_zoo.py) and
   priced from *modelled* GPU profiles (plan/gpu_model.py's roofline; the host's own costs
   set to zero), on pairs of pools of two GPU classes, and on one class alone (where the
   pools do not differ, pipelining can only match the baseline, up to the devices' rounding).
   SLO = 5x the model's batch-1 latency on the faster class (PPipe's rule), weights 1.
2. **Planner speed**: 5 random (seeded) models of 10 blocks each (50 blocks) on 30 + 70
   devices of two types, wall time of the whole plan (both solves, both phases, the checker
   outside the timing), with the solver's gap at the time budget.
"""

from __future__ import annotations

import datetime
import platform
import random
import time

from cellserve.plan.pipeline import Block, Blocks, Link, ModelBlocks, Pools
from cellserve.plan.pipeline_check import check_plan
from cellserve.plan.pipeline_milp import Options, plan

ZOO = ("lstm-512", "gru-256", "bilstm-tagger", "seq2seq-reverse")
PAIRS = (("h100", "t4", 4, 12), ("a100", "t4", 4, 12), ("h100", "l4", 4, 12), ("a100", "a100", 8, 8))
MEAN_TOKENS = 25.0
LINK = Link(0.05, 0.04)  # 50 us per hand-over, 25 GB/s


def zoo_blocks(fast: str, slow: str, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)) -> Blocks:
    """The zoo's models, unstacked, cut into blocks priced on modelled `fast` and `slow` GPUs."""
    from cellserve.graph import zoo
    from cellserve.plan.gpu_model import gpu_class, modelled_gpu_profile
    from cellserve.plan.pipeline_zoo import model_blocks
    from cellserve.plan.profile import synthetic_profile

    models = {}
    for name in ZOO:
        model = zoo.load(name)
        host = synthetic_profile(model, 0.0, max_batch=max(batches), stack_layers=False)
        profiles = {t: modelled_gpu_profile(model, host, gpu_class(t)) for t in {fast, slow}}
        probe = model_blocks(model, profiles, MEAN_TOKENS, slo_ms=1.0, batches=batches)
        one = sum(b.latency_ms[fast][1] for b in probe.blocks)
        models[name] = ModelBlocks(5.0 * one, 1.0, probe.blocks)
    return Blocks(models)


def speed_instance(seed: int = 0, n_models: int = 5, n_blocks: int = 10) -> tuple[Blocks, Pools]:
    rng = random.Random(seed)
    sizes = (1, 2, 4, 8, 16, 32)
    models = {}
    for m in range(n_models):
        blocks = []
        for _ in range(n_blocks):
            base, per, slow = rng.uniform(0.5, 3), rng.uniform(0.05, 0.5), rng.uniform(1.5, 5)
            blocks.append(Block({"fast": {b: base + per * b ** 0.8 for b in sizes},
                                 "slow": {b: slow * (base + per * b ** 0.9) for b in sizes}}, rng.uniform(0.01, 0.5)))
        one = sum(b.latency_ms["fast"][1] for b in blocks)
        models[f"m{m}"] = ModelBlocks(one * rng.uniform(3, 8), float(rng.choice([1, 2])), tuple(blocks))
    return Blocks(models), Pools({"fast": 30, "slow": 70}, Link(0.2, 0.5))


def _one(blocks: Blocks, pools: Pools, options: Options) -> dict:
    t0 = time.perf_counter()
    result = plan(blocks, pools, options)
    wall = time.perf_counter() - t0
    problems = check_plan(result, blocks, pools)
    ratio = result.objective / result.baseline_objective if result.baseline_objective > 0 else None
    return {"objective": result.objective, "baseline_objective": result.baseline_objective, "ratio": ratio,
            "gap": result.gap, "plan_s": wall, "feasible": not problems, "problems": problems[:5],
            "pipelines": {m: [[f"{s.device_type}x{s.devices}[{s.first}-{s.last}]" for s in p.stages] + [f"b{p.batch}"]
                              for p in mp.pipelines] for m, mp in result.models.items()},
            "stats": result.stats}


def run(quick: bool = False) -> dict:
    options = Options(time_limit_s=10.0)
    pairs = PAIRS[:2] + PAIRS[3:] if quick else PAIRS
    gains = {}
    for fast, slow, n_fast, n_slow in pairs:
        blocks = zoo_blocks(fast, slow)
        pools = Pools({fast: n_fast, slow: n_slow} if fast != slow else {fast: n_fast + n_slow}, LINK)
        gains[f"{fast}x{n_fast}+{slow}x{n_slow}" if fast != slow else f"{fast}x{n_fast + n_slow}"] = _one(
            blocks, pools, options)
    blocks, pools = speed_instance()
    speed = {f"max_stages={k}": _one(blocks, pools, Options(max_stages=k, time_limit_s=10.0))
             for k in ((2,) if quick else (2, 3))}
    return {"benchmark": "plan pipeline", "modelled": True, "simulated": False, "quick": quick,
            "date": datetime.date.today().isoformat(), "machine": platform.node() or platform.machine(),
            "note": "pure planner on modelled GPU profiles; objective = min over models of planned req/s / weight",
            "gain": gains, "speed": {"blocks": 50, "devices": 100, **speed}}


def table(results: dict) -> str:
    lines = ["pipelining vs no pipelining (modelled GPU profiles, zoo models cut into blocks)",
             f"{'pools':<22} {'objective':>11} {'baseline':>11} {'ratio':>6} {'gap':>8} {'plan s':>7} feasible"]
    for name, r in results["gain"].items():
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        lines.append(f"{name:<22} {r['objective']:>11.1f} {r['baseline_objective']:>11.1f} {ratio:>6} "
                     f"{r['gap']:>8.2g} {r['plan_s']:>7.2f} {r['feasible']}")
    lines.append(f"planner speed: {results['speed']['blocks']} blocks, {results['speed']['devices']} devices")
    for name, r in results["speed"].items():
        if isinstance(r, dict):
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
            lines.append(f"{name:<22} {r['objective']:>11.1f} {r['baseline_objective']:>11.1f} {ratio:>6} "
                         f"{r['gap']:>8.2g} {r['plan_s']:>7.2f} {r['feasible']} ({r['stats']['candidates']} shapes)")
    return "\n".join(lines)
