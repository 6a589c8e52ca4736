"""The executor boundary: what the engine asks of a device, and the typed answers it gets.

An executor owns one device (a CPU core group, a CUDA device, or a simulated device) and the
kernels of the cell types placed on it. The engine decides what runs (admission, scheduling,
each request's walk through its model); an executor only runs it and says how long the device
was busy. Costs the engine learns come from those figures, never from a clock read around a
call, so the same engine learns the same way from a real device and from a simulated one.

Contract for every implementation:
- `start_lane` admits one lane of a cell type (its input projection included) and returns
  where it lives; `execute` advances a `StepBatch`'s lanes, one batched step, or up to
  `lone_steps` steps of each lane alone when the engine asks for that; `finish_lane` reads a
  lane that ran to its end and frees it; `release_lane` frees one without reading it.
- `run_plain` runs a request's consecutive plain ops (embedding lookups, heads, glue: one
  group of the model's program, or the rest of one) on the request's tensors in place, in order.
- Every call returns the seconds the device was busy for it. An executor never calls back
  into the engine and never touches a request other than through what it is given.
- With several executors running at once, `execute` runs on the executor's worker thread
  and every other call on the engine's thread, never while a batch of the same executor is
  in flight; `run_plain` alone may be called while one is (it must not touch the kernels).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from cellserve.errors import NotOnThisExecutor
from cellserve.executor.batch import StepBatch
from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, RecurrentLayer
from cellserve.kernels.cell import LaneStorage
from cellserve.kernels.decoder import BeamCandidates
from cellserve.kernels.protocol import LayerResult

RecurrentStep = RecurrentLayer | LayerStack | GraphDecoder

# How many steps a lone lane may run per `execute` (see Engine._lone_steps): an arrival stops
# the run early, so this bounds only how long the engine goes without checking deadlines.
LONE_LANE_CHUNK = 64


@dataclass(frozen=True)
class CellTypeSpec:
    """One cell type to place on an executor: a direction of a layer, a stack or a decoder."""

    cell_type: str
    step: RecurrentStep
    direction: int = 0

    @property
    def is_decoder(self) -> bool:
        return isinstance(self.step, GraphDecoder)


@dataclass(frozen=True)
class LaneStarted:
    storage: LaneStorage  # slot and rows; opaque to the engine but for the scheduler's ints
    busy_s: float  # the input projection
    flops: float


@dataclass(frozen=True)
class BeamStarted:
    storages: list[LaneStorage]  # the row's slots over one memory block; the first is live
    busy_s: float


@dataclass(frozen=True)
class StepResult:
    """What one `execute` did."""

    steps: int  # steps every lane of the batch advanced
    busy_s: float  # device seconds, all steps together
    flops: float
    # decoders: the token each batch entry emitted (one step); a lone lane's run (a batch of
    # one greedy lane, `lone_steps`): the token of each of its `steps`, in order
    tokens: np.ndarray | None = None
    # a graph decoder's batch holding beam lanes: each entry's best next tokens (kernels/decoder.py)
    candidates: BeamCandidates | None = None


@dataclass(frozen=True)
class LaneFinished:
    layers: list[LayerResult]  # per layer of the cell type; empty for a decoder
    busy_s: float


class Executor(ABC):
    """Runs cell types and plain ops on one device (see the module docstring)."""

    name: str = "executor"
    # Whether the engine may run this executor's batches on a worker thread at once with
    # other executors' (executor/workers.py): the real devices can; the simulator's, which
    # advances one virtual clock per call, cannot.
    concurrent: bool = False
    # The CPU cores its kernel threads run on (a core group), or None: wherever the engine
    # thread's do (one executor) or anywhere (a GPU's).
    cores: tuple[int, ...] | None = None

    @abstractmethod
    def add_cell_type(self, spec: CellTypeSpec) -> None:
        """Build (or price) the cell type's kernel; called once per cell type at start (or
        when Engine.add_model adds a model)."""

    def remove_cell_type(self, cell_type: str) -> None:
        """Release the cell type's kernel (Engine.remove_model; no lane of it is left). An
        executor that keeps nothing per cell type has nothing to do."""

    @abstractmethod
    def lone_lanes(self, cell_type: str) -> int:
        """Batches of up to this many lanes may run each lane alone (0: never)."""

    @abstractmethod
    def start_lane(self, cell_type: str, x: np.ndarray, states: list[tuple] | None) -> LaneStarted:
        """Admit a lane: x its inputs ([T, I] floats or [T] token ids; a decoder's [T, H]
        memory), states (h0, c0) per layer (None entries: zeros)."""

    @abstractmethod
    def execute(self, batch: StepBatch, slots: np.ndarray, rows: np.ndarray, lone_steps: int,
                stop: np.ndarray) -> StepResult:
        """Run `batch` (slots and rows as int64 arrays, rows where each lane is now): one
        batched step, or with `lone_steps` > 0 up to that many steps of each lane alone, the
        first lane stopping early once `stop[0]` is set (an arrival) and the others then
        running as many steps as it did."""

    # Whether start_beam and reorder_beams run here (the real kernels' executor and the
    # simulator's: yes). The engine refuses a beam request at admission when its decoder's
    # executor says no, so the two methods below are never called on such an executor.
    beam_search: bool = False

    def start_beam(self, cell_type: str, x: np.ndarray, states: list[tuple] | None,
                   width: int) -> BeamStarted:
        """Admit a beam-search row of a graph decoder: `width` slots over one memory x [S, M],
        the first live (see GraphDecoderKernel.start_beam). Only when `beam_search`."""
        raise NotOnThisExecutor(f"executor {self.name!r} does not run beam search")

    def reorder_beams(self, cell_type: str, dst: np.ndarray, src: np.ndarray, tokens: np.ndarray) -> float:
        """Between steps of beam rows: slots dst take the states of slots src and the next
        tokens `tokens` (see GraphDecoderKernel.reorder); busy seconds. Only when `beam_search`."""
        raise NotOnThisExecutor(f"executor {self.name!r} does not run beam search")

    @abstractmethod
    def finish_lane(self, cell_type: str, storage: LaneStorage) -> LaneFinished:
        """Read a lane that ran to its end, and free it. The arrays returned are the caller's
        (copies, or arrays never written again): the engine passes them on as the request's
        outputs without copying."""

    @abstractmethod
    def release_lane(self, cell_type: str, storage: LaneStorage) -> None:
        """Free a lane without reading it (its request failed or was dropped)."""

    @abstractmethod
    def run_plain(self, model: str, nodes: tuple[DenseNode, ...], env: dict) -> float:
        """Run consecutive plain ops of `model`'s program, in order, on a request's tensors
        (`env`, updated in place); busy seconds. One call per group, not per op: a request's
        walk crosses into the executor once for all the ops between two recurrent steps."""

    @abstractmethod
    def startup_costs(self, cell_type: str, sizes: list[int]) -> dict[int, float]:
        """Seconds per batched step at each batch size, to seed the engine's cost model
        before the first request (measured on dummy lanes, or read from a profile)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of weights the executor keeps on its device."""

    def engine_work(self, requests_taken: int = 0, runs_checked: int = 0) -> None:
        """The engine's own work that just ran on its thread, beside no call of this
        executor's: `requests_taken` requests taken in (admitted, refused or answered at
        once), a drop check that priced `runs_checked` runs. A real executor has nothing to
        do (that time passed on the real clock); the simulator's charges it to the virtual
        one, as its profile prices it (SimExecutor)."""

    def use_versions(self, profiles: list) -> None:
        """Choose each profiled cell type's kernel version (thread count) by the interference
        measured while serving, from kernel-versions profiles (plan/versions.py). Only the
        real CPU executor does."""
        raise NotOnThisExecutor(f"executor {self.name!r} does not switch kernel versions")

    def pinned(self, enabled: bool):
        """A context manager around a worker loop that pins the executor's threads (real
        CPU executors); a no-op elsewhere."""
        from contextlib import nullcontext
        return nullcontext(())
