"""Admission prices a beam request at its hypotheses: a row decoded with width k is k lanes of
the decoder's cell type, in the prediction and in the load committed to the engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import AdditiveSeq2Seq, additive_spec, load_additive

STEP_S = lambda lanes: 1e-4 * lanes  # noqa: E731  a step's price, linear in its lanes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    module = AdditiveSeq2Seq(vocab=12, hidden=16).eval()
    spec = dataclasses.replace(additive_spec(MaxLength(ratio=1.0, constant=3)), max_beam_width=4)
    return load_additive(module, spec, "beam")


def _engine(model) -> Engine:
    engine = Engine([model], EngineConfig(policy="cellular", max_batch=64, profile=False, pin_threads=False))
    for cell_type in engine.cell_types:
        for b in (1, 2, 4, 8, 16, 32, 64):
            engine.costs.observe(cell_type, b, STEP_S(b))
    return engine


def _request(width: int | None, rows: int = 2) -> Request:
    return Request("beam", {"source": np.full((rows, 5), 3, np.int64)}, beam_width=width)


def test_a_beam_request_is_priced_at_width_lanes_per_row_in_the_decoder(model):
    engine = _engine(model)
    decoder = next(t for t in engine.cell_types if t.endswith("/decoder"))
    others = [t for t in engine.cell_types if t != decoder]
    rounds = sum(engine._rounds_plan(model, _request(1).inputs))
    for width in (1, 2, 4):
        load = {decoder: 2 * width, **{t: 2 for t in others}}
        assert engine.predicted_latency(_request(width)) == pytest.approx(
            rounds * engine.costs.round_time(load, best=True))
    assert engine.predicted_latency(_request(4)) > engine.predicted_latency(_request(1))


def test_an_admitted_beam_request_commits_its_hypotheses_and_gives_them_back(model):
    engine = _engine(model)
    decoder = next(t for t in engine.cell_types if t.endswith("/decoder"))
    done = []
    engine.submit(Request("beam", _request(3).inputs, beam_width=3, on_done=done.append))
    engine.step()  # admitted: its encoder runs, its beam rows start
    assert engine._committed[decoder] == 2 * 3
    engine.run_until_idle()
    assert [r.status.value for r in done] == ["ok"]
    assert all(n == 0 for n in engine._committed.values())
