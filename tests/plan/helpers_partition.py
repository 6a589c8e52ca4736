"""Test-only references for the partition planner, written apart from its code: random DAGs,
an independent evaluator (longest paths through the graph of data edges plus each device's
order as a chain) and a brute force over every assignment and every order on each device.

They share nothing with cellserve/plan/partition*.py but the Graph/Node/Edge/Link data
classes, so a bug in the planner's evaluator or solvers shows up as a disagreement here.
"""

from __future__ import annotations

import itertools
import random

from cellserve.plan.partition_graph import Edge, Graph, Link, Node


def random_graph(seed: int, n: int, devices=("cpu", "gpu"), edge_p: float = 0.35, forbid_p: float = 0.1) -> Graph:
    """A random DAG of `n` nodes (edges only from lower to higher index), costs 0.5-10 ms
    (some devices forbidden), memory 0-100 MB, edges 0-3 MB, links 0-1 ms + 0-2 ms/MB."""
    r = random.Random(seed)
    nodes = []
    for i in range(n):
        cost = {d: round(r.uniform(0.5, 10.0), 2) for d in devices if r.random() >= forbid_p}
        if not cost:
            cost = {r.choice(devices): round(r.uniform(0.5, 10.0), 2)}
        nodes.append(Node(f"n{i}", cost, {d: float(r.randint(0, 100)) for d in devices}))
    edges = [Edge(f"n{i}", f"n{j}", round(r.uniform(0.0, 3.0), 2))
             for i in range(n) for j in range(i + 1, n) if r.random() < edge_p]
    links = {(a, b): Link(round(r.uniform(0.0, 1.0), 2), round(r.uniform(0.0, 2.0), 2))
             for a in devices for b in devices if a != b}
    return Graph(tuple(devices), tuple(nodes), tuple(edges), links)


def makespan(graph: Graph, assignment: dict[str, str], order: dict[str, list[str]]) -> float | None:
    """The finish of the last node when every node starts as early as its inputs and the node
    before it on its device allow, computed as the longest path in the DAG of data edges
    (weighted by the node's cost plus the transfer) and order edges (weighted by the cost);
    None when the orders and edges form a cycle (no schedule exists)."""
    cost = {n.id: n.cost_ms[assignment[n.id]] for n in graph.nodes}
    arcs: dict[str, list[tuple[str, float]]] = {n.id: [] for n in graph.nodes}
    for e in graph.edges:
        a, b = assignment[e.src], assignment[e.dst]
        delay = 0.0 if a == b else graph.links[(a, b)].latency_ms + e.mb * graph.links[(a, b)].ms_per_mb
        arcs[e.src].append((e.dst, cost[e.src] + delay))
    for nodes in order.values():
        for u, v in zip(nodes, nodes[1:]):
            arcs[u].append((v, cost[u]))
    indeg = {n: 0 for n in arcs}
    for u in arcs:
        for v, _ in arcs[u]:
            indeg[v] += 1
    start = {n: 0.0 for n in arcs}
    queue = [n for n, k in indeg.items() if k == 0]
    seen = 0
    while queue:
        u = queue.pop()
        seen += 1
        for v, w in arcs[u]:
            start[v] = max(start[v], start[u] + w)
            indeg[v] -= 1
            if indeg[v] == 0:
                queue.append(v)
    if seen < len(arcs):
        return None
    return max(start[n] + cost[n] for n in arcs)


def _reach(graph: Graph) -> dict[str, set[str]]:
    succ: dict[str, set[str]] = {n.id: set() for n in graph.nodes}
    for e in graph.edges:
        succ[e.src].add(e.dst)
    out = {}

    def down(n):
        if n not in out:
            out[n] = set(succ[n]).union(*(down(m) | {m} for m in succ[n])) if succ[n] else set()
        return out[n]

    for n in succ:
        down(n)
    return out


def _extensions(nodes: list[str], reach: dict[str, set[str]]):
    """Every order of `nodes` in which no node comes after one it reaches."""
    if not nodes:
        yield []
        return
    for i, n in enumerate(nodes):
        rest = nodes[:i] + nodes[i + 1:]
        if any(n in reach[m] for m in rest):
            continue
        for tail in _extensions(rest, reach):
            yield [n] + tail


def all_plans(graph: Graph):
    """Every (assignment, order) pair that can run: each node on a device it allows, each
    device's nodes in every order the edges permit."""
    reach = _reach(graph)
    ids = [n.id for n in graph.nodes]
    for devs in itertools.product(*(sorted(n.cost_ms) for n in graph.nodes)):
        assignment = dict(zip(ids, devs))
        per_device = [list(_extensions([n for n in ids if assignment[n] == d], reach)) for d in graph.devices]
        for orders in itertools.product(*per_device):
            yield assignment, dict(zip(graph.devices, orders))


def memory(graph: Graph, assignment: dict[str, str]) -> dict[str, float]:
    out = {d: 0.0 for d in graph.devices}
    for n in graph.nodes:
        out[assignment[n.id]] += n.memory_mb.get(assignment[n.id], 0.0)
    return out


def bottleneck(graph: Graph, assignment: dict[str, str]) -> float:
    load = {d: 0.0 for d in graph.devices}
    for n in graph.nodes:
        load[assignment[n.id]] += n.cost_ms[assignment[n.id]]
    links = {k: 0.0 for k in graph.links}
    for e in graph.edges:
        a, b = assignment[e.src], assignment[e.dst]
        if a != b:
            links[(a, b)] += e.mb * graph.links[(a, b)].ms_per_mb
    return max([*load.values(), *links.values()])


def brute_force(graph: Graph, mode: str, slo_ms=None, budgets=None, memory_device=None):
    """(primary objective, makespan) of the best plan by enumeration, or None when none meets
    the SLO and budgets; ties on the objective go to the lower makespan."""
    budgets = budgets or {}
    best = None
    for assignment, order in all_plans(graph):
        mem = memory(graph, assignment)
        if any(mem[d] > mb + 1e-9 for d, mb in budgets.items()):
            continue
        span = makespan(graph, assignment, order)
        if span is None or (slo_ms is not None and span > slo_ms + 1e-9):
            continue
        value = {"latency": span, "memory": mem.get(memory_device, 0.0),
                 "throughput": bottleneck(graph, assignment)}[mode]
        if best is None or (value, span) < best:
            best = (value, span)
    return best
