"""A layer fed by an embedding keeps every token's projection only while that table is small
(cell.MAX_PROJECTED_TABLE_BYTES); past it a lane's start looks up its embeddings and projects
them: the same outputs either way, on every backend, for a layer alone and a stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph import load_torch
from cellserve.kernels import cell


class Tagger(torch.nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        torch.manual_seed(layers)
        self.embedding = torch.nn.Embedding(40, 6)
        self.rnn = torch.nn.LSTM(6, 10, num_layers=layers)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, tokens):
        return self.head(self.rnn(self.embedding(tokens))[0])


def answers(model, backend: str) -> tuple[list[np.ndarray], Engine]:
    engine = Engine([model], EngineConfig(profile=False, pin_threads=False, backend=backend))
    rng = np.random.default_rng(0)
    got = []
    for length, rows in ((7, 1), (3, 2), (12, 3)):
        engine.submit(Request("net", {"tokens": rng.integers(0, 40, (length, rows))}, on_done=got.append))
    engine.run_until_idle()
    assert all(r.status is Status.OK for r in got)
    return [r.outputs["scores"] for r in sorted(got, key=lambda r: r.request_id)], engine


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("layers", [1, 2])
def test_a_table_too_large_to_keep_is_projected_per_lane_with_the_same_outputs(monkeypatch, backend, layers):
    model = load_torch(Tagger(layers).eval(), "net", (torch.zeros((4, 2), dtype=torch.long),), ["tokens"], ["scores"],
                       {"tokens": {0: "time", 1: "batch"}, "scores": {0: "time", 1: "batch"}})
    kept, engine = answers(model, backend)
    assert any(getattr(k, "projected_table", None) is not None for k in _cell_kernels(engine))
    monkeypatch.setattr(cell, "MAX_PROJECTED_TABLE_BYTES", 0)
    looked_up, engine = answers(model, backend)
    assert all(getattr(k, "projected_table", None) is None for k in _cell_kernels(engine))
    for a, b in zip(kept, looked_up):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _cell_kernels(engine: Engine) -> list:
    kernels = []
    for kernel in engine.executors["default"].kernels.values():
        kernels += getattr(kernel, "layers", [kernel])
    return kernels
