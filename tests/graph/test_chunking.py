"""Which models answer a sequence sent in chunks as they answer it whole (graph/chunking.py):
heads over the last step, the final state or each step apart do; heads that pool over time,
read the first step, or start one layer from another's final state do not, and say which
output. The refusals are checked against the real engine: for those models, a stream's
answer does differ from the whole sequence's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph import load_torch, zoo

VOCAB = 30


class Head(nn.Module):
    """Embedding -> GRU -> one of several heads over its outputs (batch-first tokens)."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(1)
        self.kind = kind
        self.embedding = nn.Embedding(VOCAB, 6)
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.score = nn.Linear(8, 1)
        self.out = nn.Linear(8, 4)

    def forward(self, tokens):
        y, h = self.rnn(self.embedding(tokens))
        if self.kind == "last":
            return self.out(y[:, -1])
        if self.kind == "final-state":
            return self.out(h[-1])
        if self.kind == "each-step":
            return self.out(y)
        if self.kind == "mean":
            return self.out(y.mean(1))
        if self.kind == "first":
            return self.out(y[:, 0])
        weights = torch.softmax(self.score(y), dim=1)  # attention pooling over time
        return self.out((weights * y).sum(1))


class Handoff(nn.Module):
    """A second LSTM started from the first one's final state."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embedding = nn.Embedding(VOCAB, 6)
        self.first = nn.LSTM(6, 8, batch_first=True)
        self.second = nn.LSTM(6, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens):
        x = self.embedding(tokens)
        _, state = self.first(x)
        y, _ = self.second(x, state)
        return self.out(y[:, -1])


def load(module: nn.Module):
    return load_torch(module.eval(), "net", (torch.zeros((2, 5), dtype=torch.long),), ["tokens"], ["scores"],
                      {"tokens": {0: "batch", 1: "time"}, "scores": {0: "batch"}})


@pytest.mark.parametrize("kind", ["last", "final-state", "each-step"])
def test_heads_that_chunk_exactly_are_streamable(kind):
    assert load(Head(kind)).why_not_streamable() is None


@pytest.mark.parametrize("kind", ["mean", "first", "attention"])
def test_heads_over_more_than_a_chunk_are_not(kind):
    why = load(Head(kind)).why_not_streamable()
    assert why is not None and "output 'scores' depends on more of the sequence than one chunk holds" in why


def test_a_layer_started_from_another_layers_final_state_is_not():
    why = load(Handoff()).why_not_streamable()
    assert why is not None and "starts from a state computed from the sequence" in why


@pytest.mark.parametrize("name", ["lstm-512", "gru-256"])
def test_the_zoos_streamable_models_still_are(name):
    assert zoo.load(name).why_not_streamable() is None


@pytest.mark.parametrize("module", [Head("mean"), Head("first"), Head("attention"), Handoff()],
                         ids=["mean", "first", "attention", "handoff"])
def test_what_is_refused_would_in_fact_answer_differently_in_chunks(module):
    """The engine itself, the sequence cut in two carrying the state: the refused models'
    answers differ from the whole sequence's (so the refusal is not over-cautious)."""
    model = load(module)
    engine = Engine([model], EngineConfig(profile=False, pin_threads=False))
    tokens = np.random.default_rng(5).integers(0, VOCAB, (2, 9))
    got = {}

    def on_done(response):
        got[response.request_id] = response

    whole = Request("net", {"tokens": tokens}, on_done=on_done)
    engine.submit(whole)
    first = Request("net", {"tokens": tokens[:, :4]}, on_done=on_done, return_state=True)
    engine.submit(first)
    engine.run_until_idle()
    second = Request("net", {"tokens": tokens[:, 4:]}, on_done=on_done, initial_state=got[first.request_id].state)
    engine.submit(second)
    engine.run_until_idle()
    assert all(r.status is Status.OK for r in got.values())
    assert not np.allclose(got[second.request_id].outputs["scores"], got[whole.request_id].outputs["scores"],
                           rtol=1e-4, atol=1e-5)
