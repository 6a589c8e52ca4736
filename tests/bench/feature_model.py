"""A small model of float feature rows, as a user exports one from PyTorch (a speech or sensor
tagger): rows of 6, time-major, a GRU of 8 (both directions, if asked) and a head of 3 at every
step. For the benchmarks' tests of models that are not token classifiers."""

from __future__ import annotations

import torch

FEATURES, HIDDEN, CLASSES = 6, 8, 3


class Frames(torch.nn.Module):
    def __init__(self, bidirectional: bool = False):
        super().__init__()
        self.rnn = torch.nn.GRU(FEATURES, HIDDEN, bidirectional=bidirectional)
        self.head = torch.nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, features):
        return self.head(self.rnn(features)[0])


def export_frames(path, bidirectional: bool = False, seed: int = 0) -> None:
    """Write the model to `path` (its folder made), input `features` [time, batch, 6]."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "time", 1: "batch"}
    torch.onnx.export(Frames(bidirectional).eval(), (torch.zeros(5, 1, FEATURES),), str(path),
                      input_names=["features"], output_names=["scores"], opset_version=17, dynamo=False,
                      dynamic_axes={"features": axes, "scores": axes})
