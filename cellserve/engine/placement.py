"""Serving a partition: a plan from `cellserve plan partition` (or one planned at start,
placement_auto.py) becomes the engine's executors and placement map.

A plan's `assignment` maps nodes to devices. Nodes are the engine's names: cell types
(`Model.cell_types()` of the model as served, stacked or not), plain-op groups `MODEL/ops/K`
(`graph.model.plain_group_key`), and `MODEL/input` / `MODEL/output` (the host; nothing to place).
Devices become executors as placement_devices.py says. Refused, each naming what is wrong:
a node that is no cell type or group of the models served, a model the plan covers only in
part (made with another --stack-layers setting?), a device that is none of cpu, cpuN, gpu,
cuda[:N], core groups that do not fit the process's cores, a CUDA device where there is none.
Models the plan does not name run on the first executor (the first CPU one, if any).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cellserve.decimal_text import ascii_int
from cellserve.engine.config import EngineConfig
from cellserve.engine.placement_devices import ExecutorSpec, device_specs, parse_core_groups
from cellserve.graph.model import Model, plain_group_key, plain_groups


def plain_ops_key(model: str) -> str:
    """The placement key of all of a model's plain ops (a model whose cell type had this name
    is refused at load); `plain_group_key` places one group of them."""
    return f"{model}/#plain"



class PlacementError(ValueError):
    """A placement that cannot be served; the message names the file, field and value."""


@dataclass(frozen=True)
class Placement:
    """What the engine is built with: executors to make (in order: the first is the default)
    and the placement map (node -> executor name)."""

    specs: dict[str, ExecutorSpec]
    placement: dict[str, str]
    source: str  # the plan file, or "auto"


def read_plan(path: str | Path):
    """The plan file, parsed (plan/partition_io.py); PlacementError naming the file and field."""
    from cellserve.plan.partition_graph import PartitionError
    from cellserve.plan.partition_io import load_plan

    try:
        return load_plan(path)
    except PartitionError as exc:
        raise PlacementError(str(exc)) from None


def _served_nodes(models: list[Model], stack: bool) -> dict[str, set[str]]:
    """Each model's placeable nodes as the engine names them."""
    from cellserve.graph.stacking import stack_layers

    nodes = {}
    for model in models:
        served = stack_layers(model) if stack else model
        ids = set(served.cell_types())
        ids |= {plain_group_key(model.name, k) for k in range(len(plain_groups(served)))}
        nodes[model.name] = ids
    return nodes


def placement_for(plan, models: list[Model], config: EngineConfig, where: str) -> Placement:
    """The executors and map of `plan` for these models (see the module docstring). A plan's
    node `M/...` places model M; where the engine names its models `M:VERSION` (a server's),
    it places every version of M served."""
    served = _served_nodes(models, config.stack_layers)
    placement: dict[str, str] = {}
    owner: dict[str, str] = {}
    for node, dev in plan.assignment.items():
        model, _, rest = node.partition("/")
        targets = [m for m in served if m == model] or [m for m in served if m.rpartition(":")[0] == model]
        if not targets:
            shown = sorted({m.rpartition(":")[0] or m for m in served})
            raise PlacementError(f"{where}: plan.assignment names node {node!r} of model {model!r}, which is not "
                                 f"served (served: {', '.join(shown)})")
        if rest in ("input", "output"):  # the host, where a request arrives and leaves: nothing to place
            continue
        for m in targets:
            key = f"{m}/{rest}"
            if key not in served[m]:
                known = ", ".join(sorted(n.replace(m, model, 1) for n in served[m]))
                raise PlacementError(f"{where}: plan.assignment names node {node!r}, which is not a cell type or "
                                     f"plain-op group of model {model!r} (its nodes: {known})")
            placement[key], owner[key] = dev, m
    covered = set(owner.values())
    if not covered:
        raise PlacementError(f"{where}: the plan places none of the models served ({', '.join(sorted(served))})")
    for m in sorted(covered):
        missing = sorted(served[m] - set(placement))
        if missing:
            raise PlacementError(f"{where}: the plan places only part of model {m!r}: not {', '.join(missing)} "
                                 "(planned with another --stack-layers setting?)")
    devices = sorted(set(placement.values()), key=_device_order)
    try:
        groups = parse_core_groups(config.placement_cores)
        specs = device_specs(devices, groups, sorted(os.sched_getaffinity(0)), config.device)
    except ValueError as exc:
        raise PlacementError(f"{where}: {exc}") from None
    return Placement(specs, placement, where)


def _device_order(dev: str) -> tuple:
    """CPU executors first (the default executor), core groups by number, then CUDA."""
    if dev == "cpu":
        return (0, 0, dev)
    if dev.startswith("cpu") and ascii_int(dev[3:]) is not None:
        return (0, int(dev[3:]), dev)
    return (1, 0, dev)


def build_executors(placement: Placement, config: EngineConfig) -> dict:
    """The executors of a placement, in its order (the first is the engine's default)."""
    import torch

    from cellserve.executor.kernel import executor_for

    on_cuda = config.device.startswith("cuda")  # then --backend names the CUDA executors' backend
    executors = {}
    for name, spec in placement.specs.items():
        if spec.cores is None and not torch.cuda.is_available():
            raise PlacementError(f"{placement.source}: device {name!r} needs CUDA ({spec.device}), which is not "
                                 "available here")
        cpu = spec.cores is not None
        backend = (None if on_cuda else config.backend) if cpu else (config.backend if on_cuda else None)
        executors[name] = executor_for(spec.device, backend, name, list(spec.cores) if cpu else None)
    return executors


def engine_placement(models: list[Model], config: EngineConfig) -> tuple[dict, dict[str, str]]:
    """`config.placement` (a plan file, or "auto") as the engine's (executors, placement)."""
    if config.placement == "auto":
        from cellserve.engine.placement_auto import auto_plan

        plan = auto_plan(models, config)
        where = "--placement auto"
    else:
        plan = read_plan(config.placement)
        where = f"plan file {str(config.placement)!r}"
    chosen = placement_for(plan, models, config, where)
    return build_executors(chosen, config), chosen.placement
