"""`cellserve bench partition`: the partition planner's own figures (no partitioned execution).

1. Speed: a random layered DAG of `nodes` nodes (seeded) planned in each mode (the heuristic:
   beyond 20 nodes), wall and CPU seconds; the goal is under 2 s.
2. Quality: random DAGs of 8-16 nodes, the heuristic's objective over the exact MILP's.
3. The zoo, CPU+GPU, MODELLED: each model's graph from its CPU profile (measured on this
   machine) and a GPU profile modelled from it (plan/gpu_model.py); per model
   - latency mode against the GPU-only and CPU-only plans (the same planner with every node
     that can run there pinned to the one device);
   - memory mode: GPU memory against GPU-only, within an SLO of `slo_factor` x GPU-only's
     makespan;
   - throughput mode (same SLO): requests/s against both single devices.
Every plan is checked by plan/partition_check.py; `ok` is false when one fails or the speed
goal is missed.
"""

from __future__ import annotations

import random
import resource
import time

from cellserve.plan.partition import plan_partition
from cellserve.plan.partition_check import check_plan
from cellserve.plan.partition_graph import Edge, Graph, Infeasible, Link, Node, Problem

SPEED_GOAL_S = 2.0


def layered_graph(n: int, seed: int, devices=("cpu", "gpu")) -> Graph:
    """A random DAG shaped like a large model: each node reads 1-3 of the 12 before it; costs
    1-10 ms on the CPU and 0.3-3x that on the GPU; 0-50 MB; edges 0-4 MB over a 0.01 ms + 0.1
    ms/MB link."""
    r = random.Random(seed)
    nodes, edges = [], []
    for i in range(n):
        cpu = r.uniform(1.0, 10.0)
        nodes.append(Node(f"v{i}", {"cpu": round(cpu, 3), "gpu": round(cpu * r.uniform(0.3, 3.0), 3)},
                          {d: float(r.randint(0, 50)) for d in devices}))
        for j in sorted(r.sample(range(max(0, i - 12), i), min(i, r.randint(1, 3)))):
            edges.append(Edge(f"v{j}", f"v{i}", round(r.uniform(0.0, 4.0), 3)))
    links = {("cpu", "gpu"): Link(0.01, 0.1), ("gpu", "cpu"): Link(0.01, 0.1)}
    return Graph(tuple(devices), tuple(nodes), tuple(edges), links)


def random_dag(seed: int, n: int, devices=("cpu", "gpu")) -> Graph:
    """A small random DAG (edges from lower to higher index with probability 0.35), costs 0.5-10
    ms per device, 0-100 MB, edges 0-3 MB, links 0-1 ms + 0-2 ms/MB: for the quality check."""
    r = random.Random(seed)
    nodes = [Node(f"n{i}", {d: round(r.uniform(0.5, 10.0), 2) for d in devices},
                  {d: float(r.randint(0, 100)) for d in devices}) for i in range(n)]
    edges = [Edge(f"n{i}", f"n{j}", round(r.uniform(0.0, 3.0), 2))
             for i in range(n) for j in range(i + 1, n) if r.random() < 0.35]
    links = {(a, b): Link(round(r.uniform(0.0, 1.0), 2), round(r.uniform(0.0, 2.0), 2))
             for a in devices for b in devices if a != b}
    return Graph(tuple(devices), tuple(nodes), tuple(edges), links)


def _timed(problem: Problem, solver: str = "auto"):
    wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    plan = plan_partition(problem, solver)
    return plan, time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu


def speed(nodes: int, seed: int) -> dict:
    g = layered_graph(nodes, seed)
    lat, _, _ = _timed(Problem(g, "latency"))
    slo = 1.5 * lat.makespan_ms
    out = {"nodes": nodes, "edges": len(g.edges), "goal_s": SPEED_GOAL_S, "modes": {}}
    for mode in ("latency", "memory", "throughput"):
        problem = Problem(g, mode, None if mode == "latency" else slo, {}, "gpu" if mode == "memory" else None)
        plan, wall, cpu = _timed(problem)
        out["modes"][mode] = {"wall_s": wall, "cpu_s": cpu, "solver": plan.solver, "gap": plan.gap,
                              "objective": plan.objective, "value": plan.objective_value,
                              "checked": check_plan(plan, problem) == []}
    out["met"] = all(m["wall_s"] < SPEED_GOAL_S for m in out["modes"].values())
    return out


