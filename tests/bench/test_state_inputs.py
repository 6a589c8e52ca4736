"""A model whose recurrent state (and sequence lengths) are inputs, as a streaming model is
exported: the benchmarks fill them in (zeros, the sequence's length) beside the sequence, in
every path that builds a request (the real engine's replay, the simulator's arrivals, ONNX
Runtime's batches, the load generator's tensors); another kind of extra input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.bench.engine_runner import replay
from cellserve.bench.loadgen import RequestFormat, request_tensors
from cellserve.bench.ort_runners import OrtRunner
from cellserve.bench.profiler import model_trace
from cellserve.bench.traces import StateInput, request_builder, sequence_input, sequence_name
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.graph.onnx_import import load_onnx
from cellserve.sim.run import arrivals
from feature_model import FEATURES, HIDDEN, export_stateful


@pytest.fixture(params=[True, False], ids=["lengths", "states-only"])
def stateful(request, tmp_path):
    path = tmp_path / "stateful.onnx"
    export_stateful(path, lengths=request.param)
    return path, load_onnx(path, "stateful"), request.param


def test_the_states_and_lengths_are_found_and_filled_in(stateful):
    _, model, lengths = stateful
    seq = sequence_input(model)
    states = (StateInput("h0", (1, 1, HIDDEN), "float32"), StateInput("c0", (1, 1, HIDDEN), "float32"))
    assert (seq.name, seq.time_major, seq.features) == ("features", True, (FEATURES,))
    assert seq.states == ((StateInput("lengths", (1,), "int32", lengths=True),) if lengths else ()) + states
    inputs = seq.request_inputs(np.ones((7, FEATURES), np.float32))
    assert inputs["features"].shape == (7, 1, FEATURES)
    assert not inputs["h0"].any() and inputs["c0"].shape == (1, 1, HIDDEN)
    if lengths:
        assert inputs["lengths"].tolist() == [7] and inputs["lengths"].dtype == np.int32


def test_the_real_engine_and_the_simulators_arrivals_get_every_input(stateful):
    _, model, lengths = stateful
    trace = model_trace(model, 0, 50.0, 0.5)
    names = {"features", "h0", "c0"} | ({"lengths"} if lengths else set())
    assert all(set(a.inputs) == names for a in arrivals(trace, model, None))
    stats = replay(Engine([model], EngineConfig()), "stateful", "features", trace, "cellular", 50.0, None)
    assert [o.status for o in stats.outcomes] == ["ok"] * len(trace)


def test_onnx_runtime_and_the_load_generator_send_them_too(stateful):
    path, model, lengths = stateful
    seq = sequence_input(model)
    runner = OrtRunner(path, padded=True, max_batch=4, sequence=seq)
    feeds = runner._feeds([np.ones((3, FEATURES), np.float32), np.ones((5, FEATURES), np.float32)])
    assert feeds["h0"].shape == (1, 2, HIDDEN) and not feeds["c0"].any()
    if lengths:
        assert feeds["lengths"].tolist() == [3, 5]
    stats = runner.run(model_trace(model, 1, 400.0, 0.1))
    assert stats.outcomes and all(o.status == "ok" for o in stats.outcomes)
    fmt = RequestFormat(seq.name, time_major=True, states=seq.states)
    sent = {name: (datatype, x) for name, datatype, x in request_tensors(np.ones((4, FEATURES), np.float32), fmt)}
    assert sent["h0"][0] == "FP32" and sent["h0"][1].shape == (1, 1, HIDDEN)
    if lengths:
        assert sent["lengths"][0] == "INT32" and sent["lengths"][1].tolist() == [4]


def test_an_input_that_is_neither_a_state_nor_lengths_is_refused_naming_it(tmp_path):
    export_stateful(tmp_path / "scaled.onnx", extra=True)
    with pytest.raises(ValueError, match="model 'scaled' takes input 'scale' of shape \\[1\\] beside its sequence; "
                                         ".* and 'scale' feeds neither"):
        sequence_input(load_onnx(tmp_path / "scaled.onnx", "scaled"))


def test_the_sequence_is_found_whatever_the_inputs_order(stateful):
    """A model that lists its states before its rows still gets the sequence in its rows."""
    _, model, _ = stateful
    model.inputs = model.inputs[::-1]
    assert model.inputs[0].name == "c0" and sequence_name(model) == "features"
    inputs = request_builder(model)(np.ones((4, FEATURES), np.float32))
    assert inputs["features"].shape == (4, 1, FEATURES) and inputs["c0"].shape == (1, 1, HIDDEN)
    assert {a.inputs["features"].shape[1:] for a in arrivals(model_trace(model, 0, 50.0, 0.5), model, None)} == {
        (1, FEATURES)}
