"""Running requests through an Engine and comparing what comes back (shared by the engine tests)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Response, Status
from cellserve.graph import zoo
from cellserve.graph.torch_import import load_torch
from cellserve.graph.zoo.modules import RNNClassifier, RNNTagger, seeded
from cellserve.graph.zoo.seq2seq import MAX_INPUT_DIGITS, PAD, greedy_decode

VOCAB = 50
EXAMPLE = (torch.zeros((1, 3), dtype=torch.long),)
TOKEN_AXES = {"tokens": {0: "batch", 1: "time"}}


class FakeClock:
    """A clock that moves only when told to (and by `tick` on every reading, if set)."""

    def __init__(self, t: float = 100.0, tick: float = 0.0):
        self.t, self.tick = t, tick

    def now(self) -> float:
        self.t += self.tick
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    sleep = advance


class FloatGRU(nn.Module):
    """features [batch, time, 4] float -> scores [batch, 2]: a model whose input is not tokens."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(features)
        return self.head(h[-1])


class Models:
    """The models and their PyTorch references."""

    def __init__(self):
        torch.set_num_threads(1)
        self.modules = {
            "lstm": seeded(RNNClassifier("lstm", vocab=VOCAB, embed=8, hidden=8, layers=2, classes=3), 0),
            "gru": seeded(RNNClassifier("gru", vocab=VOCAB, embed=8, hidden=8, layers=2, classes=3), 1),
            "tagger": seeded(RNNTagger("lstm", vocab=VOCAB, embed=8, hidden=8, layers=2, tags=4), 2),
            "floatgru": seeded(FloatGRU(), 3),
        }
        clf_out = ["probabilities", "label"]
        tag_axes = {"tag_probabilities": {0: "batch", 1: "time"}, "tags": {0: "batch", 1: "time"}}
        self.models = {
            "lstm": load_torch(self.modules["lstm"], "lstm", EXAMPLE, ["tokens"], clf_out, TOKEN_AXES),
            "gru": load_torch(self.modules["gru"], "gru", EXAMPLE, ["tokens"], clf_out, TOKEN_AXES),
            "tagger": load_torch(self.modules["tagger"], "tagger", EXAMPLE, ["tokens"],
                                 ["tag_probabilities", "tags"], {**TOKEN_AXES, **tag_axes}),
            "floatgru": load_torch(self.modules["floatgru"], "floatgru", (torch.zeros((1, 3, 4)),), ["features"],
                                   ["scores"], {"features": {0: "batch", 1: "time"}}),
            "seq2seq-reverse": zoo.load("seq2seq-reverse"),
        }
        self.models["lstm"].max_sequence_length = 16
        self.seq2seq = zoo.reference_module("seq2seq-reverse")

    def reference(self, name: str, inputs: dict) -> dict[str, np.ndarray]:
        """The PyTorch module's outputs for a token model's request."""
        (value,) = inputs.values()
        with torch.no_grad():
            outs = self.modules[name](torch.as_tensor(value))
        outs = outs if isinstance(outs, tuple) else (outs,)
        names = [spec.name for spec in self.models[name].outputs]
        return {n: o.numpy() for n, o in zip(names, outs)}


# integer outputs that are the argmax of a float output: compared only where that argmax is clear
ARGMAX_OF = {"label": "probabilities", "tags": "tag_probabilities"}


class Responses:
    """on_done callbacks that record every response, keyed by the caller's index."""

    def __init__(self):
        self.by_index: dict[int, list[Response]] = defaultdict(list)

    def callback(self, index: int):
        return lambda response: self.by_index[index].append(response)

    def one(self, index: int) -> Response:
        got = self.by_index.get(index, [])
        assert len(got) == 1, f"request {index} got {len(got)} responses: {got}"
        return got[0]


def make_request(responses: Responses, index: int, model: str, inputs: dict, **kw) -> Request:
    return Request(model, inputs, on_done=responses.callback(index), **kw)


def run_alone(models, name: str, inputs: dict) -> dict[str, np.ndarray]:
    """The request on a fresh engine under policy none, with nothing else running."""
    engine = Engine([models.models[name]], EngineConfig(policy="none", profile=False))
    responses = Responses()
    engine.submit(make_request(responses, 0, name, inputs))
    engine.run_until_idle(timeout_s=30)
    response = responses.one(0)
    assert response.status is Status.OK, response.reason
    return response.outputs


def seq2seq_reference(models, digits: np.ndarray) -> np.ndarray:
    """greedy_decode on each row, padded with PAD to the longest (at least one column)."""
    rows = [greedy_decode(models.seq2seq, [int(t) for t in row], MAX_INPUT_DIGITS + 1) for row in digits]
    out = np.full((len(rows), max(1, max(map(len, rows)))), PAD, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def assert_same_outputs(got: dict, want: dict, where: str = "", atol: float = 1e-5) -> None:
    assert set(got) == set(want), where
    for name, w in want.items():
        g = np.asarray(got[name])
        w = np.asarray(w)
        assert g.shape == w.shape, f"{where}: {name} shape {g.shape} != {w.shape}"
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol, err_msg=f"{where}: {name}")
        elif name in ARGMAX_OF and ARGMAX_OF[name] in want:
            top2 = np.sort(np.asarray(want[ARGMAX_OF[name]]), axis=-1)[..., -2:]
            clear = (top2[..., 1] - top2[..., 0]) > 1e-4
            np.testing.assert_array_equal(g[clear], w[clear], err_msg=f"{where}: {name}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{where}: {name}")
