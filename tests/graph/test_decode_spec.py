"""DecodeSpec: validation naming the field, JSON and config.pbtxt parameter round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellserve.graph.decode_spec import DecodeSpec, DecodeSpecError, MaxLength
from cellserve.graph.seq2seq_examples import additive_spec

names = st.text("abcdefgh_", min_size=1, max_size=6)


@st.composite
def specs(draw) -> DecodeSpec:
    state_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    states = tuple((f"in_{n}", f"out_{n}") for n in state_names)
    init = tuple((i, f"enc_{i}") for i, _ in states if draw(st.booleans()))
    if draw(st.booleans()):
        max_length = MaxLength(absolute=draw(st.integers(1, 500)))
    else:
        max_length = MaxLength(ratio=draw(st.sampled_from([0.5, 1.0, 1.5, 2.0])), constant=draw(st.integers(1, 9)))
    width = draw(st.integers(1, 8))
    return DecodeSpec(memory=draw(names), states=states, init=init, bos=draw(st.integers(0, 9)),
                      eos=draw(st.integers(0, 9)), max_length=max_length, output=draw(names),
                      pad=draw(st.integers(0, 9)), memory_length=draw(st.sampled_from(["", "lengths"])),
                      beam_width=1, max_beam_width=width, length_penalty=draw(st.sampled_from([0.0, 0.6, 1.0])),
                      scores_output=draw(st.sampled_from(["", "scores"])))


@settings(max_examples=60, deadline=None)
@given(specs())
def test_a_spec_round_trips_through_json_and_config_parameters(spec):
    assert DecodeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert DecodeSpec.from_parameters(spec.to_parameters()) == spec


def test_max_length_is_absolute_or_a_multiple_of_the_source_plus_a_constant():
    assert MaxLength(absolute=7).limit(100) == 7
    assert MaxLength(ratio=1.5, constant=2).limit(5) == 10  # ceil(9.5)
    assert MaxLength(ratio=0.0, constant=3).limit(50) == 3


@pytest.mark.parametrize("kwargs, field", [
    ({"bos": -1}, "bos"),
    ({"eos": "2"}, "eos"),
    ({"memory": ""}, "memory"),
    ({"states": ()}, "states"),
    ({"states": (("h", "h_next"), ("h", "x"))}, "'h'"),
    ({"init": (("nope", "h0"),)}, "'nope'"),
    ({"beam_width": 4, "max_beam_width": 2}, "beam_width"),
    ({"length_penalty": -1.0}, "length_penalty"),
    ({"token_input": "h"}, "distinct"),
    ({"logits_output": "h_next"}, "logits_output"),
    # a scores output named like another tensor of the answer would overwrite it (a sweep: token ids
    # answered as a float score)
    ({"output": "tokens", "scores_output": "tokens"}, "scores_output 'tokens' is also the output's name"),
    ({"output": "tokens", "scores_output": "tokens_beams"}, "scores_output 'tokens_beams' is the name of a tensor "
                                                            "return_beams adds"),
    ({"output": "tokens", "scores_output": "tokens_beam_scores"}, "return_beams adds"),
])
def test_a_bad_spec_is_refused_naming_the_field(kwargs, field):
    fields = {**additive_spec().__dict__, **kwargs}
    with pytest.raises(DecodeSpecError, match=field):
        DecodeSpec(**fields)


@pytest.mark.parametrize("kwargs, field", [
    ({"absolute": 0}, "max_length"),
    ({"absolute": 5, "ratio": 1.0}, "not both"),
    ({"ratio": float("nan")}, "max_length_ratio"),
    ({"ratio": 0.0, "constant": 0}, "no maximum length"),
])
def test_a_bad_max_length_is_refused(kwargs, field):
    with pytest.raises(DecodeSpecError, match=field):
        MaxLength(**kwargs)


def test_config_parameters_name_the_key_and_value_that_are_wrong():
    params = additive_spec().to_parameters()
    with pytest.raises(DecodeSpecError, match=r"decode\.eos.*'two'"):
        DecodeSpec.from_parameters({**params, "decode.eos": "two"})
    with pytest.raises(DecodeSpecError, match=r"decode\.states.*'h'"):
        DecodeSpec.from_parameters({**params, "decode.states": "h"})
    with pytest.raises(DecodeSpecError, match="unknown field 'beam'"):
        DecodeSpec.from_parameters({**params, "decode.beam": "2"})
    missing = {k: v for k, v in params.items() if k != "decode.memory"}
    with pytest.raises(DecodeSpecError, match="missing field 'memory'"):
        DecodeSpec.from_parameters(missing)
    assert DecodeSpec.from_parameters({**params, "slo_ms": "200"}) == additive_spec()  # other keys are not its


def test_the_parameters_are_the_documented_strings():
    params = additive_spec().to_parameters()
    assert params["decode.states"] == "h:h_next,feed:feed_next"
    assert params["decode.init"] == "h:h0,feed:feed0"
    assert params["decode.max_length_ratio"] == "2.0" and params["decode.max_length_constant"] == "3"
