"""Partition one model's graph between devices (Chrion-style), for latency, memory or
throughput: `plan_partition(problem)` returns a Plan or raises Infeasible.

Solver choice (`solver="auto"`): the exact MILP (plan/partition_milp.py) for graphs of up to
EXACT_MAX_NODES nodes, the heuristic (plan/partition_heuristic.py) beyond. The heuristic always
runs first: its plan starts the MILP's search, and it is the answer when the MILP finds
nothing better in its time. The plan's `solver` names what produced the partition written,
`gap` its relative optimality gap (HiGHS's bound for the MILP; a lower bound for the
heuristic, see `lower_bound`). Every figure in the plan is the evaluator's
(plan/partition_eval.py) for the partition's assignment and order.
"""

from __future__ import annotations

import time

from cellserve.plan.partition_eval import Evaluator, Schedule, objective_name, primary, violation
from cellserve.plan.partition_graph import Infeasible, PartitionError, Plan, Problem
from cellserve.plan.partition_heuristic import Heuristic, better

EXACT_MAX_NODES = 20
DEFAULT_TIME_LIMIT_S = 60.0


def lower_bound(problem: Problem) -> float:
    """A bound no plan beats, for the heuristic's gap. latency: the longest path of each
    node's cheapest cost (no transfers), and the cheapest total work spread over every
    device; throughput: that spread, and the dearest node's cheapest cost; memory: the memory
    of nodes that allow only the device minimised."""
    g = problem.graph
    cheapest = {n.id: min(n.cost_ms.values()) for n in g.nodes}
    spread = sum(cheapest.values()) / len(g.devices)
    if problem.mode == "memory":
        dev = problem.memory_device
        return sum(n.memory_mb.get(dev, 0.0) for n in g.nodes if set(n.cost_ms) == {dev})
    if problem.mode == "throughput":
        return max(spread, max(cheapest.values()))
    preds: dict[str, list[str]] = {n.id: [] for n in g.nodes}
    for e in g.edges:
        preds[e.dst].append(e.src)
    path: dict[str, float] = {}
    for n in g.topological_order():
        path[n] = cheapest[n] + max((path[p] for p in preds[n]), default=0.0)
    return max(spread, max(path.values()))


def _horizon(problem: Problem, incumbent: Schedule | None) -> float:
    """The MILP's big-M: no start of a plan worth having lies beyond it."""
    g = problem.graph
    total = sum(max(n.cost_ms.values()) for n in g.nodes)
    total += sum(max([g.transfer_ms(e, a, b) for a in g.devices for b in g.devices if (a, b) in g.links] + [0.0])
                 for e in g.edges)
    bound = total
    if problem.slo_ms is not None:
        bound = min(bound, problem.slo_ms)
    if problem.mode == "latency" and incumbent is not None and violation(incumbent, problem.slo_ms,
                                                                         problem.memory_budget_mb) == 0:
        bound = min(bound, incumbent.makespan)
    return bound * (1 + 1e-7) + 1e-7


def plan_partition(problem: Problem, solver: str = "auto", time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Plan:
    """The plan of `problem` by `solver` (auto, milp, heuristic). Raises Infeasible when no
    plan meets the SLO and the budgets (proven by the MILP, or: none found by the heuristic)."""
    if solver not in ("auto", "milp", "heuristic"):
        raise PartitionError(f"solver must be auto, milp or heuristic, got {solver!r}")
    began = time.perf_counter()
    ev = Evaluator(problem.graph)
    heuristic = Heuristic(problem, ev)
    assignment, order, sched = heuristic.solve()
    used, bound = "heuristic", lower_bound(problem)
    exact = solver == "milp" or (solver == "auto" and len(problem.graph.nodes) <= EXACT_MAX_NODES)
    feasible = violation(sched, problem.slo_ms, problem.memory_budget_mb) == 0
    if exact:
        from cellserve.plan.partition_milp import solve

        result = solve(problem, (assignment, order) if feasible else None, time_limit_s,
                       _horizon(problem, sched if feasible else None))
        if result.assignment is None:
            if result.status == "infeasible":
                raise Infeasible(_why_infeasible(problem, sched, proven=True))
        else:
            milp_sched = ev.run(result.assignment, result.order)
            if not feasible or not better(heuristic.key(sched), heuristic.key(milp_sched)):
                assignment, order, sched, feasible = result.assignment, result.order, milp_sched, True
                used = "milp"
            bound = max(bound, result.bound)
            if result.status == "optimal":  # proven: no plan beats the one kept (ties go to the MILP's)
                bound = max(bound, primary(problem.mode, sched, problem.memory_device))
    if not feasible:
        raise Infeasible(_why_infeasible(problem, sched, proven=False))
    value = primary(problem.mode, sched, problem.memory_device)
    gap = 0.0 if value <= 1e-12 else max(0.0, (value - bound) / value)
    g = problem.graph
    return Plan(
        mode=problem.mode, assignment={n: assignment[n] for n in g.node_ids()},
        order={d: list(order.get(d, [])) for d in g.devices}, makespan_ms=sched.makespan,
        memory_mb=dict(sched.memory), busy_ms=dict(sched.busy),
        link_ms={f"{a}->{b}": v for (a, b), v in sched.link.items()},
        throughput_rps=sched.throughput_rps, start_ms=dict(sched.start),
        objective=objective_name(problem.mode, problem.memory_device), objective_value=value,
        bound=min(bound, value), solver=used, gap=gap if gap > 1e-9 else 0.0,
        solve_s=time.perf_counter() - began, slo_ms=problem.slo_ms, memory_device=problem.memory_device,
        memory_budget_mb=dict(problem.memory_budget_mb), source=dict(g.source))


def _why_infeasible(problem: Problem, best: Schedule, proven: bool) -> str:
    what = []
    if problem.slo_ms is not None:
        what.append(f"makespan <= slo_ms {problem.slo_ms:g}")
    what += [f"memory on {d} <= {mb:g} MB" for d, mb in problem.memory_budget_mb.items()]
    head = ("no plan meets " if proven else "the heuristic found no plan meeting ") + " and ".join(what)
    got = [f"makespan {best.makespan:.6g} ms"] + [f"{d} {best.memory[d]:.6g} MB" for d in problem.memory_budget_mb]
    return f"{head} (the best found: {', '.join(got)})" + ("" if proven else "; try --solver milp")
