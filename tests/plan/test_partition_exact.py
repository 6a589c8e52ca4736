"""The exact mode (MILP through HiGHS) against a brute force over every assignment and every
order (tests/plan/helpers_partition.py, written apart from the planner), on seeded random DAGs
of up to 8 nodes, in every mode; the makespan a plan reports is the independent evaluator's."""

from __future__ import annotations

import pytest

from cellserve.plan.partition import plan_partition
from cellserve.plan.partition_check import check_plan
from cellserve.plan.partition_graph import Infeasible, Problem
from helpers_partition import brute_force, makespan, memory, random_graph

CASES = [(seed, 3 + seed % 6, ("cpu", "gpu")) for seed in range(10)] + \
        [(100 + seed, 3 + seed % 4, ("cpu", "gpu", "npu")) for seed in range(4)]
MORE = [(1000 + seed, 4 + seed % 5, ("cpu", "gpu")) for seed in range(40)]


def _slo(graph) -> float:
    """An SLO that binds: 1.2x the best makespan (brute force)."""
    return 1.2 * brute_force(graph, "latency")[0]


def _agrees(graph, mode, slo=None, budgets=None):
    budgets = budgets or {}
    problem = Problem(graph, mode, slo, budgets, "gpu" if mode == "memory" else None)
    best = brute_force(graph, mode, slo, budgets, "gpu")
    if best is None:
        with pytest.raises(Infeasible):
            plan_partition(problem, "milp")
        return
    plan = plan_partition(problem, "milp")
    assert plan.solver == "milp" and plan.gap == 0.0
    assert plan.objective_value == pytest.approx(best[0], rel=1e-6, abs=1e-6)
    assert plan.makespan_ms == pytest.approx(best[1], rel=1e-6, abs=1e-6)  # ties broken by the makespan
    assert makespan(graph, plan.assignment, plan.order) == pytest.approx(plan.makespan_ms, rel=1e-9, abs=1e-9)
    assert memory(graph, plan.assignment) == pytest.approx(plan.memory_mb)
    assert check_plan(plan, problem) == []


@pytest.mark.parametrize("seed,n,devices", CASES)
def test_latency_mode_is_the_brute_force_optimum(seed, n, devices):
    _agrees(random_graph(seed, n, devices), "latency")


@pytest.mark.parametrize("seed,n,devices", CASES)
def test_memory_mode_is_the_least_gpu_memory_within_the_slo(seed, n, devices):
    g = random_graph(seed, n, devices)
    _agrees(g, "memory", _slo(g))


@pytest.mark.parametrize("seed,n,devices", CASES)
def test_throughput_mode_is_the_least_bottleneck_within_the_slo(seed, n, devices):
    g = random_graph(seed, n, devices)
    _agrees(g, "throughput", _slo(g))
    _agrees(g, "throughput")


@pytest.mark.parametrize("seed,n,devices", CASES[:8])
def test_memory_budgets_are_kept_in_every_mode(seed, n, devices):
    g = random_graph(seed, n, devices)
    budget = {"gpu": 0.4 * sum(node.memory_mb["gpu"] for node in g.nodes)}
    for mode in ("latency", "throughput", "memory"):
        _agrees(g, mode, _slo(g) if mode == "memory" else None, budget)


def test_an_slo_below_every_plan_is_infeasible():
    g = random_graph(3, 6)
    best = brute_force(g, "latency")[0]
    for mode in ("latency", "memory", "throughput"):
        with pytest.raises(Infeasible, match="no plan meets makespan <= slo_ms"):
            plan_partition(Problem(g, mode, 0.99 * best, {}, "gpu" if mode == "memory" else None), "milp")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["latency", "memory", "throughput"])
def test_exact_on_forty_more_dags(mode):
    for seed, n, devices in MORE:
        g = random_graph(seed, n, devices)
        _agrees(g, mode, None if mode == "latency" else _slo(g))
