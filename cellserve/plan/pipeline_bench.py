"""The pipeline planner's benchmark (modelled costs; the data plane simulated): for the lead's
`cellserve bench plan`. `run(quick)` returns JSON-able results, `table(results)` a text table.

1. **Pipelining vs no pipelining**, zoo models cut into blocks (plan/pipeline_zoo.py) and
   priced from *modelled* GPU profiles (plan/gpu_model.py's roofline; the host's own costs
   set to zero), on pairs of pools of two GPU classes, and on one class alone (where the
   pools do not differ, pipelining can only match the baseline, up to the devices' rounding).
   SLO = 5x the model's batch-1 latency on the faster class (PPipe's rule), weights 1.
2. **Planner speed**: 5 random (seeded) models of 10 blocks each (50 blocks) on 30 + 70
   devices of two types, wall time of the whole plan (both solves, both phases, the checker
   outside the timing), with the solver's gap at the time budget.
3. **The data plane** (plan/pipeline_sim.py, **simulated**): a plan's models run through
   reservation-based batching in virtual time; per model the highest load, as a multiple of
   its planned throughput, at which 99% of requests meet the SLO (the fast-head instance; in
   a full run also the zoo on H100 + T4).
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


def fast_head_instance() -> tuple[Blocks, Pools]:
    """Two blocks: the head 10x faster on "fast", the tail alike on both; one fast device and
    eight slow ones. Whole models on either class lose to the fast head feeding slow tails."""
    head = Block({"fast": {1: 1.0, 8: 2.0}, "slow": {1: 10.0, 8: 20.0}}, 0.01)
    tail = Block({"fast": {1: 10.0, 8: 20.0}, "slow": {1: 10.0, 8: 20.0}}, 0.01)
    return Blocks({"m": ModelBlocks(200.0, 1.0, (head, tail))}), Pools({"fast": 1, "slow": 8}, Link(0.5, 1.0))


def data_plane(blocks: Blocks, pools: Pools, seconds: float, options: Options) -> dict:
    """The plan's data plane simulated (plan/pipeline_sim.py, as `cellserve plan pipeline-sim`
    reports it): per model the highest load (x its planned throughput) at which 99% of
    requests meet the SLO. Simulated figures."""
    from cellserve.plan.pipeline_sim import simulation_report

    result = plan(blocks, pools, options)
    report = simulation_report(result, blocks, pools, None, seconds, min(1.0, seconds / 5), 0, steps=6)
    ratio = result.objective / result.baseline_objective if result.baseline_objective > 0 else None
    return {"objective": result.objective, "ratio": ratio, "seconds": seconds,
            "models": {name: m for name, m in report["models"].items() if "run" in m}}


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
    seconds = 5.0 if quick else 10.0
    planes = {"fast head, slow tail": data_plane(*fast_head_instance(), seconds, options)}
    if not quick:
        fast, slow, n_fast, n_slow = PAIRS[0]
        planes[f"zoo {fast}x{n_fast}+{slow}x{n_slow}"] = data_plane(
            zoo_blocks(fast, slow), Pools({fast: n_fast, slow: n_slow}, LINK), seconds, options)
    return {"benchmark": "plan pipeline", "modelled": True, "simulated": "data_plane only", "quick": quick,
            "date": datetime.date.today().isoformat(), "machine": platform.node() or platform.machine(),
            "note": "planner on modelled GPU profiles; objective = min over models of planned req/s / weight; "
                    "data_plane: each plan run through reservation batching in virtual time (simulated)",
            "gain": gains, "speed": {"blocks": 50, "devices": 100, **speed}, "data_plane": planes}


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
    lines.append("data plane (simulated): the highest load x the plan at which 99% meet the SLO")
    for name, r in results.get("data_plane", {}).items():
        for model, m in r["models"].items():
            bound = {"found": "", "above": ">=", "below": "<"}[m["search"]]
            lines.append(f"{name + ' ' + model:<40} planned {m['planned_rps']:>10.1f} req/s  sustained "
                         f"{bound}{m['sustained_load']:.3f}x  p99 {m['run']['p99_ms'] or 0:.1f} / {m['slo_ms']:.1f} ms")
    return "\n".join(lines)
