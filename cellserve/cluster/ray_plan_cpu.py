"""Where the CPU went during a run of `ray_plan_bench` (Linux /proc; measured, not modelled).

A Nexus plan assumes each device is one whole core. On one machine the Ray workers share its
cores with the driver (`serve --ray`: HTTP frontend, routing, data plane), Ray's daemons, the
load generator and whatever else runs there. `CpuMeter` splits a run's busy CPU seconds into:

- `driver`: the `serve --ray` process;
- `workers`: its descendants whose command line names `EngineWorker` (the Ray actors);
- `ray_daemons`: its other descendants (a local Ray's GCS, raylet, idle workers ...);
- `generator`: this process (the load generator);
- `other`: the rest of the machine's busy time (other work on a shared machine).

Processes that start or end within the run count only for the part seen at both ends (the
workers live through every run). Each is also given per request and as cores (CPU s / wall s).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: user + system) of `pid`, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def machine_busy_s() -> float | None:
    """CPU seconds every core has spent busy (not idle or iowait), from /proc/stat."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


def _tree(root: int) -> dict[int, tuple[str, float]]:
    """Every live process under `root` (itself included): pid -> (its group, CPU seconds)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            group = "driver" if pid == root else "workers" if "EngineWorker" in _cmdline(pid) else "ray_daemons"
            out[pid] = (group, stats[pid][1])
            todo.extend(children.get(pid, []))
    return out


class CpuMeter:
    """Start at construction; `stop(requests)` returns the run's split (see the module)."""

    def __init__(self, driver_pid: int):
        self.root = driver_pid
        self.start = (_tree(driver_pid), time.process_time(), machine_busy_s(), time.perf_counter())

    def stop(self, requests: int) -> dict:
        tree, gen, busy, wall = _tree(self.root), time.process_time(), machine_busy_s(), time.perf_counter()
        tree0, gen0, busy0, wall0 = self.start
        wall -= wall0
        cpu = {"driver": 0.0, "workers": 0.0, "ray_daemons": 0.0, "generator": gen - gen0}
        for pid, (group, seconds) in tree.items():
            if pid in tree0:
                cpu[group] += seconds - tree0[pid][1]
        if busy is not None and busy0 is not None:
            cpu["other"] = max(0.0, (busy - busy0) - sum(cpu.values()))
        out = {"wall_s": wall, "machine_cores": os.cpu_count(),
               "cores": {k: v / wall for k, v in cpu.items()},
               "cpu_ms_per_request": {k: 1e3 * v / requests for k, v in cpu.items()} if requests else {}}
        if busy is not None and busy0 is not None:
            out["machine_busy_cores"] = (busy - busy0) / wall
        return out
