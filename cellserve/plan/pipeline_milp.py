"""The pipeline planner: a MILP over candidate shapes (plan/pipeline_candidates.py), by HiGHS.

Variables, per candidate shape k of model m (stages s on types dt_s, one device of stage s
serving c_s requests/s, SLO asking T >= Tmin_k):
    n_ks  integer devices of stage s, 0 .. pool(dt_s)
    T_k   >= 0 the throughput counted for the pipeline of shape k
    y_k   binary, the pipeline exists (only when Tmin_k > 0; at batch 1 no wait, no y)
and z, the objective. Constraints:
    T_k <= c_s * n_ks                    (a pipeline is as fast as its slowest stage)
    T_k >= Tmin_k * y_k,  n_ks <= pool * y_k   (a pipeline that runs meets its SLO)
    sum_k of m T_k >= weight_m * z       (every model)
    sum over stages on dt of n_ks <= pool(dt)
Maximise z. With `fill` a second solve then maximises sum_m throughput_m / weight_m with z held
at its optimum (devices the bottleneck model cannot use go to the others).

The baseline (no pipelining: one-stage shapes only) is solved first, the same way, and its
solution seeds the full solve, so the plan is never below the baseline even when a time
limit stops the solve early. Candidates are enumerated, not generated: the shape space is
cut by `max_stages` (PPipe also bounds stages); within it the answer is exact up to `mip_gap`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import highspy
import numpy as np

from cellserve.plan.pipeline import (Blocks, ModelPlan, Pipeline, PipelineError, PipelinePlan, Pools, Stage,
                                     end_to_end_ms)
from cellserve.plan.pipeline_candidates import Shape, all_shapes
from cellserve.plan.highs import silent_highs


PRUNE_SHARE = 0.3  # of the time limit, at most, for removing dominated shapes (the rest are kept)


@dataclass(frozen=True)
class Options:
    max_stages: int = 2  # 3 and more widen the search a lot (docs/pipelines.md, Measured)
    mip_gap: float = 1e-4  # relative; 0 asks for a proven optimum
    time_limit_s: float = 10.0  # the whole plan's (the split: `plan`)
    fill: bool = True
    prune: bool = True  # drop dominated shapes (exact; False is for tests that check that claim)


def _csc(rows: list[int], cols: list[int], vals: list[float], num_col: int):
    """Triplets as compressed columns (start, index, value)."""
    rows_a, cols_a, vals_a = np.array(rows, dtype=np.int32), np.array(cols, dtype=np.int32), np.array(vals)
    order = np.lexsort((rows_a, cols_a))
    start = np.zeros(num_col + 1, dtype=np.int32)
    np.add.at(start, cols_a + 1, 1)
    return np.cumsum(start).astype(np.int32), rows_a[order], vals_a[order]


def _max_rps(sh: Shape, pools: Pools) -> float:
    """The most a pipeline of shape `sh` could serve with whole pools (fractional devices)."""
    per_device: dict[str, float] = {}
    for s, dt in enumerate(sh.types):
        per_device[dt] = per_device.get(dt, 0.0) + 1.0 / sh.capacity(s)
    return min(pools.pools[dt] / load for dt, load in per_device.items())


@dataclass
class _Solved:
    objective: float
    values: np.ndarray | None
    status: str
    gap: float


class _Model:
    """The MILP of the module's docstring over `shapes`, as one HiGHS model."""

    def __init__(self, blocks: Blocks, pools: Pools, shapes: dict[str, list[Shape]]):
        self.shapes = [sh for name in blocks.models for sh in shapes[name]]
        rows, cols, vals, lo, hi = [], [], [], [], []
        col_lo, col_hi, cost, integ = [0.0], [math.inf], [1.0], [0]  # z
        self.t_col, self.n_cols, self.y_col = [], [], []

        def col(lower, upper, integer):
            col_lo.append(lower)
            col_hi.append(upper)
            cost.append(0.0)
            integ.append(1 if integer else 0)
            return len(col_lo) - 1

        def row(entries, lower, upper):
            r = len(lo)
            for c, v in entries:
                rows.append(r)
                cols.append(c)
                vals.append(v)
            lo.append(lower)
            hi.append(upper)

        by_model = {name: [] for name in blocks.models}
        by_type = {dt: [] for dt in pools.pools}
        for sh in self.shapes:
            t = col(0.0, math.inf, False)
            ns = [col(0.0, float(pools.pools[dt]), True) for dt in sh.types]
            y = col(0.0, 1.0, True) if sh.min_rps > 0 else None
            self.t_col.append(t)
            self.n_cols.append(ns)
            self.y_col.append(y)
            for s, n in enumerate(ns):
                row([(t, 1.0), (n, -sh.capacity(s))], -math.inf, 0.0)
                by_type[sh.types[s]].append(n)
                if y is not None:
                    row([(n, 1.0), (y, -float(pools.pools[sh.types[s]]))], -math.inf, 0.0)
            if y is not None:
                row([(t, 1.0), (y, -sh.min_rps)], 0.0, math.inf)
                # tightenings (implied by the rows above with y integer; they cut the LP relaxation)
                row([(t, 1.0), (y, -_max_rps(sh, pools))], -math.inf, 0.0)
                for n in ns:
                    row([(n, 1.0), (y, -1.0)], 0.0, math.inf)
            by_model[sh.model].append(t)
        for name, ts in by_model.items():
            row([(t, 1.0) for t in ts] + [(0, -blocks.models[name].weight)], 0.0, math.inf)
        for dt, ns in by_type.items():
            if ns:
                row([(n, 1.0) for n in ns], -math.inf, float(pools.pools[dt]))
        self.weights = {name: m.weight for name, m in blocks.models.items()}
        start, index, value = _csc(rows, cols, vals, len(col_lo))
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(col_lo), len(lo)
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = np.array(cost), np.array(col_lo), np.array(col_hi)
        lp.row_lower_, lp.row_upper_ = np.array(lo), np.array(hi)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = start, index, value
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integ]
        lp.sense_ = highspy.ObjSense.kMaximize
        self.lp = lp
        self.num_col = len(col_lo)
        self.solve_s: list[float] = []  # seconds of each solve, for stats

    def solve(self, options: Options, seconds: float, start: np.ndarray | None = None,
              fill_from: float | None = None) -> _Solved:
        h = silent_highs()
        h.setOptionValue("mip_rel_gap", float(options.mip_gap))
        h.setOptionValue("time_limit", max(0.05, float(seconds)))
        h.setOptionValue("mip_feasibility_tolerance", 1e-9)
        h.setOptionValue("primal_feasibility_tolerance", 1e-9)
        if fill_from is not None:  # second phase: z held at its optimum, the weighted sum maximised
            self.lp.col_cost_ = np.array([0.0] + [0.0] * (self.num_col - 1))
            cost = self.lp.col_cost_.copy()
            for sh, t in zip(self.shapes, self.t_col):
                cost[t] = 1.0 / self.weights[sh.model]
            self.lp.col_cost_ = cost
            lower = self.lp.col_lower_.copy()
            lower[0] = fill_from
            self.lp.col_lower_ = lower
        h.passModel(self.lp)
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(start)
            sol.value_valid = True
            h.setSolution(sol)
        t0 = time.perf_counter()
        h.run()
        self.solve_s.append(round(time.perf_counter() - t0, 3))
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        if info.primal_solution_status != 2:  # kSolutionStatusFeasible: no incumbent
            return _Solved(0.0, None, status, math.inf)
        values = np.array(h.getSolution().col_value)
        return _Solved(float(values[0]), values, status, _gap(float(values[0]), float(info.mip_dual_bound)))


