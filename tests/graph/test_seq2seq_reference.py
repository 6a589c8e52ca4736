"""The checked-in digit-reversal model really works, and the tokenizer is right."""

import numpy as np
import pytest
import torch

from cellserve.graph.zoo.seq2seq import (BOS, EOS, MAX_INPUT_DIGITS, PAD, VOCAB, decode_digits,
                                         encode_digits, greedy_decode, load_trained, reverse_task)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_trained()


def test_trained_model_reverses_fresh_inputs(model):
    # Seed 12345 differs from training's (seed 0 for batches, [0, 1] for held-out checks).
    srcs, tgts = reverse_task(np.random.default_rng(12345), 500, 1, MAX_INPUT_DIGITS)
    assert {len(s) for s in srcs} == set(range(1, MAX_INPUT_DIGITS + 1))
    outputs = [decode_digits(greedy_decode(model, encode_digits(s), MAX_INPUT_DIGITS + 1)) for s in srcs]
    misses = [(s, o) for s, t, o in zip(srcs, tgts, outputs) if o != t]
    assert len(misses) <= 5, f"{len(misses)}/500 wrong, e.g. {misses[:5]}"


@pytest.mark.parametrize("s", ["7", "00", "123456789012", "999999999999", "000000000001"])
def test_trained_model_edge_cases(model, s):
    assert decode_digits(greedy_decode(model, encode_digits(s), MAX_INPUT_DIGITS + 1)) == s[::-1]


def test_greedy_decode_respects_max_len(model):
    assert len(greedy_decode(model, encode_digits("123456789012"), 3)) == 3


def test_vocabulary():
    assert (PAD, BOS, EOS, VOCAB) == (0, 1, 2, 13)
    assert encode_digits("0123456789") == list(range(3, 13))
    assert encode_digits("") == []


@pytest.mark.parametrize("s", ["0", "42", "9081726354", "000"])
def test_encode_decode_round_trip(s):
    assert decode_digits(encode_digits(s)) == s


@pytest.mark.parametrize("s, bad", [("12a4", "'a'"), ("1 2", "' '"), ("-5", "'-'"), ("1²", "'²'")])
def test_encode_rejects_non_digits(s, bad):
    with pytest.raises(ValueError, match=bad):
        encode_digits(s)


def test_decode_rejects_non_digit_ids():
    with pytest.raises(ValueError, match="not a digit token id: 2"):
        decode_digits([3, EOS])
