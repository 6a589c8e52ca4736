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


class GraphDecoderKernel:
    """The batched greedy step of a `GraphDecoder` (a decoder-step graph; see
    graph/decoder_graph.py), implementing the RecurrentKernel protocol.

    Each lane keeps its attention memory in a row block of a memory arena [rows, M], each of
    its states in a slot row of that state's arena [slots, D_i], and the token it emitted
    last. A step gathers its lanes' memories padded to the longest in the batch, with the
    mask 1.0 at real positions and 0.0 at padding (the graph masks padding itself, so a
    lane's tokens do not depend on its batch), runs the graph once for the batch and
    scatters the new states back. States live in slot rows so that a step may later gather
    any slots (a beam search reordering its hypotheses gathers rows, not whole states).
    """

    lone_lanes = 0  # a decoder's lanes always take the batched step

    def __init__(self, step, device: torch.device):
        from cellserve.graph.decoder_graph import device_constants
        from cellserve.graph.step_ops import torch_dtype

        self.step, self.spec, self.device = step, step.spec, device
        self.constants = device_constants(step.graph, device)
        graph = step.graph
        self._mask_dtype = torch_dtype(np.dtype(graph.input(self.spec.mask_input).dtype))
        self._token_dtype = torch_dtype(np.dtype(graph.input(self.spec.token_input).dtype))
        self._dtypes = [torch_dtype(np.dtype(graph.input(name).dtype)) for name in self.spec.state_inputs]
        memory_dtype = torch_dtype(np.dtype(graph.input(self.spec.memory_input).dtype))
        self.slots, self.rows = SlotPool(), RowPool(1024)
        n = self.slots.capacity
        self.states = [torch.zeros((n, d), dtype=dt, device=device) for d, dt in zip(step.state_sizes, self._dtypes)]
        self.prev = torch.zeros(n, dtype=torch.long, device=device)
        self.memory = torch.zeros((self.rows.capacity, step.memory_width), dtype=memory_dtype, device=device)
        self.memory_len = np.zeros(n, np.int64)
        self.memory_len[0] = 1  # the scratch slot (padding lanes) attends to the scratch row

    def start_lane(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        """x: the lane's memory [S, M]; states: one (initial value [D_i] or None for zeros,)
        per state, in the spec's order."""
        length = int(x.shape[0])
        if length < 1:
            raise ValueError("a decoder lane needs a memory of at least one position")
        lane = LaneStorage(self.slots.take(), self.rows.take(length), length)
        self._fit_capacity()
        self.memory[lane.base: lane.base + length] = torch.as_tensor(np.asarray(x), device=self.device)
        for arena, (value, *_) in zip(self.states, states or [(None,)] * len(self.states)):
            if value is None:
                arena[lane.slot].zero_()
            else:
                arena[lane.slot] = torch.as_tensor(np.asarray(value), device=self.device)
        self.prev[lane.slot] = self.spec.bos
        self.memory_len[lane.slot] = length
        return lane

    def dummy_lane(self, length: int = 4) -> LaneStorage:
        """A lane with a memory of zeros and states at zeros, for timing."""
        return self.start_lane(np.zeros((length, self.memory.shape[1]), np.float32), None)

    def step_batch(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One step of the lanes in state slots `slots` whose memories start at `rows`;
        returns the token each emitted (argmax of its logits)."""
        from cellserve.graph.decoder_graph import run_step_graph

        dev, spec = self.device, self.spec
        s = torch.from_numpy(np.ascontiguousarray(slots, np.int64)).to(dev)
        lengths = self.memory_len[slots]
        width = int(lengths.max())
        offsets = np.arange(width)
        valid = offsets[None, :] < lengths[:, None]
        index = np.where(valid, rows[:, None] + offsets[None, :], rows[:, None])
        feeds = {
            spec.token_input: self.prev.index_select(0, s).to(self._token_dtype),
            spec.memory_input: self.memory[torch.from_numpy(index).to(dev)],  # [B, W, M]
            spec.mask_input: torch.from_numpy(valid).to(dev, self._mask_dtype),
        }
        for name, arena in zip(spec.state_inputs, self.states):
            feeds[name] = arena.index_select(0, s)
        out = run_step_graph(self.step.graph, feeds, self.constants)
        for name, arena in zip(spec.state_outputs, self.states):
            arena.index_copy_(0, s, out[name].to(arena.dtype))
        tokens = torch.argmax(out[spec.logits_output], dim=1)
        self.prev.index_copy_(0, s, tokens)
        return tokens.cpu().numpy()

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        raise NotImplementedError("a decoder has no lone-lane run (lone_lanes is 0)")

    def finish_lane(self, lane: LaneStorage) -> list:
        self.release(lane)
        return []

    def release(self, lane: LaneStorage) -> None:
        self.slots.give(lane.slot)
        self.rows.give(lane.base, lane.length)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.constants.values())

    def _fit_capacity(self) -> None:
        n = self.slots.capacity
        if self.prev.shape[0] < n:
            grow = lambda a: torch.cat([a, a.new_zeros((n - a.shape[0],) + tuple(a.shape[1:]))])  # noqa: E731
            self.states = [grow(a) for a in self.states]
            self.prev = grow(self.prev)
            self.memory_len = np.concatenate([self.memory_len, np.zeros(n - len(self.memory_len), np.int64)])
        if self.memory.shape[0] < self.rows.capacity:
            extra = self.memory.new_zeros((self.rows.capacity - self.memory.shape[0], self.memory.shape[1]))
            self.memory = torch.cat([self.memory, extra])
