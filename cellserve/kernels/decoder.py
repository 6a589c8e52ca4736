"""The batched step of a decoder given as a graph (see graph.model.GraphDecoder and
docs/decoders.md): `GraphDecoderKernel`, and the beam bookkeeping it keeps per request.

Each lane keeps its attention memory in a row block of a memory arena, its states in slots,
and the token it emitted last. A step runs any set of lanes, whatever their source lengths:
it gathers each lane's memory rows, padded to the longest in the batch and masked. The
step graph runs compiled (graph/step_compile.py, through `run_step_graph`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cellserve.kernels.arena import RowPool, SlotPool, new_lane
from cellserve.kernels.cell import LaneStorage


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

    Beam search (engine/beam.py decides, this kernel moves the rows): `start_beam` reserves a
    request row's `width` slots over ONE memory block (its beams share it); a step whose batch
    holds beam lanes also leaves in `candidates` each lane's best K tokens and float64
    log-probabilities (K the widest beam in the batch), exactly ordered; `reorder` then
    gathers the surviving hypotheses' state rows from their parents' slots and sets their
    tokens. A row's memory block and slots go back once its last live lane is released.
    Greedy lanes (width 1, `start_lane`) take the argmax path alone, as before.
    """

    # A batch of one greedy lane runs several steps in one call (run_lane): the engine's
    # round trip per token is most of a lone decode's time off the device
    lone_lanes = 1

    def __init__(self, step, device: torch.device):
        from cellserve.graph.decoder_graph import device_constants
        from cellserve.graph.step_ops import torch_dtype

        self.step, self.spec, self.device = step, step.spec, device
        self.constants = device_constants(step.graph, device)
        graph = step.graph
        # a step without attention is fed no memory: the lane's memory then only sets its length
        self._attends = graph.attends(self.spec)
        self._mask_dtype = torch_dtype(np.dtype(graph.input(self.spec.mask_input).dtype)) if self._attends else None
        self._token_dtype = torch_dtype(np.dtype(graph.input(self.spec.token_input).dtype))
        self._dtypes = [torch_dtype(np.dtype(graph.input(name).dtype)) for name in self.spec.state_inputs]
        memory_dtype = (torch_dtype(np.dtype(graph.input(self.spec.memory_input).dtype)) if self._attends
                        else torch.float32)
        self.slots, self.rows = SlotPool(), RowPool(1024)
        n = self.slots.capacity
        self.states = [torch.zeros((n, d), dtype=dt, device=device) for d, dt in zip(step.state_sizes, self._dtypes)]
        self.prev = torch.zeros(n, dtype=torch.long, device=device)
        self.memory = torch.zeros((self.rows.capacity, step.memory_width), dtype=memory_dtype, device=device)
        self.memory_len = np.zeros(n, np.int64)
        self.memory_len[0] = 1  # the scratch slot (padding lanes) attends to the scratch row
        self.beam_k = np.zeros(n, np.int64)  # per slot: its row's beam width (0: a greedy lane)
        self._groups: dict[int, _BeamGroup] = {}  # slot -> the beam row it belongs to
        self.candidates: BeamCandidates | None = None  # of the last step_batch (None: no beam lane)
        self.lone_tokens = np.zeros(0, np.int64)  # of the last run_lane: the token of each step
        # Read once: the spec's name lists are properties that build a list per call, and
        # each step reads them (the step is dispatch-bound at serving batch sizes).
        self._state_inputs, self._state_outputs = list(self.spec.state_inputs), list(self.spec.state_outputs)
        self._cpu = device.type == "cpu"  # `.to(device)` and `.cpu()` are no-ops there, but not free
        self._host_views()

    def start_beam(self, x: np.ndarray, states: list[tuple] | None, width: int) -> list[LaneStorage]:
        """A beam row of `width` slots sharing one memory block (x [S, M]); the first slot
        starts as start_lane's lane does and is the row's one live lane; the others are
        spares that `reorder` brings to life. Returns the width storages, first slot first."""
        first = self.start_lane(x, states)
        capacity = self.slots.capacity
        spares = [self.slots.take() for _ in range(width - 1)]
        try:
            self._fit_capacity()
        except BaseException:  # a row that could not start holds nothing (as new_lane leaves a lane)
            for s in spares:
                self.slots.give(s)
            self.slots.shrink_to(capacity)
            self.release(first)
            raise
        slots = [first.slot] + spares
        self.memory_len[slots] = first.length
        self.beam_k[slots] = width
        group = _BeamGroup(slots, first.base, first.length, {first.slot})
        for s in slots:
            self._groups[s] = group
        return [LaneStorage(s, first.base, first.length) for s in slots]

    def reorder(self, dst: np.ndarray, src: np.ndarray, tokens: np.ndarray) -> None:
        """Beam rows between steps: the state rows of slots `src` (the parents, as the last
        step left them) go to slots `dst`, whose next input token is `tokens`. Gathered
        before scattered, so a slot may be both a parent and a destination."""
        moved = dst != src
        host = self._host
        if host is not None:  # numpy views of the CPU arenas: a torch call's dispatch costs more
            _, arenas, prev = host  # than these few rows' copies (a fancy index gathers first)
            if moved.any():
                dm, sm = dst[moved], src[moved]
                for arena in arenas:
                    arena[dm] = arena[sm]
            prev[dst] = tokens
        else:
            dev = self.device
            d = torch.from_numpy(np.ascontiguousarray(dst, np.int64)).to(dev)
            if moved.any():
                dm = torch.from_numpy(np.ascontiguousarray(dst[moved], np.int64)).to(dev)
                sm = torch.from_numpy(np.ascontiguousarray(src[moved], np.int64)).to(dev)
                for arena in self.states:
                    arena.index_copy_(0, dm, arena.index_select(0, sm))
            self.prev.index_copy_(0, d, torch.from_numpy(np.ascontiguousarray(tokens, np.int64)).to(dev))
        for s in dst.tolist():
            self._groups[s].live.add(s)

    def start_lane(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        """x: the lane's memory [S, M]; states: one (initial value [D_i] or None for zeros,)
        per state, in the spec's order."""
        length = int(x.shape[0])
        if length < 1:
            raise ValueError("a decoder lane needs a memory of at least one position")
        with new_lane(self.slots, self.rows, length, self.release) as lane:
            self._load(lane, x, states)
        return lane

    def _load(self, lane: LaneStorage, x: np.ndarray, states: list[tuple] | None) -> None:
        length = lane.length
        self._fit_capacity()
        host = self._host
        if host is not None:  # the same copies through numpy views of the arenas: a torch
            memory, arenas, prev = host  # setitem costs several microseconds of dispatch each
            memory[lane.base: lane.base + length] = x
            for arena, (value, *_) in zip(arenas, states or [(None,)] * len(arenas)):
                arena[lane.slot] = 0 if value is None else value
            prev[lane.slot] = self.spec.bos
        else:
            self.memory[lane.base: lane.base + length] = torch.as_tensor(np.asarray(x), device=self.device)
            for arena, (value, *_) in zip(self.states, states or [(None,)] * len(self.states)):
                if value is None:
                    arena[lane.slot].zero_()
                else:
                    arena[lane.slot] = torch.as_tensor(np.asarray(value), device=self.device)
            self.prev[lane.slot] = self.spec.bos
        self.memory_len[lane.slot] = length

    def dummy_lane(self, length: int = 4) -> LaneStorage:
        """A lane with a memory of zeros and states at zeros, for timing."""
        return self.start_lane(np.zeros((length, self.memory.shape[1]), np.float32), None)

    def step_batch(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One step of the lanes in state slots `slots` whose memories start at `rows`;
        returns the token each emitted (argmax of its logits).

        At serving batch sizes this step is bound by dispatch, not arithmetic (about 25 torch
        calls in the digit reverser's graph, each a few microseconds), so the host side here
        keeps to as few calls as it can: one gather of the memories' rows, no device moves
        on the CPU, no beam bookkeeping while no beam row exists; and it runs in inference
        mode, which skips autograd's layer of every call (the same kernels compute the same
        values). Only in-place writes to the arenas outlive it, and those stay normal tensors:
        inference mode makes new tensors, never converts old ones."""
        with torch.inference_mode():
            return self._step_batch(slots, rows)

    def _step_batch(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        dev, spec = self.device, self.spec
        slots = np.ascontiguousarray(slots, np.int64)
        s = torch.from_numpy(slots)
        if not self._cpu:
            s = s.to(dev)
        token = self.prev.index_select(0, s)
        if token.dtype != self._token_dtype:
            token = token.to(self._token_dtype)
        feeds = {spec.token_input: token}
        if self._attends:
            lengths = self.memory_len[slots]
            width = int(lengths.max())
            offsets = np.arange(width)
            valid = offsets < lengths[:, None]
            # A lane's rows, each padding position pointing at its first row (the mask hides it)
            index = np.ascontiguousarray(rows, np.int64)[:, None] + offsets * valid
            flat = torch.from_numpy(index.reshape(-1))
            memory = self.memory.index_select(0, flat if self._cpu else flat.to(dev))
            feeds[spec.memory_input] = memory.view(len(slots), width, memory.shape[1])  # [B, W, M]
            feeds[spec.mask_input] = torch.from_numpy(valid).to(dev, self._mask_dtype)
        for name, arena in zip(self._state_inputs, self.states):
            feeds[name] = arena.index_select(0, s)
        compiled = self.constants.compiled  # what run_step_graph would call, without its two calls
        if compiled is None:
            from cellserve.graph.decoder_graph import run_step_graph

            out = run_step_graph(self.step.graph, feeds, self.constants)
        else:
            out = compiled(feeds)
        for name, arena in zip(self._state_outputs, self.states):
            value = out[name]
            arena.index_copy_(0, s, value if value.dtype == arena.dtype else value.to(arena.dtype))
        logits = out[spec.logits_output]
        tokens = torch.argmax(logits, dim=1)
        self.prev.index_copy_(0, s, tokens)  # a beam lane's token is set again by reorder
        self.candidates = None
        if self._groups:  # beam rows exist (only they set beam_k)
            widths = self.beam_k[slots]
            if widths.any():
                self.candidates = _top_candidates(logits, int(widths.max()))
        return tokens.numpy() if self._cpu else tokens.cpu().numpy()

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None,
                 stop_at_eos: bool = True) -> int:
        """Up to `steps` greedy steps of the lane in `slot` (memory from `row`; `stride` is 0
        for a decoder and unused) in one call: the same steps, bit for bit, as step_batch
        gives a batch of this one lane, without its per-step gathers (the memory and mask
        are the lane's own, the states carried from step to step and written back once).
        Stops after the step that emits EOS (unless `stop_at_eos` is False: for timing), or
        after any step once `stop[0]` is set. Returns the steps run; `lone_tokens` holds
        the token of each. Greedy lanes only: a beam row's lanes take step_batch."""
        if self.beam_k[slot]:
            raise ValueError(f"slot {slot} is a beam lane: beam rows take the batched step")
        with torch.inference_mode():
            return self._run_lane(slot, row, steps, stop, stop_at_eos)

    def _run_lane(self, slot: int, row: int, steps: int, stop: np.ndarray | None, stop_at_eos: bool) -> int:
        spec, eos = self.spec, self.spec.eos
        token = self.prev[slot: slot + 1]
        if token.dtype != self._token_dtype:
            token = token.to(self._token_dtype)
        feeds = {}
        if self._attends:
            length = int(self.memory_len[slot])
            feeds[spec.memory_input] = self.memory[row: row + length].unsqueeze(0)  # [1, S, M]
            feeds[spec.mask_input] = torch.ones((1, length), dtype=self._mask_dtype, device=self.device)
        states = [arena[slot: slot + 1] for arena in self.states]
        compiled = self.constants.compiled
        if compiled is None:
            from cellserve.graph.decoder_graph import run_step_graph

            compiled = lambda f: run_step_graph(self.step.graph, f, self.constants)  # noqa: E731
        tokens = []
        for _ in range(max(steps, 1)):  # at least one step, as every run_lane
            feeds[spec.token_input] = token
            for name, value in zip(self._state_inputs, states):
                feeds[name] = value
            out = compiled(feeds)
            states = [out[name] if out[name].dtype == arena.dtype else out[name].to(arena.dtype)
                      for name, arena in zip(self._state_outputs, self.states)]
            emitted = torch.argmax(out[spec.logits_output], dim=1)
            tokens.append(int(emitted[0]))
            token = emitted if emitted.dtype == self._token_dtype else emitted.to(self._token_dtype)
            if (stop_at_eos and tokens[-1] == eos) or (stop is not None and stop[0]):
                break
        for arena, value in zip(self.states, states):
            arena[slot: slot + 1] = value
        self.prev[slot] = tokens[-1]
        self.lone_tokens = np.array(tokens, np.int64)
        self.candidates = None
        return len(tokens)

    def finish_lane(self, lane: LaneStorage) -> list:
        self.release(lane)
        return []

    def release(self, lane: LaneStorage) -> None:
        """Free a lane; a beam lane frees its row's slots and memory with its row's last live lane."""
        group = self._groups.get(lane.slot)
        if group is None:
            self.slots.give(lane.slot)
            self.rows.give(lane.base, lane.length)
            return
        group.live.discard(lane.slot)
        if group.live:
            return
        for s in group.slots:
            del self._groups[s]
            self.beam_k[s] = 0
            self.slots.give(s)
        self.rows.give(group.base, group.length)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.constants.values())

    def _fit_capacity(self) -> None:
        """Grow the arenas to the pools' capacities (called at every lane start: the usual
        case, nothing to grow, is one comparison of two ints each)."""
        n = self.slots.capacity
        if n == self._fit[0] and self.rows.capacity == self._fit[1]:
            return
        # every new arena made before any is replaced: an allocation that fails (a MemoryError)
        # leaves the kernel as it was, its host views on the arenas it still uses
        states, prev, memory_len, beam_k, memory = self.states, self.prev, self.memory_len, self.beam_k, self.memory
        if prev.shape[0] < n:
            grow = lambda a: torch.cat([a, a.new_zeros((n - a.shape[0],) + tuple(a.shape[1:]))])  # noqa: E731
            states, prev = [grow(a) for a in states], grow(prev)
            memory_len = np.concatenate([memory_len, np.zeros(n - len(memory_len), np.int64)])
            beam_k = np.concatenate([beam_k, np.zeros(n - len(beam_k), np.int64)])
        if memory.shape[0] < self.rows.capacity:
            memory = torch.cat([memory, memory.new_zeros((self.rows.capacity - memory.shape[0], memory.shape[1]))])
        self.states, self.prev, self.memory_len, self.beam_k, self.memory = states, prev, memory_len, beam_k, memory
        self._host_views()  # the arenas may have been replaced: the views must follow

    def _host_views(self) -> None:
        """numpy views of the memory, state and token arenas (sharing their storage), through
        which a lane's start writes them on the CPU; None elsewhere, or where a dtype has no
        numpy twin (bfloat16). Also notes the capacities the arenas fit (_fit_capacity)."""
        self._fit = (self.prev.shape[0], self.memory.shape[0])
        self._host = None
        if self._cpu:
            try:
                self._host = (self.memory.numpy(), [a.numpy() for a in self.states], self.prev.numpy())
            except TypeError:
                pass


@dataclass(eq=False)
class _BeamGroup:
    """A beam row's reserved slots, its shared memory block, and which slots are live lanes."""

    slots: list[int]
    base: int
    length: int
    live: set[int]


@dataclass(frozen=True)
class BeamCandidates:
    """Per batch entry, its best K next tokens [B, K] int64 and their log-probabilities
    [B, K] float64 (log_softmax of the float32 logits in float64), sorted by log-probability
    descending, ties by token id ascending. K is the widest beam in the batch (at most V)."""

    tokens: np.ndarray
    logp: np.ndarray


def _top_candidates(logits: torch.Tensor, k: int) -> BeamCandidates:
    """The exact best k per row (see BeamCandidates): topk of k + 1 finds the set unless the
    k-th and (k+1)-th tie, when that row is sorted whole (stable: ties to the lower id)."""
    logp = torch.log_softmax(logits.double(), dim=1)
    vocab = logp.shape[1]
    k = min(k, vocab)
    values, index = torch.topk(logp, min(k + 1, vocab), dim=1)
    values, index = values.cpu().numpy(), index.cpu().numpy()
    if k < vocab:
        for r in np.flatnonzero(values[:, k - 1] == values[:, k]).tolist():  # a tie across the cut
            order = torch.sort(logp[r], descending=True, stable=True).indices[: k + 1].cpu().numpy()
            index[r], values[r] = order, logp[r, order].cpu().numpy()
    values, index = values[:, :k], index[:, :k]
    order = np.lexsort((index, -values), axis=1)  # within the set: log-prob down, then id up
    return BeamCandidates(np.take_along_axis(index, order, 1), np.take_along_axis(values, order, 1))
