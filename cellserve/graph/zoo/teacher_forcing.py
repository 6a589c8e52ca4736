"""How the zoo's encoder-decoders are trained (train_seq2seq.py, train_dates.py): teacher-forced
batches and the training loop."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


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


def train(model: torch.nn.Module, next_batch: Callable[[], tuple], steps: int, lr: float, pad: int,
          report_every: int, report: Callable[[int, float], None]) -> None:
    """Train an encoder-decoder whose forward is `model(src, src_lens, tgt_in) -> logits` on
    `steps` batches from `next_batch()` (teacher_forcing_batch's four tensors): Adam at `lr`
    decaying linearly to 0 (a high rate learns the alignment fast, the low tail polishes it),
    cross-entropy ignoring `pad`, gradients clipped to norm 1 (recurrent nets spike early on).
    Every `report_every` steps, and after the last, `report(step, loss)`."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    loss_fn = nn.CrossEntropyLoss(ignore_index=pad)
    for step in range(1, steps + 1):
        src, src_lens, tgt_in, tgt_out = next_batch()
        logits = model(src, src_lens, tgt_in)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % report_every == 0 or step == steps:
            report(step, loss.item())
