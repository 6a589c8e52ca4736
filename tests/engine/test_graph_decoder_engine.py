"""Graph decoders (a decoder-step graph plus a DecodeSpec) served by the engine as a cell type:
each lane's tokens are what a plain PyTorch greedy loop gives for it alone, whatever else
shares its batches, in whatever order requests arrive, under the cellular and padded policies."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import (AdditiveEncoder, AdditiveSeq2Seq, AdditiveStep, ReverserEncoder,
                                              ReverserStep, additive_spec, greedy_reference)
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo import seq2seq

OUTPUTS = ["memory", "h0", "feed0"]
EXAMPLE = (torch.zeros((1, 3), dtype=torch.long),)


class _Additive:
    """The example GRU/additive-attention model, with an EOS its random weights emit at
    varied positions (so that lanes end at different steps)."""

    def __init__(self):
        torch.manual_seed(3)
        self.module = AdditiveSeq2Seq(vocab=20, hidden=32).eval()
        self.encoder, self.step = AdditiveEncoder(self.module), AdditiveStep(self.module)
        probe = dataclasses.replace(additive_spec(MaxLength(absolute=12)), eos=0)
        rng = np.random.default_rng(0)
        firsts: dict[int, set] = {}
        for _ in range(30):
            tokens = greedy_reference(self.encoder, self.step, probe, torch.from_numpy(rng.integers(3, 20, 6)), OUTPUTS)
            for pos, t in reversed(list(enumerate(tokens))):
                firsts.setdefault(t, set()).add(pos)
        eos = max((t for t in firsts if t not in (0, 1)), key=lambda t: (len(firsts[t]), -t))
        self.spec = additive_spec(MaxLength(ratio=1.0, constant=4), eos=eos)
        self.model = load_torch_seq2seq(self.encoder, self.step, self.spec, "add", EXAMPLE, ["source"], OUTPUTS)

    def reference(self, source: np.ndarray) -> list[int]:
        return greedy_reference(self.encoder, self.step, self.spec, torch.from_numpy(source), OUTPUTS)


@pytest.fixture(scope="module")
def additive() -> _Additive:
    return _Additive()


@pytest.fixture(scope="module")
def reverser():
    m = seq2seq.load_trained()
    spec = dataclasses.replace(additive_spec(MaxLength(absolute=seq2seq.MAX_INPUT_DIGITS + 1)), bos=seq2seq.BOS,
                               eos=seq2seq.EOS, pad=seq2seq.PAD, output="reversed",
                               states=(("h", "h_next"), ("c", "c_next")), init=(("h", "h0"), ("c", "c0")))
    model = load_torch_seq2seq(ReverserEncoder(m), ReverserStep(m), spec, "rev", EXAMPLE, ["digits"],
                               ["memory", "h0", "c0"])
    return m, model


def _serve(model, sources: list[np.ndarray], order: list[int], policy: str = "cellular", max_batch: int = 32,
           stagger: int = 0) -> dict[int, np.ndarray]:
    """Submit the requests (each a [B, S] array) in `order`; with `stagger`, run that many
    steps between arrivals so requests join lanes already decoding."""
    engine = Engine([model], EngineConfig(policy=policy, max_batch=max_batch, profile=False))
    done = {}
    name = model.outputs[0].name
    for i in order:
        engine.submit(Request(model.name, {model.inputs[0].name: sources[i]},
                              on_done=lambda r, i=i: done.__setitem__(i, r)))
        for _ in range(stagger):
            engine.step()
    engine.run_until_idle()
    assert all(done[i].status is Status.OK for i in order), [done[i].reason for i in order]
    return {i: done[i].outputs[name] for i in order}


def _rows(tokens: np.ndarray, pad: int) -> list[list[int]]:
    """Each row's tokens (padding after the last token removed)."""
    out = []
    for row in tokens.tolist():
        while row and row[-1] == pad:
            row.pop()
        out.append(row)
    return out


