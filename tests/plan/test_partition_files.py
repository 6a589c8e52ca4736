"""GRAPH and PLAN files: bad ones are refused naming the field; both round-trip; the checker
catches a tampered plan; the CLI writes checked plans and exits 2 on bad input, 1 when no plan
meets the SLO."""

from __future__ import annotations

import copy
import json

import pytest

from cellserve import cli
from cellserve.plan.partition import plan_partition
from cellserve.plan.partition_check import check_plan
from cellserve.plan.partition_graph import PartitionError, Problem
from cellserve.plan.partition_io import graph_to_dict, load_graph, load_plan, parse_graph, parse_plan, plan_to_dict
from helpers_partition import makespan, random_graph

GRAPH = {"devices": ["cpu", "gpu"],
         "nodes": [{"id": "embed", "cost_ms": {"cpu": 1.0, "gpu": 0.5}, "memory_mb": {"cpu": 40, "gpu": 40}},
                   {"id": "fwd", "cost_ms": {"cpu": 6.0, "gpu": 4.0}, "memory_mb": {"gpu": 8}},
                   {"id": "bwd", "cost_ms": {"cpu": 6.0, "gpu": 4.0}, "memory_mb": {"gpu": 8}},
                   {"id": "head", "cost_ms": {"cpu": 0.5}}],
         "edges": [{"src": "embed", "dst": "fwd", "mb": 0.1}, {"src": "embed", "dst": "bwd", "mb": 0.1},
                   {"src": "fwd", "dst": "head", "mb": 0.05}, {"src": "bwd", "dst": "head", "mb": 0.05}],
         "links": {"cpu->gpu": {"latency_ms": 0.1, "ms_per_mb": 1.0}, "gpu->cpu": {"latency_ms": 0.1, "ms_per_mb": 1.0}}}


def _set(d: dict, path: str, value):
    d = copy.deepcopy(d)
    keys = path.split(".")
    at = d
    for k in keys[:-1]:
        at = at[int(k)] if isinstance(at, list) else at[k]
    last = keys[-1]
    if value is _DELETE:
        del at[last]
    elif isinstance(at, list):
        at[int(last)] = value
    else:
        at[last] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path,value,message", [
    ("devices", [], "graph.devices is empty"),
    ("devices", ["cpu", "cpu"], "graph.devices lists a device twice"),
    ("devices", ["cpu", "a->b"], r"graph.devices\[1\] .* cannot contain '->'"),
    ("nodes", _DELETE, "graph.nodes is missing"),
    ("nodes.1.id", "embed", r"graph.nodes\[1\].id 'embed' is used by an earlier node"),
    ("nodes.1.cost_ms", {}, r"graph.nodes\[1\].cost_ms is empty"),
    ("nodes.1.cost_ms", {"gpu": -1}, r"graph.nodes\[1\].cost_ms\['gpu'\] must be >= 0, got -1"),
    ("nodes.1.cost_ms", {"tpu": 1}, r"graph.nodes\[1\].cost_ms has device 'tpu'"),
    ("nodes.0.memory_mb", {"gpu": "big"}, r"graph.nodes\[0\].memory_mb\['gpu'\] must be a finite number"),
    ("edges.0.src", "nowhere", r"graph.edges\[0\].src is 'nowhere', which no node"),
    ("edges.0.mb", -2, r"graph.edges\[0\].mb must be >= 0"),
    ("edges.0.dst", "embed", r"graph.edges\[0\] goes from 'embed' to itself"),
    ("edges.1", {"src": "embed", "dst": "fwd", "mb": 1}, r"graph.edges\[1\] repeats the edge"),
    ("edges.3", {"src": "head", "dst": "embed", "mb": 1}, "graph.edges form a cycle"),
    ("links", {"cpu->gpu": {"latency_ms": 0.1, "ms_per_mb": 1}}, "graph.links lacks 'gpu->cpu'"),
    ("links.cpu->gpu", {"latency_ms": 0.1}, r"graph.links\['cpu->gpu'\].ms_per_mb is missing"),
    ("links", {"cpu-gpu": {"latency_ms": 0, "ms_per_mb": 0}}, "graph.links has key 'cpu-gpu'"),
    ("slo_ms", 0, "graph.slo_ms must be > 0"),
    ("schema_version", 9, "graph.schema_version is 9"),
])
def test_bad_graphs_are_refused_naming_the_field(path, value, message):
    if path.startswith("links.cpu->gpu"):
        bad = copy.deepcopy(GRAPH)
        bad["links"]["cpu->gpu"] = value
    else:
        bad = _set(GRAPH, path, value)
    with pytest.raises(PartitionError, match=message):
        parse_graph(bad)


