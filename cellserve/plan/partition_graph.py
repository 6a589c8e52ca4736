"""What the partition planner reads and writes, as typed data: a graph of one request's work
(nodes with a cost and a memory per device, edges with the megabytes they carry, links
between devices) and a plan (each node's device, each device's order, the figures the plan
predicts).

Contract (docs/partition.md): a node runs on one device, in that device's order; a device runs
one node at a time; a node starts when its device is free and every input has arrived; an
edge between nodes on different devices a, b delivers its data links[a->b].latency_ms +
mb * links[a->b].ms_per_mb after its source finishes (on one device: at once). A node may
forbid a device by leaving it out of `cost_ms`. Figures are milliseconds and megabytes
(10^6 bytes). The JSON parsers and writers are in plan/partition_io.py.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

SCHEMA_VERSION = 1
MODES = ("latency", "memory", "throughput")
SOLVERS = ("milp", "exhaustive", "heuristic")


class PartitionError(ValueError):
    """A graph, plan or request the partition planner cannot use; the message names the field."""


class Infeasible(Exception):
    """No plan meets the constraints (memory budgets, the SLO); the message says which."""


@dataclass(frozen=True)
class Link:
    latency_ms: float
    ms_per_mb: float

    def transfer_ms(self, mb: float) -> float:
        return self.latency_ms + mb * self.ms_per_mb


@dataclass(frozen=True)
class Node:
    id: str
    cost_ms: dict[str, float]  # device -> ms of this node there; a device left out is forbidden
    memory_mb: dict[str, float]  # device -> MB it holds there (a device left out: 0)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    mb: float


@dataclass(frozen=True)
class Graph:
    """A validated DAG (plan/partition_io.py's `parse_graph` makes one from JSON and refuses
    anything else). `slo_ms` and `memory_budget_mb` are defaults the CLI's flags override;
    `source` says where the figures came from (a model and its profiles), for the reader."""

    devices: tuple[str, ...]
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    links: dict[tuple[str, str], Link]
    slo_ms: float | None = None
    memory_budget_mb: dict[str, float] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    def transfer_ms(self, edge: Edge, src_dev: str, dst_dev: str) -> float:
        """When the data of `edge` arrives after its source finishes, the source on src_dev and
        the destination on dst_dev (0 on one device)."""
        return 0.0 if src_dev == dst_dev else self.links[(src_dev, dst_dev)].transfer_ms(edge.mb)

    def topological_order(self) -> list[str]:
        """Node ids, every edge's source before its destination; among ready nodes the one
        listed first in `nodes` (so the result is deterministic)."""
        indeg = {n.id: 0 for n in self.nodes}
        succ: dict[str, list[str]] = {n.id: [] for n in self.nodes}
        for e in self.edges:
            indeg[e.dst] += 1
            succ[e.src].append(e.dst)
        position = {n.id: i for i, n in enumerate(self.nodes)}
        ready = [(position[n], n) for n, k in indeg.items() if k == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            _, n = heapq.heappop(ready)
            out.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    heapq.heappush(ready, (position[m], m))
        return out


@dataclass(frozen=True)
class Problem:
    """A graph and what to plan it for.

    latency: minimise the makespan (meeting `slo_ms` if given);
    memory: minimise the memory on `memory_device`, subject to makespan <= slo_ms;
    throughput: minimise the bottleneck's busy time per request (the busiest device's sum of
    node costs, or the busiest link's sum of mb * ms_per_mb), subject to makespan <= slo_ms
    if given; requests/s = 1000 / that.
    Every mode keeps each device's memory within `memory_budget_mb`, and breaks ties on the
    primary objective by the lower makespan."""

    graph: Graph
    mode: str
    slo_ms: float | None = None
    memory_budget_mb: dict[str, float] = field(default_factory=dict)
    memory_device: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise PartitionError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "memory":
            if self.slo_ms is None:
                raise PartitionError("memory mode needs an SLO (--slo-ms, or the graph's slo_ms)")
            if self.memory_device not in self.graph.devices:
                raise PartitionError(f"--minimise-memory-on {self.memory_device!r} is not a device of the graph "
                                     f"(devices: {', '.join(self.graph.devices)})")
        if self.slo_ms is not None and not self.slo_ms > 0:
            raise PartitionError(f"slo_ms must be > 0, got {self.slo_ms!r}")
        for dev, mb in self.memory_budget_mb.items():
            if dev not in self.graph.devices:
                raise PartitionError(f"memory budget for {dev!r}, which is not a device of the graph "
                                     f"(devices: {', '.join(self.graph.devices)})")
            if not mb >= 0:
                raise PartitionError(f"memory budget for {dev!r} must be >= 0 MB, got {mb!r}")


@dataclass(frozen=True)
class Plan:
    """A partition and what it predicts. `order[d]` lists the nodes on d in the order d runs
    them (every device appears, perhaps with []). `gap` is the relative optimality gap of the
    mode's primary objective: (value - lower bound) / value, 0 when proven optimal; for the
    heuristic an upper bound on the true gap, from `bound`."""

    mode: str
    assignment: dict[str, str]
    order: dict[str, list[str]]
    makespan_ms: float
    memory_mb: dict[str, float]
    busy_ms: dict[str, float]  # device -> sum of its nodes' costs per request
    link_ms: dict[str, float]  # "a->b" -> sum of mb * ms_per_mb crossing it per request
    throughput_rps: float  # 1000 / max(busy_ms, link_ms)
    start_ms: dict[str, float]
    objective: str  # makespan_ms | memory_mb[DEV] | bottleneck_ms
    objective_value: float
    bound: float  # a lower bound on the objective
    solver: str
    gap: float
    solve_s: float
    slo_ms: float | None = None
    memory_device: str | None = None
    memory_budget_mb: dict[str, float] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
