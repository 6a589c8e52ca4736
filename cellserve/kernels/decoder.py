"""The batched step of a greedy attention decoder (see graph.model.AttentionDecoder).

Each lane keeps its encoder outputs in a row block of a memory arena, its LSTM state in a
slot, and the token it emitted last. A step runs any set of lanes, whatever their source
lengths: the attention gathers each lane's memory rows, padded to the longest in the batch
and masked.
"""

from __future__ import annotations

import numpy as np
import torch

from cellserve.graph.model import AttentionDecoder
from cellserve.kernels.arena import RowPool, SlotPool
from cellserve.kernels.cell import LaneStorage, lstm_pointwise


class DecoderKernel:
    def __init__(self, spec: AttentionDecoder, device: torch.device):
        self.spec, self.device, self.hidden = spec, device, spec.hidden
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)  # noqa: E731
        w = spec.cell
        # the embedding lookup and the input projection fold into one table, as in CellKernel
        self.projected_table = t(spec.embedding @ w.w_ih.T + w.b_ih + w.b_hh)
        self.w_hh_t = t(w.w_hh.T)
        self.combine_w_t, self.combine_b = t(spec.combine_w.T), t(spec.combine_b)
        self.out_w_t, self.out_b = t(spec.out_w.T), t(spec.out_b)
        self.slots, self.rows = SlotPool(), RowPool(1024)
        self.h = torch.zeros((self.slots.capacity, self.hidden), device=device)
        self.c = torch.zeros_like(self.h)
        self.prev = torch.zeros(self.slots.capacity, dtype=torch.long, device=device)
        self.memory = torch.zeros((self.rows.capacity, self.hidden), device=device)
        self.memory_len = np.zeros(self.slots.capacity, np.int64)
        self.memory_len[0] = 1  # the scratch slot (padding lanes) attends to the scratch row

    def start(self, memory: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> LaneStorage:
        """memory: [T, H] encoder outputs; h0, c0: [H]."""
        length = int(memory.shape[0])
        lane = LaneStorage(self.slots.take(), self.rows.take(length), length)
        self._fit_capacity()
        self.memory[lane.base: lane.base + length] = torch.as_tensor(memory, device=self.device)
        self.h[lane.slot] = torch.as_tensor(h0, device=self.device)
        self.c[lane.slot] = torch.as_tensor(c0, device=self.device)
        self.prev[lane.slot] = self.spec.bos
        self.memory_len[lane.slot] = length
        return lane

    def release(self, lane: LaneStorage) -> None:
        self.slots.give(lane.slot)
        self.rows.give(lane.base, lane.length)

    def step(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Run one decoder step for lanes in state slots `slots` whose memory starts at
        `rows`; returns the token each emitted."""
        dev = self.device
        s = torch.from_numpy(slots).to(dev)
        gates = self.projected_table.index_select(0, self.prev.index_select(0, s)) + self.h.index_select(0, s) @ self.w_hh_t
        h, c = lstm_pointwise(gates, self.c.index_select(0, s))
        self.h.index_copy_(0, s, h)
        self.c.index_copy_(0, s, c)
        lengths = self.memory_len[slots]
        width = int(lengths.max())
        offsets = np.arange(width)
        valid = offsets[None, :] < lengths[:, None]
        index = np.where(valid, rows[:, None] + offsets[None, :], rows[:, None])
        memory = self.memory[torch.from_numpy(index).to(dev)]  # [B, L, H]
        scores = torch.bmm(memory, h.unsqueeze(2)).squeeze(2)
        scores = scores.masked_fill(~torch.from_numpy(valid).to(dev), float("-inf"))
        context = torch.bmm(torch.softmax(scores, dim=1).unsqueeze(1), memory).squeeze(1)
        attended = torch.tanh(torch.cat([context, h], dim=1) @ self.combine_w_t + self.combine_b)
        tokens = torch.argmax(attended @ self.out_w_t + self.out_b, dim=1)
        self.prev.index_copy_(0, s, tokens)
        return tokens.cpu().numpy()

    # ---- the RecurrentKernel protocol (see protocol.py) ----

    lone_lanes = 0  # a decoder's lanes always take the batched step

    def start_lane(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        (h0, c0), = states
        return self.start(x, h0, c0)

    def step_batch(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self.step(slots, rows)

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        raise NotImplementedError("a decoder has no lone-lane run (lone_lanes is 0)")

    def finish_lane(self, lane: LaneStorage) -> list:
        self.release(lane)
        return []

    def weight_bytes(self) -> int:
        tensors = (self.projected_table, self.w_hh_t, self.combine_w_t, self.combine_b, self.out_w_t, self.out_b)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _fit_capacity(self) -> None:
        n = self.slots.capacity
        if self.h.shape[0] < n:
            grow = lambda a: torch.cat([a, a.new_zeros((n - a.shape[0],) + a.shape[1:])])  # noqa: E731
            self.h, self.c, self.prev = grow(self.h), grow(self.c), grow(self.prev)
            self.memory_len = np.concatenate([self.memory_len, np.zeros(n - len(self.memory_len), np.int64)])
        if self.memory.shape[0] < self.rows.capacity:
            extra = self.memory.new_zeros((self.rows.capacity - self.memory.shape[0], self.hidden))
            self.memory = torch.cat([self.memory, extra])
