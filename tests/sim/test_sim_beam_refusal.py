"""An executor that does not beam-search (the simulator's) gets no beam request: the engine
refuses it at admission, naming the executor, before any of its work runs; greedy requests
of the same model are served."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import AdditiveEncoder, AdditiveSeq2Seq, AdditiveStep, additive_spec
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.clock import VirtualClock
from cellserve.sim.executor import SimExecutor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    module = AdditiveSeq2Seq(vocab=12, hidden=16).eval()
    spec = dataclasses.replace(additive_spec(MaxLength(ratio=1.0, constant=3)), max_beam_width=4)
    return load_torch_seq2seq(AdditiveEncoder(module), AdditiveStep(module), spec, "beam",
                              (torch.zeros((1, 3), dtype=torch.long),), ["source"], ["memory", "h0", "feed0"])


def test_a_beam_request_on_the_simulator_is_refused_at_admission_and_greedy_is_served(model):
    clock = VirtualClock()
    executor = SimExecutor({"beam": synthetic_profile(model, 1e-4)}, clock, np.random.default_rng(0))
    engine = Engine([model], EngineConfig(policy="cellular", profile=False, pin_threads=False), clock,
                    executors={"sim": executor})
    done: dict[str, object] = {}
    source = {"source": np.full((1, 4), 3, np.int64)}
    engine.submit(Request("beam", source, beam_width=3, on_done=lambda r: done.__setitem__("beam", r)))
    engine.submit(Request("beam", source, return_beams=True, on_done=lambda r: done.__setitem__("k best", r)))
    engine.submit(Request("beam", source, on_done=lambda r: done.__setitem__("greedy", r)))
    engine.run_until_idle()
    for key in ("beam", "k best"):
        assert done[key].status is Status.INVALID and done[key].admitted is None
        assert "executor 'sim'" in done[key].reason and "does not run beam search" in done[key].reason
    assert done["greedy"].status is Status.OK
