"""The dates model (dates.py) as the zoo's `dates`: served through the decoder-step path and
publishing its vocabularies, so that a client can send text and read text.

Served: the trained encoder and decoder step exported from PyTorch in memory
(`load_torch_seq2seq`) under `dates.DECODE_SPEC` (greedy by default; a request may ask for a
beam of up to 8 with the `beam_width` parameter). Input `source` int64 [batch, characters],
output `date` int64 [batch, length] (ISO characters, rows padded with PAD).

Published (`parameters()`, the model config's parameters over the protocol): the text
vocabularies in cellserve/text_vocab.py's format, and the decode spec's `decode.*` keys, as a
repository model's config.pbtxt would hold them.
"""

from __future__ import annotations

import dataclasses

import torch

from cellserve.graph.model import Model, RecurrentLayer
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo import dates
from cellserve.text_vocab import TextVocabulary

NAME = "dates"
# The longest written form `date_task` draws is 53 characters ("the twenty-seventh of
# september, two thousand and forty-seven" and kin); longer input is refused at the server.
MAX_SOURCE_CHARS = 64


def vocabulary() -> TextVocabulary:
    """The source characters (id 0 is PAD, no text) and the ISO characters of the target
    (PAD, BOS, EOS are not text)."""
    source = (None, *dates.SOURCE_CHARS)
    target = (None,) * dates.TARGET_OFFSET + tuple(dates.TARGET_CHARS)
    return TextVocabulary(dates.ENCODER_INPUTS[0], source, dates.DECODE_SPEC.output, target)


def parameters() -> dict[str, str]:
    """What the server publishes in the model's config: text.* and decode.* keys."""
    return {**vocabulary().to_parameters(), **dates.DECODE_SPEC.to_parameters()}


def load(name: str = NAME, model: dates.DatesModel | None = None) -> Model:
    """The served model (trained weights unless `model` is given). Its cell types are
    `<name>/encoder/0`, `<name>/encoder/1` (the bidirectional GRU's two directions) and
    `<name>/decoder`."""
    m = model if model is not None else dates.load_trained()
    example = (torch.tensor([dates.encode_source("3 March 2021")]),)
    served = load_torch_seq2seq(m.encoder, m.step, dates.DECODE_SPEC, name, example,
                                dates.ENCODER_INPUTS, dates.ENCODER_OUTPUTS)
    served.max_sequence_length = MAX_SOURCE_CHARS
    # the exporter names the encoder's layer after its ONNX node ("rnn.GRU"); the zoo names it
    # "encoder", as seq2seq-reverse's, so that placements and plans read alike
    served.program = [dataclasses.replace(s, name="encoder") if isinstance(s, RecurrentLayer) else s
                      for s in served.program]
    return served
