"""The batches the zoo's encoder-decoders are trained on (train_seq2seq.py, train_dates.py)."""

from __future__ import annotations

import torch


def teacher_forcing_batch(src_ids: list[list[int]], tgt_ids: list[list[int]], pad: int, bos: int, eos: int):
    """Token id lists -> src [B, S], src_lens [B], tgt_in [B, T] = BOS + target and
    tgt_out [B, T] = target + EOS, each padded with `pad` to the batch's longest."""
    S, T = max(map(len, src_ids)), max(map(len, tgt_ids)) + 1
    src = torch.full((len(src_ids), S), pad, dtype=torch.long)
    tgt_in = torch.full((len(src_ids), T), pad, dtype=torch.long)
    tgt_out = torch.full((len(src_ids), T), pad, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[i, :len(s)] = torch.tensor(s)
        tgt_in[i, :len(t) + 1] = torch.tensor([bos] + t)
        tgt_out[i, :len(t) + 1] = torch.tensor(t + [eos])
    return src, torch.tensor([len(s) for s in src_ids]), tgt_in, tgt_out
