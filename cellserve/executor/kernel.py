"""Executors that run real kernels: `KernelExecutor` on the CPU (the fused, oneDNN, BLAS or
torch step, with pinned OpenMP threads) and `CudaExecutor` (the torch step on a CUDA device,
timed with the device synchronised).

Busy time is measured here, around each kernel call, by the executor's own timer: it is the
device's time, not the engine's clock, which in a test or the simulator is not wall time.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from cellserve.errors import NotOnThisExecutor
from cellserve.executor.base import BeamStarted, CellTypeSpec, Executor, LaneFinished, LaneStarted, StepResult
from cellserve.executor.batch import StepBatch
from cellserve.executor.interference import InterferenceMeter
from cellserve.executor.versions import PERIOD_S, KernelVersions
from cellserve.graph import dense_ops
from cellserve.graph.model import DenseNode, LayerStack
from cellserve.kernels import affinity
from cellserve.kernels.cell import CellKernel, LaneStorage, default_backend
from cellserve.kernels.decoder import GraphDecoderKernel
from cellserve.kernels.protocol import RecurrentKernel
from cellserve.kernels.stack import StackKernel
from cellserve.plan.versions import VersionProfile, version_name


class KernelExecutor(Executor):
    """Real kernels on one torch device, with the given backend (None: the device's best)."""

    concurrent = True
    beam_search = True

    def __init__(self, device: str | torch.device = "cpu", backend: str | None = None, name: str | None = None,
                 cores: list[int] | tuple[int, ...] | None = None):
        """`cores`: the core group its kernel threads run on when it runs at once with other
        executors (one thread per core, pinned; see executor/workers.py); None: all of them."""
        self.device = torch.device(device)
        self.backend = backend
        self.name = name or str(self.device)
        if cores is not None and not cores:
            raise ValueError(f"executor {self.name}: a core group needs at least one core")
        self.cores = None if cores is None else tuple(cores)
        self.kernels: dict[str, RecurrentKernel] = {}
        self._specs: dict[str, CellTypeSpec] = {}
        self._flops: dict[str, tuple[float, float]] = {}  # recurrent cell type -> (per step, per token projected)
        self.versions: KernelVersions | None = None  # kernel versions chosen by interference (use_versions)

    # ---- cell types ----

    def add_cell_type(self, spec: CellTypeSpec) -> None:
        step = spec.step
        if spec.is_decoder:
            kernel = GraphDecoderKernel(step, self.device)
        elif self.backend == "triton":  # the persistent GPU kernel (kernels/triton_rnn.py); imports triton
            from cellserve.kernels.triton_rnn import triton_kernel

            kernel = triton_kernel(step, spec.direction, self.device)
        elif isinstance(step, LayerStack):
            kernel = StackKernel(step, self.device, self.backend)
        else:
            kernel = CellKernel(step.kind, step.hidden, step.directions[spec.direction], self.device,
                                step.token_table, self.backend)
        self.kernels[spec.cell_type] = kernel
        self._specs[spec.cell_type] = spec
        if not spec.is_decoder:  # FLOPs per lane-step and per projected token, read at every call
            self._flops[spec.cell_type] = (step.flops_per_step(), step.flops_per_token_projection())

    def remove_cell_type(self, cell_type: str) -> None:
        self.kernels.pop(cell_type, None)  # its weights and lane storage go with the kernel
        self._specs.pop(cell_type, None)
        self._flops.pop(cell_type, None)

    def lone_lanes(self, cell_type: str) -> int:
        return self.kernels[cell_type].lone_lanes

    def memory_bytes(self) -> int:
        return sum(k.weight_bytes() for k in self.kernels.values())

    def pinned(self, enabled: bool):
        if self.device.type != "cpu":
            return super().pinned(enabled)
        return self._pinned_cpu(enabled)

    @contextlib.contextmanager
    def _pinned_cpu(self, enabled: bool):
        if self.versions is not None:  # back to all threads before pinning; the switch is built anew after
            self.versions.reset()
        with affinity.openmp_threads_pinned(enabled) as cores:
            try:
                yield cores
            finally:
                if self.versions is not None:
                    self.versions.reset()

    # ---- kernel versions (Veltair) ----

    def use_versions(self, profiles: list[VersionProfile], meter: InterferenceMeter | None = None,
                     period_s: float = PERIOD_S) -> None:
        """Step the profiled cell types on the version (openmp-N, elastic-N) the interference
        now calls for (executor/versions.py), choosing every `period_s` from what `meter`
        reads (by default /proc's accounting of the executor's cores). Only on the fused CPU
        step, whose answers do not depend on its threading, profiled on as many threads."""
        backend = self.backend or (default_backend(self.device) if self.device.type == "cpu" else "torch")
        if self.device.type != "cpu" or backend != "fused":
            raise NotOnThisExecutor(f"kernel versions switch how the fused CPU step is threaded; executor "
                                    f"{self.name!r} runs the {backend} step on {self.device}")
        cores = self.cores or tuple(sorted(os.sched_getaffinity(0)))
        threads = len(cores) if self.cores else torch.get_num_threads()
        for p in profiles:
            if p.backend != "fused" or p.cores != threads:
                raise NotOnThisExecutor(f"the kernel-versions profile of {p.model!r} was measured on {p.cores} "
                                        f"threads of the {p.backend} step; executor {self.name!r} runs {threads} "
                                        f"threads of the fused step (profile it here, with the same --threads)")
            if version_name("openmp", threads) not in p.versions:  # the version it runs without a neighbour
                raise NotOnThisExecutor(f"the kernel-versions profile of {p.model!r} does not time "
                                        f"{version_name('openmp', threads)}, the engine's own version")
        self.versions = KernelVersions(profiles, cores[:threads], meter, period_s)

    # ---- lanes ----

    def start_lane(self, cell_type: str, x: np.ndarray, states: list[tuple] | None) -> LaneStarted:
        spec = self._specs[cell_type]
        t0 = time.perf_counter()
        storage = self.kernels[cell_type].start_lane(x, states)
        busy = self._since(t0)
        flops = 0.0 if spec.is_decoder else storage.length * self._flops[cell_type][1]
        return LaneStarted(storage, busy, flops)

    def execute(self, batch: StepBatch, slots: np.ndarray, rows: np.ndarray, lone_steps: int,
                stop: np.ndarray) -> StepResult:
        kernel = self.kernels[batch.cell_type]
        spec = self._specs[batch.cell_type]
        tokens, steps = None, 1
        t0 = time.perf_counter()
        if self.versions is not None:
            self.versions.prepare(batch.cell_type, batch.size, t0)
            t0 = time.perf_counter()
        if lone_steps:
            first, *others = zip(batch.slots, rows.tolist(), batch.strides)
            steps = kernel.run_lane(*first, lone_steps, stop)
            for slot, row, stride in others:  # never a decoder's (its lone_lanes is 1)
                kernel.run_lane(slot, row, stride, steps)
            if spec.is_decoder:
                tokens = kernel.lone_tokens
        else:
            tokens = kernel.step_batch(slots, rows)
        busy = self._since(t0)
        if self.versions is not None:
            self.versions.ended(t0 + busy)
        candidates = kernel.candidates if spec.is_decoder and not lone_steps else None
        if spec.is_decoder:  # GraphDecoder.flops_per_step summed over the lanes, without a call per lane
            step = spec.step
            flops = steps * (batch.size * step.flops_fixed
                             + step.flops_per_position * float(kernel.memory_len[slots].sum()))
        else:
            flops = batch.size * steps * self._flops[batch.cell_type][0]
        return StepResult(steps, busy, flops, tokens, candidates)

    def start_beam(self, cell_type: str, x: np.ndarray, states: list[tuple] | None, width: int) -> BeamStarted:
        t0 = time.perf_counter()
        storages = self.kernels[cell_type].start_beam(x, states, width)
        return BeamStarted(storages, self._since(t0))

    def reorder_beams(self, cell_type: str, dst: np.ndarray, src: np.ndarray, tokens: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.kernels[cell_type].reorder(dst, src, tokens)
        return self._since(t0)

    def finish_lane(self, cell_type: str, storage: LaneStorage) -> LaneFinished:
        t0 = time.perf_counter()
        layers = self.kernels[cell_type].finish_lane(storage)
        return LaneFinished(layers, self._since(t0))

    def release_lane(self, cell_type: str, storage: LaneStorage) -> None:
        self.kernels[cell_type].release(storage)

    def run_plain(self, model: str, nodes: tuple[DenseNode, ...], env: dict) -> float:
        t0 = time.perf_counter()
        for node in nodes:
            dense_ops.run(node, env)
        return time.perf_counter() - t0

    # ---- start-up costs ----

    def startup_costs(self, cell_type: str, sizes: list[int]) -> dict[int, float]:
        """The fastest of five batched steps at each size, on dummy lanes: the first run of a
        size is often a cold one, and a noisy neighbour slows some runs but speeds up none
        (serving then learns the costs as they are)."""
        kernel = self.kernels[cell_type]
        costs = {}
        for b in sizes:
            lanes = [self.dummy_lane(cell_type) for _ in range(b)]
            slots = np.array([s.slot for s in lanes], np.int64)
            rows = np.array([s.base for s in lanes], np.int64)
            samples = []
            for _ in range(5):
                t0 = time.perf_counter()
                kernel.step_batch(slots, rows)
                samples.append(self._since(t0))
            costs[b] = min(samples)
            for s in lanes:
                kernel.release(s)
        return costs

    def dummy_lane(self, cell_type: str, length: int = 4) -> LaneStorage:
        """A lane of zeros, for timing."""
        step = self._specs[cell_type].step
        if self._specs[cell_type].is_decoder:
            return self.kernels[cell_type].dummy_lane(length)
        if step.token_table is not None:
            x = np.zeros(length, np.int64)
        else:
            x = np.zeros((length, step.input_size), np.float32)
        return self.kernels[cell_type].start_lane(x, None)

    def _since(self, t0: float) -> float:
        return time.perf_counter() - t0


class CudaExecutor(KernelExecutor):
    """Kernels on a CUDA device: busy time waits for the device to finish the work."""

    def __init__(self, device: str | torch.device = "cuda", backend: str | None = None, name: str | None = None,
                 cores: list[int] | tuple[int, ...] | None = None):
        super().__init__(device, backend, name, cores)
        if self.device.type != "cuda":
            raise ValueError(f"CudaExecutor needs a CUDA device, got {self.device}")

    def _since(self, t0: float) -> float:
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def device_problem(device: str, backend: str | None = None) -> str | None:
    """What stops kernels running on `device` with `backend` (the text after the flags' names,
    for a one-line start-up error); None when they can."""
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        return f"--device {device!r} is not a torch device: {exc}"
    if kind == "cuda" and not torch.cuda.is_available():
        return (f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                f"{'built with' if torch.backends.cuda.is_built() else 'a build without'} CUDA)")
    if kind not in ("cpu", "cuda"):
        return f"--device {device}: cellserve runs cells on cpu or cuda"
    if backend == "triton":
        from cellserve.kernels.triton_rnn import triton_unavailable

        reason = triton_unavailable(torch.device(device))
        if reason:
            return f"--backend triton: {reason}"
    return None


def executor_for(device: str, backend: str | None = None, name: str | None = None,
                 cores: list[int] | None = None) -> KernelExecutor:
    """The real executor for a torch device name ("cpu", "cuda", "cuda:1", ...)."""
    kind = CudaExecutor if torch.device(device).type == "cuda" else KernelExecutor
    return kind(device, backend, name, cores)