request_mixes = st.lists(st.tuples(st.integers(1, 2), st.integers(1, 8)), min_size=1, max_size=7)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mix=request_mixes, seed=st.integers(0, 2**16), max_batch=st.sampled_from([2, 3, 32]),
       stagger=st.integers(0, 3), policy=st.sampled_from(["cellular", "cellular-edf"]))
def test_random_mixes_answer_as_each_alone_and_as_a_pytorch_greedy_loop(additive, mix, seed, max_batch, stagger,
                                                                        policy):
    rng = np.random.default_rng(seed)
    sources = [rng.integers(3, 20, size=(rows, length)).astype(np.int64) for rows, length in mix]
    order = list(rng.permutation(len(sources)))
    together = _serve(additive.model, sources, order, policy, max_batch, stagger)
    for i, src in enumerate(sources):
        alone = _serve(additive.model, [src], [0])[0]
        np.testing.assert_array_equal(together[i], alone)
        want = [additive.reference(row) for row in src]
        # a row's tokens end at its EOS or its max length; padding (pad 0, never emitted here) after
        assert [r[:len(w)] for r, w in zip(together[i].tolist(), want)] == want
        assert all(len(w) == together[i].shape[1] or together[i][b, len(w)] == 0 for b, w in enumerate(want))


def test_lanes_end_at_eos_at_different_steps(additive):
    rng = np.random.default_rng(1)
    lengths = {len(additive.reference(rng.integers(3, 20, 6))) for _ in range(20)}
    assert len(lengths) >= 3  # the fixture's EOS makes lanes of many lengths: the mixes above are real mixes


def test_the_padded_policy_answers_the_same(additive):
    rng = np.random.default_rng(2)
    sources = [rng.integers(3, 20, size=(1, int(n))).astype(np.int64) for n in rng.integers(1, 9, 8)]
    cellular = _serve(additive.model, sources, list(range(8)))
    padded = _serve(additive.model, sources, list(range(8)), policy="padded", max_batch=4)
    for i in range(8):
        np.testing.assert_array_equal(cellular[i], padded[i])


def test_a_lane_that_never_ends_stops_at_ratio_times_source_plus_constant(additive):
    never = dataclasses.replace(additive.spec, eos=0, max_length=MaxLength(ratio=1.5, constant=2))  # 0 is never argmax
    model = load_torch_seq2seq(additive.encoder, additive.step, never, "add", EXAMPLE, ["source"], OUTPUTS)
    rng = np.random.default_rng(3)
    for n in (1, 4, 7):
        tokens = _serve(model, [rng.integers(3, 20, size=(1, n)).astype(np.int64)], [0])[0]
        assert tokens.shape == (1, int(np.ceil(1.5 * n + 2)))


def test_the_trained_reverser_through_the_graph_path_answers_as_its_reference(reverser):
    m, model = reverser
    rng = np.random.default_rng(4)
    srcs, _ = seq2seq.reverse_task(rng, 24)
    sources = [np.array([seq2seq.encode_digits(s)]) for s in srcs]
    got = _serve(model, sources, list(rng.permutation(24)), stagger=1)
    for i, s in enumerate(srcs):
        want = seq2seq.greedy_decode(m, seq2seq.encode_digits(s), seq2seq.MAX_INPUT_DIGITS + 1)
        assert _rows(got[i], seq2seq.PAD) == [want]


class _LengthEncoder(nn.Module):
    """Rows padded with 0 after their tokens: each row's length is an output (`lengths`), the
    memory the GRU's outputs (causal, so a padded row's first n equal the unpadded row's), h0
    its output at the row's last real position."""

    def __init__(self, m: AdditiveSeq2Seq):
        super().__init__()
        self.m = m

    def forward(self, source):
        lengths = (source != 0).sum(dim=1)
        memory, _ = self.m.encoder(self.m.src_embedding(source))
        last = (torch.arange(source.shape[1])[None, :] == (lengths - 1)[:, None]).to(memory.dtype)
        h0 = (memory * last.unsqueeze(2)).sum(dim=1)
        return memory, h0, torch.zeros_like(h0), lengths


