"""The triton backend under the real engine (TRITON_INTERPRET=1, CPU): requests of different
lengths batched together, stacked layers, a bidirectional layer (reverse lanes) and lone
lanes (run_lane) answer as the PyTorch modules do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'cellserve[gpu]')")

from cellserve.engine.engine import Engine, EngineConfig  # noqa: E402
from cellserve.engine.request import Request, Status  # noqa: E402
from cellserve.executor.kernel import executor_for  # noqa: E402
from cellserve.graph.torch_import import load_torch  # noqa: E402
from cellserve.graph.zoo.modules import RNNClassifier, RNNTagger, seeded  # noqa: E402
from cellserve.kernels.triton_rnn import TritonCellKernel, TritonStackKernel  # noqa: E402

VOCAB = 20
TOKENS = {"tokens": {0: "batch", 1: "time"}}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)


def served(module, name: str, outputs: list[str], requests: list[np.ndarray], axes: dict):
    """Each request's outputs from an engine on the triton backend (all submitted at once)."""
    model = load_torch(module, name, (torch.zeros((1, 3), dtype=torch.long),), ["tokens"], outputs, {**TOKENS, **axes})
    engine = Engine([model], EngineConfig(policy="cellular", profile=False, max_batch=4),
                    executors={"default": executor_for("cpu", "triton")})
    answers = {}
    for i, tokens in enumerate(requests):
        engine.submit(Request(name, {"tokens": tokens}, on_done=lambda r, i=i: answers.setdefault(i, r)))
    engine.run_until_idle(timeout_s=120)
    return engine, answers


def test_a_stacked_lstm_classifier_and_a_bidirectional_tagger_answer_as_pytorch():
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, VOCAB, (1, n)) for n in (5, 2, 7, 3)]
    tag_axes = {"tag_probabilities": {0: "batch", 1: "time"}, "tags": {0: "batch", 1: "time"}}
    cases = [  # two LSTM layers stacked into one cell type; one GRU layer's two directions
        (seeded(RNNClassifier("lstm", vocab=VOCAB, embed=6, hidden=7, layers=2, classes=3), 0), "clf",
         ["probabilities", "label"], {}, [TritonStackKernel]),
        (seeded(RNNTagger("gru", vocab=VOCAB, embed=6, hidden=5, layers=1, tags=4), 1), "tagger",
         ["tag_probabilities", "tags"], tag_axes, [TritonCellKernel, TritonCellKernel]),
    ]
    for module, name, outputs, axes, kinds in cases:
        engine, answers = served(module, name, outputs, requests, axes)
        assert [type(k) for k in engine.executors["default"].kernels.values()] == kinds
        for i, tokens in enumerate(requests):
            assert answers[i].status is Status.OK, answers[i].reason
            with torch.no_grad():
                want = module(torch.as_tensor(tokens))[0].numpy()
            np.testing.assert_allclose(answers[i].outputs[outputs[0]], want, atol=1e-5, err_msg=f"{name} request {i}")
