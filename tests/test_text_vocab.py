"""cellserve/text_vocab.py: the published text vocabulary's format, round trip through the
parameters, encoding (refusals naming the character and position) and decoding rules."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellserve.text_vocab import KEYS, TextVocabulary, VocabularyError

VOCAB = TextVocabulary("source", (None, "a", "b", " ", "é"), "out", (None, None, None, "x", "-"))


def test_round_trip_through_parameters():
    params = VOCAB.to_parameters()
    assert set(params) == set(KEYS) and all(isinstance(v, str) for v in params.values())
    assert json.loads(params["text.input_vocabulary"]) == [None, "a", "b", " ", "é"]
    assert TextVocabulary.from_parameters({**params, "decode.bos": "1"}) == VOCAB


def test_no_keys_is_no_vocabulary():
    assert TextVocabulary.from_parameters({"slo_ms": "200"}) is None


@given(st.text(alphabet="ab é", min_size=1, max_size=30))
def test_encode_is_one_id_per_character(text):
    ids = VOCAB.encode(text)
    assert len(ids) == len(text) and "".join(VOCAB.input_tokens[i] for i in ids) == text


@pytest.mark.parametrize("text, message", [
    ("ab?a", "character '?' at position 2 of 'ab?a' is not in the vocabulary of input 'source'"),
    ("A", "character 'A' at position 0"),
    ("", "the text is empty"),
])
def test_encode_names_the_character_and_its_position(text, message):
    with pytest.raises(VocabularyError, match=message.replace("?", r"\?")):
        VOCAB.encode(text)


def test_decode_stops_at_the_first_id_that_is_not_text():
    assert VOCAB.decode([3, 4, 3, 2, 3]) == "x-x"  # EOS (2) ends it
    assert VOCAB.decode([3, 0, 0]) == "x"         # padding after the row's end
    assert VOCAB.decode([]) == ""
    with pytest.raises(VocabularyError, match="output id 7 is outside the vocabulary of 'out' \\(0..4\\)"):
        VOCAB.decode([3, 7])


@pytest.mark.parametrize("change, message", [
    ({"text.output": None}, "publishes text.input, text.input_vocabulary, text.output_vocabulary but not text.output"),
    ({"text.input_vocabulary": "[1, 2"}, "text.input_vocabulary is not valid JSON"),
    ({"text.input_vocabulary": "{}"}, "must be a non-empty JSON array"),
    ({"text.input_vocabulary": '[null, "ab"]'}, "entry 1 is 'ab': input tokens are single characters"),
    ({"text.input_vocabulary": '["a", "a"]'}, "has 'a' twice \\(ids 0 and 1\\)"),
    ({"text.output_vocabulary": '[null, 3]'}, "text.output_vocabulary entry 1 must be a non-empty string or null"),
    ({"text.input": ""}, "text.input must name a tensor"),
])
def test_bad_parameters_are_named(change, message):
    params = VOCAB.to_parameters()
    for key, value in change.items():
        if value is None:
            del params[key]
        else:
            params[key] = value
    with pytest.raises(VocabularyError, match=message):
        TextVocabulary.from_parameters(params)
