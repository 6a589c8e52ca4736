"""GraphDecoderKernel's lone-lane run: a greedy lane's steps in one call, bit for bit the
steps the batched step gives that lane alone, stopping at EOS or when asked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cellserve.graph.model import GraphDecoder
from cellserve.graph.zoo import load
from cellserve.kernels.decoder import GraphDecoderKernel


def _decoder(name: str) -> GraphDecoder:
    (dec,) = [s for s in load(name).program if isinstance(s, GraphDecoder)]
    return dec


def _lane(kernel: GraphDecoderKernel, dec: GraphDecoder, seed: int, length: int = 7):
    rng = np.random.default_rng(seed)
    memory = rng.standard_normal((length, dec.memory_width)).astype(np.float32)
    states = [(rng.standard_normal(d).astype(np.float32),) for d in dec.state_sizes]
    return kernel.start_lane(memory, states)


def _state_rows(kernel: GraphDecoderKernel, slot: int) -> list[torch.Tensor]:
    return [arena[slot].clone() for arena in kernel.states]


@pytest.mark.parametrize("name", ["seq2seq-reverse", "dates"])
def test_a_lone_run_gives_the_batched_steps_tokens_and_states_bit_for_bit(name):
    dec = _decoder(name)
    kernel = GraphDecoderKernel(dec, torch.device("cpu"))
    for seed in range(3):
        lone, batched = _lane(kernel, dec, seed), _lane(kernel, dec, seed)
        steps = 9
        assert kernel.run_lane(lone.slot, lone.base, 0, steps, stop_at_eos=False) == steps
        want = [int(kernel.step_batch(np.array([batched.slot]), np.array([batched.base]))[0]) for _ in range(steps)]
        assert kernel.lone_tokens.tolist() == want
        for a, b in zip(_state_rows(kernel, lone.slot), _state_rows(kernel, batched.slot)):
            assert torch.equal(a, b)
        assert int(kernel.prev[lone.slot]) == int(kernel.prev[batched.slot]) == want[-1]
        # and the lane goes on from there as the batched one does
        kernel.run_lane(lone.slot, lone.base, 0, 1, stop_at_eos=False)
        assert kernel.lone_tokens.tolist() == kernel.step_batch(np.array([batched.slot]),
                                                                np.array([batched.base])).tolist()
        kernel.release(lone)
        kernel.release(batched)


def test_a_lone_run_stops_after_the_step_that_emits_eos():
    dec = _decoder("seq2seq-reverse")
    kernel = GraphDecoderKernel(dec, torch.device("cpu"))
    lane = _lane(kernel, dec, 5)
    probe = _lane(kernel, dec, 5)
    free = [int(kernel.step_batch(np.array([probe.slot]), np.array([probe.base]))[0]) for _ in range(40)]
    eos = free[len(free) // 2]  # a token this lane emits, its first time at some step k: EOS there
    first = free.index(eos)
    kernel.spec = dataclasses.replace(kernel.spec, eos=eos)
    assert kernel.run_lane(lane.slot, lane.base, 0, 40) == first + 1
    assert kernel.lone_tokens.tolist() == free[:first + 1]


def test_a_lone_run_gives_way_after_its_step_in_progress_once_asked():
    dec = _decoder("dates")
    kernel = GraphDecoderKernel(dec, torch.device("cpu"))
    lane = _lane(kernel, dec, 1)
    stop = np.ones(1, np.int64)  # raised before the run: it still runs one step
    assert kernel.run_lane(lane.slot, lane.base, 0, 20, stop, stop_at_eos=False) == 1
    assert len(kernel.lone_tokens) == 1


def test_a_beam_lane_is_refused_a_lone_run():
    dec = _decoder("seq2seq-reverse")
    kernel = GraphDecoderKernel(dec, torch.device("cpu"))
    memory = np.zeros((4, dec.memory_width), np.float32)
    first, *_ = kernel.start_beam(memory, [(None,)] * len(dec.state_sizes), 3)
    with pytest.raises(ValueError, match="is a beam lane: beam rows take the batched step"):
        kernel.run_lane(first.slot, first.base, 0, 5)
