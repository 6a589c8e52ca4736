"""The simulator beam-searches as the real engine does: the engine's own beam bookkeeping
(rows, pruning, reordering, the k best) runs on the simulator's priced steps, a width-k row
costing about k lanes of the decoder, and a row's slots are freed with its last lane."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import AdditiveSeq2Seq, additive_spec, load_additive
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.clock import VirtualClock
from cellserve.sim.executor import SimExecutor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    module = AdditiveSeq2Seq(vocab=12, hidden=16).eval()
    spec = dataclasses.replace(additive_spec(MaxLength(ratio=1.0, constant=3)), max_beam_width=4)
    return load_additive(module, spec, "beam")


def _serve(model, requests: list[dict]):
    """Each request alone on a fresh simulated engine: (response, decoder lane-steps, executor)."""
    out = []
    for params in requests:
        clock = VirtualClock()
        executor = SimExecutor({"beam": synthetic_profile(model, 1e-4)}, clock, np.random.default_rng(0))
        engine = Engine([model], EngineConfig(policy="cellular", profile=False, pin_threads=False), clock,
                        executors={"sim": executor})
        done = []
        engine.submit(Request("beam", {"source": np.full((2, 5), 3, np.int64)}, on_done=done.append, **params))
        engine.run_until_idle()
        decoder = [t for t in engine.stats.lanes_by_type if t.endswith("decoder")]
        out.append((done[0], sum(engine.stats.lanes_by_type[t] for t in decoder), executor))
    return out


def test_beam_requests_run_on_the_simulator_and_cost_about_k_lanes(model):
    (greedy, greedy_lanes, _), (beam, beam_lanes, executor), (best, _, _) = _serve(
        model, [{}, {"beam_width": 4, "return_beams": True}, {"beam_width": 4}])
    for response in (greedy, beam, best):
        assert response.status is Status.OK, response.reason
    (output,) = [n for n in greedy.outputs if not n.endswith(("_beams", "_beam_scores"))]
    beams, scores = beam.outputs[f"{output}_beams"], beam.outputs[f"{output}_beam_scores"]
    assert beams.shape[:2] == (2, 4) and scores.shape == (2, 4)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    # the same draw of the row's length as the greedy lane's: the best beam is as long
    assert np.array_equal(beam.outputs[output], greedy.outputs[output])
    assert np.array_equal(best.outputs[output], greedy.outputs[output])
    assert 3 * greedy_lanes <= beam_lanes <= 4 * greedy_lanes
    assert executor._decoding == {} and executor._beams == {}  # every row's slots freed


class _GreedyOnly(SimExecutor):
    """An executor that does not beam-search (as a third party's might not)."""

    beam_search = False


def test_an_executor_that_does_not_beam_search_gets_no_beam_request(model):
    # refused at admission, naming the executor, before any of its work runs; greedy is served
    clock = VirtualClock()
    executor = _GreedyOnly({"beam": synthetic_profile(model, 1e-4)}, clock, np.random.default_rng(0))
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
