"""graph/cut.py: a model cut into parts at its recurrent steps, each served by an engine of
its own, answers as the whole model does, bit for bit (the same steps on the same kernels)."""

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request
from cellserve.graph import zoo
from cellserve.graph.cut import CutError, cut_model
from cellserve.graph.onnx_import import load_onnx
from cellserve.graph.stacking import stack_layers

from .helpers import NetSpec, export_torchscript

CONFIG = EngineConfig(stack_layers=False, profile=False, admission=False)


def _answers(model, inputs: list[dict]) -> list[dict]:
    engine = Engine([model], CONFIG)
    done = []
    for i, x in enumerate(inputs):
        engine.submit(Request(model.name, dict(x), on_done=lambda r, i=i: done.append((i, r))))
    engine.run_until_idle(timeout_s=120)
    assert len(done) == len(inputs)
    out = [None] * len(inputs)
    for i, r in done:
        assert r.status.name == "OK", r.reason
        out[i] = r.outputs
    return out


def _through_parts(cut, requests: list[dict]) -> list[dict]:
    """Each request run through the parts in turn, each on an engine of its own: what the
    last part holds per request (ModelCut.answer picks the outputs from it)."""
    held = [dict(r) for r in requests]
    for k, part in enumerate(cut.parts):
        answers = _answers(part, [cut.part_inputs(k, h) for h in held])
        held = [cut.carry(k, {**h, **a}) for h, a in zip(held, answers)]
    return held


def _requests(model, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    vocab = model.semantics[spec.name].vocab
    out = []
    for i in range(n):
        rows, length = 1 + i % 3, int(rng.integers(1, min(24, model.max_sequence_length) + 1))
        out.append({spec.name: rng.integers(0, vocab, size=(rows, length)).astype(spec.dtype)})
    return out


@pytest.mark.parametrize("name", ["lstm-512", "gru-256", "bilstm-tagger", "seq2seq-reverse", "dates"])
def test_the_parts_run_in_turn_answer_as_the_whole_model_bit_for_bit(name):
    model = zoo.load(name)
    cut = cut_model(model, [0])
    assert [p.name for p in cut.parts] == [f"{name}.part0", f"{name}.part1"]
    requests = _requests(model, 9)
    whole = _answers(model, requests)
    held = _through_parts(cut, requests)
    for w, h in zip(whole, held):
        got = cut.answer(h)
        assert list(got) == list(w)
        for key in w:
            assert got[key].dtype == w[key].dtype and np.array_equal(got[key], w[key]), key


def test_what_travels_is_what_a_later_part_reads_and_the_specs_share_the_batch_axis():
    model = zoo.load("lstm-512")
    cut = cut_model(model, [0])
    head, tail = cut.parts
    assert [s.name for s in head.inputs] == ["tokens"] and head.semantics["tokens"].vocab == 10000
    assert {s.name for s in head.outputs} == set(cut.carried[0]) == {s.name for s in tail.inputs}
    assert cut.carried[1] == {"probabilities", "label"} and [s.name for s in tail.outputs] == ["probabilities", "label"]
    y = next(s for s in tail.inputs if len(s.shape) == 4)  # layer 0's sequence output [T, D, B, H]
    y_h = next(s for s in tail.inputs if len(s.shape) == 3)  # its last state [D, B, H]
    assert y.shape == (-1, 1, -1, 512) and y_h.shape == (1, -1, 512)
    assert y.dim_names[2] == y_h.dim_names[1] == model.inputs[0].dim_names[0] != ""  # the request's batch axis
    assert tail.semantics[y.name].batch_axis == 2 and tail.semantics[y.name].time_axis == 0
    assert "head.weight" in tail.constants and "head.weight" not in head.constants


@pytest.mark.parametrize("cuts, why", [([], "a cut is after step 0..0"), ([1], "a cut is after step 0..0"),
                                       ([-1], "a cut is after step 0..0"), ([0, 0], "ascending and distinct")])
def test_a_cut_outside_the_model_is_refused_naming_it(cuts, why):
    with pytest.raises(CutError, match=why):
        cut_model(zoo.load("lstm-512"), cuts)


def test_a_stacked_model_is_refused():
    with pytest.raises(CutError, match="stacked: cut it as imported"):
        cut_model(stack_layers(zoo.load("lstm-512")), [0])


def test_a_model_of_one_recurrent_step_cannot_be_cut():
    model = zoo.load("gru-256")
    model.program = model.program[:model.program.index(model.recurrent_steps()[1])]
    with pytest.raises(CutError, match="has 1 recurrent steps"):
        cut_model(model, [0])


@pytest.mark.parametrize("spec, cuts", [
    (NetSpec("gru", layers=3, batch_first=False, tokens=False), [0]),
    (NetSpec("gru", layers=3, batch_first=False, tokens=False), [1]),
    (NetSpec("gru", layers=3, batch_first=False, tokens=False), [0, 1]),
    (NetSpec("lstm", layers=2, bidirectional=True), [0]),
    (NetSpec("rnn_tanh", layers=2, tokens=False), [0]),
])
def test_a_users_onnx_model_cut_anywhere_answers_as_the_whole(spec, cuts):
    """A user's exported model whose outputs read every layer (h_n, c_n: the final state of
    each layer, concatenated at the end): what an earlier part makes is carried to the last."""
    model = load_onnx(export_torchscript(spec.module(), spec), "user")
    cut = cut_model(model, cuts)
    assert len(cut.parts) == len(cuts) + 1
    rng = np.random.default_rng(1)
    requests = [spec.request(rng, batch=1 + i % 2, time=2 + i) for i in range(5)]
    whole = _answers(model, requests)
    held = _through_parts(cut, requests)
    for w, h in zip(whole, held):
        got = cut.answer(h)
        assert list(got) == list(w)
        for key in w:
            assert np.array_equal(got[key], w[key]), key
