"""An independent feasibility check of a pipeline plan against its BLOCKS and POOLS.

Written apart from the planner (it shares only the data classes, none of the rule helpers of
plan/pipeline.py): it re-derives every stage's latency from the blocks' tables and checks
each rule docs/pipelines.md states, so a planner bug shows up here as a problem rather than
as the planner agreeing with itself. `check_plan` returns the problems, each naming the model,
pipeline and stage; [] is a feasible plan. The CLI runs it on every plan before writing it.
"""

from __future__ import annotations

from cellserve.plan.pipeline import Blocks, PipelinePlan, Pools

TOL_MS = 1e-6
TOL_REL = 1e-6


def _close_or_below(value: float, bound: float) -> bool:
    return value <= bound * (1 + TOL_REL) + 1e-9


def check_plan(plan: PipelinePlan, blocks: Blocks, pools: Pools) -> list[str]:
    problems: list[str] = []
    used = {dt: 0 for dt in pools.pools}
    missing = sorted(set(blocks.models) - set(plan.models))
    extra = sorted(set(plan.models) - set(blocks.models))
    if missing:
        problems.append(f"models {missing} of the blocks file have no entry in the plan")
    if extra:
        problems.append(f"plan has models {extra} that the blocks file lacks")
    ratios = []
    for name, mp in plan.models.items():
        model = blocks.models.get(name)
        if model is None:
            continue
        n_blocks = len(model.blocks)
        total = 0.0
        for i, p in enumerate(mp.pipelines):
            where = f"models[{name!r}].pipelines[{i}]"
            expect_first = 0
            busy_ms = 0.0  # stages' latencies and transfers
            slowest = float("inf")
            ok = True
            for j, st in enumerate(p.stages):
                sw = f"{where}.stages[{j}]"
                if st.first != expect_first or st.last < st.first or st.last >= n_blocks:
                    problems.append(f"{sw}.blocks is [{st.first}, {st.last}]; the stages must cut blocks "
                                    f"0..{n_blocks - 1} in order, this one starting at {expect_first}")
                    ok = False
                    break
                expect_first = st.last + 1
                if st.device_type not in pools.pools:
                    problems.append(f"{sw}.device_type {st.device_type!r} is no pool")
                    ok = False
                    continue
                if st.devices < 1:
                    problems.append(f"{sw}.devices is {st.devices}; a stage has at least one device")
                    ok = False
                used[st.device_type] += st.devices
                latency = 0.0
                for k in range(st.first, st.last + 1):
                    ms = model.blocks[k].latency_ms.get(st.device_type, {}).get(p.batch)
                    if ms is None:
                        problems.append(f"{sw}: block {k} has no latency on {st.device_type!r} at batch {p.batch}")
                        ok = False
                        break
                    latency += ms
                else:
                    slowest = min(slowest, st.devices * p.batch * 1000.0 / latency)
                    busy_ms += latency
                    if j + 1 < len(p.stages):
                        busy_ms += pools.link.latency_ms + p.batch * model.blocks[st.last].out_mb * pools.link.ms_per_mb
            if ok and expect_first != n_blocks:
                problems.append(f"{where}: stages end at block {expect_first - 1}, the model has {n_blocks} blocks")
                ok = False
            if not ok:
                continue
            if not _close_or_below(p.throughput_rps, slowest):
                problems.append(f"{where}.throughput_rps is {p.throughput_rps:g}, above its slowest stage's "
                                f"{slowest:g} req/s")
            wait = 0.0 if p.batch == 1 else (p.batch - 1) * 1000.0 / slowest
            e2e = busy_ms + wait
            if e2e > model.slo_ms * (1 + 1e-9) + TOL_MS:
                problems.append(f"{where}: end-to-end latency {e2e:.6g} ms (stages and transfers {busy_ms:.6g} + "
                                f"wait {wait:.6g}) exceeds the SLO {model.slo_ms:g} ms")
            total += p.throughput_rps
        if abs(total - mp.throughput_rps) > TOL_REL * max(1.0, total):
            problems.append(f"models[{name!r}].throughput_rps is {mp.throughput_rps:g}; its pipelines sum to {total:g}")
        ratios.append(mp.throughput_rps / model.weight)
    for dt, n in used.items():
        if n > pools.pools[dt]:
            problems.append(f"the plan uses {n} devices of {dt!r}; the pool has {pools.pools[dt]}")
    if ratios and not missing:
        objective = min(ratios)
        if abs(plan.objective - objective) > TOL_REL * max(1.0, objective):
            problems.append(f"objective is {plan.objective:g}; min over models of throughput / weight is {objective:g}")
    if plan.gap < 0:
        problems.append(f"gap is {plan.gap:g}; a gap is >= 0")
    return problems