def test_graph_and_plan_round_trip(tmp_path):
    g = parse_graph(GRAPH)
    assert parse_graph(json.loads(json.dumps(graph_to_dict(g)))) == g
    for mode in ("latency", "memory", "throughput"):
        problem = Problem(g, mode, 20.0, {"gpu": 100}, "gpu" if mode == "memory" else None)
        plan = plan_partition(problem)
        assert parse_plan(json.loads(json.dumps(plan_to_dict(plan)))) == plan


def test_a_node_may_forbid_a_device():
    plan = plan_partition(Problem(parse_graph(GRAPH), "latency"))
    assert plan.assignment["head"] == "cpu"


@pytest.mark.parametrize("field,value,message", [
    ("makespan_ms", 1.0, "makespan_ms is 1.0"),
    ("memory_mb", {"cpu": 0.0, "gpu": 0.0}, "memory_mb"),
    ("gap", 2.0, "gap is 2.0"),
])
def test_the_checker_catches_a_tampered_plan(field, value, message):
    g = random_graph(11, 7)
    problem = Problem(g, "latency")
    d = plan_to_dict(plan_partition(problem))
    d[field] = value
    assert any(message in p for p in check_plan(parse_plan(d), problem))


def test_the_checker_catches_an_order_against_the_edges():
    g = parse_graph(GRAPH)
    problem = Problem(g, "latency")
    d = plan_to_dict(plan_partition(problem))
    d["assignment"] = {"embed": "cpu", "fwd": "cpu", "bwd": "cpu", "head": "cpu"}
    d["order"] = {"cpu": ["head", "embed", "fwd", "bwd"], "gpu": []}
    assert any("cycle" in p for p in check_plan(parse_plan(d), problem))
    assert makespan(g, d["assignment"], d["order"]) is None


def test_bad_plans_and_unreadable_files(tmp_path):
    with pytest.raises(PartitionError, match="plan.solver must be one of"):
        parse_plan({"assignment": {}, "order": {}, "makespan_ms": 1, "memory_mb": {}, "solver": "guess", "gap": 0})
    with pytest.raises(PartitionError, match="plan.gap is missing"):
        parse_plan({"assignment": {}, "order": {}, "makespan_ms": 1, "memory_mb": {}, "solver": "milp"})
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(PartitionError, match="graph file .*x.json' is not JSON"):
        load_graph(tmp_path / "x.json")
    with pytest.raises(PartitionError, match="cannot read plan file"):
        load_plan(tmp_path / "missing.json")


def _main(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:
        return exc.code


def test_cli_round_trip(tmp_path, capsys):
    (tmp_path / "g.json").write_text(json.dumps(GRAPH))
    for mode in ("latency", "memory", "throughput"):
        out = tmp_path / f"{mode}.json"
        code = _main("plan", "partition", "--graph", str(tmp_path / "g.json"), "--mode", mode, "--slo-ms", "20",
                     "--device-memory", "gpu=100", "--json", str(out))
        assert code == 0, capsys.readouterr().err
        plan = load_plan(out)
        problem = Problem(load_graph(tmp_path / "g.json"), mode, 20.0, {"gpu": 100.0},
                          "gpu" if mode == "memory" else None)
        assert check_plan(plan, problem) == [] and plan.solver == "milp"
    assert "wrote" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    g = tmp_path / "g.json"
    g.write_text(json.dumps(_set(GRAPH, "edges.0.mb", -1)))
    assert _main("plan", "partition", "--graph", str(g), "--mode", "latency", "--json", str(tmp_path / "p.json")) == 2
    assert "graph.edges[0].mb must be >= 0" in capsys.readouterr().err
    g.write_text(json.dumps(GRAPH))
    assert _main("plan", "partition", "--graph", str(g), "--mode", "memory", "--json", str(tmp_path / "p.json")) == 2
    assert "memory mode needs an SLO" in capsys.readouterr().err
    assert _main("plan", "partition", "--graph", str(g), "--mode", "memory", "--slo-ms", "9", "--minimise-memory-on",
                 "tpu", "--json", str(tmp_path / "p.json")) == 2
    assert "'tpu' is not a device of the graph" in capsys.readouterr().err
    assert _main("plan", "partition", "--graph", str(g), "--mode", "latency", "--device-memory", "gpu",
                 "--json", str(tmp_path / "p.json")) == 2
    assert "DEVICE=MB" in capsys.readouterr().err
    assert _main("plan", "partition", "--graph", str(g), "--mode", "latency", "--slo-ms", "0.1",
                 "--json", str(tmp_path / "p.json")) == 1
    assert "no plan meets makespan <= slo_ms 0.1" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
