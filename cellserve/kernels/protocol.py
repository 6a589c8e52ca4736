"""The one interface every recurrent kernel offers to an executor.

A kernel owns one cell type on one device: its weights, the state slots and row blocks of
the lanes running through it, and a batched step over any set of those lanes. CellKernel
(one direction of one layer), StackKernel (stacked layers stepped together) and
GraphDecoderKernel (a decoder step given as a graph) all implement it, so an executor never
asks which one it holds.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

# (outputs [T, H], final h [H], final c [H] or None) of one layer for one lane
LayerResult = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


@runtime_checkable
class RecurrentKernel(Protocol):
    @property
    def lone_lanes(self) -> int:
        """Batches of up to this many lanes run each lane alone with `run_lane` (0: never)."""

    def start_lane(self, x: np.ndarray, states: list[tuple[np.ndarray | None, np.ndarray | None]] | None):
        """Admit a lane and return its LaneStorage. x: the lane's inputs ([T, I] floats or
        [T] token ids; a decoder's [T, H] attention memory); states: (h0, c0) per layer of
        the cell type, None entries for zeros (a decoder needs both)."""

    def step_batch(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """Advance lanes (state slots `slots`, next rows `rows`, int64) one step each.
        Returns the token each lane emitted (decoders), else None."""

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        """Advance one lane up to `steps` steps in one call; stops early once `stop[0]` is set
        by another thread (at least one step). Returns the steps run. Only for kernels with
        `lone_lanes` > 0."""

    def finish_lane(self, lane) -> list[LayerResult]:
        """Each layer's results for a lane that ran to its end (empty for a decoder, whose
        tokens the engine kept), and free the lane. The arrays are the caller's to keep: not
        views of storage a later lane reuses."""

    def release(self, lane) -> None:
        """Free a lane without reading it."""

    def weight_bytes(self) -> int:
        """Bytes of weights (packed copies included) the kernel keeps on its device."""
