"""What the zoo models should answer: their PyTorch modules, run directly."""

from __future__ import annotations

import functools

import numpy as np
import torch

from cellserve.graph import zoo
from cellserve.graph.zoo.seq2seq import PAD, decode_digits, encode_digits

TOKEN_MODELS = {"lstm-512": ("probabilities", "label"), "gru-256": ("probabilities", "label"),
                "bilstm-tagger": ("tag_probabilities", "tags")}


@functools.lru_cache(maxsize=None)
def module(name: str) -> torch.nn.Module:
    return zoo.reference_module(name)


def token_reference(name: str, tokens: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = module(name)(torch.as_tensor(tokens))
    return {n: o.numpy() for n, o in zip(TOKEN_MODELS[name], outs)}


def digits(texts: list[str]) -> np.ndarray:
    """Digit strings of one length as the seq2seq model's input."""
    return np.array([encode_digits(t) for t in texts], np.int64)


def reversed_texts(tokens: np.ndarray) -> list[str]:
    return [decode_digits([t for t in row if t != PAD]) for row in tokens]