def _gap(objective: float, bound: float) -> float:
    """(bound - incumbent) / incumbent, the relative gap HiGHS reports, with 0/0 read as 0 (a
    proven objective of zero: some model no pipeline can serve)."""
    if not math.isfinite(bound):
        return math.inf
    if objective <= 1e-12:
        return 0.0 if bound <= 1e-9 else math.inf
    return max(0.0, (bound - objective) / objective)


def _plan_of(model: _Model, solved: _Solved, blocks: Blocks) -> dict[str, ModelPlan]:
    """Pipelines from a solution: counts rounded, each stage trimmed to what the pipeline's
    slowest stage needs, throughput re-derived from the counts (never from T_k)."""
    out: dict[str, list[Pipeline]] = {name: [] for name in blocks.models}
    if solved.values is not None:
        v = solved.values
        for sh, t, ns in zip(model.shapes, model.t_col, model.n_cols):
            counts = [int(round(v[n])) for n in ns]
            if v[t] <= 1e-9 or min(counts) == 0:
                continue
            rps = min(c * sh.capacity(s) for s, c in enumerate(counts))
            counts = [min(c, max(1, math.ceil(rps / sh.capacity(s) - 1e-9))) for s, c in enumerate(counts)]
            rps = min(c * sh.capacity(s) for s, c in enumerate(counts))
            stages = tuple(Stage(first, last, dt, c) for (first, last), dt, c in zip(sh.cuts, sh.types, counts))
            out[sh.model].append(Pipeline(sh.batch, rps, stages, end_to_end_ms(sh.fixed_ms, sh.batch, rps)))
    return {name: ModelPlan(sum(p.throughput_rps for p in ps), tuple(ps)) for name, ps in out.items()}