def quality(seed: int, count: int = 8) -> dict:
    ratios: dict[str, list[float]] = {"latency": [], "memory": [], "throughput": []}
    for k in range(count):
        g = random_dag(seed + k, 8 + k % 9)
        lat = plan_partition(Problem(g, "latency"), "heuristic")
        for mode in ratios:
            slo = None if mode == "latency" else 1.3 * lat.makespan_ms
            problem = Problem(g, mode, slo, {}, "gpu" if mode == "memory" else None)
            exact = plan_partition(problem, "milp")
            heur = plan_partition(problem, "heuristic")
            if exact.objective_value > 0:
                ratios[mode].append(heur.objective_value / exact.objective_value)
    return {mode: {"graphs": len(r), "mean": sum(r) / len(r) if r else None, "max": max(r, default=None)}
            for mode, r in ratios.items()}


def zoo_model(model, cpu_profile, gpu, length: int, slo_factor: float) -> dict:
    """The modelled CPU+GPU comparison of one model (see the module's docstring)."""
    from cellserve.graph.stacking import stack_layers
    from cellserve.plan.gpu_model import modelled_gpu_profile
    from cellserve.plan.partition_model import build_graph, pinned

    served = stack_layers(model) if cpu_profile.stack_layers else model
    gpu_profile = modelled_gpu_profile(served, cpu_profile, gpu)
    length = min(length, model.max_sequence_length)
    g = build_graph(model, {"cpu": cpu_profile, "gpu": gpu_profile}, length, gpu)
    row = {"model": model.name, "modelled": True, "gpu": gpu.name, "length_tokens": length, "nodes": len(g.nodes)}
    single = {}
    for dev in ("cpu", "gpu"):
        p = plan_partition(Problem(pinned(g, dev), "latency"))
        single[dev] = p
        row[f"{dev}_only"] = {"makespan_ms": p.makespan_ms, "gpu_memory_mb": p.memory_mb["gpu"],
                              "throughput_rps": p.throughput_rps}
    slo = slo_factor * single["gpu"].makespan_ms
    row["slo_ms"] = slo
    plans = {}
    for mode in ("latency", "memory", "throughput"):
        problem = Problem(g, mode, None if mode == "latency" else slo, {}, "gpu" if mode == "memory" else None)
        try:
            plans[mode] = p = plan_partition(problem)
        except Infeasible as exc:
            row[mode] = {"infeasible": str(exc)}
            continue
        row[mode] = {"makespan_ms": p.makespan_ms, "gpu_memory_mb": p.memory_mb["gpu"],
                     "throughput_rps": p.throughput_rps, "solver": p.solver, "gap": p.gap,
                     "on_gpu": p.order["gpu"], "checked": check_plan(p, problem) == []}
    gpu_only, cpu_only = single["gpu"], single["cpu"]
    if "latency" in plans:
        row["latency"]["vs_gpu_only_pct"] = _pct_lower(plans["latency"].makespan_ms, gpu_only.makespan_ms)
        row["latency"]["vs_cpu_only_pct"] = _pct_lower(plans["latency"].makespan_ms, cpu_only.makespan_ms)
    if "memory" in plans:
        row["memory"]["gpu_memory_saved_pct"] = _pct_lower(plans["memory"].memory_mb["gpu"], gpu_only.memory_mb["gpu"])
    if "throughput" in plans:
        t = plans["throughput"].throughput_rps
        row["throughput"]["vs_gpu_only_x"] = t / gpu_only.throughput_rps
        row["throughput"]["vs_cpu_only_x"] = t / cpu_only.throughput_rps
    return row


def _pct_lower(value: float, base: float) -> float | None:
    return None if base <= 0 else 100.0 * (base - value) / base


def run(profiles: dict, gpu_name: str, length: int, slo_factor: float, nodes: int, seed: int) -> dict:
    """`profiles`: {model name: (Model, CPU ModelProfile)}."""
    from cellserve.plan.gpu_model import gpu_class

    gpu = gpu_class(gpu_name)
    rows = [zoo_model(model, prof, gpu, length, slo_factor) for model, prof in profiles.values()]
    report = {"modelled": f"CPU profiles measured on this machine; GPU ({gpu.name}) and links modelled "
                          "(plan/gpu_model.py); every CPU+GPU figure is a prediction of the planner's model",
              "speed": speed(nodes, seed), "quality": quality(seed), "models": rows,
              "settings": {"gpu": gpu_name, "length_tokens": length, "slo_factor": slo_factor, "seed": seed}}
    checked = [r[m]["checked"] for r in rows for m in ("latency", "memory", "throughput") if "checked" in r[m]]
    checked += [m["checked"] for m in report["speed"]["modes"].values()]
    report["ok"] = all(checked) and report["speed"]["met"]
    from cellserve.plan.partition_report import table
    report["table"] = table(report)
    return report


def write_report(report: dict, path) -> None:
    from cellserve.plan.partition_report import write
    write(report, path)
