"""How a stack of layers steps as one cell type (see graph.model.LayerStack).

A `StackKernel` holds one `CellKernel` per layer, all sharing one slot pool and one row pool:
a lane has the same slot and rows in every layer, so one batch's slots and rows serve each.
A batched step runs the first layer's step, then the next layer's step on the output rows it
wrote (their projection, then the step, see CellKernel.step_rows), and so on up. A lane
alone runs piece by piece: up to LANE_PIECE steps of each layer in turn, with one projection
of those rows between (see run_lane). Both project before they step, the same way
(CellKernel.project_rows: on the fused backend W_ih in panels, each row summed alike however
many are projected), so a lane's answer is the same to the last bit whichever way its steps
ran.

Tried and dropped: letting each layer run a few steps behind the one below, so that
projections run a chunk of rows at a time. It saves GEMM calls only for batches of one or
two lanes, and the steps it adds to every request cost more under load (measured at 150-650
req/s on lstm-512: higher p50, fewer requests within a 50 ms deadline).
"""

from __future__ import annotations

import numpy as np
import torch

from cellserve.graph.model import LayerStack
from cellserve.kernels.arena import RowPool, SlotPool, new_lane
from cellserve.kernels.cell import CellKernel, LaneStorage

# Steps of a lone lane's run per layer between projections: 16 rows amortise the read of
# W_ih (a projection of 8 rows costs nearly what one of 16 does) and keep an arrival's wait
# for the layers above short (16 steps of each).
LANE_PIECE = 16


class StackKernel:
    def __init__(self, stack: LayerStack, device: torch.device, backend: str | None = None):
        self.slots, self.rows = SlotPool(), RowPool()
        self.layers = [CellKernel(layer.kind, layer.hidden, layer.directions[0], device, layer.token_table,
                                  backend, pools=(self.slots, self.rows), fed_by_rows=i > 0)
                       for i, layer in enumerate(stack.layers)]
        self.device, self.backend = device, self.layers[0].backend

    def start(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        """Admit a lane. x: the first layer's inputs (as CellKernel.start); states: (h0, c0)
        per layer, each None for zeros."""
        with new_lane(self.slots, self.rows, int(x.shape[0]), self.release) as lane:
            for i, layer in enumerate(self.layers):
                h0, c0 = states[i] if states else (None, None)
                layer.load(lane, x if i == 0 else None, h0, c0)
        return lane

    def finish(self, lane: LaneStorage) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Each layer's (outputs [T, H], h [H], c [H] or None), and free the lane."""
        results = [layer.read(lane) for layer in self.layers]
        self.release(lane)
        return results

    def release(self, lane: LaneStorage) -> None:
        self.layers[0].release(lane)  # the pools are shared: one give frees the lane everywhere

    def step(self, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        """Advance a batch of lanes one step through every layer (as CellKernel.step)."""
        below = self.layers[0]
        below.step(slots, xrows, orows)
        for layer in self.layers[1:]:
            layer.step_rows(below.out, orows, slots, orows)
            below = layer

    # ---- the RecurrentKernel protocol (see protocol.py) ----

    def start_lane(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        return self.start(x, states)

    def step_batch(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.step(slots, rows, rows)

    def finish_lane(self, lane: LaneStorage) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        return self.finish(lane)

    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes() for layer in self.layers)

    @property
    def lone_lanes(self) -> int:
        """Batches of up to this many lanes run each lane alone (CPU backends). One lane: its
        run_lane goes many steps per call. Two: with oneDNN or BLAS a batched step of two
        projects two rows per step, which reads as much of W_ih as a projection of a whole
        piece, and costs more than the two lanes alone; the fused step reads each weight once
        for both lanes, and costs less (docs/performance.md, "Kernels")."""
        if not self.layers[0].lone_lanes:
            return 0
        return 1 if self.backend == "fused" else 2

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        """Advance one lane up to `steps` steps (CPU backends; stride is 1, a stack runs
        forward), `stop` as CellKernel.run_lane; returns the steps run.

        Each layer in turn runs a piece of LANE_PIECE steps, the first one stopping early
        when `stop` is set, the others catching up on the rows it wrote: a request that
        arrives waits for at most one piece of the layers above."""
        done = 0
        while done < steps:
            first = row + done
            ran = self.layers[0].run_lane(slot, first, 1, min(LANE_PIECE, steps - done), stop)
            rows = np.arange(first, first + ran, dtype=np.int64)
            below = self.layers[0]
            for layer in self.layers[1:]:
                layer.project_rows(below.out, rows, layer.x, rows)
                layer.run_lane(slot, first, 1, ran)
                below = layer
            done += ran
            if stop is not None and stop[0]:
                break
        return done
