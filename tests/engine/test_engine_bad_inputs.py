"""A bad request gets an INVALID response naming the problem; the requests around it are served."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Status
from helpers_engine import VOCAB, Responses, assert_same_outputs, make_request, seq2seq_reference

GOOD_TOKENS = np.array([[3, 1, 4, 1, 5]], np.int64)
GOOD_FEATURES = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
GOOD_DIGITS = np.array([[4, 5, 6, 7]], np.int64)

with_nan = GOOD_FEATURES.copy()
with_nan[1, 2, 0] = np.nan
with_inf = GOOD_FEATURES.copy()
with_inf[0, 0, 3] = np.inf

# (test id, model, inputs, a regex the reason must match)
BAD = [
    ("wrong input name", "lstm", {"token": GOOD_TOKENS}, r"unknown input.*'token'"),
    ("extra input", "lstm", {"tokens": GOOD_TOKENS, "mask": GOOD_TOKENS}, r"unknown input.*'mask'"),
    ("missing input", "lstm", {}, r"missing input.*'tokens'"),
    ("rank too low", "lstm", {"tokens": np.array([1, 2, 3])}, r"'tokens'.*rank 2"),
    ("rank too high", "lstm", {"tokens": np.ones((1, 2, 3), np.int64)}, r"'tokens'.*rank 2"),
    ("scalar", "lstm", {"tokens": np.int64(3)}, r"'tokens'.*rank 2"),
    ("float tokens", "lstm", {"tokens": GOOD_TOKENS.astype(np.float32)}, r"'tokens': has datatype FP32; the model expects INT64"),
    ("string tokens", "lstm", {"tokens": np.array([["a", "b"]])}, r"'tokens': has datatype str32; the model expects INT64"),
    ("bool tokens", "lstm", {"tokens": np.ones((1, 2), bool)}, r"'tokens': has datatype BOOL; the model expects INT64"),
    ("negative token id", "lstm", {"tokens": np.array([[1, -1, 2]])}, r"'tokens'.*token id -1.*out of range"),
    ("token id = vocab", "lstm", {"tokens": np.array([[1, VOCAB, 2]])}, rf"'tokens'.*token id {VOCAB}.*out of range"),
    ("huge token id", "gru", {"tokens": np.array([[2**62]])}, r"'tokens'.*out of range"),
    ("uint64 beyond int64", "gru", {"tokens": np.array([[2**64 - 1]], np.uint64)}, r"'tokens'.*do not fit int64"),
    ("empty sequence", "lstm", {"tokens": np.zeros((1, 0), np.int64)}, r"'tokens'.*dimension 1 is empty"),
    ("empty batch", "lstm", {"tokens": np.zeros((0, 3), np.int64)}, r"'tokens'.*dimension 0 is empty"),
    ("over-long sequence", "lstm", {"tokens": np.ones((1, 17), np.int64)}, r"'tokens'.*length 17 exceeds.*16"),
    ("too many sequences", "lstm", {"tokens": np.ones((1025, 2), np.int64)},
     r"^input 'tokens': 1025 sequences \(dimension 0\) exceed the model's limit of 1024 per request"),
    ("over-long digits", "seq2seq-reverse", {"digits": np.full((1, 13), 5)}, r"'digits'.*length 13 exceeds.*12"),
    ("digit id out of range", "seq2seq-reverse", {"digits": np.array([[3, 13]])}, r"'digits'.*token id 13"),
    ("NaN in float input", "floatgru", {"features": with_nan}, r"'features'.*NaN"),
    ("infinity in float input", "floatgru", {"features": with_inf}, r"'features'.*infinity"),
    ("wrong fixed dimension", "floatgru", {"features": np.zeros((1, 3, 5), np.float32)},
     r"'features'.*dimension 2 must be 4"),
    ("int for float input", "floatgru", {"features": np.zeros((1, 3, 4), np.int64)}, r"'features': has datatype INT64; the model expects FP32"),
    ("float64 past float32's range", "floatgru", {"features": np.full((1, 3, 4), 1e300)},
     r"^input 'features': values do not fit float32 \(largest magnitude 1e\+300\)$"),
    ("unknown model", "no-such-model", {"tokens": GOOD_TOKENS}, r"unknown model 'no-such-model'"),
    ("ragged nested list", "lstm", {"tokens": [[1, 2, 3], [4]]}, r"'tokens'"),
]


@pytest.fixture(scope="module")
def engine_factory(models):
    served = [models.models[n] for n in ("lstm", "gru", "floatgru", "seq2seq-reverse")]
    return lambda: Engine(served, EngineConfig(profile=False))


@pytest.mark.parametrize("model, inputs, reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_invalid_with_a_reason_and_neighbours_are_served(models, engine_factory, model, inputs,
                                                                        reason):
    engine = engine_factory()
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": GOOD_TOKENS}))
    engine.submit(make_request(responses, 1, "floatgru", {"features": GOOD_FEATURES}))
    engine.submit(make_request(responses, 2, model, inputs))
    engine.submit(make_request(responses, 3, "seq2seq-reverse", {"digits": GOOD_DIGITS}))
    engine.submit(make_request(responses, 4, "gru", {"tokens": GOOD_TOKENS}))
    engine.run_until_idle(timeout_s=10)

    bad = responses.one(2)
    assert bad.status is Status.INVALID
    assert bad.outputs == {}
    assert re.search(reason, bad.reason), bad.reason

    for i, name, inputs_ in ((0, "lstm", {"tokens": GOOD_TOKENS}), (1, "floatgru", {"features": GOOD_FEATURES}),
                             (4, "gru", {"tokens": GOOD_TOKENS})):
        ok = responses.one(i)
        assert ok.status is Status.OK, ok.reason
        assert_same_outputs(ok.outputs, models.reference(name, inputs_), f"neighbour {name}")
    ok = responses.one(3)
    assert ok.status is Status.OK, ok.reason
    np.testing.assert_array_equal(ok.outputs["reversed"], seq2seq_reference(models, GOOD_DIGITS))
    assert engine.idle()


def test_other_integer_widths_are_accepted_for_int64_tokens(models, engine_factory):
    engine = engine_factory()
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": GOOD_TOKENS.astype(np.int32)}))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": GOOD_TOKENS.astype(np.uint8)}))
    engine.submit(make_request(responses, 2, "lstm", {"tokens": GOOD_TOKENS.tolist()}))  # a plain list
    engine.run_until_idle(timeout_s=10)
    want = models.reference("lstm", {"tokens": GOOD_TOKENS})
    for i in range(3):
        assert responses.one(i).status is Status.OK, responses.one(i).reason
        assert_same_outputs(responses.one(i).outputs, want)


def test_a_request_at_the_row_limit_is_served(models, engine_factory):
    engine = engine_factory()
    responses = Responses()
    tokens = np.arange(1024 * 3, dtype=np.int64).reshape(1024, 3) % VOCAB
    engine.submit(make_request(responses, 0, "lstm", {"tokens": tokens}))
    engine.run_until_idle(timeout_s=30)
    assert responses.one(0).status is Status.OK
    assert_same_outputs(responses.one(0).outputs, models.reference("lstm", {"tokens": tokens}))


def test_a_sequence_at_the_length_limit_is_served(models, engine_factory):
    engine = engine_factory()
    responses = Responses()
    tokens = np.arange(16, dtype=np.int64)[None] % VOCAB
    engine.submit(make_request(responses, 0, "lstm", {"tokens": tokens}))
    engine.run_until_idle(timeout_s=10)
    assert responses.one(0).status is Status.OK
    assert_same_outputs(responses.one(0).outputs, models.reference("lstm", {"tokens": tokens}))


def _first_layer(models, name: str) -> str:
    from cellserve.graph.model import layers_of

    return layers_of(models.models[name].recurrent_steps()[0])[0].name


# (test id, the Request's fields, a regex the reason must match); the Python API's own misuses
BAD_FIELDS = [
    ("inputs not a dict", {"inputs": [GOOD_TOKENS]}, r"^inputs must be a dict of input name -> array, got list$"),
    ("inputs None", {"inputs": None}, r"^inputs must be a dict .* got NoneType$"),
    ("timeout a string", {"timeout_s": "1"}, r"^timeout_s must be a number of seconds or None, got '1'$"),
    ("priority negative", {"priority": -1}, r"^priority must be an integer >= 0 \(lower runs first\), got -1$"),
    ("priority a float", {"priority": 2.5}, r"^priority must be an integer >= 0 .* got 2.5$"),
    ("priority a word", {"priority": "high"}, r"^priority must be an integer >= 0 .* got 'high'$"),
    ("state of an unknown layer", {"initial_state": {"nope": (np.zeros((1, 1, 4)), None)}},
     r"^initial_state names \['nope'\], which are not recurrent layers of model 'lstm' \(its layers: "),
    ("an LSTM state without c", "lstm-without-c", r"is an LSTM, so its state needs c as well as h$"),
]


@pytest.mark.parametrize("fields, reason", [b[1:] for b in BAD_FIELDS], ids=[b[0] for b in BAD_FIELDS])
def test_a_requests_own_fields_are_checked_too(models, engine_factory, fields, reason):
    if fields == "lstm-without-c":
        layer = _first_layer(models, "lstm")
        fields = {"initial_state": {layer: (np.zeros((1, 1, 4), np.float32), None)}}
    engine = engine_factory()
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", **{"inputs": {"tokens": GOOD_TOKENS}, **fields}))
    engine.submit(make_request(responses, 1, "lstm", {"tokens": GOOD_TOKENS}))
    engine.run_until_idle(timeout_s=10)
    bad = responses.one(0)
    assert bad.status is Status.INVALID and re.search(reason, bad.reason), bad.reason
    assert responses.one(1).status is Status.OK


def test_two_models_of_one_name_are_refused(models):
    with pytest.raises(ValueError, match=r"model 'lstm' is already served; give each model its own name"):
        Engine([models.models["lstm"], models.models["lstm"]], EngineConfig(profile=False))


def test_a_call_between_steps_whose_caller_gave_up_is_not_run_and_stops_nothing(models):
    """between_steps' future cancelled before its turn (a client that gave up on a model
    load): the engine skips it and steps on; it used to set a result on the cancelled future
    and the InvalidStateError ended the serving loop."""
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False))
    ran = []
    given_up = engine.between_steps(lambda: ran.append("cancelled one"))
    assert given_up.cancel()
    kept = engine.between_steps(lambda: ran.append("kept one") or 7)
    responses = Responses()
    engine.submit(make_request(responses, 0, "lstm", {"tokens": GOOD_TOKENS}))
    engine.run_until_idle(timeout_s=10)
    assert ran == ["kept one"] and kept.result() == 7 and responses.one(0).status is Status.OK


def test_lane_storage_is_bounded_a_request_too_large_for_all_of_it_is_invalid_and_one_that_fits_later_waits(models):
    # gru: two stacked GRU layers of width 8, 256 bytes of lane storage per token of a sequence
    limit_mb = 1200 / 2**20  # 1,200 bytes: four tokens of one sequence
    engine = Engine([models.models["gru"]], EngineConfig(max_lane_memory_mb=limit_mb, profile=False))
    responses = Responses()
    engine.submit(make_request(responses, 0, "gru", {"tokens": np.ones((1, 5), np.int64)}))  # 1,280 bytes
    engine.submit(make_request(responses, 1, "gru", {"tokens": np.ones((1, 3), np.int64)}))  # 768
    engine.submit(make_request(responses, 2, "gru", {"tokens": np.ones((2, 2), np.int64)}))  # 1,024: not with 1's
    engine.run_until_idle()
    too_big, ok, later = responses.one(0), responses.one(1), responses.one(2)
    assert too_big.status is Status.INVALID
    assert re.search(r"needs 1,280 bytes of lane storage \(1 sequence\(s\) of 5 steps\), more than the engine holds "
                     r"for all requests \(1,200 bytes, --max-lane-memory\)", too_big.reason), too_big.reason
    assert ok.status is Status.OK
    assert later.status is Status.REJECTED and later.congestion, later.reason
    assert "the requests in flight hold" in later.reason
    for i in range(3, 6):  # what the answered requests held was given back: each fits again
        engine.submit(make_request(responses, i, "gru", {"tokens": np.ones((2, 2), np.int64)}))
        engine.run_until_idle()
        assert responses.one(i).status is Status.OK, responses.one(i).reason


def test_the_default_lane_storage_limit_is_a_quarter_of_the_machines_memory(models):
    from cellserve.engine.admission import machine_memory_bytes

    engine = Engine([models.models["gru"]], EngineConfig(profile=False))
    assert engine.lane_memory_limit == machine_memory_bytes() // 4 > 0
