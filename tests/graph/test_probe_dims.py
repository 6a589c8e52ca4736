"""Probing a model's inputs: dynamic dimensions that share an ONNX dim_param name get one
probe size, so an encoder taking `source [b, s]` and `lengths [b]` loads (with different
sizes its plain ops cannot broadcast the two and the import failed), and answers per row as
each row alone; an encoder of plain ops only (no recurrent layer to find the batch by) loads
too, its batch read from the memory; and a request whose inputs disagree on the batch is
refused with a reason, not failed inside the model."""


from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import DecodeSpec, MaxLength
from cellserve.graph.model import TensorSpec
from cellserve.graph.onnx_import import load_onnx, probe_shapes
from cellserve.graph.seq2seq_examples import AdditiveSeq2Seq, AdditiveStep
from cellserve.graph.seq2seq_import import load_torch_seq2seq


def test_dims_with_one_name_share_a_probe_size_and_others_do_not():
    inputs = [TensorSpec("source", "int64", (-1, -1), ("b", "s")), TensorSpec("lengths", "int64", (-1,), ("b",)),
              TensorSpec("extra", "float32", (-1, 4, -1), ("", "", "s")), TensorSpec("old", "float32", (-1,))]
    shapes = probe_shapes(inputs, [7, 5, 11, 13])
    assert shapes == {"source": [7, 5], "lengths": [7], "extra": [11, 4, 5], "old": [13]}


def test_a_spec_without_dim_names_probes_as_before():
    shapes = probe_shapes([TensorSpec("a", "int64", (-1, -1)), TensorSpec("b", "int64", (-1,))], [7, 5, 11])
    assert shapes == {"a": [7, 5], "b": [11]}
    assert TensorSpec("a", "int64", (-1,), ("n",)) == TensorSpec("a", "int64", (-1,))  # names are not identity


class _LengthsEncoder(nn.Module):
    """source [B, S] (padded), lengths [B] -> memory [B, S, H] (the GRU's outputs, zero past
    each row's length), h0 = the mean of each row's real positions: what a row alone gives."""

    def __init__(self, m: AdditiveSeq2Seq):
        super().__init__()
        self.m = m

    def forward(self, source, lengths):
        mask = (torch.arange(source.shape[1])[None, :] < lengths[:, None]).float()
        memory = self.m.encoder(self.m.src_embedding(source))[0] * mask[:, :, None]
        h0 = memory.sum(1) / lengths[:, None].float()
        return memory, h0, torch.zeros_like(h0)


# an encoder taking (source, lengths) whose outputs start the additive decoder's two states
LENGTHS_SPEC = DecodeSpec(memory="memory", memory_length="lengths", states=(("h", "h_next"), ("feed", "feed_next")),
                          init=(("h", "h0"), ("feed", "feed0")), bos=1, eos=2,
                          max_length=MaxLength(ratio=1.0, constant=2), output="tokens")


