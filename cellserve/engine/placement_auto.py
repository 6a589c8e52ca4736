"""`--placement auto`: plan a partition at start, over this machine's CPU core groups.

For each model served, the partition graph of one request of AUTO_LENGTH tokens is built by
the planner's own builder (plan/partition_model.py) from a profile: the model's file among
`--placement-profiles` (a CPU profile from `cellserve profile`), else one timed here and now:
each cell type's lone-lane step and batched step of one lane, measured on its real kernel
(the best of a few runs), plain ops at a nominal NOMINAL_PLAIN_OP_S each (numpy on tiny
tensors). The graph's one CPU device becomes the core groups cpu0 .. cpuN-1
(`--placement-groups`, default 2 where the process has 2 cores or more): every node costs on
each group what the profile says (the groups are alike; a profile taken with more threads
than a group has prices its steps low), and a tensor between groups pays a modelled
GROUP_LINK (a thread hand-off, and a copy at memory bandwidth). The partition planner
(`--placement-mode`, latency by default) plans it; the plans of all models are merged.

Not here: GPUs (plan a CPU + GPU partition with `cellserve plan partition` and serve it with
`--placement PLAN.json`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np

from cellserve.engine.config import EngineConfig
from cellserve.graph.model import Model

AUTO_LENGTH = 25  # tokens of the request planned for: the benchmarks' mean (WMT-like lengths)
NOMINAL_PLAIN_OP_S = 5e-6
GROUP_LATENCY_MS = 0.02  # modelled: a batch handed to another executor's thread and back
GROUP_MS_PER_MB = 0.1  # modelled: a copy at 10 GB/s
_REPEATS = 5


@dataclass(frozen=True)
class AutoPlan:
    """The merged plans: `assignment` (node -> device) is what the engine reads; `plans` keeps
    each model's Plan (for logs and tests)."""

    assignment: dict[str, str]
    plans: dict[str, object]


def groups_for(config: EngineConfig) -> int:
    """The core groups --placement auto plans over: --placement-groups, at most one per core
    this process may use (a PlacementError otherwise), or two when there are two cores."""
    cores = len(os.sched_getaffinity(0))
    if config.placement_groups is not None:
        if config.placement_groups > cores:
            from cellserve.engine.placement import PlacementError

            raise PlacementError(f"--placement-groups {config.placement_groups}: more core groups than the "
                                 f"{cores} core(s) this process may use")
        return config.placement_groups
    return 2 if cores >= 2 else 1


def auto_plan(models: list[Model], config: EngineConfig) -> AutoPlan:
    from cellserve.engine.placement import PlacementError
    from cellserve.plan.partition import plan_partition
    from cellserve.plan.partition_graph import Infeasible, PartitionError, Problem
    from cellserve.plan.partition_model import build_graph

    profiles = _given_profiles(config)
    served = {m.name for m in models} | {m.name.rpartition(":")[0] for m in models}
    strays = sorted(set(profiles) - served)
    if strays:  # a profile that plans nothing is a mistake, not a default
        raise PlacementError(f"--placement-profiles: a profile of model(s) {strays}, which this server does not "
                             f"serve (it serves {sorted(m.name for m in models)})")
    devices = [f"cpu{i}" for i in range(groups_for(config))]
    assignment: dict[str, str] = {}
    plans = {}
    for model in models:
        # a server names its models NAME:VERSION; a profile names the model as `cellserve profile` did
        given = profiles.get(model.name) or profiles.get(model.name.rpartition(":")[0])
        profile = replace(given, model=model.name) if given is not None else timed_profile(model, config)
        length = min(AUTO_LENGTH, model.max_sequence_length)
        try:
            graph = over_groups(build_graph(model, {"cpu": profile}, length, None), devices)
            plan = plan_partition(Problem(graph, config.placement_mode), time_limit_s=10.0)
        except (PartitionError, Infeasible) as exc:
            raise PlacementError(f"--placement auto: planning model {model.name!r} failed: {exc}") from None
        plans[model.name] = plan
        assignment.update(plan.assignment)
    return AutoPlan(assignment, plans)


