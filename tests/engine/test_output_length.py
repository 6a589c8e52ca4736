"""Admission prices a decoder's rounds at the steps its lanes have taken (engine/output_length.py):
a straight line in the source length fitted to the lanes that ended, the source length plus the
end step until enough have, never above the decode spec's limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.output_length import MIN_LANES, OutputLength
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import AdditiveSeq2Seq, additive_spec, load_additive

EOS = 2


def test_before_enough_lanes_ended_a_lane_is_priced_at_its_source_length_and_the_end_step():
    lengths = OutputLength()
    for _ in range(MIN_LANES - 1):
        lengths.observe(20, 4)
    assert lengths.steps(20, limit=100) == 21
    assert lengths.steps(20, limit=9) == 9  # never above the spec's limit


def test_outputs_of_one_length_whatever_the_source_are_priced_at_that_length():
    lengths = OutputLength()
    rng = np.random.default_rng(0)
    for n in rng.integers(8, 40, size=200):
        lengths.observe(int(n), 11)
    for n in (5, 20, 60):
        assert lengths.steps(n, limit=1000) == 11


def test_outputs_proportional_to_the_source_are_priced_along_the_line():
    lengths = OutputLength()
    for n in range(1, 200):
        lengths.observe(n % 40 + 1, 2 * (n % 40 + 1) + 3)  # steps = 2n + 3 = 2(n + 1) + 1
    assert lengths.steps(10, limit=1000) == 23
    assert lengths.steps(50, limit=1000) == 103  # beyond the lengths seen, along the line
    assert lengths.steps(50, limit=60) == 60
    assert lengths.steps(0, limit=1000) >= 1


def test_old_lanes_fade_so_a_changed_output_length_is_learnt():
    lengths = OutputLength()
    for _ in range(300):
        lengths.observe(10, 30)
    for _ in range(600):
        lengths.observe(10, 5)
    assert lengths.steps(10, limit=1000) <= 6


@pytest.fixture(scope="module")
def ends_at_once():
    """An encoder-decoder whose first token is always the end token: one step per lane."""
    torch.manual_seed(4)
    module = AdditiveSeq2Seq(vocab=12, hidden=16).eval()
    with torch.no_grad():
        module.out.bias[EOS] = 100.0
    return load_additive(module, additive_spec(MaxLength(ratio=1.0, constant=3), eos=EOS), "short")


def test_the_engine_learns_a_decoder_that_ends_at_once_and_prices_it_at_one_step(ends_at_once):
    engine = Engine([ends_at_once], EngineConfig(policy="cellular", max_batch=64, profile=False, pin_threads=False))
    source = {"source": np.full((1, 20), 5, np.int64)}
    assert engine._rounds_plan(ends_at_once, source) == [20, 21]  # nothing learnt: the source length and the end step
    done: list = []
    for _ in range(MIN_LANES):
        engine.submit(Request("short", source, on_done=done.append))
        engine.run_until_idle()
    assert all(r.status is Status.OK and r.outputs["tokens"].shape[1] <= 1 for r in done)
    assert engine._rounds_plan(ends_at_once, source) == [20, 1]
    # the price follows: 21 rounds of the request's lanes on an idle engine, not 41
    round_s = engine.costs.round_time({t: 1 for t in engine.cell_types}, best=True)
    assert engine.predicted_latency(Request("short", source)) == pytest.approx(21 * round_s)
    # a source length never seen is priced on the same line (every lane took one step)
    assert engine._rounds_plan(ends_at_once, {"source": np.full((1, 7), 5, np.int64)}) == [7, 1]
