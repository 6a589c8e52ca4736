"""The "triton" backend: cell kernels whose recurrence runs in the persistent Triton kernel
(kernels/triton_cells.py), many steps per launch, with tiles chosen by the tiling model
(kernels/triton_tiling.py).

What is Triton's and what is not: a `TritonCellKernel` is a CellKernel of the torch backend
(its arenas are tensors on the device, a lane's input projection is one torch GEMM when it
starts, `finish_lane` reads the arenas back) whose steps run in Triton:

- `step_batch`: one launch of one step for the batch;
- `run_lanes(slots, rows, strides, steps)`: one launch of up to max(steps) steps for a set of
  lanes of different remaining lengths (each stops at its own last step); what a launch runs
  between two scheduling points of cellular batching;
- `run_lane`: one lane alone, in launches of `steps_per_launch` steps, checking the engine's
  stop flag between launches (a launch already queued cannot be interrupted: an arrival waits
  for at most one launch).

Where it runs: on a CUDA device (grid = the model's programs, the barrier needs them all
resident: the model guarantees it), or on the CPU under TRITON_INTERPRET=1, for tests, where
one program runs the whole grid's tiles (see triton_cells.py: a spin barrier would wait forever
for a program the interpreter has not started). `triton_unavailable(device)` says why not,
elsewhere. Stacks (`TritonStackKernel`) whose layers share kind and hidden size run as one
wavefront launch (every layer of step t, then of step t + 1, ...); other stacks step layer after
layer, each in its own launches, with a torch GEMM projecting the rows between.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from cellserve.graph.model import DirectionWeights, LayerStack
from cellserve.kernels.arena import RowPool, SlotPool
from cellserve.kernels.cell import CellKernel, LaneStorage
from cellserve.kernels.stack import StackKernel
from cellserve.kernels.triton_tiling import (CHIPS, MAX_REGS_PER_THREAD, STEPS_PER_LAUNCH, CellShape, GpuChip,
                                             TileConfig, choose, rank)

TRITON_BACKEND = "triton"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """Why the triton backend cannot run on `device`; None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'cellserve[gpu]'"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if device.type == "cpu" and interpreting():
        return None
    return f"the triton backend needs a CUDA device, or the CPU with TRITON_INTERPRET=1 (tests); got {device}"