def _given_profiles(config: EngineConfig) -> dict:
    from cellserve.engine.placement import PlacementError
    from cellserve.plan.profile import ModelProfile, ProfileError

    out = {}
    for path in config.placement_profiles:
        try:
            p = ModelProfile.from_json(path)
        except (ProfileError, OSError) as exc:
            raise PlacementError(f"--placement-profiles: {exc}") from None
        if p.machine.device != "cpu":
            raise PlacementError(f"--placement-profiles: {path!r} is a profile for {p.machine.device!r}; "
                                 "--placement auto plans over CPU core groups from CPU profiles")
        if p.model in out:
            raise PlacementError(f"--placement-profiles: two profiles of model {p.model!r}")
        out[p.model] = p
    return out


def over_groups(graph, devices: list[str]):
    """The one-CPU graph with its CPU device split into the core groups `devices`."""
    from cellserve.plan.partition_graph import Graph, Link, Node

    model = graph.source.get("model")
    host = {f"{model}/input", f"{model}/output"}
    nodes = []
    for n in graph.nodes:
        if n.id in host:  # where requests arrive and leave: free, and on the first group
            nodes.append(Node(n.id, {devices[0]: 0.0}, {}))
            continue
        nodes.append(Node(n.id, {d: n.cost_ms["cpu"] for d in devices},
                          {d: n.memory_mb.get("cpu", 0.0) for d in devices}))
    links = {(a, b): Link(GROUP_LATENCY_MS, GROUP_MS_PER_MB) for a in devices for b in devices if a != b}
    source = dict(graph.source, links="modelled: a thread hand-off and a copy at 10 GB/s")
    return Graph(tuple(devices), tuple(nodes), graph.edges, links, source=source)


def timed_profile(model: Model, config: EngineConfig):
    """A profile of `model` from its kernels timed here (see the module docstring)."""
    from cellserve.executor.base import CellTypeSpec
    from cellserve.executor.kernel import KernelExecutor
    from cellserve.graph.model import GraphDecoder, RecurrentLayer
    from cellserve.graph.stacking import stack_layers
    from cellserve.plan.profile import Timing, synthetic_profile

    served = stack_layers(model) if config.stack_layers else model
    executor = KernelExecutor("cpu", config.backend)
    types = iter(served.cell_types())
    step_s, lone_s = {}, {}
    for step in served.recurrent_steps():
        directions = len(step.directions) if isinstance(step, RecurrentLayer) else 1
        for d in range(directions):
            cell_type = next(types)
            executor.add_cell_type(CellTypeSpec(cell_type, step, d))
            step_s[cell_type] = executor.startup_costs(cell_type, [1])[1]
            if executor.lone_lanes(cell_type) >= 1:
                lone_s[cell_type] = _lone_step(executor, cell_type, isinstance(step, GraphDecoder))
    base = synthetic_profile(model, 0.0, max_batch=1, lone_lanes=1, lone_step_s=0.0,
                             plain_op_s=NOMINAL_PLAIN_OP_S, stack_layers=config.stack_layers)
    cells = {}
    for t, cell in base.cell_types.items():
        lone = lone_s.get(t)
        cells[t] = replace(cell, step_s={1: Timing.fixed(step_s[t])},
                           lone_lanes=1 if lone is not None else 0,
                           lone_step_s=None if lone is None else Timing.fixed(lone))
    return replace(base, cell_types=cells)


def _lone_step(executor, cell_type: str, decoder: bool) -> float:
    """Seconds per step of one lane running alone (run_lane), the best of a few runs (a
    decoder's dummy lane timed for its steps whatever it emits)."""
    kernel = executor.kernels[cell_type]
    lane = executor.dummy_lane(cell_type, AUTO_LENGTH)
    best = float("inf")
    until = {"stop_at_eos": False} if decoder else {}
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        kernel.run_lane(lane.slot, lane.base, 1, AUTO_LENGTH, np.zeros(1, np.int64), **until)
        best = min(best, (time.perf_counter() - t0) / AUTO_LENGTH)
    kernel.release(lane)
    return best
