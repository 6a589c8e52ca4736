"""The zoo: built-in models that work offline.

Classifiers and the tagger have seeded random weights (they exist to be served and measured);
`seq2seq-reverse` is a real trained model (see seq2seq.py and train_seq2seq.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cellserve.errors import UnknownModel
from cellserve.graph.model import AttentionDecoder, DenseNode, DirectionWeights, Model, RecurrentLayer, TensorSpec
from cellserve.graph.onnx_import import find_semantics
from cellserve.graph.torch_import import load_torch
from cellserve.graph.zoo import seq2seq
from cellserve.graph.zoo.modules import RNNClassifier, RNNTagger, seeded

TOKENS_AXES = {"tokens": {0: "batch", 1: "time"}}


@dataclass(frozen=True)
class ZooEntry:
    description: str
    module: Callable[[], torch.nn.Module] | None  # the PyTorch reference, when there is one
    outputs: tuple[str, ...]
    time_output_axes: dict[str, dict[int, str]]


def _classifier(kind: str, vocab: int, width: int, layers: int, seed: int) -> Callable[[], torch.nn.Module]:
    return lambda: seeded(RNNClassifier(kind, vocab, width, width, layers, classes=8), seed)


ZOO: dict[str, ZooEntry] = {
    "lstm-512": ZooEntry("2-layer LSTM text classifier: vocabulary 10000, embedding and hidden 512, 8 classes",
                         _classifier("lstm", 10000, 512, 2, 0), ("probabilities", "label"),
                         {"probabilities": {0: "batch"}, "label": {0: "batch"}}),
    "gru-256": ZooEntry("2-layer GRU text classifier: vocabulary 10000, embedding and hidden 256, 8 classes",
                        _classifier("gru", 10000, 256, 2, 1), ("probabilities", "label"),
                        {"probabilities": {0: "batch"}, "label": {0: "batch"}}),
    "bilstm-tagger": ZooEntry("2-layer bidirectional LSTM tagger: vocabulary 5000, hidden 128, 16 tags",
                              lambda: seeded(RNNTagger("lstm", 5000, 128, 128, 2, tags=16), 2),
                              ("tag_probabilities", "tags"),
                              {"tag_probabilities": {0: "batch", 1: "time"}, "tags": {0: "batch", 1: "time"}}),
    "seq2seq-reverse": ZooEntry("trained LSTM encoder-decoder with attention that reverses digit strings "
                                "(greedy decoding)", None, ("reversed",), {}),
}


def names() -> list[str]:
    return list(ZOO)


def reference_module(name: str) -> torch.nn.Module:
    entry = _entry(name)
    return entry.module() if entry.module else seq2seq.load_trained()


def load(name: str) -> Model:
    entry = _entry(name)
    if entry.module is None:
        return _seq2seq_model(name, seq2seq.load_trained())
    example = (torch.zeros((1, 3), dtype=torch.long),)
    model = load_torch(entry.module(), name, example, ["tokens"], list(entry.outputs),
                       {**TOKENS_AXES, **entry.time_output_axes})
    model.max_sequence_length = 1024
    return model


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UnknownModel(f"no zoo model {name!r}; the zoo has {', '.join(ZOO)}")
    return ZOO[name]


def _weights(cell: torch.nn.Module, suffix: str = "") -> DirectionWeights:
    get = lambda n: getattr(cell, n + suffix).detach().numpy().astype(np.float32)  # noqa: E731
    return DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))


def _seq2seq_model(name: str, m: seq2seq.Seq2SeqAttention) -> Model:
    """Build the encoder-decoder's cell graph from the trained module's weights."""
    hidden = m.encoder.hidden_size
    np_ = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    program = [
        DenseNode("Transpose", "time_major", ["digits"], ["ids"], {"perm": [1, 0]}),
        RecurrentLayer("encoder", "lstm", hidden, [_weights(m.encoder, "_l0")], x="ids",
                       y="enc_y", y_h="enc_h", y_c="enc_c", token_table=np_(m.src_embedding.weight)),
        DenseNode("Squeeze", "memory", ["enc_y"], ["memory"], {"axes": [1]}),
        DenseNode("Squeeze", "h0", ["enc_h"], ["h0"], {"axes": [0]}),
        DenseNode("Squeeze", "c0", ["enc_c"], ["c0"], {"axes": [0]}),
        AttentionDecoder("decoder", hidden, np_(m.tgt_embedding.weight), _weights(m.decoder),
                         np_(m.combine.weight), np_(m.combine.bias), np_(m.out.weight), np_(m.out.bias),
                         bos=seq2seq.BOS, eos=seq2seq.EOS, pad=seq2seq.PAD, max_len=seq2seq.MAX_INPUT_DIGITS + 1,
                         memory="memory", initial_h="h0", initial_c="c0", output="reversed"),
    ]
    model = Model(name, [TensorSpec("digits", "int64", (-1, -1))], [TensorSpec("reversed", "int64", (-1, -1))],
                  {}, program, max_sequence_length=seq2seq.MAX_INPUT_DIGITS)
    model.semantics = find_semantics(model)
    return model
