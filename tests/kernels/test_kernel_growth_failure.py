"""A kernel whose arrays cannot grow for one huge lane (a MemoryError) refuses that lane and
serves the next ones as before: its pools do not keep the capacity the arrays never got."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.graph.model import GraphDecoder, LayerStack
from cellserve.graph.stacking import stack_layers
from cellserve.graph.zoo import load
from cellserve.kernels import decoder as decoder_module
from cellserve.kernels.cell import CellKernel
from cellserve.kernels.decoder import GraphDecoderKernel
from cellserve.kernels.stack import StackKernel

CPU = torch.device("cpu")


def _stack() -> StackKernel:
    (stack,) = [s for s in stack_layers(load("gru-256")).program if isinstance(s, LayerStack)]
    return StackKernel(stack, CPU, "fused")


def _outputs(kernel: StackKernel, tokens: np.ndarray) -> list[np.ndarray]:
    lane = kernel.start_lane(tokens)
    kernel.run_lane(lane.slot, lane.base, 1, len(tokens))
    return [y for y, _, _ in kernel.finish_lane(lane)]


def test_a_stack_that_cannot_grow_for_a_huge_lane_serves_the_next_lanes_as_before(monkeypatch):
    kernel, fresh = _stack(), _stack()
    tokens = np.arange(1, 30, dtype=np.int64)
    rows = kernel.rows.capacity

    def no_memory(self, a, n):
        raise MemoryError(f"cannot allocate {n} rows")

    with monkeypatch.context() as m:
        m.setattr(CellKernel, "_resized", no_memory)
        with pytest.raises(MemoryError):
            kernel.start_lane(np.ones(rows + 10, np.int64))
    assert kernel.rows.capacity == rows and kernel.rows.take(rows - 1) == 1  # all of it free, none past the arrays
    kernel.rows.give(1, rows - 1)
    for got, want in zip(_outputs(kernel, tokens), _outputs(fresh, tokens)):
        np.testing.assert_array_equal(got, want)
    huge = kernel.start_lane(np.ones(rows + 10, np.int64))  # memory again: the huge lane starts too
    kernel.release(huge)


def test_a_decoder_that_cannot_grow_for_a_huge_lane_serves_the_next_lanes_as_before(monkeypatch):
    (dec,) = [s for s in load("seq2seq-reverse").program if isinstance(s, GraphDecoder)]
    kernel, fresh = GraphDecoderKernel(dec, CPU), GraphDecoderKernel(dec, CPU)
    rows = kernel.rows.capacity
    memory = np.random.default_rng(0).standard_normal((6, dec.memory_width)).astype(np.float32)
    real_cat = torch.cat

    def no_memory(tensors, *args, **kwargs):
        if sum(t.shape[0] for t in tensors) > rows:
            raise MemoryError("cannot allocate the memory arena")
        return real_cat(tensors, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(decoder_module.torch, "cat", no_memory)
        with pytest.raises(MemoryError):
            kernel.start_lane(np.zeros((rows + 10, dec.memory_width), np.float32))
    assert kernel.rows.capacity == rows

    def decode(k: GraphDecoderKernel) -> list[int]:
        lane = k.start_lane(memory)
        k.run_lane(lane.slot, lane.base, 0, 8, stop_at_eos=False)
        k.release(lane)
        return k.lone_tokens.tolist()

    assert decode(kernel) == decode(fresh)