def chip_of(device: torch.device) -> GpuChip:
    """The tiling model's description of a visible CUDA device: the modelled class its name
    matches (t4, l4, a100, h100, h200), with the SM count, registers and L2 the device reports;
    an unknown device gets H100-like rates."""
    props = torch.cuda.get_device_properties(device)
    name = props.name.lower()
    known = next((CHIPS[k] for k in ("h200", "h100", "a100", "l4", "t4") if k in name), CHIPS["h100"])
    return replace(known, gpu=replace(known.gpu, name=props.name), sms=props.multi_processor_count,
                   regs_per_sm=getattr(props, "regs_per_multiprocessor", known.regs_per_sm),
                   l2_bytes=getattr(props, "L2_cache_size", known.l2_bytes))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonCellKernel(CellKernel):
    """One direction of one layer, its recurrence in Triton (see the module docstring).

    `tile`: a fixed configuration (tests); by default the tiling model chooses per launch
    batch on a GPU, and under the interpreter one resident tile covers every unit."""

    def __init__(self, kind: str, hidden: int, weights: DirectionWeights, device: torch.device,
                 token_table: np.ndarray | None = None, tile: TileConfig | None = None,
                 pools: tuple[SlotPool, RowPool] | None = None, steps_per_launch: int = STEPS_PER_LAUNCH):
        reason = triton_unavailable(device)
        if reason:
            raise RuntimeError(reason)
        super().__init__(kind, hidden, weights, device, token_table, backend="torch", pools=pools)
        from cellserve.kernels.triton_loader import triton_cells  # after the check: it imports triton

        self._cells = triton_cells(interpret=device.type == "cpu")
        self.step_backend = TRITON_BACKEND
        self.tile, self.steps_per_launch = tile, steps_per_launch
        self._chip = chip_of(device) if device.type == "cuda" else None
        self._chosen: dict[int, TileConfig] = {}
        self._counter = torch.zeros(1, dtype=torch.int32, device=device)
        # W_hh^T [H, G*H] as the torch step keeps it: row r of W_hh is column r here
        self._w_strides = (self.w_hh_t.stride(1), self.w_hh_t.stride(0))

    # ---- launches ----

    def config_for(self, lanes: int) -> TileConfig:
        """The tile configuration of a launch of `lanes` lanes."""
        if self.tile is not None:
            return self.tile
        if self._chip is None:  # the interpreter: one program, one tile of every unit
            return TileConfig(units=_pow2(self.hidden), warps=1, lane_block=min(4, _pow2(lanes)), resident=True)
        key = _pow2(lanes)
        if key not in self._chosen:
            self._chosen[key] = choose(self._chip, CellShape(self.kind, self.hidden), key).config
        return self._chosen[key]

    def run_lanes(self, slots: np.ndarray, rows: np.ndarray, strides: np.ndarray, steps: np.ndarray) -> None:
        """One launch: lane i (state slot slots[i]) runs steps[i] steps, reading input row
        rows[i] + t * strides[i] at its step t and writing its output there; lanes that end
        before the launch's last step keep their state from their own last step."""
        n = len(slots)
        n_steps = int(np.max(steps)) if n else 0
        if n_steps <= 0:
            return
        self._fit_capacity()
        cfg = self.config_for(n)
        tiles = -(-self.hidden // cfg.units)
        if self._chip is None:
            programs = 1
            if cfg.resident and tiles > 1:
                raise ValueError(f"under the interpreter a resident tile must cover all {self.hidden} units")
        else:  # every program resident at once, or the grid barrier never opens (triton_tiling.py)
            if cfg.resident and tiles > self._chip.sms:
                raise ValueError(f"{tiles} resident programs exceed the {self._chip.sms} SMs: the grid barrier "
                                 "needs every program resident; use more units per tile or a streaming tile")
            programs = tiles if cfg.resident else min(tiles, self._chip.sms)
        dev = self.device
        # the lanes' slots, first rows, strides and steps: one host-to-device copy per launch
        lanes = torch.from_numpy(np.stack([np.asarray(a, dtype=np.int64) for a in (slots, rows, strides, steps)]))
        lanes = lanes.to(dev)
        hbuf = torch.empty((2, n, self.hidden), dtype=torch.float32, device=dev)
        self._counter.zero_()
        gates = self.x.shape[1] // self.hidden
        c = self.c if self.c is not None else self.h  # unused unless LSTM
        hb = self.bias_vec if self.bias_vec is not None else self.h
        self._cells.recurrent_steps[(programs,)](
            self.x, self.out, self.h, c, hb, self.w_hh_t, *self._w_strides, hbuf, self._counter,
            lanes[0], lanes[1], lanes[2], lanes[3], n, n_steps, self.hidden, tiles,
            KIND=self._cells.KIND_CODE[self.kind], G=gates, BU=cfg.units, BH=_pow2(self.hidden),
            LB=cfg.lane_block, RESIDENT=cfg.resident, num_warps=cfg.warps)

    # ---- steps, as CellKernel's ----

    def step_from(self, x, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        """A step in Triton when it reads the kernel's own rows and writes the same rows (every
        step the engine runs); anything else as the torch backend does."""
        if x is not self.x or not np.array_equal(xrows, orows):
            super().step_from(x, slots, xrows, orows)
            return
        n = len(slots)
        self.run_lanes(slots, xrows, np.zeros(n, np.int64), np.ones(n, np.int64))

    def step_rows(self, source, rows: np.ndarray, slots: np.ndarray, orows: np.ndarray) -> None:
        """A stack's upper layer: project the rows below into this layer's own rows (torch),
        then step them in Triton."""
        dev = self.device
        fresh = source.index_select(0, torch.from_numpy(rows).to(dev))
        self.x.index_copy_(0, torch.from_numpy(orows).to(dev), self.project(fresh))
        self.step(slots, orows, orows)

    @property
    def lone_lanes(self) -> int:
        """A lane alone runs many steps per launch (run_lane)."""
        return 1

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        """Up to `steps` steps of one lane in launches of `steps_per_launch`, stopping after the
        launch in progress once `stop[0]` is set; returns the steps run (at least one launch)."""
        done = 0
        while done < steps:
            chunk = min(self.steps_per_launch, steps - done)
            self.run_lanes(np.array([slot]), np.array([row + done * stride]), np.array([stride]), np.array([chunk]))
            done += chunk
            if stop is not None and stop[0]:
                break
        return done


class TritonStackKernel(StackKernel):
    """A stack whose layers are TritonCellKernels sharing one slot pool and one row pool.

    Where every layer has the same kind and hidden size (each upper layer's input is the output
    of the one below), a launch runs the whole stack as a wavefront (`stack_steps` in
    triton_cells.py: per step, layer 0, then 1, ..., one grid barrier after each), and the
    layers' h, c and output arenas are slices of one tensor each, [layers, rows or slots, H],
    so that one kernel reaches them all. Otherwise each layer runs in its own launches, with a
    torch GEMM projecting the rows between (StackKernel's steps on TritonCellKernels)."""

    def __init__(self, stack: LayerStack, device: torch.device, tile: TileConfig | None = None):
        self.slots, self.rows = SlotPool(), RowPool()
        self.layers = [TritonCellKernel(layer.kind, layer.hidden, layer.directions[0], device, layer.token_table,
                                        tile=tile, pools=(self.slots, self.rows))
                       for layer in stack.layers]
        self.device, self.backend = device, TRITON_BACKEND
        first = self.layers[0]
        self.wavefront = all(k.kind == first.kind and k.hidden == first.hidden for k in self.layers) and all(
            layer.input_size == first.hidden for layer in stack.layers[1:])
        self._combined: dict[str, torch.Tensor] = {}
        self._chosen: dict[int, TileConfig] = {}
        if self.wavefront:
            hidden, gates = first.hidden, first.gates
            zeros = torch.zeros((hidden, gates), device=device)
            self._whh = torch.stack([k.w_hh_t for k in self.layers]).contiguous()
            self._wih = torch.stack([zeros] + [k.project.w for k in self.layers[1:]]).contiguous()
            no_bias = torch.zeros(gates, device=device)
            self._xb = torch.stack([no_bias] + [k.project.b for k in self.layers[1:]]).contiguous()
            self._hb = torch.stack([no_bias if k.bias_vec is None else k.bias_vec for k in self.layers]).contiguous()
            self._share_arenas()

    @property
    def lone_lanes(self) -> int:
        return 1

    def _share_arenas(self) -> None:
        """Make each layer's h, c and out slices of one [layers, ...] tensor (again after a pool
        grew, which gives each layer new arenas of its own)."""
        for name in ("h", "c", "out"):
            parts = [getattr(k, name) for k in self.layers]
            if parts[0] is None:
                continue
            combined = self._combined.get(name)
            if combined is not None and all(p.data_ptr() == combined[i].data_ptr() and p.shape == combined[i].shape
                                            for i, p in enumerate(parts)):
                continue
            combined = torch.stack(parts)
            self._combined[name] = combined
            for k, view in zip(self.layers, combined):
                setattr(k, name, view)

    def start(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        lane = super().start(x, states)
        if self.wavefront:
            self._share_arenas()
        return lane

    def run_lanes(self, slots: np.ndarray, rows: np.ndarray, strides: np.ndarray, steps: np.ndarray) -> None:
        """One launch of the whole stack (as TritonCellKernel.run_lanes, every layer)."""
        n = len(slots)
        n_steps = int(np.max(steps)) if n else 0
        if n_steps <= 0:
            return
        first = self.layers[0]
        cfg = self.config_for(n)
        tiles = -(-first.hidden // cfg.units)
        programs = 1 if first._chip is None else min(tiles, first._chip.sms)
        dev, layers = self.device, len(self.layers)
        lanes = torch.from_numpy(np.stack([np.asarray(a, dtype=np.int64) for a in (slots, rows, strides, steps)]))
        lanes = lanes.to(dev)
        hbuf = torch.empty((layers, 2, n, first.hidden), dtype=torch.float32, device=dev)
        first._counter.zero_()
        h, out = self._combined["h"], self._combined["out"]
        c = self._combined.get("c", h)  # unused unless LSTM
        first._cells.stack_steps[(programs,)](
            first.x, out, h, c, self._hb, self._xb, self._whh, self._wih, hbuf, first._counter,
            lanes[0], lanes[1], lanes[2], lanes[3], n, n_steps, first.hidden, tiles, layers, h.shape[1], out.shape[1],
            KIND=first._cells.KIND_CODE[first.kind], G=first.gates // first.hidden, BU=cfg.units,
            BH=_pow2(first.hidden), LB=cfg.lane_block, num_warps=cfg.warps)

    def config_for(self, lanes: int) -> TileConfig:
        """The wavefront's tile: on a GPU the model's best streaming tile whose registers still
        fit with W_ih's slice live beside W_hh's; elsewhere the layers' own."""
        first = self.layers[0]
        if first.tile is not None or first._chip is None:
            return first.config_for(lanes)
        key = _pow2(lanes)
        if key not in self._chosen:
            cell = CellShape(first.kind, first.hidden)
            fits = [p.config for p in rank(first._chip, cell, key) if not p.config.resident and p.regs_per_thread
                    + cell.gates * p.config.units * _pow2(cell.hidden) // (32 * p.config.warps) <= MAX_REGS_PER_THREAD]
            self._chosen[key] = fits[0] if fits else first.config_for(lanes)
        return self._chosen[key]

    def step(self, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        if not self.wavefront or not np.array_equal(xrows, orows):
            super().step(slots, xrows, orows)
            return
        n = len(slots)
        self.run_lanes(slots, xrows, np.zeros(n, np.int64), np.ones(n, np.int64))

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        """As TritonCellKernel.run_lane, the whole stack per launch (StackKernel's pieces, layer
        by layer, where the layers differ)."""
        if not self.wavefront:
            return super().run_lane(slot, row, stride, steps, stop)
        done, per_launch = 0, self.layers[0].steps_per_launch
        while done < steps:
            chunk = min(per_launch, steps - done)
            self.run_lanes(np.array([slot]), np.array([row + done * stride]), np.array([stride]), np.array([chunk]))
            done += chunk
            if stop is not None and stop[0]:
                break
        return done


def triton_kernel(step, direction: int, device: torch.device, tile: TileConfig | None = None):
    """The triton backend's kernel for an executor's cell type: a layer's direction or a stack."""
    if isinstance(step, LayerStack):
        return TritonStackKernel(step, device, tile)
    return TritonCellKernel(step.kind, step.hidden, step.directions[direction], device, step.token_table, tile)
