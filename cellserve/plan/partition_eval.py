"""The planner's evaluator: what a partition (assignment and per-device order) predicts.

Rules (docs/partition.md): a device runs its nodes one at a time in the given order; a node
starts at max(its device is free, every input has arrived); an input from a node on another
device arrives link latency + mb * ms_per_mb after that node finishes; the makespan is the
last finish. This is the earliest-start schedule of that order, so no schedule with the same
assignment and order finishes sooner. Throughput counts busy time per request: each device's
sum of node costs, each link's sum of mb * ms_per_mb (latency overlaps with other transfers);
the bottleneck is the largest, requests/s = 1000 / bottleneck.

The solvers call `Evaluator.run` many times, so it works on precomputed tables. The checker
(plan/partition_check.py) re-derives all of this separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from cellserve.plan.partition_graph import Graph, PartitionError


@dataclass(frozen=True)
class Schedule:
    start: dict[str, float]
    finish: dict[str, float]
    makespan: float
    busy: dict[str, float]
    memory: dict[str, float]
    link: dict[tuple[str, str], float]

    @property
    def bottleneck(self) -> float:
        return max([*self.busy.values(), *self.link.values(), 0.0])

    @property
    def throughput_rps(self) -> float:
        b = self.bottleneck
        return float("inf") if b <= 0 else 1000.0 / b


class Evaluator:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.ids = graph.node_ids()
        self.cost = {n.id: n.cost_ms for n in graph.nodes}
        self.mem = {n.id: n.memory_mb for n in graph.nodes}
        self.preds: dict[str, list[tuple[str, float]]] = {n: [] for n in self.ids}  # (src, mb)
        for e in graph.edges:
            self.preds[e.dst].append((e.src, e.mb))
        self.succ: dict[str, list[str]] = {n: [] for n in self.ids}
        for e in graph.edges:
            self.succ[e.src].append(e.dst)
        self.links = graph.links

    def run(self, assignment: dict[str, str], order: dict[str, list[str]]) -> Schedule:
        """The schedule of a complete partition. Raises PartitionError when a node is on a
        device it forbids, is missing or listed twice, or when the orders contradict the edges
        (a device would wait forever for a node queued behind it)."""
        g = self.graph
        placed = {}
        for dev, nodes in order.items():
            for n in nodes:
                if n in placed:
                    raise PartitionError(f"node {n!r} is in the order twice")
                placed[n] = dev
        for n in self.ids:
            dev = assignment.get(n)
            if dev is None:
                raise PartitionError(f"node {n!r} has no device")
            if dev not in self.cost[n]:
                raise PartitionError(f"node {n!r} is on {dev!r}, which its cost_ms forbids")
            if placed.get(n) != dev:
                raise PartitionError(f"node {n!r} is assigned to {dev!r} but ordered on {placed.get(n)!r}")
        if len(placed) != len(self.ids):
            raise PartitionError(f"the order lists unknown nodes {sorted(set(placed) - set(self.ids))}")
        # a node runs once its inputs are done and it heads its device's queue: count the
        # inputs each still waits for, and look at a device again whenever its head may run
        waiting = {n: len(self.preds[n]) for n in self.ids}
        succ, links, cost = self.succ, self.links, self.cost
        start: dict[str, float] = {}
        finish: dict[str, float] = {}
        heads = {d: 0 for d in order}
        free = {d: 0.0 for d in order}
        look = list(order)
        while look:
            dev = look.pop()
            nodes = order[dev]
            while heads[dev] < len(nodes) and waiting[nodes[heads[dev]]] == 0:
                n = nodes[heads[dev]]
                t = free[dev]
                for p, mb in self.preds[n]:
                    a = assignment[p]
                    if a == dev:
                        ready = finish[p]
                    else:
                        link = links[(a, dev)]
                        ready = finish[p] + link.latency_ms + mb * link.ms_per_mb
                    if ready > t:
                        t = ready
                start[n] = t
                finish[n] = free[dev] = t + cost[n][dev]
                heads[dev] += 1
                for m in succ[n]:
                    waiting[m] -= 1
                    if waiting[m] == 0 and assignment[m] != dev:
                        look.append(assignment[m])
        if len(finish) < len(self.ids):
            stuck = {d: nodes[heads[d]] for d, nodes in order.items() if heads[d] < len(nodes)}
            raise PartitionError(f"the order contradicts the edges: each device's next node waits for an "
                                 f"input queued behind another ({stuck})")
        busy = {d: sum(self.cost[n][d] for n in order.get(d, [])) for d in g.devices}
        memory = {d: sum(self.mem[n].get(d, 0.0) for n in order.get(d, [])) for d in g.devices}
        link = {pair: 0.0 for pair in g.links}
        for e in g.edges:
            a, b = assignment[e.src], assignment[e.dst]
            if a != b:
                link[(a, b)] += e.mb * g.links[(a, b)].ms_per_mb
        return Schedule(start, finish, max(finish.values(), default=0.0), busy, memory, link)


# ---- the modes' objectives, as every solver and the checker's caller reads them ----

TOL = 1e-6  # ms or MB: figures within this of a limit meet it


def primary(mode: str, schedule: Schedule, memory_device: str | None) -> float:
    """The figure the mode minimises: makespan (latency), the memory on `memory_device`
    (memory), the bottleneck's busy ms per request (throughput)."""
    if mode == "latency":
        return schedule.makespan
    if mode == "memory":
        return schedule.memory[memory_device]
    return schedule.bottleneck


def violation(schedule: Schedule, slo_ms: float | None, budgets: dict[str, float]) -> float:
    """How far a schedule is from meeting the SLO and the memory budgets (ms over plus MB
    over; 0 when it meets them all, to within TOL)."""
    over = 0.0
    if slo_ms is not None and schedule.makespan > slo_ms + TOL:
        over += schedule.makespan - slo_ms
    for dev, limit in budgets.items():
        if schedule.memory.get(dev, 0.0) > limit + TOL:
            over += schedule.memory[dev] - limit
    return over


def objective_name(mode: str, memory_device: str | None) -> str:
    return {"latency": "makespan_ms", "memory": f"memory_mb[{memory_device}]", "throughput": "bottleneck_ms"}[mode]
