"""The zoo's `dates` entry (graph/zoo/dates_served.py): served through the decoder-step path, it
answers a few dozen fresh dates token for token as the plain PyTorch reference search
(reference_decode), greedy and beam 4, all requests in one engine at once; it publishes
vocabularies that encode and decode as the model's own functions do."""

import collections
import json

import numpy as np
import pytest

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph import zoo
from cellserve.graph.zoo import dates, dates_served
from cellserve.text_vocab import TextVocabulary, VocabularyError

REQUESTS = 36


@pytest.fixture(scope="module")
def trained():
    return zoo.reference_module("dates")


@pytest.fixture(scope="module")
def served():
    return zoo.load("dates")


@pytest.fixture(scope="module")
def texts():
    srcs, _ = dates.date_task(np.random.default_rng(4321), REQUESTS)
    return srcs


def _serve_all(model, texts, **request_args):
    """Every text as a one-row request, submitted together to one engine; the responses in order."""
    engine, answers = Engine([model], EngineConfig()), collections.defaultdict(list)
    for i, text in enumerate(texts):
        engine.submit(Request("dates", {"source": np.array([dates.encode_source(text)])},
                              on_done=lambda r, i=i: answers[i].append(r), **request_args))
    engine.run_until_idle(timeout_s=120)
    assert all(len(answers[i]) == 1 for i in range(len(texts)))
    return [answers[i][0] for i in range(len(texts))]


def _tokens(row) -> list[int]:
    return [int(t) for t in np.asarray(row).reshape(-1) if int(t) != dates.PAD]


def test_the_zoo_lists_it_with_its_cell_types(served):
    assert "dates" in zoo.names()
    assert served.cell_types() == ["dates/encoder/0", "dates/encoder/1", "dates/decoder"]
    assert [s.name for s in served.inputs] == ["source"] and [s.name for s in served.outputs] == ["date"]
    assert served.max_sequence_length == dates_served.MAX_SOURCE_CHARS


def test_greedy_answers_equal_the_reference(served, trained, texts):
    for text, response in zip(texts, _serve_all(served, texts)):
        assert response.status == Status.OK, response.reason
        assert _tokens(response.outputs["date"]) == list(dates.normalise(trained, text)[1].best.tokens), text


def test_beam4_answers_equal_the_reference(served, trained, texts):
    responses = _serve_all(served, texts, beam_width=4, return_beams=True)
    for text, response in zip(texts, responses):
        assert response.status == Status.OK, response.reason
        want = dates.normalise(trained, text, beam_width=4)[1]
        assert _tokens(response.outputs["date"]) == list(want.best.tokens), text
        beams, scores = response.outputs["date_beams"][0], response.outputs["date_beam_scores"][0]
        assert len(beams) == 4 == len(want.beams)
        for j, h in enumerate(want.beams):
            assert _tokens(beams[j]) == list(h.tokens), (text, j)
        np.testing.assert_allclose(scores, [h.score for h in want.beams], rtol=0, atol=1e-5)
    # the beams are real alternatives, not copies of the best
    assert all(len({tuple(_tokens(b)) for b in r.outputs["date_beams"][0]}) == 4 for r in responses)


def test_a_beam_wider_than_eight_is_refused(served):
    spec = dates.DECODE_SPEC
    assert spec.max_beam_width == 8 and spec.beam_width == 1
    engine, answers = Engine([served], EngineConfig()), []
    for width in (9, 8):
        engine.submit(Request("dates", {"source": np.array([dates.encode_source("1998.3.3")])},
                              on_done=answers.append, beam_width=width))
    engine.run_until_idle(timeout_s=30)
    assert answers[0].status is Status.INVALID
    assert "'beam_width' 9 exceeds model 'dates''s max_beam_width 8" in answers[0].reason
    assert answers[1].status is Status.OK and _tokens(answers[1].outputs["date"]) == dates.encode_target("1998-03-03")


def test_published_vocabulary_encodes_and_decodes_as_the_model_does(texts):
    params = zoo.parameters("dates")
    assert all(isinstance(v, str) for v in params.values())  # config parameters are strings
    vocab = TextVocabulary.from_parameters(params)
    assert (vocab.input, vocab.output) == ("source", "date")
    for text in texts:
        assert vocab.encode(text) == dates.encode_source(text)
    iso = "2021-03-03"
    ids = dates.encode_target(iso) + [dates.EOS, dates.PAD, dates.PAD]
    assert vocab.decode(ids) == dates.decode_target(ids) == iso
    assert json.loads(params["text.output_vocabulary"])[:3] == [None, None, None]  # PAD, BOS, EOS
    assert params["decode.max_beam_width"] == "8" and params["decode.output"] == "date"
    with pytest.raises(VocabularyError, match=r"character '€' at position 2"):
        vocab.encode("3 €")


def test_other_zoo_models_publish_nothing():
    assert zoo.parameters("lstm-512") == {} and zoo.parameters("seq2seq-reverse") == {}
