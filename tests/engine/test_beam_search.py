"""Beam search in the engine (engine/beam.py, GraphDecoderKernel's beam rows): random mixes of
requests with beam widths 1-4, lengths and arrival orders answer token for token as each
alone and as the plain PyTorch reference (graph/zoo/reference_decode.py), scores within
1e-5, whatever the batch cut (rows split across batches) or the policy; greedy stays on its
streamed path; beam lanes stream nothing; widths above the spec's maximum are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import AdditiveEncoder, AdditiveSeq2Seq, AdditiveStep, additive_spec
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo.reference_decode import decode

OUTPUTS = ["memory", "h0", "feed0"]
EXAMPLE = (torch.zeros((1, 3), dtype=torch.long),)
MAX_WIDTH = 4


class _Beamed:
    """The example GRU/additive-attention model with random weights, a spec allowing widths up
    to 4 with GNMT's length penalty, and an EOS the search reaches at varied steps."""

    def __init__(self):
        torch.manual_seed(7)
        self.module = AdditiveSeq2Seq(vocab=12, hidden=24).eval()
        self.encoder, self.step = AdditiveEncoder(self.module), AdditiveStep(self.module)
        base = dataclasses.replace(additive_spec(MaxLength(ratio=1.0, constant=3)), max_beam_width=MAX_WIDTH,
                                   length_penalty=0.6)
        rng = np.random.default_rng(0)
        counts = np.zeros(12, int)
        for _ in range(10):  # the token beams emit most often, but at no fixed step: a real mix of ends
            row = torch.from_numpy(rng.integers(3, 12, (1, 5)))
            for h in decode(self.encoder, self.step, row, dataclasses.replace(base, eos=0), OUTPUTS, 4).beams:
                counts[list(h.tokens)] += 1
        counts[[0, 1]] = 0
        self.spec = dataclasses.replace(base, eos=int(np.argmax(counts)))
        self.model = load_torch_seq2seq(self.encoder, self.step, self.spec, "beam", EXAMPLE, ["source"], OUTPUTS)

    def reference(self, row: np.ndarray, width: int):
        return decode(self.encoder, self.step, torch.from_numpy(row[None]), self.spec, OUTPUTS, beam_width=width)


@pytest.fixture(scope="module")
def beamed() -> _Beamed:
    return _Beamed()


def _serve(model, requests: list[tuple[np.ndarray, int | None]], order: list[int], policy: str = "cellular",
           max_batch: int = 32, stagger: int = 0, return_beams: bool = True, streamed: dict | None = None):
    """Submit (source [B, S], beam width) requests in `order`, `stagger` steps apart; the responses."""
    engine = Engine([model], EngineConfig(policy=policy, max_batch=max_batch, profile=False))
    done = {}
    for i in order:
        source, width = requests[i]
        on_tokens = None if streamed is None else (lambda b, t, i=i: streamed.setdefault(i, []).append((b, t)))
        engine.submit(Request(model.name, {"source": source}, on_done=lambda r, i=i: done.__setitem__(i, r),
                              beam_width=width, return_beams=return_beams, on_tokens=on_tokens))
        for _ in range(stagger):
            engine.step()
    engine.run_until_idle()
    assert all(done[i].status is Status.OK for i in order), [done[i].reason for i in order]
    kernel = engine.executors[next(iter(engine.executors))].kernels["beam/decoder"]
    assert kernel.slots.in_use == 0 and not kernel._groups  # every beam row's slots and memory went back
    return done


def _check_against_reference(beamed: _Beamed, source: np.ndarray, width: int, outputs: dict) -> None:
    pad = beamed.spec.pad
    for b, row in enumerate(source):
        want = beamed.reference(row, width)
        best = outputs["tokens"][b].tolist()
        assert best[:len(want.best.tokens)] == list(want.best.tokens)
        assert all(t == pad for t in best[len(want.best.tokens):])
        beams, scores = outputs["tokens_beams"][b], outputs["tokens_beam_scores"][b]
        assert beams.shape[0] == width and scores.shape == (width,)
        for j, h in enumerate(want.beams):
            assert beams[j, :len(h.tokens)].tolist() == list(h.tokens)
            assert abs(scores[j] - h.score) < 1e-5
        assert np.all(np.isneginf(scores[len(want.beams):]))


request_mixes = st.lists(st.tuples(st.integers(1, 2), st.integers(1, 7), st.integers(1, MAX_WIDTH)),
                         min_size=1, max_size=6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=request_mixes, seed=st.integers(0, 2**16), max_batch=st.sampled_from([3, 5, 64]),
       stagger=st.integers(0, 3), policy=st.sampled_from(["cellular", "cellular-edf"]))
