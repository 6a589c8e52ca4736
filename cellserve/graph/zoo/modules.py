"""PyTorch definitions of the zoo's models.

These modules are the reference: the engine imports them (through their ONNX export) and
its outputs are tested against theirs. Weights are seeded, so a zoo model is the same on
every machine without downloading anything.
"""

from __future__ import annotations

import torch
from torch import nn

_RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def make_rnn(kind: str, input_size: int, hidden: int, layers: int, bidirectional: bool) -> nn.Module:
    cls = _RNN_TYPES[kind]
    extra = {"nonlinearity": kind.split("_")[1]} if kind.startswith("rnn_") else {}
    return cls(input_size, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional, **extra)


class RNNClassifier(nn.Module):
    """tokens [batch, time] -> (probabilities [batch, classes], label [batch]).

    Reads out the last layer's final hidden state (both directions if bidirectional).
    """

    def __init__(self, kind: str, vocab: int, embed: int, hidden: int, layers: int,
                 classes: int, bidirectional: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.rnn = make_rnn(kind, embed, hidden, layers, bidirectional)
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(hidden * self.directions, classes)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, state = self.rnn(self.embedding(tokens))
        h_n = state[0] if isinstance(state, tuple) else state
        last = torch.cat([h_n[-d] for d in range(self.directions, 0, -1)], dim=-1)
        probabilities = torch.softmax(self.head(last), dim=-1)
        return probabilities, torch.argmax(probabilities, dim=-1)


class RNNTagger(nn.Module):
    """tokens [batch, time] -> (tag_probabilities [batch, time, tags], tags [batch, time])."""

    def __init__(self, kind: str, vocab: int, embed: int, hidden: int, layers: int, tags: int,
                 bidirectional: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.rnn = make_rnn(kind, embed, hidden, layers, bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), tags)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, _ = self.rnn(self.embedding(tokens))
        probabilities = torch.softmax(self.head(outputs), dim=-1)
        return probabilities, torch.argmax(probabilities, dim=-1)


def seeded(module: nn.Module, seed: int, scale: float | None = None) -> nn.Module:
    """Re-initialise every parameter from `seed` (uniform in +-scale, PyTorch's default scale
    1/sqrt(hidden) when scale is None) and put the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            bound = scale if scale is not None else 1.0 / max(p.shape[-1], 1) ** 0.5
            if name.startswith("embedding"):
                bound = 1.0
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
    return module.eval()
