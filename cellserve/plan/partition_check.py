"""An independent check of a partition plan against its graph and problem, run on every plan
before it is written.

Written apart from the evaluator and the solvers (it shares only the data classes): it
re-derives each node's start by recursion over "the node before me on my device" and "my
inputs" (the evaluator walks the devices' queues round by round), and checks every rule
docs/partition.md states and every figure the plan reports. `check_plan` returns the problems
found, each naming the node, device or field; [] is a sound plan.
"""

from __future__ import annotations

import math
import sys

from cellserve.plan.partition_graph import Graph, Plan, Problem

REL = 1e-6


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b))


def _starts(graph: Graph, plan: Plan) -> dict[str, float] | str:
    """Each node's earliest start under the plan, or why there is none."""
    before = {}
    for nodes in plan.order.values():
        for prev, n in zip(nodes, nodes[1:]):
            before[n] = prev
    inputs: dict[str, list] = {n.id: [] for n in graph.nodes}
    for e in graph.edges:
        inputs[e.dst].append(e)
    cost = {n.id: n.cost_ms[plan.assignment[n.id]] for n in graph.nodes}
    start: dict[str, float] = {}
    busy: set[str] = set()

    def visit(n: str) -> float:
        if n in start:
            return start[n]
        if n in busy:
            raise RecursionError(n)
        busy.add(n)
        t = 0.0
        if n in before:
            t = visit(before[n]) + cost[before[n]]
        for e in inputs[n]:
            a, b = plan.assignment[e.src], plan.assignment[n]
            delay = 0.0 if a == b else graph.links[(a, b)].latency_ms + e.mb * graph.links[(a, b)].ms_per_mb
            t = max(t, visit(e.src) + cost[e.src] + delay)
        busy.discard(n)
        start[n] = t
        return t

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * len(graph.nodes) + 100))
    try:
        for n in graph.nodes:
            visit(n.id)
    except RecursionError as exc:
        return f"the order and the edges wait on each other in a cycle (through node {exc.args[0]!r})"
    finally:
        sys.setrecursionlimit(limit)
    return start


def check_plan(plan: Plan, problem: Problem) -> list[str]:
    g = problem.graph
    problems: list[str] = []
    ids = {n.id: n for n in g.nodes}
    if set(plan.assignment) != set(ids):
        missing, extra = sorted(set(ids) - set(plan.assignment)), sorted(set(plan.assignment) - set(ids))
        problems.append(f"assignment lacks nodes {missing[:8]} or has unknown {extra[:8]}")
        return problems
    for n, dev in plan.assignment.items():
        if dev not in ids[n].cost_ms:
            problems.append(f"node {n!r} is on {dev!r}, which its cost_ms forbids")
    if set(plan.order) - set(g.devices):
        problems.append(f"order names devices the graph lacks: {sorted(set(plan.order) - set(g.devices))}")
    listed = [n for nodes in plan.order.values() for n in nodes]
    if sorted(listed) != sorted(ids):
        problems.append("order does not list every node exactly once")
    for dev, nodes in plan.order.items():
        for n in nodes:
            if plan.assignment.get(n) != dev:
                problems.append(f"node {n!r} is ordered on {dev!r} but assigned to {plan.assignment.get(n)!r}")
    if problems:
        return problems
    start = _starts(g, plan)
    if isinstance(start, str):
        return [start]
    cost = {n: ids[n].cost_ms[d] for n, d in plan.assignment.items()}
    makespan = max(start[n] + cost[n] for n in ids)
    if not _close(makespan, plan.makespan_ms):
        problems.append(f"makespan_ms is {plan.makespan_ms!r}; the plan's order gives {makespan!r}")
    for n in ids:
        if n in plan.start_ms and not _close(start[n], plan.start_ms[n]):
            problems.append(f"start_ms[{n!r}] is {plan.start_ms[n]!r}; the plan's order gives {start[n]!r}")
    memory = {d: sum(ids[n].memory_mb.get(d, 0.0) for n, dd in plan.assignment.items() if dd == d) for d in g.devices}
    busy = {d: sum(cost[n] for n, dd in plan.assignment.items() if dd == d) for d in g.devices}
    for d in g.devices:
        if not _close(memory[d], plan.memory_mb.get(d, math.nan)):
            problems.append(f"memory_mb[{d!r}] is {plan.memory_mb.get(d)!r}; the assignment holds {memory[d]!r}")
        if d in plan.busy_ms and not _close(busy[d], plan.busy_ms[d]):
            problems.append(f"busy_ms[{d!r}] is {plan.busy_ms[d]!r}; the assignment gives {busy[d]!r}")
    links = {f"{a}->{b}": 0.0 for (a, b) in g.links}
    for e in g.edges:
        a, b = plan.assignment[e.src], plan.assignment[e.dst]
        if a != b:
            links[f"{a}->{b}"] += e.mb * g.links[(a, b)].ms_per_mb
    bottleneck = max([*busy.values(), *links.values()])
    rps = math.inf if bottleneck <= 0 else 1000.0 / bottleneck
    if not (math.isinf(rps) and math.isinf(plan.throughput_rps)) and not _close(rps, plan.throughput_rps):
        problems.append(f"throughput_rps is {plan.throughput_rps!r}; the assignment gives {rps!r}")
    if problem.slo_ms is not None and makespan > problem.slo_ms * (1 + REL):
        problems.append(f"makespan {makespan:.6g} ms exceeds slo_ms {problem.slo_ms:g}")
    for d, limit in problem.memory_budget_mb.items():
        if memory[d] > limit * (1 + REL) + REL:
            problems.append(f"memory on {d!r} is {memory[d]:.6g} MB, over its budget {limit:g} MB")
    value = {"latency": makespan, "memory": memory.get(problem.memory_device or "", 0.0),
             "throughput": bottleneck}[problem.mode]
    if plan.mode != problem.mode:
        problems.append(f"mode is {plan.mode!r}, the problem's {problem.mode!r}")
    elif not _close(value, plan.objective_value):
        problems.append(f"objective_value is {plan.objective_value!r}; the plan gives {value!r}")
    if not 0.0 <= plan.gap <= 1.0:
        problems.append(f"gap is {plan.gap!r}, outside [0, 1]")
    if plan.bound > value * (1 + REL) + REL:
        problems.append(f"bound {plan.bound!r} is above the plan's objective {value!r}")
    return problems