def test_random_mixes_of_beam_widths_answer_as_each_alone_and_as_the_pytorch_reference(beamed, mix, seed, max_batch,
                                                                                       stagger, policy):
    rng = np.random.default_rng(seed)
    requests = [(rng.integers(3, 12, size=(rows, length)).astype(np.int64), width) for rows, length, width in mix]
    order = list(rng.permutation(len(requests)))
    together = _serve(beamed.model, requests, order, policy, max_batch, stagger)
    for i, (source, width) in enumerate(requests):
        alone = _serve(beamed.model, [(source, width)], [0])[0]
        for name in ("tokens", "tokens_beams"):
            np.testing.assert_array_equal(together[i].outputs[name], alone.outputs[name])
        # float32 logits of a batch differ in their last bits with the batch's make-up
        np.testing.assert_allclose(together[i].outputs["tokens_beam_scores"], alone.outputs["tokens_beam_scores"],
                                   rtol=0, atol=1e-5)
        _check_against_reference(beamed, source, width, together[i].outputs)


def test_rows_split_across_batches_and_the_padded_policy_answer_the_same(beamed):
    rng = np.random.default_rng(11)
    requests = [(rng.integers(3, 12, size=(2, int(n))).astype(np.int64), 4) for n in rng.integers(2, 8, 6)]
    wide = _serve(beamed.model, requests, list(range(6)))
    split = _serve(beamed.model, requests, list(range(6)), max_batch=3)  # a row's 4 beams never fit one batch
    padded = _serve(beamed.model, requests, list(range(6)), policy="padded", max_batch=2)
    for i, (source, width) in enumerate(requests):
        for other in (split, padded):
            np.testing.assert_array_equal(wide[i].outputs["tokens_beams"], other[i].outputs["tokens_beams"])
        _check_against_reference(beamed, source, width, wide[i].outputs)


def test_beams_end_at_different_steps_and_some_rows_differ_from_greedy(beamed):
    rng = np.random.default_rng(2)
    steps, differ = set(), 0
    for _ in range(12):
        row = rng.integers(3, 12, 6)
        got = beamed.reference(row, 4)
        steps |= {len(h.tokens) for h in got.beams if h.ended}
        differ += got.best.tokens != beamed.reference(row, 1).best.tokens
    assert len(steps) >= 3 and differ >= 1  # the properties above test a search that matters


def test_greedy_requests_stay_on_the_streamed_argmax_path_and_beam_lanes_stream_nothing(beamed):
    rng = np.random.default_rng(3)
    source = rng.integers(3, 12, size=(2, 5)).astype(np.int64)
    streamed: dict = {}
    done = _serve(beamed.model, [(source, None), (source, 3), (source, 1)], [0, 1, 2], return_beams=False,
                  streamed=streamed)
    assert set(done[0].outputs) == {"tokens"} and set(done[1].outputs) == {"tokens"}
    greedy = [beamed.reference(row, 1).best.tokens for row in source]
    assert [[t for b2, t in streamed[0] if b2 == b] for b in range(2)] == [list(g) for g in greedy]
    assert 1 not in streamed  # the beam request streamed no token
    assert streamed[2] == streamed[0]  # width 1 is greedy: the same path, streamed
    for b, g in enumerate(greedy):
        assert done[0].outputs["tokens"][b, :len(g)].tolist() == list(g)
        want = beamed.reference(source[b], 3).best.tokens
        assert done[1].outputs["tokens"][b, :len(want)].tolist() == list(want)
    np.testing.assert_array_equal(done[0].outputs["tokens"], done[2].outputs["tokens"])


def test_a_beam_row_keeps_one_memory_block_for_all_its_beams(beamed):
    engine = Engine([beamed.model], EngineConfig(profile=False))
    kernel = engine.executors[next(iter(engine.executors))].kernels["beam/decoder"]
    free_rows = sum(kernel.rows._lengths)
    engine.submit(Request("beam", {"source": np.full((1, 7), 5, np.int64)}, beam_width=4))
    for _ in range(3):
        engine.step()
    assert free_rows - sum(kernel.rows._lengths) == 7  # 7 memory rows, shared by up to 4 beams
    assert kernel.slots.in_use == 4
    engine.run_until_idle()
    assert sum(kernel.rows._lengths) == free_rows and kernel.slots.in_use == 0


def test_a_width_above_the_maximum_is_refused_naming_both_numbers(beamed):
    engine = Engine([beamed.model], EngineConfig(profile=False))
    done = []
    for width in (5, 0):
        engine.submit(Request("beam", {"source": np.ones((1, 3), np.int64) * 4}, on_done=done.append,
                              beam_width=width))
    engine.run_until_idle()
    assert done[0].status is Status.INVALID
    assert "'beam_width' 5 exceeds model 'beam''s max_beam_width 4" in done[0].reason
    assert done[1].status is Status.INVALID and "'beam_width' must be an integer >= 1, got 0" in done[1].reason


def test_a_spec_with_a_default_width_decodes_every_request_with_it(beamed):
    spec = dataclasses.replace(beamed.spec, beam_width=3, scores_output="score")
    model = load_torch_seq2seq(beamed.encoder, beamed.step, spec, "beam", EXAMPLE, ["source"], OUTPUTS)
    source = np.random.default_rng(4).integers(3, 12, size=(2, 6)).astype(np.int64)
    done = _serve(model, [(source, None)], [0], return_beams=False)[0]
    for b, row in enumerate(source):
        want = beamed.reference(row, 3).best
        assert done.outputs["tokens"][b, :len(want.tokens)].tolist() == list(want.tokens)
        assert abs(done.outputs["score"][b] - want.score) < 1e-5
