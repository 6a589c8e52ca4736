"""Probing a model's inputs: dynamic dimensions that share an ONNX dim_param name get one
probe size, so an encoder taking `source [b, s]` and `lengths [b]` loads (with different
sizes its plain ops cannot broadcast the two and the import failed), and answers per row as
each row alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request
from cellserve.graph.decode_spec import DecodeSpec, MaxLength
from cellserve.graph.model import TensorSpec
from cellserve.graph.onnx_import import probe_shapes
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


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the probe's lengths are zeros
def test_a_two_input_encoder_loads_and_each_row_answers_as_alone():
    torch.manual_seed(4)
    m = AdditiveSeq2Seq(vocab=20, embed=16, hidden=32).eval()
    spec = DecodeSpec(memory="memory", memory_length="lengths", states=(("h", "h_next"), ("feed", "feed_next")),
                      init=(("h", "h0"), ("feed", "feed0")), bos=1, eos=2,
                      max_length=MaxLength(ratio=1.0, constant=2), output="tokens")
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