def _objective(models: dict[str, ModelPlan], blocks: Blocks) -> float:
    return min(mp.throughput_rps / blocks.models[m].weight for m, mp in models.items())


def plan(blocks: Blocks, pools: Pools, options: Options = Options()) -> PipelinePlan:
    """The plan of the module's docstring; `stats` records candidates and solve seconds.

    The time limit is the whole plan's: the pruning of dominated shapes stops at `PRUNE_SHARE`
    of it; each baseline phase may take 10%; the maximin takes what is left but 20%, which the
    fill gets. Enumerating the shapes and building the MILP are not interruptible; they grow
    with the shape count (`stats`: shapes_s, build_s) and can overrun a short limit."""
    if options.max_stages < 1:
        raise PipelineError(f"max_stages must be >= 1, got {options.max_stages}")
    t0 = time.perf_counter()
    shapes, pruned = all_shapes(blocks, pools, options.max_stages, options.prune,
                                deadline=t0 + PRUNE_SHARE * options.time_limit_s)
    t_shapes = time.perf_counter() - t0
    full = _Model(blocks, pools, shapes)
    base = _Model(blocks, pools, {m: [sh for sh in s if len(sh.types) == 1] for m, s in shapes.items()})
    t_build = time.perf_counter() - t0 - t_shapes
    budget = options.time_limit_s
    left = lambda: budget - (time.perf_counter() - t0)  # noqa: E731
    base_solved = base.solve(options, 0.1 * budget)
    if options.fill and base_solved.values is not None:
        base_solved = _refill(base, base_solved, options, 0.1 * budget)
    base_plan = _plan_of(base, base_solved, blocks)
    start = np.zeros(full.num_col)  # the baseline's solution, in the full model's columns
    if base_solved.values is not None:
        index = {id(sh): k for k, sh in enumerate(full.shapes)}
        start[0] = base_solved.values[0]
        for sh, t, ns, y in zip(base.shapes, base.t_col, base.n_cols, base.y_col):
            k = index[id(sh)]
            start[full.t_col[k]] = base_solved.values[t]
            for a, b in zip(full.n_cols[k], ns):
                start[a] = base_solved.values[b]
            if y is not None:
                start[full.y_col[k]] = base_solved.values[y]
    solved = full.solve(options, max(0.05, left() - 0.2 * budget), start)
    if options.fill and solved.values is not None:
        solved = _refill(full, solved, options, left())
    models = _plan_of(full, solved, blocks)
    baseline_objective = _objective(base_plan, blocks)
    objective = _objective(models, blocks)
    if objective < baseline_objective:  # only when a time limit stopped the full solve early
        models, objective = base_plan, baseline_objective
    elapsed = time.perf_counter() - t0
    stats = {"candidates": len(full.shapes), "baseline_candidates": len(base.shapes),
             "max_stages": options.max_stages, "shapes_s": round(t_shapes, 4),
             "pruning_complete": pruned, "build_s": round(t_build, 4), "plan_s": round(elapsed, 4),
             "status": solved.status, "baseline_status": base_solved.status,
             "solve_s": full.solve_s, "baseline_solve_s": base.solve_s}
    return PipelinePlan(models, objective, baseline_objective, f"HiGHS {silent_highs().version()} MILP",
                        solved.gap if math.isfinite(solved.gap) else 1.0, stats=stats)


def _refill(model: _Model, solved: _Solved, options: Options, seconds: float) -> _Solved:
    """The second phase (see the module's docstring); keeps the first's gap (the maximin's)."""
    again = model.solve(options, seconds, solved.values, fill_from=solved.objective * (1 - 1e-9))
    if again.values is None:
        return solved
    return _Solved(solved.objective, again.values, solved.status, solved.gap)
