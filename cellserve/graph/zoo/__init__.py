"""The zoo: built-in models that work offline.

Classifiers and the tagger have seeded random weights (they exist to be served and measured);
`seq2seq-reverse` (seq2seq.py, train_seq2seq.py), `dates` (dates.py, train_dates.py,
dates_served.py) and the `reverse` family's variants (families.py) are real trained
encoder-decoders, served through the decoder-step path.

`parameters(name)` is what the server publishes in a model's config (Triton's model
configuration `parameters`): for `dates`, its text vocabularies (cellserve/text_vocab.py) and
its decode spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from cellserve.errors import UnknownModel
from cellserve.graph.decode_spec import DecodeSpec, MaxLength
from cellserve.graph.model import Model, RecurrentLayer
from cellserve.graph.seq2seq_examples import ReverserEncoder, ReverserStep
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.torch_import import load_torch
from cellserve.graph.zoo import dates, dates_served, families, seq2seq
from cellserve.graph.zoo.modules import RNNClassifier, RNNTagger, seeded

TOKENS_AXES = {"tokens": {0: "batch", 1: "time"}}


@dataclass(frozen=True)
class ZooEntry:
    description: str
    module: Callable[[], torch.nn.Module] | None  # the PyTorch reference of a one-graph model
    outputs: tuple[str, ...]
    time_output_axes: dict[str, dict[int, str]]
    # an encoder-decoder: its served model (decoder-step path), trained module, and published parameters
    served: Callable[[str], Model] | None = None
    trained: Callable[[], torch.nn.Module] | None = None
    parameters: Callable[[], dict[str, str]] | None = None


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
                                "(greedy decoding)", None, ("reversed",), {},
                                served=lambda name: _seq2seq_model(name, seq2seq.load_trained()),
                                trained=seq2seq.load_trained),
    "dates": ZooEntry("trained GRU encoder-decoder with additive attention: written dates ('3rd of March 1998') "
                      "to ISO (1998-03-03), text in and out; beam search up to 8", None, ("date",), {},
                      served=lambda name: dates_served.load(name), trained=dates.load_trained,
                      parameters=dates_served.parameters),
}

# The variant families (families.py): the digit reverser at several widths, for accuracy
# scaling (docs/accuracy-scaling.md); each variant is also a model of its own.
ZOO.update({v.name: ZooEntry(f"trained digit reverser, hidden {v.hidden}: variant of family {v.family!r}, "
                             f"exact match {v.accuracy:.3f}", None, ("reversed",), {},
                             served=families.load, trained=lambda v=v: families.load_reference(v.name))
            for v in families.VARIANTS.values()})


def names() -> list[str]:
    return list(ZOO)


def reference_module(name: str) -> torch.nn.Module:
    """The PyTorch module a zoo model is served from (an encoder-decoder: its trained model)."""
    entry = _entry(name)
    return entry.module() if entry.module else entry.trained()


def parameters(name: str) -> dict[str, str]:
    """The parameters the server publishes in the model's config ({} for most models)."""
    entry = _entry(name)
    return entry.parameters() if entry.parameters else {}


def load(name: str) -> Model:
    entry = _entry(name)
    if entry.served is not None:
        return entry.served(name)
    example = (torch.zeros((1, 3), dtype=torch.long),)
    model = load_torch(entry.module(), name, example, ["tokens"], list(entry.outputs),
                       {**TOKENS_AXES, **entry.time_output_axes})
    model.max_sequence_length = 1024
    return model


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UnknownModel(f"no zoo model {name!r}; the zoo has {', '.join(ZOO)}")
    return ZOO[name]


def _seq2seq_model(name: str, m: seq2seq.Seq2SeqAttention) -> Model:
    """The trained digit reverser served through the decoder-step path (docs/decoders.md):
    its encoder and its decoder step exported from PyTorch in memory, wired by a decode spec
    (greedy, at most MAX_INPUT_DIGITS + 1 tokens, EOS ends a row, rows padded with PAD)."""
    spec = DecodeSpec(memory="memory", states=(("h", "h_next"), ("c", "c_next")), init=(("h", "h0"), ("c", "c0")),
                      bos=seq2seq.BOS, eos=seq2seq.EOS, pad=seq2seq.PAD,
                      max_length=MaxLength(absolute=seq2seq.MAX_INPUT_DIGITS + 1), output="reversed")
    model = load_torch_seq2seq(ReverserEncoder(m), ReverserStep(m), spec, name, (torch.zeros((1, 3), dtype=torch.long),),
                               ["digits"], ["memory", "h0", "c0"])
    model.max_sequence_length = seq2seq.MAX_INPUT_DIGITS
    # the exporter names the encoder's layer after its ONNX node; keep the zoo's cell type names
    # (seq2seq-reverse/encoder/0, seq2seq-reverse/decoder) that placements and plans refer to
    model.program = [dataclasses.replace(s, name="encoder") if isinstance(s, RecurrentLayer) else s
                     for s in model.program]
    return model
