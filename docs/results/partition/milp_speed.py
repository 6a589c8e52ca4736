"""The exact partition solver on layered graphs of 20 and 26 nodes over three devices, latency
and memory modes, the SLO 1.2x the heuristic's makespan: each plan's objective, makespan, gap
and wall seconds (docs/partition.md, Solvers).
Usage: [LIMIT=S] python docs/results/partition/milp_speed.py"""
import os
import time

from cellserve.plan.partition import plan_partition
from cellserve.plan.partition_bench import layered_graph
from cellserve.plan.partition_graph import Problem

limit = float(os.environ.get("LIMIT", "30"))
for n in (20, 26):
    for seed in (3, 4):
        for mode in ("latency", "memory"):
            g = layered_graph(n, seed, devices=("cpu", "gpu", "cpu2"))
            slo = plan_partition(Problem(g, "latency"), "heuristic").makespan_ms * 1.2
            problem = Problem(g, mode, slo_ms=slo, memory_device="gpu" if mode == "memory" else None)
            t0 = time.perf_counter()
            p = plan_partition(problem, "milp", limit)
            print(f"{n} nodes seed {seed} {mode:8} {p.objective}={p.objective_value:.3f} makespan {p.makespan_ms:.3f} ms "
                  f"gap {p.gap:.4f} {time.perf_counter() - t0:.2f} s", flush=True)
