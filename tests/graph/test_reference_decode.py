"""The reference beam search (zoo/reference_decode.py) against brute-force enumeration and by hand."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from cellserve.graph.decode_spec import DecodeSpec
from cellserve.graph.zoo.reference_decode import Hypothesis, beam_search, decode, greedy, length_penalty

V, BOS, EOS, MAX_LEN = 4, 0, 1, 3


class TinyStep(nn.Module):
    """A seeded step module that follows the contract: attention over memory, one state h."""

    def __init__(self, seed: int, d: int = 3, m: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(V, d, generator=g))
        self.w = nn.Parameter(torch.randn(2 * d, d, generator=g))
        self.q = nn.Parameter(torch.randn(d, m, generator=g))
        self.out = nn.Parameter(2 * torch.randn(d + m, V, generator=g))

    def forward(self, token, memory, memory_mask, h):
        h = torch.tanh(torch.cat([self.emb[token], h], dim=-1) @ self.w)
        scores = torch.matmul(memory, (h @ self.q).unsqueeze(2)).squeeze(2) + (memory_mask - 1) * 1e9
        ctx = torch.matmul(torch.softmax(scores, dim=1).unsqueeze(1), memory).squeeze(1)
        return torch.cat([h, ctx], dim=-1) @ self.out, h


def inputs(seed: int, s: int):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(s, 2, generator=g), [torch.randn(1, 3, generator=g)]


@torch.no_grad()
def sequence_log_prob(step, memory, states, tokens) -> float:
    """Run the step along BOS + tokens one lane at a time; sum the log-probabilities of tokens."""
    prev, total, states = BOS, 0.0, list(states)
    for tok in tokens:
        logits, *states = step(torch.tensor([prev]), memory[None], torch.ones(1, memory.shape[0]), *states)
        total += float(torch.log_softmax(logits.double(), -1)[0, tok])
        prev = tok
    return total


def brute_force(step, memory, states, alpha):
    """Every sequence the search can produce (ended at EOS within MAX_LEN steps, or MAX_LEN
    non-EOS tokens), scored exactly as the search scores them, best first."""
    others = [t for t in range(V) if t != EOS]
    hyps = []
    for n in range(MAX_LEN):
        for body in itertools.product(others, repeat=n):
            lp = sequence_log_prob(step, memory, states, body + (EOS,))
            hyps.append(Hypothesis(body, lp, lp / length_penalty(n + 1, alpha), True))
    for body in itertools.product(others, repeat=MAX_LEN):
        lp = sequence_log_prob(step, memory, states, body)
        hyps.append(Hypothesis(body, lp, lp / length_penalty(MAX_LEN, alpha), False))
    return sorted(hyps, key=lambda h: -h.score)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_wide_beam_is_exhaustive_and_matches_brute_force(seed, alpha):
    step = TinyStep(seed)
    memory, states = inputs(seed, s=1 + seed % 4)
    expected = brute_force(step, memory, states, alpha)
    assert len(expected) == 1 + 3 + 9 + 27
    got = beam_search(step, memory, states, bos=BOS, eos=EOS, max_length=MAX_LEN, beam_width=len(expected),
                      alpha=alpha)
    assert [h.tokens for h in got.beams] == [h.tokens for h in expected]
    assert [h.ended for h in got.beams] == [h.ended for h in expected]
    np.testing.assert_allclose([h.score for h in got.beams], [h.score for h in expected], rtol=0, atol=1e-5)
    assert got.best == got.beams[0]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_narrow_beam_returns_true_scores_of_real_sequences(seed, k):
    """A narrow beam may miss the best sequence, but what it returns is what it claims."""
    step = TinyStep(seed)
    memory, states = inputs(seed, s=2)
    truth = {(h.tokens, h.ended): h.score for h in brute_force(step, memory, states, 0.6)}
    got = beam_search(step, memory, states, bos=BOS, eos=EOS, max_length=MAX_LEN, beam_width=k, alpha=0.6)
    assert len(got.beams) == k
    assert len({(h.tokens, h.ended) for h in got.beams}) == k
    for h in got.beams:
        assert h.score == pytest.approx(truth[(h.tokens, h.ended)], abs=1e-5)
    assert [h.score for h in got.beams] == sorted((h.score for h in got.beams), reverse=True)
    assert got.best.score <= max(truth.values()) + 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_beam_one_is_greedy_argmax(seed):
    step = TinyStep(seed)
    memory, states = inputs(seed, s=3)
    prev, tokens, h = BOS, [], states
    for _ in range(MAX_LEN):
        logits, *h = step(torch.tensor([prev]), memory[None], torch.ones(1, 3), *h)
        prev = int(logits.argmax())
        if prev == EOS:
            break
        tokens.append(prev)
    got = greedy(step, memory, states, bos=BOS, eos=EOS, max_length=MAX_LEN)
    assert got.best.tokens == tuple(tokens)
    assert got.beams == (got.best,)
    assert got == beam_search(step, memory, states, bos=BOS, eos=EOS, max_length=MAX_LEN, beam_width=1)


class Flat(nn.Module):
    """Equal logits for every token: every choice is a tie."""

    def forward(self, token, memory, memory_mask, h):
        return torch.zeros(token.shape[0], V), h


def test_ties_go_to_lower_beam_then_lower_token():
    memory, states = torch.zeros(2, 2), [torch.zeros(1, 3)]
    got = beam_search(Flat(), memory, states, bos=BOS, eos=EOS, max_length=3, beam_width=2)
    # Step 1 keeps token 0 (live) and token 1 = EOS (ended, tokens ()); then token 0 twice more.
    assert [(h.tokens, h.ended) for h in got.beams] == [((), True), ((0, 0, 0), False)]
    assert got.beams[0].log_prob == pytest.approx(-math.log(4))
    assert got.beams[1].log_prob == pytest.approx(-3 * math.log(4))
    wide = beam_search(Flat(), memory, states, bos=BOS, eos=3, max_length=2, beam_width=3)
    # Step 1: tokens 0, 1, 2 live; step 2 keeps beam 0's tokens 0, 1, 2 (beam 0 before beam 1).
    assert [h.tokens for h in wide.beams] == [(0, 0), (0, 1), (0, 2)]


def test_equal_scores_keep_ending_order():
    memory, states = torch.zeros(1, 2), [torch.zeros(1, 3)]
    got = beam_search(Flat(), memory, states, bos=BOS, eos=EOS, max_length=3, beam_width=4, alpha=0.0)
    # Step 1 ends () and keeps 0, 2, 3; step 2 ends (0,) and keeps (0,0), (0,2); step 3 ends (0,0), keeps (0,0,0);
    # (0,0) and (0,0,0) tie at 3 log(1/4) and keep that order.
    assert [h.tokens for h in got.beams] == [(), (0,), (0, 0), (0, 0, 0)]
    assert [h.ended for h in got.beams] == [True, True, True, False]


def spec(**overrides) -> DecodeSpec:
    fields = {"memory": "mem", "init": {"h": "h0"}, "states": [["h", "h_next"]], "bos": BOS, "eos": EOS,
              "max_length_ratio": 0.5, "max_length_constant": 1, "max_beam_width": 4, "length_penalty": 0.6,
              "output": "tokens"}
    return DecodeSpec.from_dict({**fields, **overrides})


def test_decode_maps_encoder_outputs_by_spec_names():
    step = TinyStep(3)
    memory, states = inputs(3, s=3)

    class Encoder(nn.Module):
        def forward(self, source):  # outputs deliberately not in the step's order
            return states[0], memory[None]

    source = torch.zeros(1, 3, dtype=torch.long)
    got = decode(Encoder(), step, source, spec(), ["h0", "mem"], beam_width=2)
    # max length ceil(0.5 * 3 + 1) = 3 steps, the spec's length penalty.
    assert got == beam_search(step, memory, states, bos=BOS, eos=EOS, max_length=3, beam_width=2, alpha=0.6)
    assert decode(Encoder(), step, source, spec(beam_width=1), ["h0", "mem"]).beams == \
        greedy(step, memory, states, bos=BOS, eos=EOS, max_length=3).beams
    assert decode(Encoder(), step, source, spec(max_length_ratio=0.0, max_length_constant=1),
                  ["h0", "mem"]).best.steps == 1
    with pytest.raises(ValueError, match="'mem'.*outputs are \\['h0', 'memory'\\]"):
        decode(Encoder(), step, source, spec(), ["h0", "memory"])
    with pytest.raises(ValueError, match="does not initialise state 'h'"):
        decode(Encoder(), step, source, spec(init={}), ["h0", "mem"])
    with pytest.raises(ValueError, match="encoder returned 2 outputs, encoder_outputs names 1"):
        decode(Encoder(), step, source, spec(), ["mem"])


def test_bad_arguments_are_named():
    step, (memory, states) = TinyStep(0), inputs(0, 2)
    with pytest.raises(ValueError, match="beam_width must be at least 1, got 0"):
        beam_search(step, memory, states, bos=BOS, eos=EOS, max_length=3, beam_width=0)
    with pytest.raises(ValueError, match="max_length must be at least 1, got 0"):
        beam_search(step, memory, states, bos=BOS, eos=EOS, max_length=0)
    with pytest.raises(ValueError, match="eos 4 outside the step's vocabulary \\[0, 4\\)"):
        beam_search(step, memory, states, bos=BOS, eos=4, max_length=3)
    with pytest.raises(ValueError, match="memory must be"):
        beam_search(step, memory[None].expand(2, -1, -1), states, bos=BOS, eos=EOS, max_length=3)
