"""The exact solver: the partition as a mixed-integer program, solved by HiGHS (highspy).

Variables: x[n,d] = 1 when node n runs on device d (only devices n allows); s[n] its start;
C the makespan; y[i,j] = 1 when i runs before j, for each pair no path orders (a path already
does: its costs and transfers are >= 0); for throughput B, the bottleneck, and z[e,a,b] >= 0
standing for "edge e crosses a->b". With p_n = sum_d cost[n,d] x[n,d]:

    sum_d x[n,d] = 1                                      each node on one device
    s[j] >= s[i] + p_i                                    every edge i->j
    s[j] >= s[i] + p_i + t_e(a,b) (x[i,a] + x[j,b] - 1)   every edge and a != b (its transfer)
    s[j] >= s[i] + p_i - M (1 - y) - M (2 - x[i,d] - x[j,d])   } one device runs one node at a
    s[i] >= s[j] + p_j - M y     - M (2 - x[i,d] - x[j,d])     } time, either order
    C >= s[n] + p_n;   C <= SLO;   sum_n mem[n,d] x[n,d] <= budget[d]
    C >= sum_n cost[n,d] x[n,d] (each d: implied by the rows above for integer x, it tightens
                                 the relaxation, whose big-M rows say little)
    throughput: B >= sum_n cost[n,d] x[n,d] (each d);  z[e,a,b] >= x[i,a] + x[j,b] - 1;
                B >= sum_e mb_e ms_per_mb[a,b] z[e,a,b] (each link)

M is an upper bound on any start that matters (the SLO, or the incumbent's makespan when
minimising it, else the sum of every cost and transfer). Objectives: latency min C; memory
min sum_n mem[n,DEV] x[n,DEV]; throughput min B; memory and throughput then minimise C with
their first objective held to its optimum (lexicographic, two solves). The solution's order
on each device is by start time; its makespan is re-derived by the evaluator (the earliest
starts of that order, never later than the program's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np

from cellserve.plan.partition_graph import Problem
from cellserve.plan.highs import silent_highs

INF = highspy.kHighsInf


@dataclass(frozen=True)
class MilpResult:
    status: str  # optimal | time_limit | infeasible | ...
    assignment: dict[str, str] | None
    order: dict[str, list[str]] | None
    value: float | None  # the primary objective of the solution HiGHS found
    bound: float  # HiGHS's dual bound on the primary objective
    gap: float  # HiGHS's relative gap on the primary objective


class _Model:
    """Columns and rows of a MILP, added one by one and handed to HiGHS at once."""

    def __init__(self):
        self.cost, self.lower, self.upper, self.integer = [], [], [], []
        self.row_lower, self.row_upper, self.starts, self.index, self.value = [], [], [0], [], []

    def col(self, lower=0.0, upper=INF, integer=False, cost=0.0) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, *parts: dict[int, float], lower=-INF, upper=INF) -> None:
        """lower <= sum of every part's coefficient * column <= upper; a column in several
        parts gets the sum of its coefficients."""
        terms: dict[int, float] = {}
        for part in parts:
            for c, v in part.items():
                terms[c] = terms.get(c, 0.0) + v
        for c, v in sorted(terms.items()):
            if v:
                self.index.append(c)
                self.value.append(v)
        self.starts.append(len(self.index))
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    def lp(self) -> highspy.HighsLp:
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.cost), len(self.row_lower)
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = (np.array(v, dtype=float) for v in (self.cost, self.lower, self.upper))
        lp.row_lower_, lp.row_upper_ = np.array(self.row_lower, dtype=float), np.array(self.row_upper, dtype=float)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.array(self.starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(self.index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(self.value, dtype=float)
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in self.integer]
        return lp


def _ancestors(problem: Problem) -> dict[str, set[str]]:
    g = problem.graph
    preds: dict[str, list[str]] = {n.id: [] for n in g.nodes}
    for e in g.edges:
        preds[e.dst].append(e.src)
    out: dict[str, set[str]] = {}
    for n in g.topological_order():
        out[n] = set(preds[n]).union(*(out[p] for p in preds[n]))
    return out


def solve(problem: Problem, incumbent: tuple[dict, dict] | None, time_limit_s: float,
          horizon_ms: float) -> MilpResult:
    """Solve `problem` exactly (to HiGHS's 1e-7 relative gap) within `time_limit_s`, both
    solves of a lexicographic mode together.
    `incumbent` (assignment, order), if given, starts the search; `horizon_ms` bounds every
    finish (the caller's big-M: see the module's docstring)."""
    g, mode = problem.graph, problem.mode
    ids = g.node_ids()
    m = _Model()
    x = {(n.id, d): m.col(0, 1, True) for n in g.nodes for d in n.cost_ms}
    M = horizon_ms
    s = {n: m.col(0, M) for n in ids}
    C = m.col(0, M)
    dev_of = {n.id: list(n.cost_ms) for n in g.nodes}
    cost = {n.id: n.cost_ms for n in g.nodes}

    def p(n: str) -> dict[int, float]:
        return {x[(n, d)]: cost[n][d] for d in dev_of[n]}

    def neg(terms: dict[int, float]) -> dict[int, float]:
        return {k: -v for k, v in terms.items()}

    for n in ids:
        m.row({x[(n, d)]: 1.0 for d in dev_of[n]}, lower=1.0, upper=1.0)
        m.row({C: 1.0, s[n]: -1.0}, neg(p(n)), lower=0.0)
    for e in g.edges:
        i, j = e.src, e.dst
        m.row({s[j]: 1.0, s[i]: -1.0}, neg(p(i)), lower=0.0)
        for a in dev_of[i]:
            for b in dev_of[j]:
                t = g.transfer_ms(e, a, b)
                if a != b and t > 0:  # s_j - s_i - p_i - t x_ia - t x_jb >= -t
                    m.row({s[j]: 1.0, s[i]: -1.0}, neg(p(i)), {x[(i, a)]: -t}, {x[(j, b)]: -t}, lower=-t)
    anc = _ancestors(problem)
    y = {}
    for ai, i in enumerate(ids):
        for j in ids[ai + 1:]:
            if i in anc[j] or j in anc[i]:
                continue
            shared = [d for d in dev_of[i] if d in cost[j]]
            if not shared:
                continue
            y[(i, j)] = yc = m.col(0, 1, True)
            for d in shared:
                # s_j - s_i - p_i - M y - M x_id - M x_jd >= -3M   (i before j when y = 1)
                m.row({s[j]: 1.0, s[i]: -1.0, yc: -M}, neg(p(i)), {x[(i, d)]: -M}, {x[(j, d)]: -M}, lower=-3 * M)
                # s_i - s_j - p_j + M y - M x_id - M x_jd >= -2M   (j before i when y = 0)
                m.row({s[i]: 1.0, s[j]: -1.0, yc: M}, neg(p(j)), {x[(i, d)]: -M}, {x[(j, d)]: -M}, lower=-2 * M)
    for d in g.devices:  # a device runs one node at a time: C >= its busy time (a cut; the rows above imply it)
        busy = {x[(n.id, d)]: -n.cost_ms[d] for n in g.nodes if d in n.cost_ms}
        if busy:
            m.row({C: 1.0}, busy, lower=0.0)
    if problem.slo_ms is not None:
        m.upper[C] = min(m.upper[C], problem.slo_ms)
    for d, limit in problem.memory_budget_mb.items():
        m.row({x[(n.id, d)]: n.memory_mb.get(d, 0.0) for n in g.nodes if d in n.cost_ms}, upper=limit)
    primary: dict[int, float]
    if mode == "latency":
        primary = {C: 1.0}
    elif mode == "memory":
        dev = problem.memory_device
        primary = {x[(n.id, dev)]: n.memory_mb.get(dev, 0.0) for n in g.nodes if dev in n.cost_ms}
    else:
        B = m.col(0)
        primary = {B: 1.0}
        for d in g.devices:
            m.row({B: 1.0}, {x[(n.id, d)]: -n.cost_ms[d] for n in g.nodes if d in n.cost_ms}, lower=0.0)
        loads: dict[tuple[str, str], dict[int, float]] = {pair: {} for pair in g.links}
        for e in g.edges:
            for a in dev_of[e.src]:
                for b in dev_of[e.dst]:
                    if a != b and e.mb * g.links[(a, b)].ms_per_mb > 0:
                        z = m.col(0, 1)
                        m.row({z: 1.0}, {x[(e.src, a)]: -1.0}, {x[(e.dst, b)]: -1.0}, lower=-1.0)
                        loads[(a, b)][z] = e.mb * g.links[(a, b)].ms_per_mb
        for terms in loads.values():
            if terms:
                m.row({B: 1.0}, {z: -w for z, w in terms.items()}, lower=0.0)
    for c, v in primary.items():
        m.cost[c] = v

    began = time.perf_counter()
    h = silent_highs()
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", 1e-7)
    h.setOptionValue("mip_abs_gap", 1e-9)
    h.passModel(m.lp())
    if incumbent is not None:
        _warm_start(h, m, incumbent, x, s, C, y, problem)
    h.run()
    status = h.modelStatusToString(h.getModelStatus()).lower().replace(" ", "_")
    info = h.getInfo()
    values = np.array(h.getSolution().col_value) if info.primal_solution_status == 2 else None
    if values is None:
        return MilpResult(status, None, None, None, info.mip_dual_bound, float("inf"))
    value, bound, gap = info.objective_function_value, info.mip_dual_bound, info.mip_gap
    if mode != "latency" and h.getModelStatus() == highspy.HighsModelStatus.kOptimal:
        # lexicographic: hold the first objective at its optimum, then minimise C
        tol = 1e-9 * max(1.0, abs(value))
        h.addRow(-INF, value + tol, len(primary), np.array(list(primary), dtype=np.int32),
                 np.array(list(primary.values()), dtype=float))
        h.changeColsCost(len(m.cost), np.arange(len(m.cost), dtype=np.int32),
                         np.array([1.0 if c == C else 0.0 for c in range(len(m.cost))]))
        h.setSolution(_solution(values))
        # one limit for both solves (HiGHS times each run on its own): the second gets what is left
        h.setOptionValue("time_limit", max(0.01, float(time_limit_s) - (time.perf_counter() - began)))
        h.run()
        if h.getInfo().primal_solution_status == 2:
            values = np.array(h.getSolution().col_value)
    assignment = {n: max(dev_of[n], key=lambda d: values[x[(n, d)]]) for n in ids}
    topo = {n: k for k, n in enumerate(g.topological_order())}
    order = {d: sorted((n for n in ids if assignment[n] == d),
                       key=lambda n: (round(values[s[n]], 9), round(values[s[n]] + cost[n][assignment[n]], 9), topo[n]))
             for d in g.devices}
    return MilpResult(status, assignment, order, value, bound, max(0.0, gap))


def _solution(values) -> highspy.HighsSolution:
    sol = highspy.HighsSolution()
    sol.col_value = list(values)
    sol.value_valid = True
    return sol


def _warm_start(h, m: _Model, incumbent, x, s, C, y, problem: Problem) -> None:
    """Hand HiGHS the incumbent's integer choices (it completes the continuous ones)."""
    from cellserve.plan.partition_eval import Evaluator

    assignment, order = incumbent
    sched = Evaluator(problem.graph).run(assignment, order)
    if problem.slo_ms is not None and sched.makespan > problem.slo_ms:
        return  # not feasible: no use as a start
    values = [0.0] * len(m.cost)
    for (n, d), c in x.items():
        values[c] = 1.0 if assignment[n] == d else 0.0
    for n, c in s.items():
        values[c] = sched.start[n]
    values[C] = sched.makespan
    pos = {n: k for nodes in order.values() for k, n in enumerate(nodes)}
    for (i, j), c in y.items():
        values[c] = 1.0 if sched.start[i] < sched.start[j] or (sched.start[i] == sched.start[j] and pos[i] < pos[j]) else 0.0
    h.setSolution(_solution(values))
