"""The partition planner's files as JSON: GRAPH (read, and written by `--write-graph`) and
PLAN (written, and read back). Each parser refuses a broken file with a PartitionError naming
the field (`graph.nodes[2].cost_ms['gpu'] must be >= 0, got -1`); each `*_to_dict` writes what
the matching parser reads. Formats: docs/partition.md. The field helpers are the profile
parser's (plan/profile.py), so every planner file reads alike.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from cellserve.plan.partition_graph import (MODES, SCHEMA_VERSION, SOLVERS, Edge, Graph, Link, Node, PartitionError,
                                            Plan)
from cellserve.plan.profile import ProfileError, _get, _num, _obj, _str
from cellserve.plan import json_io

read_json = functools.partial(json_io.read_json, error=PartitionError)
write_json = json_io.write_json
_version = functools.partial(json_io.check_version, version=SCHEMA_VERSION, error=PartitionError)
_list = functools.partial(json_io.as_list, error=PartitionError)


def _errors(parse):
    """The profile helpers raise ProfileError; these parsers raise PartitionError."""
    @functools.wraps(parse)
    def wrapped(*args):
        try:
            return parse(*args)
        except ProfileError as exc:
            raise PartitionError(str(exc)) from None
    return wrapped


def _per_device(x: object, where: str, devices, positive: bool = False) -> dict[str, float]:
    d = _obj(x, where)
    for k in d:
        if k not in devices:
            raise PartitionError(f"{where} has device {k!r}, which graph.devices does not list ({', '.join(devices)})")
    return {k: _num(v, f"{where}[{k!r}]", positive) for k, v in d.items()}


# ---- GRAPH ----

@_errors
def parse_graph(x: object) -> Graph:
    g = _obj(x, "graph")
    _version(g, "graph")
    devices = _list(_get(g, "devices", "graph"), "graph.devices")
    if not devices:
        raise PartitionError("graph.devices is empty")
    for i, dev in enumerate(devices):
        if "->" in _str(dev, f"graph.devices[{i}]"):
            raise PartitionError(f"graph.devices[{i}] is {dev!r}; a device name cannot contain '->'")
    if len(set(devices)) < len(devices):
        raise PartitionError(f"graph.devices lists a device twice: {devices}")
    nodes, seen = [], set()
    raw_nodes = _list(_get(g, "nodes", "graph"), "graph.nodes")
    if not raw_nodes:
        raise PartitionError("graph.nodes is empty")
    for i, raw in enumerate(raw_nodes):
        where = f"graph.nodes[{i}]"
        raw = _obj(raw, where)
        nid = _str(_get(raw, "id", where), f"{where}.id")
        if nid in seen:
            raise PartitionError(f"{where}.id {nid!r} is used by an earlier node")
        seen.add(nid)
        cost = _per_device(_get(raw, "cost_ms", where), f"{where}.cost_ms", devices)
        if not cost:
            raise PartitionError(f"{where}.cost_ms is empty: node {nid!r} may run on no device")
        memory = _per_device(raw.get("memory_mb", {}), f"{where}.memory_mb", devices)
        nodes.append(Node(nid, cost, memory))
    edges, pairs = [], set()
    for i, raw in enumerate(_list(g.get("edges", []), "graph.edges")):
        where = f"graph.edges[{i}]"
        raw = _obj(raw, where)
        src, dst = (_str(_get(raw, k, where), f"{where}.{k}") for k in ("src", "dst"))
        for k, v in (("src", src), ("dst", dst)):
            if v not in seen:
                raise PartitionError(f"{where}.{k} is {v!r}, which no node of graph.nodes has as id")
        if src == dst:
            raise PartitionError(f"{where} goes from {src!r} to itself")
        if (src, dst) in pairs:
            raise PartitionError(f"{where} repeats the edge {src!r} -> {dst!r}")
        pairs.add((src, dst))
        edges.append(Edge(src, dst, _num(_get(raw, "mb", where), f"{where}.mb")))
    links = {}
    for key, raw in _obj(g.get("links", {}), "graph.links").items():
        where = f"graph.links[{key!r}]"
        a, arrow, b = key.partition("->")
        if not arrow or a not in devices or b not in devices or a == b:
            raise PartitionError(f"graph.links has key {key!r}; keys are 'SRC->DST', two different devices of "
                                 f"graph.devices")
        raw = _obj(raw, where)
        links[(a, b)] = Link(_num(_get(raw, "latency_ms", where), f"{where}.latency_ms"),
                             _num(_get(raw, "ms_per_mb", where), f"{where}.ms_per_mb"))
    by_id = {n.id: n for n in nodes}
    for i, e in enumerate(edges):  # a link the edge might cross must be given
        for a in by_id[e.src].cost_ms:
            for b in by_id[e.dst].cost_ms:
                if a != b and (a, b) not in links:
                    raise PartitionError(f"graph.links lacks '{a}->{b}', which graph.edges[{i}] ({e.src!r} -> "
                                         f"{e.dst!r}) may cross")
    slo = g.get("slo_ms")
    graph = Graph(tuple(devices), tuple(nodes), tuple(edges), links,
                  None if slo is None else _num(slo, "graph.slo_ms", positive=True),
                  _per_device(g.get("memory_budget_mb", {}), "graph.memory_budget_mb", devices),
                  _obj(g.get("source", {}), "graph.source"))
    order = graph.topological_order()
    if len(order) < len(nodes):
        stuck = sorted(set(seen) - set(order))
        raise PartitionError(f"graph.edges form a cycle through nodes {stuck[:8]}; the graph must be acyclic")
    return graph


def load_graph(path: str | Path) -> Graph:
    d = read_json(path, "graph file")
    try:
        return parse_graph(d)
    except PartitionError as exc:
        raise PartitionError(f"graph file {str(path)!r}: {exc}") from None


def graph_to_dict(g: Graph) -> dict:
    d = {"schema_version": SCHEMA_VERSION, "devices": list(g.devices),
         "nodes": [{"id": n.id, "cost_ms": dict(n.cost_ms), "memory_mb": dict(n.memory_mb)} for n in g.nodes],
         "edges": [{"src": e.src, "dst": e.dst, "mb": e.mb} for e in g.edges],
         "links": {f"{a}->{b}": {"latency_ms": l.latency_ms, "ms_per_mb": l.ms_per_mb} for (a, b), l in g.links.items()}}
    if g.slo_ms is not None:
        d["slo_ms"] = g.slo_ms
    if g.memory_budget_mb:
        d["memory_budget_mb"] = dict(g.memory_budget_mb)
    if g.source:
        d["source"] = g.source
    return d


# ---- PLAN ----

def plan_to_dict(p: Plan) -> dict:
    return {"schema_version": p.schema_version, "mode": p.mode, "assignment": p.assignment, "order": p.order,
            "makespan_ms": p.makespan_ms, "memory_mb": p.memory_mb, "solver": p.solver, "gap": p.gap,
            "objective": p.objective, "objective_value": p.objective_value, "bound": p.bound,
            "throughput_rps": None if math.isinf(p.throughput_rps) else p.throughput_rps,
            "busy_ms": p.busy_ms, "link_ms": p.link_ms, "start_ms": p.start_ms, "slo_ms": p.slo_ms,
            "minimise_memory_on": p.memory_device, "memory_budget_mb": p.memory_budget_mb,
            "solve_s": p.solve_s, "source": p.source}


@_errors
def parse_plan(x: object) -> Plan:
    """A plan as written by plan_to_dict; only the issue's fields are required (assignment,
    order, makespan_ms, memory_mb, solver, gap), the rest default."""
    d = _obj(x, "plan")
    _version(d, "plan")
    mode = d.get("mode", "latency")
    if mode not in MODES:
        raise PartitionError(f"plan.mode must be one of {', '.join(MODES)}, got {mode!r}")
    assignment = {_str(k, "plan.assignment key"): _str(v, f"plan.assignment[{k!r}]")
                  for k, v in _obj(_get(d, "assignment", "plan"), "plan.assignment").items()}
    order = {}
    for dev, nodes in _obj(_get(d, "order", "plan"), "plan.order").items():
        order[dev] = [_str(n, f"plan.order[{dev!r}][{i}]") for i, n in enumerate(_list(nodes, f"plan.order[{dev!r}]"))]
    solver = _get(d, "solver", "plan")
    if solver not in SOLVERS:
        raise PartitionError(f"plan.solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    makespan = _num(_get(d, "makespan_ms", "plan"), "plan.makespan_ms")
    memory = {_str(k, "plan.memory_mb key"): _num(v, f"plan.memory_mb[{k!r}]")
              for k, v in _obj(_get(d, "memory_mb", "plan"), "plan.memory_mb").items()}
    throughput = d.get("throughput_rps")

    def floats(key: str) -> dict[str, float]:
        return {str(k): _num(v, f"plan.{key}[{k!r}]") for k, v in _obj(d.get(key, {}), f"plan.{key}").items()}

    slo = d.get("slo_ms")
    return Plan(mode=mode, assignment=assignment, order=order, makespan_ms=makespan, memory_mb=memory,
                busy_ms=floats("busy_ms"), link_ms=floats("link_ms"),
                throughput_rps=float("inf") if throughput is None else _num(throughput, "plan.throughput_rps"),
                start_ms=floats("start_ms"), objective=str(d.get("objective", "makespan_ms")),
                objective_value=_num(d.get("objective_value", makespan), "plan.objective_value"),
                bound=_num(d.get("bound", 0.0), "plan.bound"), solver=solver,
                gap=_num(_get(d, "gap", "plan"), "plan.gap"), solve_s=_num(d.get("solve_s", 0.0), "plan.solve_s"),
                slo_ms=None if slo is None else _num(slo, "plan.slo_ms", positive=True),
                memory_device=d.get("minimise_memory_on"), memory_budget_mb=floats("memory_budget_mb"),
                source=_obj(d.get("source", {}), "plan.source"))


def load_plan(path: str | Path) -> Plan:
    d = read_json(path, "plan file")
    try:
        return parse_plan(d)
    except PartitionError as exc:
        raise PartitionError(f"plan file {str(path)!r}: {exc}") from None
