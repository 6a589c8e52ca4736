"""The zoo's trained encoder-decoder: an LSTM with Luong dot attention that reverses digit strings.

This module is the PyTorch reference. Other components re-implement the model from its
state_dict, so the architecture and the parameter names below are a contract:

    src_embedding  nn.Embedding(VOCAB, E)
    encoder        nn.LSTM(E, H, num_layers=1, batch_first=True)     unidirectional
    tgt_embedding  nn.Embedding(VOCAB, E)
    decoder        nn.LSTMCell(E, H)                                  no input feeding
    combine        nn.Linear(2H, H), applied to cat([ctx, h_t]) then tanh
    out            nn.Linear(H, VOCAB)                                logits

Decoder step t: h_t, c_t = decoder(tgt_embedding(prev), (h, c)); scores_j = <enc_out_j, h_t>;
a = softmax(scores) (padding masked); ctx = sum_j a_j enc_out_j; logits = out(tanh(combine(
cat([ctx, h_t])))). The decoder starts from the encoder's final (h, c) with input BOS.

The weights are checked in (weights/reverse.npz, written by train_seq2seq.py) so the demo
answers correctly offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD, BOS, EOS = 0, 1, 2
DIGIT_OFFSET = 3  # '0'..'9' are token ids 3..12
VOCAB = 13
MAX_INPUT_DIGITS = 12
WEIGHTS_PATH = Path(__file__).parent / "weights" / "reverse.npz"


def encode_digits(s: str) -> list[int]:
    """'307' -> [6, 3, 10]. Raises ValueError naming the first non-digit character."""
    for i, ch in enumerate(s):
        if ch not in "0123456789":  # not str.isdigit(): that accepts e.g. '²' and Arabic digits
            raise ValueError(f"not a digit: {ch!r} at position {i} in {s!r}")
    return [ord(ch) - ord("0") + DIGIT_OFFSET for ch in s]


def decode_digits(ids) -> str:
    """[6, 3, 10] -> '307'. Raises ValueError on an id that is not a digit token."""
    out = []
    for i in ids:
        i = int(i)
        if not DIGIT_OFFSET <= i < VOCAB:
            raise ValueError(f"not a digit token id: {i} (digits are {DIGIT_OFFSET}..{VOCAB - 1})")
        out.append(chr(i - DIGIT_OFFSET + ord("0")))
    return "".join(out)


def reverse_task(rng: np.random.Generator, n: int, min_len: int = 1,
                 max_len: int = MAX_INPUT_DIGITS) -> tuple[list[str], list[str]]:
    """n random digit strings (length uniform in [min_len, max_len]) and their reversals."""
    lengths = rng.integers(min_len, max_len + 1, size=n)
    srcs = ["".join(map(str, rng.integers(0, 10, size=int(k)))) for k in lengths]
    return srcs, [s[::-1] for s in srcs]


class Seq2SeqAttention(nn.Module):
    def __init__(self, embed: int = 32, hidden: int = 128):
        super().__init__()
        self.embed, self.hidden = embed, hidden
        self.src_embedding = nn.Embedding(VOCAB, embed)
        self.encoder = nn.LSTM(embed, hidden, num_layers=1, batch_first=True)
        self.tgt_embedding = nn.Embedding(VOCAB, embed)
        self.decoder = nn.LSTMCell(embed, hidden)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, VOCAB)

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor):
        """src [B, S] (PAD-padded), src_lens [B] -> (enc_out [B, S, H], (h, c) each [B, H]).

        Packing makes (h, c) the state at each sequence's true last position, not after padding.
        """
        packed = pack_padded_sequence(self.src_embedding(src), src_lens.cpu(), batch_first=True,
                                      enforce_sorted=False)
        enc_out, (h, c) = self.encoder(packed)
        enc_out, _ = pad_packed_sequence(enc_out, batch_first=True, total_length=src.shape[1])
        return enc_out, (h[0], c[0])

    def step(self, prev: torch.Tensor, state, enc_out: torch.Tensor, src_mask: torch.Tensor):
        """One decoder step. prev [B] token ids, src_mask [B, S] True at real positions.
        Returns (logits [B, VOCAB], (h_t, c_t))."""
        h, c = self.decoder(self.tgt_embedding(prev), state)
        scores = torch.bmm(enc_out, h.unsqueeze(2)).squeeze(2)        # [B, S]
        scores = scores.masked_fill(~src_mask, float("-inf"))
        ctx = torch.bmm(torch.softmax(scores, dim=1).unsqueeze(1), enc_out).squeeze(1)  # [B, H]
        logits = self.out(torch.tanh(self.combine(torch.cat([ctx, h], dim=-1))))
        return logits, (h, c)

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, VOCAB] for decoder inputs tgt_in [B, T] (BOS first)."""
        enc_out, state = self.encode(src, src_lens)
        src_mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_lens[:, None].to(src.device)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, state = self.step(tgt_in[:, t], state, enc_out, src_mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


@torch.no_grad()
def greedy_decode(model: Seq2SeqAttention, src_ids: list[int], max_len: int) -> list[int]:
    """Reference decode of one request: feed back the argmax from BOS until EOS or max_len
    steps. Returns the generated ids without the final EOS."""
    if not src_ids:
        raise ValueError("empty source sequence")
    src = torch.tensor([src_ids], dtype=torch.long)
    enc_out, state = model.encode(src, torch.tensor([len(src_ids)]))
    mask = torch.ones_like(src, dtype=torch.bool)
    prev, generated = torch.tensor([BOS]), []
    for _ in range(max_len):
        logits, state = model.step(prev, state, enc_out, mask)
        token = int(logits.argmax(dim=-1))
        if token == EOS:
            break
        generated.append(token)
        prev = torch.tensor([token])
    return generated


def save_weights(model: Seq2SeqAttention, path: str | Path) -> None:
    """state_dict as float32 arrays named by key, plus config_embed / config_hidden; no pickle."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    np.savez(path, config_embed=np.int64(model.embed), config_hidden=np.int64(model.hidden), **arrays)


def load_trained(path: str | Path = WEIGHTS_PATH) -> Seq2SeqAttention:
    """The checked-in trained model, in eval mode."""
    with np.load(path, allow_pickle=False) as z:
        model = Seq2SeqAttention(int(z["config_embed"]), int(z["config_hidden"]))
        model.load_state_dict({k: torch.from_numpy(z[k]) for k in model.state_dict()})
    return model.eval()
