"""Implicit state: a sequence sent in chunks, each chunk starting from the state the last one
left, gives the outputs of the whole sequence sent at once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Status

from helpers_engine import VOCAB, Responses, assert_same_outputs, make_request, run_alone


def run_in_chunks(engine: Engine, name: str, tokens: np.ndarray, cuts: list[int]) -> dict:
    state, outputs = None, None
    bounds = [0, *cuts, tokens.shape[1]]
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        responses = Responses()
        engine.submit(make_request(responses, i, name, {"tokens": tokens[:, start:end]},
                                   initial_state=state, return_state=True))
        engine.run_until_idle(timeout_s=30)
        response = responses.one(i)
        assert response.status is Status.OK, response.reason
        state, outputs = response.state, response.outputs
    return outputs


@pytest.mark.parametrize("name", ["lstm", "gru"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_chunks_equal_whole(models, name, data):
    length = data.draw(st.integers(2, 14), label="length")
    batch = data.draw(st.integers(1, 3), label="batch")
    cuts = sorted(data.draw(st.sets(st.integers(1, length - 1), min_size=1, max_size=4), label="cuts"))
    tokens = np.random.default_rng(length * 7 + batch).integers(0, VOCAB, (batch, length))
    engine = Engine([models.models[name]], EngineConfig(profile=False))
    got = run_in_chunks(engine, name, tokens, cuts)
    assert_same_outputs(got, run_alone(models, name, {"tokens": tokens}), f"{name} cut at {cuts}")


def test_state_names_every_recurrent_layer(models):
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False))
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": np.array([[1, 2, 3]])}, return_state=True))
    engine.run_until_idle()
    state = responses.one(0).state
    layers = [s.name for s in models.models["lstm"].recurrent_steps()]
    assert sorted(state) == sorted(layers)
    for h, c in state.values():
        assert h.shape == (1, 1, 8) and c.shape == (1, 1, 8)


def test_state_of_wrong_batch_is_an_error_for_that_request_only(models):
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False))
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": np.array([[1, 2, 3]])}, return_state=True))
    engine.run_until_idle()
    state = responses.one(0).state
    engine.submit(make_request(responses, 1, "lstm", {"tokens": np.array([[1, 2], [3, 4]])}, initial_state=state))
    engine.submit(make_request(responses, 2, "lstm", {"tokens": np.array([[1, 2]])}, initial_state=state))
    engine.run_until_idle()
    bad = responses.one(1)
    assert bad.status is Status.INVALID and bad.reason.endswith(
        "goes on from a sequence of 1 row(s) (as its first request held) but holds 2: every request of a "
        "sequence must hold as many rows as its first")
    assert responses.one(2).status is Status.OK


def test_why_not_streamable(models):
    assert models.models["lstm"].why_not_streamable() is None
    assert "backwards" in models.models["tagger"].why_not_streamable()
    assert "decodes" in models.models["seq2seq-reverse"].why_not_streamable()
