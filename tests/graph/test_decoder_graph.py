"""Decoder-step graphs and encoder-decoder import: the graph computes what the PyTorch step
computes, unsupported operators and bad specs are refused at load naming what is wrong."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from cellserve.errors import ModelLoadError, UnsupportedOperator
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.decoder_graph import device_constants, load_decoder_step, run_step_graph
from cellserve.graph.model import GraphDecoder
from cellserve.graph.seq2seq_examples import AdditiveEncoder, AdditiveSeq2Seq, AdditiveStep, additive_spec
from cellserve.graph.seq2seq_import import load_seq2seq, load_torch_seq2seq
from cellserve.graph.torch_import import export_onnx_bytes

EXAMPLE = (torch.zeros((1, 3), dtype=torch.long),)
ENC_OUTPUTS = ["memory", "h0", "feed0"]


def _seeded(hidden: int = 32, seed: int = 0) -> AdditiveSeq2Seq:
    torch.manual_seed(seed)
    return AdditiveSeq2Seq(hidden=hidden).eval()


def _encoder_bytes(m: AdditiveSeq2Seq) -> bytes:
    return export_onnx_bytes(AdditiveEncoder(m), EXAMPLE, ["source"], ENC_OUTPUTS, {"source": {0: "b", 1: "t"}})


def _step_bytes(step: nn.Module, hidden: int, names=("token", "memory", "memory_mask", "h", "feed"),
                outputs=("logits", "h_next", "feed_next"), feed: int | None = None) -> bytes:
    example = (torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, hidden), torch.ones(2, 3), torch.zeros(2, hidden),
               torch.zeros(2, feed or hidden))
    axes = {n: {0: "b"} for n in (*names, *outputs)}
    axes[names[1]] = axes[names[2]] = {0: "b", 1: "s"}
    return export_onnx_bytes(step, example, list(names), list(outputs), axes)


def _load(m=None, step=None, spec=None):
    m = m or _seeded()
    return load_torch_seq2seq(AdditiveEncoder(m), step or AdditiveStep(m), spec or additive_spec(), "add",
                              EXAMPLE, ["source"], ENC_OUTPUTS)


def test_the_step_graph_computes_what_the_pytorch_step_computes_on_a_padded_masked_batch():
    m = _seeded()
    model = _load(m)
    dec = model.program[-1]
    assert isinstance(dec, GraphDecoder) and dec.vocab == 20 and dec.state_sizes == [32, 32]
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(4, 6, 32, generator=g)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 1])[:, None]).float()
    h, feed = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    token = torch.tensor([1, 5, 7, 19])
    out = run_step_graph(dec.graph, {"token": token, "memory": memory, "memory_mask": mask, "h": h, "feed": feed},
                         device_constants(dec.graph, torch.device("cpu")))
    with torch.no_grad():
        logits, h2, feed2 = m.step(token, memory, mask, h, feed)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["h_next"], h2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["feed_next"], feed2, rtol=1e-5, atol=1e-5)


def test_flops_grow_with_the_memory_length():
    dec = _load().program[-1]
    assert dec.flops_per_position > 0 and dec.flops_fixed > 0
    assert dec.flops_per_step(10) == pytest.approx(dec.flops_fixed + 10 * dec.flops_per_position)


class _CumSumStep(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, token, memory, memory_mask, h, feed):
        logits, h, feed = self.m.step(token, memory, memory_mask, h, feed)
        return torch.cumsum(logits, dim=1), h, feed


def test_an_unsupported_operator_is_refused_naming_the_operator_and_the_node():
    m = _seeded()
    with pytest.raises(UnsupportedOperator, match=r"'CumSum' \(node 'CumSum"):
        load_decoder_step(_step_bytes(_CumSumStep(m), 32))


@pytest.mark.parametrize("change, message", [
    ({"memory": "enc_out"}, r"memory 'enc_out' is not an output of the encoder"),
    ({"init": (("h", "h_final"),)}, r"init 'h' <- 'h_final'.*not an output of the encoder"),
    ({"memory_length": "lens"}, r"memory_length 'lens' is neither an input nor an output"),
    ({"states": (("hx", "h_next"), ("feed", "feed_next")), "init": ()}, r"state input 'hx' is not an input"),
    ({"states": (("h", "h_out"), ("feed", "feed_next"))}, r"state output 'h_out' is not an output"),
    ({"token_input": "prev"}, r"token_input 'prev' is not an input"),
    ({"logits_output": "scores"}, r"logits_output 'scores' is not an output"),
    ({"eos": 20}, r"eos 20 is outside the vocabulary \[0, 20\)"),
    ({"bos": 25}, r"bos 25 is outside the vocabulary \[0, 20\)"),
])
def test_a_spec_naming_what_the_graphs_lack_is_refused_naming_it(change, message):
    m = _seeded()
    spec = dataclasses.replace(additive_spec(), **change)
    with pytest.raises(ModelLoadError, match=message):
        load_seq2seq(_encoder_bytes(m), _step_bytes(AdditiveStep(m), 32), spec, "add")


def test_a_step_input_the_spec_does_not_name_is_refused():
    m = _seeded()
    spec = dataclasses.replace(additive_spec(), states=(("h", "h_next"),), init=(("h", "h0"),))
    with pytest.raises(ModelLoadError, match=r"decoder-step input 'feed' is not named in the decode spec"):
        load_seq2seq(_encoder_bytes(m), _step_bytes(AdditiveStep(m), 32), spec, "add")


class _ShrinkingStep(nn.Module):
    """Its state output `feed_next` is narrower than its state input `feed`."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, token, memory, memory_mask, h, feed):
        logits, h, feed = self.m.step(token, memory, memory_mask, h, feed)
        return logits, h, feed[:, :16]


def test_a_state_output_not_shaped_as_its_input_is_refused():
    m = _seeded()
    with pytest.raises(ModelLoadError, match=r"state output 'feed_next' has shape \[3, 16\].*'feed' is \[3, 32\]"):
        load_seq2seq(_encoder_bytes(m), _step_bytes(_ShrinkingStep(m), 32), additive_spec(), "add")


def test_a_memory_narrower_than_the_step_expects_is_refused():
    small, wide = _seeded(hidden=24), _seeded(hidden=32)
    with pytest.raises(ModelLoadError, match=r"decoder-step input 'memory' has shape \[-1, -1, 32\]"):
        load_seq2seq(_encoder_bytes(small), _step_bytes(AdditiveStep(wide), 32), additive_spec(), "add")


def test_the_combined_model_takes_the_encoder_inputs_and_answers_the_spec_output():
    model = _load(spec=dataclasses.replace(additive_spec(), output="translation", max_length=MaxLength(absolute=9)))
    assert [i.name for i in model.inputs] == ["source"]
    assert [(o.name, o.dtype) for o in model.outputs] == [("translation", "int64")]
    assert model.semantics["source"].batch_axis == 0 and model.semantics["source"].time_axis == 1
    assert model.cell_types() == ["add/decoder"] or model.cell_types()[-1] == "add/decoder"
    assert model.why_not_streamable() is not None
    assert np.all([isinstance(s, GraphDecoder) for s in model.program[-1:]])
