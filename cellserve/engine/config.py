"""The engine's configuration: typed, validated once when built.

Each field is declared with `setting(...)` (cellserve/config.py): its help, bounds and flag
name are what `cellserve serve` offers as a flag, a key of the config file's [engine] table,
and a line of `--print-config`. A field added here is reachable from all three.

Importing this module imports no torch (`cellserve --help` stays fast): the names of the
policies and backends are repeated here, and tests/test_config.py checks that they agree with
cellserve.engine.scheduler.POLICIES and cellserve.kernels.cell.BACKENDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cellserve.config import Problem, check, path_list, setting

# cellserve.engine.scheduler.POLICIES and cellserve.kernels.cell.BACKENDS (see above), plus
# "triton": the executor builds that one itself (kernels/triton_rnn.py)
POLICY_NAMES = ("cellular", "cellular-edf", "padded", "none")
BACKEND_NAMES = ("fused", "onednn", "blas", "torch", "triton")

_BATCHING = "batching and admission"
_COMPUTE = "compute"


def _plan_path(value: str, f: Callable[[Path], Path]) -> str:
    """`paths` of --placement: a plan file's path (a config file's, from the file's folder), or auto."""
    return value if value == "auto" else str(f(Path(value)))


def _core_groups_problem(items: list[str]) -> str | None:
    from cellserve.engine.placement_devices import parse_core_groups

    try:
        parse_core_groups(items)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class EngineConfig:
    policy: str = setting("cellular", "batching policy", choices=POLICY_NAMES, group=_BATCHING)
    max_batch: int | None = setting(None, "batch cap per cell type", ge=1, unset="the policy's", group=_BATCHING,
                                    metavar="N")
    batch_timeout_s: float = setting(0.005, "padded policy: seconds a batch waits after its oldest request",
                                     ge=0, flag="--batch-timeout", group=_BATCHING, metavar="SECONDS")
    device: str = setting("cpu", "torch device for the cells: cpu, cuda, cuda:1, ...", group=_COMPUTE)
    backend: str | None = setting(None, "how cell steps run: fused (one C call per step; the default on CPUs "
                                        "with AVX-512), onednn (the default on other CPUs), blas, torch "
                                        "(any device; the default off the CPU), or triton (persistent GPU "
                                        "kernels; a CUDA device)",
                                  choices=BACKEND_NAMES, unset="the best for the device", group=_COMPUTE)
    admission: bool = setting(True, "refuse a request whose predicted finish misses its deadline",
                              group=_BATCHING)
    admission_headroom: float = setting(0.8, "admit a request only if predicted to finish within this share of "
                                             "its time to deadline", gt=0, le=1, group=_BATCHING, metavar="SHARE")
    drop_late: bool = setting(True, "drop an admitted request that can no longer make its deadline",
                              group=_BATCHING)
    default_timeout_s: float | None = setting(None, "deadline in seconds of requests (of any model) that send no "
                                                    "timeout and whose model sets none",
                                              gt=0, flag="--default-timeout", unset="none", group=_BATCHING,
                                              metavar="SECONDS")
    max_active: int = setting(4096, "requests in flight in the engine at once; more are refused (HTTP 429)",
                              ge=1, flag="--max-inflight", aliases=("--max-queue",), group=_BATCHING, metavar="N")
    max_lane_memory_mb: float | None = setting(None, "MiB of lane storage (each sequence's rows in the recurrent "
                                                     "layers and a decoder's memory, per token) held for the "
                                                     "requests in flight; a request that would take more is refused "
                                                     "(HTTP 429; 400 when it needs more than all of it alone)",
                                               gt=0, flag="--max-lane-memory",
                                               unset="a quarter of the machine's memory (or of the cgroup's limit)",
                                               group=_BATCHING, metavar="MIB")
    profile: bool = setting(True, "measure step costs at start-up to seed the cost model",
                            flag="--startup-profile", group=_COMPUTE)
    pin_threads: bool = setting(True, "pin the kernel threads to one core each when they match the cores this "
                                      "process may use (off anyway when OMP_PROC_BIND, OMP_PLACES or "
                                      "GOMP_CPU_AFFINITY is set; see kernels/affinity.py)", group=_COMPUTE)
    stack_layers: bool = setting(True, "step stacked forward layers (LSTM -> LSTM) as one cell type, one round "
                                       "per token for all of them (see graph/stacking.py)", group=_COMPUTE)
    # issue 17: a partition of the models' cell types over several executors (docs/partition.md)
    placement: str | None = setting(None, "serve with a partition: a plan from `cellserve plan partition` (its "
                                          "devices: cpu, cpu0, cpu1, ... core groups; gpu, cuda, cuda:N) or auto "
                                          "(planned at start over --placement-groups core groups)",
                                    unset="one executor for every cell type", group=_COMPUTE,
                                    metavar="PLAN.json|auto", paths=_plan_path)
    placement_cores: list[str] = setting(help="the cores of a placement's CPU core group, DEVICE=CORES (cpu0=0, "
                                              "cpu1=1-3,6; repeat the flag for each group)",
                                         default_factory=list, unset="the process's cores split evenly among "
                                         "cpu0, cpu1, ...", check=_core_groups_problem, group=_COMPUTE,
                                         metavar="DEV=CORES")
    placement_groups: int | None = setting(None, "--placement auto: CPU core groups to plan over (cpu0, cpu1, ...)",
                                           ge=1, unset="2 where the process has 2 cores or more, else 1",
                                           group=_COMPUTE, metavar="N")
    placement_mode: str = setting("latency", "--placement auto: the partition planner's mode (latency: one "
                                             "request's makespan; throughput: requests per second)",
                                  choices=("latency", "throughput"), group=_COMPUTE)
    placement_profiles: list[str] = setting(help="--placement auto: profile files (cellserve profile) to plan "
                                                 "from, one per model; a model without one is timed at start",
                                            default_factory=list, unset="none", group=_COMPUTE, metavar="P.json",
                                            paths=path_list)
    # issue 19 (Veltair): kernel versions chosen by interference (docs/tenancy.md)
    kernel_versions: list[str] = setting(help="kernel-versions profiles (cellserve profile-versions), one per "
                                              "model: step each profiled cell type on the thread count that "
                                              "the interference measured now makes fastest",
                                         default_factory=list, unset="none: every step on all threads",
                                         group=_COMPUTE, metavar="V.json", paths=path_list)

    def __post_init__(self) -> None:
        check(self)  # ConfigError (a ValueError) naming each bad field

    def _problems(self) -> list[Problem]:
        """Settings of --placement auto given without it would be silently ignored."""
        if self.placement == "auto":
            return []
        given = [k for k in ("placement_groups", "placement_profiles") if getattr(self, k)]
        given += ["placement_mode"] if self.placement_mode != "latency" else []
        return [Problem(k, "{name} plans --placement auto: it needs --placement auto (placement)") for k in given]
