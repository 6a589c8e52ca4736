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


# ---- what a streaming sweep found the first check let through, or refused wrongly ----

class Custom(nn.Module):
    """Embedding -> recurrent layer(s) -> a head given as a function; a second input when
    `extra` names its kind: "feature" a per-sequence float [B, 1], "speaker" a per-sequence
    id [B], "mask" a per-step float [B, T]."""

    def __init__(self, head, cell="gru", extra=None, twin=False):
        super().__init__()
        torch.manual_seed(7)
        self.head, self.extra, self.twin = head, extra, twin
        self.embedding = nn.Embedding(VOCAB, 6)
        make = {"gru": lambda: nn.GRU(6, 8, batch_first=True), "lstm": lambda: nn.LSTM(6, 8, batch_first=True),
                "relu": lambda: nn.RNN(6, 8, nonlinearity="relu", batch_first=True)}[cell]
        self.student, self.teacher = make(), make()  # equal name lengths, equal shapes
        self.speakers = nn.Embedding(2, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, tokens, extra=None):
        x = self.embedding(tokens)
        y = self.student(x)[0]
        if self.twin:
            y = y - self.teacher(x)[0]
        if self.extra == "speaker":
            y = y + self.speakers(extra)[:, None]
        return self.head(self, y, extra)


def load_custom(module: nn.Module) -> object:
    example = (torch.zeros((2, 5), dtype=torch.long),)
    names, axes = ["tokens"], {"tokens": {0: "batch", 1: "time"}, "out": {0: "batch"}}
    if module.extra == "feature":
        example, names, axes = example + (torch.ones(2, 1),), names + ["feature"], {**axes, "feature": {0: "batch"}}
    elif module.extra == "speaker":
        example, names, axes = example + (torch.zeros(2, dtype=torch.long),), names + ["speaker"], {**axes, "speaker": {0: "batch"}}
    elif module.extra == "mask":
        example, names, axes = example + (torch.ones(2, 5),), names + ["mask"], {**axes, "mask": {0: "batch", 1: "time"}}
    return load_torch(module.eval(), "net", example, names, ["out"], axes)


REFUSED = {  # each answers differently in chunks
    "pooled times a per-sequence feature": Custom(lambda m, y, f: y[:, -1] + f * y.mean(1), extra="feature"),
    "two layers of equal shapes, their difference pooled": Custom(lambda m, y, _: (y * y).mean(1), twin=True),
    "a ReLU RNN's pooled excess over 1": Custom(lambda m, y, _: torch.relu(y - 1).mean(1), cell="relu"),
    "the class of a pooled score": Custom(lambda m, y, _: torch.argmax(m.out(y.mean(1)), dim=-1)),
}
EXACT = {  # each answers exactly in chunks
    "a per-sequence speaker id added at every step": Custom(lambda m, y, _: m.out(y[:, -1]), extra="speaker"),
    "a per-step mask read by the head alone": Custom(lambda m, y, mask: m.out(y * mask[:, :, None]), extra="mask"),
    "a per-sequence feature normalised": Custom(lambda m, y, f: torch.cat([y[:, -1], f / (f * f).sum(-1, keepdim=True)],
                                                                        -1), extra="feature"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_answers_otherwise_in_chunks_is_refused(name):
    assert load_custom(REFUSED[name]).why_not_streamable() is not None


@pytest.mark.parametrize("name", list(EXACT))
def test_what_answers_exactly_in_chunks_is_streamable(name):
    assert load_custom(EXACT[name]).why_not_streamable() is None


def test_a_request_the_model_turns_into_no_steps_is_invalid_not_an_error():
    """A model whose recurrence reads the input's differences (T - 1 steps) given one token:
    INVALID naming the layer, where the kernel's failure was an internal error."""

    class Differences(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.embedding, self.rnn, self.out = nn.Embedding(VOCAB, 6), nn.GRU(6, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, tokens):
            x = self.embedding(tokens)
            return self.out(self.rnn(x[:, 1:] - x[:, :-1])[0][:, -1])

    model = load(Differences())
    engine = Engine([model], EngineConfig(profile=False, pin_threads=False))
    got = []
    engine.submit(Request("net", {"tokens": np.array([[3]])}, on_done=got.append))
    engine.submit(Request("net", {"tokens": np.array([[3, 4, 5]])}, on_done=got.append))
    engine.run_until_idle()
    assert got[0].status is Status.INVALID and "gets no time steps from this request" in got[0].reason, got[0].reason
    assert got[1].status is Status.OK
