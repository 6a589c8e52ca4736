"""`cellserve profile-versions`: each kernel version's step time, alone and beside a neighbour.

For every recurrent cell type of a model (decoders have no versions), every batch size of a
doubling series and every version of the fused step (plan/versions.py: OpenMP's team of 1 .. N
threads, the elastic team of N), the mean step time, steady (steps
STEADY_GAP_S apart, the master busy between them as the engine's own work keeps it) and after a
pause (PAUSE_GAP_S of sleep before each), at each interference level: a burner process (bench/burner.py) at a set duty on the
executor's last core (none at level 0). The versions of one batch are timed in turns within a
level, so that drift in the machine lands on all of them. The level recorded is what the
interference meter (executor/interference.py) read over the level's measurements, so that
serving compares its readings with readings of the same meter.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace

import numpy as np
import torch

from cellserve.bench.burner import Burner
from cellserve.bench.host import cpu_name
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import DEFAULT_EXECUTOR, Engine
from cellserve.executor.interference import others_load, read_cpu_times
from cellserve.executor.kernel import KernelExecutor
from cellserve.executor.versions import ThreadSwitch
from cellserve.graph.model import Model
from cellserve.plan.versions import AFTER, VersionProfile, version_name

DUTIES = (0.0, 0.25, 0.5, 1.0)
ROUNDS = 3  # turns over the versions per (batch, level)
STEADY_GAP_S = 1e-4  # about the engine's own work per step under load (docs/performance.md)
PAUSE_GAP_S = 1e-3  # past executor/versions.py's PAUSE_S: the workers went to sleep


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    sizes = [1]
    while sizes[-1] * 2 <= max_batch:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def profile_versions(model: Model, config: EngineConfig, duties: tuple[float, ...] = DUTIES, max_batch: int = 64,
                     quick: bool = False, log=print) -> VersionProfile:
    """Measure `model`'s cell types on the fused step's versions (N: torch's thread count,
    which should be the cores this process may use) at each burner duty."""
    if sorted(set(duties)) != list(duties) or duties[0] != 0 or not all(0 <= d <= 1 for d in duties):
        raise ValueError(f"duties must start at 0, ascend and stay within 0..1, got {list(duties)}")
    config = replace(config, profile=False, backend="fused", kernel_versions=[])
    engine = Engine([model], config)
    executor = engine.executors[DEFAULT_EXECUTOR]
    assert isinstance(executor, KernelExecutor)
    cores = tuple(sorted(os.sched_getaffinity(0)))
    threads = torch.get_num_threads()
    if threads > len(cores):
        raise ValueError(f"{threads} kernel threads on {len(cores)} cores: give --threads at most {len(cores)}")
    cell_types = [ct for ct, spec in executor._specs.items() if not spec.is_decoder]
    if not cell_types:
        raise ValueError(f"model {model.name!r} has no recurrent cell type outside a decoder: no versions to profile")
    versions = tuple(version_name("openmp", n) for n in range(1, threads + 1))
    versions += (version_name("elastic", threads),) if threads > 1 else ()
    batches = batch_sizes(max_batch)
    seconds = 0.03 if quick else 0.1  # of steps per version, batch, level and gap, in ROUNDS turns
    tables = {ct: {t: {a: [] for a in AFTER} for t in versions} for ct in cell_types}
    levels = []
    with executor.pinned(config.pin_threads):
        switch = ThreadSwitch(threads, cores[:threads])
        for duty in duties:
            with Burner(cores[threads - 1], duty):
                before = read_cpu_times(cores[:threads])
                for ct in cell_types:
                    for after, gap in zip(AFTER, (STEADY_GAP_S, PAUSE_GAP_S)):
                        rows = _time_versions(executor, ct, switch, versions, batches, seconds, gap, after == "pause")
                        for t in versions:
                            tables[ct][t][after].append(tuple(rows[t]))
                after = read_cpu_times(cores[:threads])
            level = others_load(before, after, threads) if before and after else duty
            levels.append(round(level, 4))
            log(f"  burner at {duty:.2f} of core {cores[threads - 1]}: others' load read {level:.2f} cores")
        switch.close()
    levels = _ascending(levels)
    return VersionProfile(model=model.name, backend="fused", cores=threads, versions=versions, batches=batches,
                          duties=tuple(duties), levels=tuple(levels),
                          step_s={ct: {t: {a: tuple(rows) for a, rows in by_a.items()} for t, by_a in by_t.items()}
                                  for ct, by_t in tables.items()},
                          machine={"cpu": cpu_name(), "cores": list(cores[:threads]), "torch": torch.__version__,
                                   "python": platform.python_version(), "quick": quick})


def _time_versions(executor: KernelExecutor, cell_type: str, switch: ThreadSwitch, versions: tuple[str, ...],
                   batches: tuple[int, ...], seconds: float, gap_s: float, sleep: bool) -> dict[str, list[float]]:
    """Mean seconds per step, per version, at each batch size; steps `gap_s` apart (slept, or
    spent busy on this thread)."""
    kernel = executor.kernels[cell_type]
    out = {t: [] for t in versions}
    for b in batches:
        lanes = [executor.dummy_lane(cell_type, 32) for _ in range(b)]
        slots = np.array([s.slot for s in lanes], np.int64)
        rows = np.array([s.base for s in lanes], np.int64)
        spent = {t: 0.0 for t in versions}
        steps = {t: 0 for t in versions}
        for _ in range(ROUNDS):
            for t in versions:
                switch.use(t)
                kernel.step_batch(slots, rows)  # the first step after a switch is not the version's own
                end = time.perf_counter() + seconds / ROUNDS
                while True:
                    _wait(gap_s, sleep)
                    t0 = time.perf_counter()
                    kernel.step_batch(slots, rows)
                    now = time.perf_counter()
                    spent[t] += now - t0
                    steps[t] += 1
                    if now >= end:
                        break
        for t in versions:
            out[t].append(spent[t] / steps[t])
        for lane in lanes:
            kernel.release(lane)
    return out


def _wait(seconds: float, sleep: bool) -> None:
    if sleep:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _ascending(levels: list[float]) -> list[float]:
    """The meter's readings made strictly ascending (a level that read no higher than the one
    below, on a machine with other noise, is nudged just above it)."""
    out = []
    for x in levels:
        out.append(x if not out or x > out[-1] else round(out[-1] + 0.01, 4))
    return out



def table(profile: VersionProfile, batches: tuple[int, ...] = (1, 16, 64)) -> str:
    """Markdown: per cell type, version and interference level, the steady and after-a-pause
    step times (us) at a few batch sizes."""
    shown = [b for b in batches if b in profile.batches] or list(profile.batches[:3])
    lines = []
    for ct, by_version in profile.step_s.items():
        lines += [f"{ct} (us per step; steady / after a pause)", "",
                  "| version | others' load (cores) | " + " | ".join(f"batch {b}" for b in shown) + " |",
                  "|---|---:|" + "---:|" * len(shown)]
        for v in profile.versions:
            for i, level in enumerate(profile.levels):
                cells = []
                for b in shown:
                    j = profile.batches.index(b)
                    steady, pause = by_version[v]["steady"][i][j], by_version[v]["pause"][i][j]
                    cells.append(f"{steady * 1e6:.0f} / {pause * 1e6:.0f}")
                lines.append(f"| {v} | {level:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