def test_rows_of_one_request_with_their_own_memory_lengths_answer_as_each_row_alone(additive):
    spec = dataclasses.replace(additive.spec, memory_length="lengths")
    model = load_torch_seq2seq(_LengthEncoder(additive.module), additive.step, spec, "lens", EXAMPLE, ["source"],
                               [*OUTPUTS, "lengths"])
    rng = np.random.default_rng(5)
    lengths = np.array([6, 2, 4, 1])
    source = rng.integers(3, 20, size=(4, 6)).astype(np.int64)
    source[np.arange(6)[None, :] >= lengths[:, None]] = 0
    engine = Engine([model], EngineConfig(profile=False))
    done = {}
    engine.submit(Request("lens", {"source": source}, on_done=lambda r: done.__setitem__(0, r)))
    engine.submit(Request("lens", {"source": np.zeros((2, 3), np.int64)}, on_done=lambda r: done.__setitem__(1, r)))
    engine.run_until_idle()
    assert done[0].status is Status.OK, done[0].reason
    got = done[0].outputs["tokens"].tolist()
    for b, n in enumerate(lengths):
        want = additive.reference(source[b, :n])
        assert got[b][:len(want)] == want
    assert done[1].status is Status.INVALID and "'lengths' [0, 0] must be 2 source lengths" in done[1].reason


class _PlainEncoder(nn.Module):
    """Embedding and GRU: memory [B, S, H] (only its length is used) and the final state."""

    def __init__(self):
        super().__init__()
        self.embedding, self.gru = nn.Embedding(12, 8), nn.GRU(8, 16, batch_first=True)

    def forward(self, source):
        memory, h = self.gru(self.embedding(source))
        return memory, h[0]


class _PlainStep(nn.Module):
    """A decoder without attention (Sutskever et al.'s): the encoder's final state starts a
    GRU cell that sees only its previous token; memory and memory_mask are ignored."""

    def __init__(self):
        super().__init__()
        self.embedding, self.cell, self.out = nn.Embedding(12, 8), nn.GRUCell(8, 16), nn.Linear(16, 12)

    def forward(self, token, memory, memory_mask, h):
        h = self.cell(self.embedding(token), h)
        return self.out(h), h


def test_a_decoder_without_attention_answers_as_its_pytorch_reference():
    """Its exported step takes neither memory nor mask (the exporter drops them): it is served,
    greedy and beam-searched, each answer the reference's, whatever shares its batches."""
    from cellserve.graph.decode_spec import DecodeSpec
    from cellserve.graph.zoo.reference_decode import decode

    torch.manual_seed(11)
    encoder, step = _PlainEncoder().eval(), _PlainStep().eval()
    outputs = ["memory", "h0"]
    base = DecodeSpec(memory="memory", states=(("h", "h_next"),), init=(("h", "h0"),), bos=1, eos=0,
                      max_length=MaxLength(ratio=1.0, constant=3), output="tokens", max_beam_width=3)
    rng = np.random.default_rng(2)
    sources = [rng.integers(2, 12, size=(rows, length)).astype(np.int64) for rows, length in
               [(1, 3), (2, 6), (1, 1), (1, 9), (2, 4)]]
    seen = Counter(t for src in sources for row in src
                   for t in decode(encoder, step, torch.from_numpy(row[None]), base, outputs, 1).best.tokens)
    spec = dataclasses.replace(base, eos=max((t for t in seen if t != 1), key=lambda t: (seen[t], -t)))
    model = load_torch_seq2seq(encoder, step, spec, "plain", EXAMPLE, ["source"], outputs)
    (decoder,) = [s for s in model.program if hasattr(s, "spec")]
    assert sorted(i.name for i in decoder.graph.inputs) == ["h", "token"]  # no memory, no mask
    for width in (1, 3):
        engine = Engine([model], EngineConfig(max_batch=4, profile=False))
        done = {}
        for i, src in enumerate(sources):
            engine.submit(Request("plain", {"source": src}, beam_width=width,
                                  on_done=lambda r, i=i: done.__setitem__(i, r)))
            engine.step()  # later requests join lanes already decoding
        engine.run_until_idle()
        for i, src in enumerate(sources):
            assert done[i].status is Status.OK, done[i].reason
            for b, row in enumerate(src):
                want = list(decode(encoder, step, torch.from_numpy(row[None]), spec, outputs, width).best.tokens)
                got = done[i].outputs["tokens"][b].tolist()
                assert got[:len(want)] == want and all(t == spec.pad for t in got[len(want):]), (width, i, b)


