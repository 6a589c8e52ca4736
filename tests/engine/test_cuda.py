"""The same engine on a CUDA device: every model's requests, batched together, answer as on
the CPU. Skipped where torch sees no GPU (CI has none; run it on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Status

from helpers_engine import VOCAB, Responses, assert_same_outputs, make_request, run_alone, seq2seq_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


@pytest.mark.parametrize("policy", ["cellular", "padded", "none"])
def test_mixed_requests_on_cuda_match_the_cpu(models, policy):
    rng = np.random.default_rng(0)
    engine = Engine(list(models.models.values()), EngineConfig(device="cuda", policy=policy))
    assert engine.executors["default"].device.type == "cuda"
    requests = []
    for i in range(30):
        name = ["lstm", "gru", "tagger", "floatgru", "seq2seq-reverse"][i % 5]
        batch, length = int(rng.integers(1, 4)), int(rng.integers(1, 12))
        if name == "floatgru":
            inputs = {"features": rng.standard_normal((batch, length, 4)).astype(np.float32)}
        elif name == "seq2seq-reverse":
            inputs = {"digits": rng.integers(3, 13, (batch, length))}
        else:
            inputs = {"tokens": rng.integers(0, VOCAB, (batch, length))}
        requests.append((name, inputs))
    responses = Responses()
    for i, (name, inputs) in enumerate(requests):
        engine.submit(make_request(responses, i, name, inputs))
    engine.run_until_idle(timeout_s=120)
    for i, (name, inputs) in enumerate(requests):
        response = responses.one(i)
        assert response.status is Status.OK, f"request {i} ({name}): {response.reason}"
        if name == "seq2seq-reverse":
            np.testing.assert_array_equal(response.outputs["reversed"], seq2seq_reference(models, inputs["digits"]))
        else:
            assert_same_outputs(response.outputs, run_alone(models, name, inputs), f"request {i} ({name})")


def test_streamed_state_on_cuda(models):
    engine = Engine([models.models["gru"]], EngineConfig(device="cuda"))
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 9))
    state, responses = None, Responses()
    for i, (a, b) in enumerate([(0, 4), (4, 9)]):
        engine.submit(make_request(responses, i, "gru", {"tokens": tokens[:, a:b]}, initial_state=state,
                                   return_state=True))
        engine.run_until_idle(timeout_s=60)
        state = responses.one(i).state
    assert_same_outputs(responses.one(1).outputs, run_alone(models, "gru", {"tokens": tokens}))
