"""A partition's device names, and the executors they become (no torch here: the settings
check `--placement-cores` with it).

The devices a plan may name (docs/partition.md, "Executing a placement"):
- `cpu`: one CPU executor on every core the process may use;
- `cpu0`, `cpu1`, ...: CPU core groups, one executor each, with one kernel thread per core
  of its group. The groups come from `--placement-cores cpu0=0 --placement-cores cpu1=1-3`;
  without it the process's cores are split evenly, in order, among the groups the plan names,
  sorted by number. `cpu` cannot be combined with core groups (it has every core);
- `gpu` (the engine's `--device` when it is a CUDA device, else `cuda`), `cuda`, `cuda:N`: a
  CUDA executor on that device.
Any other name is refused, naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GROUP = re.compile(r"cpu(\d+)")
_CUDA = re.compile(r"cuda(:\d+)?")


@dataclass(frozen=True)
class ExecutorSpec:
    """One executor to build: its name (the plan's device), torch device, and core group."""

    name: str
    device: str  # "cpu", "cuda", "cuda:1"
    cores: tuple[int, ...] | None  # None: a CUDA executor


def _cores(text: str, where: str) -> tuple[int, ...]:
    cores: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"{where}: {part.strip()!r} is not a core or a range of cores (0, 2-5)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"{where}: range {part.strip()!r} runs backwards")
        cores += range(lo, hi + 1)
    if len(set(cores)) < len(cores):
        raise ValueError(f"{where}: a core is listed twice")
    return tuple(cores)


def parse_core_groups(items: list[str]) -> dict[str, tuple[int, ...]]:
    """`["cpu0=0", "cpu1=1-3,6"]` -> {"cpu0": (0,), "cpu1": (1, 2, 3, 6)}; ValueError naming
    the item that cannot be read (a device that is not cpuN, a bad core list, a core in two
    groups, a group given twice)."""
    groups: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for item in items:
        name, sep, cores = item.partition("=")
        name = name.strip()
        if not sep or not _GROUP.fullmatch(name):
            raise ValueError(f"entry {item!r} must be cpuN=CORES (cpu0=0, cpu1=1-3)")
        if name in groups:
            raise ValueError(f"gives core group {name} twice")
        groups[name] = _cores(cores, f"entry {item!r}")
        for c in groups[name]:
            if c in owner:
                raise ValueError(f"entry {item!r}: core {c} is in {owner[c]} already")
            owner[c] = name
    return groups


def device_specs(devices: list[str], core_groups: dict[str, tuple[int, ...]], available: list[int],
                 cuda_device: str = "cuda") -> dict[str, ExecutorSpec]:
    """The executor of each device name (see the module docstring); ValueError naming a device
    that is none of those, core groups that cannot be made from `available` (the cores this
    process may use), or `cpu` beside core groups."""
    specs: dict[str, ExecutorSpec] = {}
    groups = sorted((d for d in devices if _GROUP.fullmatch(d)), key=lambda d: int(d[3:]))
    for dev in devices:
        if dev == "cpu" or _GROUP.fullmatch(dev):
            continue
        if dev == "gpu":
            specs[dev] = ExecutorSpec(dev, cuda_device if cuda_device.startswith("cuda") else "cuda", None)
        elif _CUDA.fullmatch(dev):
            specs[dev] = ExecutorSpec(dev, dev, None)
        else:
            raise ValueError(f"device {dev!r} is not one cellserve can serve on: name CPU executors cpu (every "
                             "core) or cpu0, cpu1, ... (core groups), and CUDA devices gpu, cuda or cuda:N")
    if "cpu" in devices:
        if groups:
            raise ValueError(f"device 'cpu' (every core) cannot be combined with core groups ({', '.join(groups)})")
        specs["cpu"] = ExecutorSpec("cpu", "cpu", tuple(available))
    extra = sorted(set(core_groups) - set(groups))
    if extra:
        raise ValueError(f"--placement-cores gives core groups {', '.join(extra)}, which the plan does not use "
                         f"(it uses {', '.join(groups) or 'none'})")
    missing = [g for g in groups if g not in core_groups]
    if missing and core_groups:
        raise ValueError(f"--placement-cores gives no cores for {', '.join(missing)} (give every group, or none "
                         "to split the cores evenly)")
    for g in groups:
        if g in core_groups:
            outside = sorted(set(core_groups[g]) - set(available))
            if outside:
                raise ValueError(f"core group {g}: cores {outside} are not among the cores this process may use "
                                 f"({_ranges(available)})")
    if not core_groups and groups:
        if len(groups) > len(available):
            raise ValueError(f"the plan uses {len(groups)} core groups ({', '.join(groups)}) but this process may "
                             f"use only {len(available)} cores ({_ranges(available)})")
        n, k = len(available), len(groups)
        core_groups = {g: tuple(available[i * n // k:(i + 1) * n // k]) for i, g in enumerate(groups)}
    for g in groups:
        specs[g] = ExecutorSpec(g, "cpu", core_groups[g])
    return {d: specs[d] for d in devices}


def _ranges(cores: list[int]) -> str:
    return ",".join(map(str, cores))