class _UnmaskedStep(_PlainStep):
    """Attends over the memory (its mean) but ignores the mask: batched lanes of other source
    lengths would change its answers, so it is refused."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(32, 16)

    def forward(self, token, memory, memory_mask, h):
        h = self.cell(self.embedding(token), torch.tanh(self.mix(torch.cat([h, memory.mean(1)], dim=1))))
        return self.out(h), h


def test_a_step_that_reads_the_memory_without_its_mask_is_refused_saying_why():
    from cellserve.errors import ModelLoadError
    from cellserve.graph.decode_spec import DecodeSpec

    spec = DecodeSpec(memory="memory", states=(("h", "h_next"),), init=(("h", "h0"),), bos=1, eos=0,
                      max_length=MaxLength(absolute=5), output="tokens")
    with pytest.raises(ModelLoadError, match="takes 'memory' but not 'memory_mask': a step that attends over the "
                                             "memory takes both memory_input and mask_input"):
        load_torch_seq2seq(_PlainEncoder(), _UnmaskedStep(), spec, "unmasked", EXAMPLE, ["source"], ["memory", "h0"])


def test_an_output_named_as_an_input_is_refused():
    from cellserve.errors import ModelLoadError
    from cellserve.graph.decode_spec import DecodeSpec

    spec = DecodeSpec(memory="memory", states=(("h", "h_next"),), init=(("h", "h0"),), bos=1, eos=0,
                      max_length=MaxLength(absolute=5), output="source")
    with pytest.raises(ModelLoadError, match="decode spec output 'source' is also the name of an encoder input"):
        load_torch_seq2seq(_PlainEncoder(), _PlainStep(), spec, "clash", EXAMPLE, ["source"], ["memory", "h0"])


def _decode_alone(model, source: np.ndarray, stream: bool = False):
    """One request alone on an engine: its answer, the tokens streamed (each with the number
    of executor calls made when it came) and the engine's executor calls in all."""
    engine = Engine([model], EngineConfig(profile=False))
    done, streamed = {}, []
    on_tokens = (lambda b, t: streamed.append((t, len(engine.stats.step_records)))) if stream else None
    engine.submit(Request(model.name, {model.inputs[0].name: source}, on_done=lambda r: done.__setitem__(0, r),
                          on_tokens=on_tokens))
    engine.run_until_idle()
    assert done[0].status is Status.OK, done[0].reason
    return done[0].outputs[model.outputs[0].name], streamed, len(engine.stats.step_records)


def test_a_lone_greedy_lane_decodes_several_tokens_per_executor_call(reverser):
    m, model = reverser
    digits = "314159265358"
    got, _, calls = _decode_alone(model, np.array([seq2seq.encode_digits(digits)]))
    want = seq2seq.greedy_decode(m, seq2seq.encode_digits(digits), seq2seq.MAX_INPUT_DIGITS + 1)
    assert _rows(got, seq2seq.PAD) == [want]
    # the encoder's call(s) and the decoder's: far fewer than one per token (13 with EOS)
    assert calls < len(want) // 2


def test_a_streamed_lane_sends_each_token_from_its_own_step(reverser):
    m, model = reverser
    source = np.array([seq2seq.encode_digits("27182818")])
    got, streamed, _ = _decode_alone(model, source, stream=True)
    plain, _, _ = _decode_alone(model, source)
    np.testing.assert_array_equal(got, plain)
    assert [t for t, _ in streamed] == _rows(got, seq2seq.PAD)[0]
    calls = [c for _, c in streamed]
    assert calls == sorted(set(calls))  # one executor call per token: none waits for a later one