def test_a_two_input_encoder_loads_and_each_row_answers_as_alone():
    torch.manual_seed(4)
    m = AdditiveSeq2Seq(vocab=20, embed=16, hidden=32).eval()
    spec = LENGTHS_SPEC
    example = (torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    model = load_torch_seq2seq(_LengthsEncoder(m), AdditiveStep(m), spec, "lens", example, ["source", "lengths"],
                               ["memory", "h0", "feed0"],
                               dynamic_axes={"source": {0: "batch", 1: "time"}, "lengths": {0: "batch"}})
    assert model.semantics["source"].batch_axis == 0 and model.semantics["source"].time_axis == 1
    engine = Engine([model], EngineConfig())
    answers = {}

    def ask(key, source, lengths):
        engine.submit(Request("lens", {"source": np.array(source), "lengths": np.array(lengths)},
                              on_done=lambda r: answers.__setitem__(key, r)))

    ask("both", [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], [3, 5])
    ask("first", [[5, 6, 7]], [3])
    ask("second", [[8, 9, 10, 11, 12]], [5])
    engine.run_until_idle()
    tokens = {k: np.asarray(r.outputs["tokens"]) for k, r in answers.items()}
    row = lambda a: [int(t) for t in a if t != spec.pad]  # noqa: E731
    assert row(tokens["both"][0]) == row(tokens["first"][0])
    assert row(tokens["both"][1]) == row(tokens["second"][0])


class _PlainEncoder(nn.Module):
    """No recurrent layer: memory = tanh(W embed(source)), h0 = the mean of each row's real
    positions (0 / 0 on the probe's zero lengths: the import must not mind)."""

    def __init__(self, m: AdditiveSeq2Seq):
        super().__init__()
        self.m = m
        self.proj = nn.Linear(16, 32)

    def forward(self, source, lengths):
        memory = torch.tanh(self.proj(self.m.src_embedding(source)))
        mask = (torch.arange(source.shape[1])[None, :] < lengths[:, None]).float()
        h0 = (memory * mask[:, :, None]).sum(1) / lengths[:, None].float()
        return memory, h0, torch.zeros_like(h0)


def _plain_encoder_model():
    torch.manual_seed(5)
    m = AdditiveSeq2Seq(vocab=20, embed=16, hidden=32).eval()
    spec = LENGTHS_SPEC
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the probe's 0 / 0 stays quiet
        model = load_torch_seq2seq(_PlainEncoder(m), AdditiveStep(m), spec, "plain", (torch.tensor([[5, 6, 7]]),
                                   torch.tensor([3])), ["source", "lengths"], ["memory", "h0", "feed0"],
                                   dynamic_axes={"source": {0: "batch", 1: "time"}, "lengths": {0: "batch"}})
    return model, spec


def _serve(model, requests: dict) -> dict:
    engine = Engine([model], EngineConfig())
    answers = {}
    for key, inputs in requests.items():
        engine.submit(Request(model.name, {k: np.array(v) for k, v in inputs.items()},
                              on_done=lambda r, key=key: answers.__setitem__(key, r)))
    engine.run_until_idle()
    return answers


def test_an_encoder_of_plain_ops_loads_its_batch_read_from_the_memory():
    model, spec = _plain_encoder_model()
    assert (model.semantics["source"].batch_axis, model.semantics["source"].time_axis) == (0, 1)
    answers = _serve(model, {"both": {"source": [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], "lengths": [3, 5]},
                             "first": {"source": [[5, 6, 7]], "lengths": [3]},
                             "second": {"source": [[8, 9, 10, 11, 12]], "lengths": [5]}})
    assert {r.status for r in answers.values()} == {Status.OK}
    row = lambda r, b: [int(t) for t in np.asarray(r.outputs["tokens"])[b] if t != spec.pad]  # noqa: E731
    assert row(answers["both"], 0) == row(answers["first"], 0)
    assert row(answers["both"], 1) == row(answers["second"], 0)


def test_inputs_that_disagree_on_the_batch_are_refused_naming_them_and_neighbours_are_served():
    model, _ = _plain_encoder_model()
    answers = _serve(model, {"short": {"source": [[5, 6, 7], [8, 9, 10]], "lengths": [3]},
                             "good": {"source": [[5, 6, 7]], "lengths": [3]}})
    assert answers["short"].status is Status.INVALID
    assert "'lengths'" in answers["short"].reason and "'source' holds 2 sequences" in answers["short"].reason
    assert answers["good"].status is Status.OK


class _TwoInputs(nn.Module):
    """tokens [B, T] through a GRU, plus a context vector [B, 8] that reaches no recurrent
    layer (so only its ONNX dim name says it is per sequence)."""

    def __init__(self):
        super().__init__()
        self.embedding, self.rnn = nn.Embedding(50, 8), nn.GRU(8, 16, batch_first=True)
        self.context, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, tokens, context):
        _, h = self.rnn(self.embedding(tokens))
        return self.head(torch.tanh(h[-1] + self.context(context)))


def test_a_context_input_with_the_batchs_dim_name_must_match_the_batch():
    torch.manual_seed(6)
    module, buf = _TwoInputs().eval(), io.BytesIO()
    torch.onnx.export(module, (torch.randint(0, 50, (2, 7)), torch.randn(2, 8)), buf, input_names=["tokens", "context"],
                      output_names=["out"], dynamic_axes={"tokens": {0: "batch", 1: "time"}, "context": {0: "batch"},
                                                          "out": {0: "batch"}}, opset_version=17, dynamo=False)
    model = load_onnx(buf.getvalue(), name="two")
    tokens, context = np.array([[1, 2, 3], [4, 5, 6]]), np.random.default_rng(0).standard_normal((3, 8), np.float32)
    answers = _serve(model, {"mismatch": {"tokens": tokens, "context": context},
                             "good": {"tokens": tokens, "context": context[:2]}})
    assert answers["mismatch"].status is Status.INVALID
    assert answers["mismatch"].reason == ("input 'context': dimension 0 ('batch', the batch) is 3, but input "
                                          "'tokens' holds 2 sequences")
    assert answers["good"].status is Status.OK
    with torch.no_grad():
        want = module(torch.from_numpy(tokens), torch.from_numpy(context[:2])).numpy()
    np.testing.assert_allclose(answers["good"].outputs["out"], want, rtol=1e-4, atol=1e-5)
