"""Train the zoo's digit-reversal seq2seq model and write its weights.

    python -m cellserve.graph.zoo.train_seq2seq --out cellserve/graph/zoo/weights/reverse.npz

Teacher forcing, cross-entropy, Adam. Deterministic for a given --seed and --threads (the
thread count can change float summation order, hence the final weights' last bits).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cellserve.graph.zoo.seq2seq import (BOS, EOS, MAX_INPUT_DIGITS, PAD, Seq2SeqAttention,
                                         encode_digits, decode_digits, greedy_decode,
                                         reverse_task, save_weights)
from cellserve.graph.zoo.teacher_forcing import teacher_forcing_batch, train


def make_batch(srcs: list[str], tgts: list[str]):
    """-> src [B, S], src_lens [B], tgt_in [B, T] = BOS + target, tgt_out [B, T] = target + EOS."""
    return teacher_forcing_batch([encode_digits(s) for s in srcs], [encode_digits(t) for t in tgts], PAD, BOS, EOS)


def exact_match(model: Seq2SeqAttention, srcs: list[str], tgts: list[str]) -> float:
    model.eval()
    hits = sum(decode_digits(greedy_decode(model, encode_digits(s), MAX_INPUT_DIGITS + 1)) == t
               for s, t in zip(srcs, tgts))
    model.train()
    return hits / len(srcs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the .npz weights file to write")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", type=int, default=1000, help="held-out inputs for the final accuracy")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    # Held-out inputs come from a different stream than the training batches.
    heldout_rng = np.random.default_rng([args.seed, 1])

    model = Seq2SeqAttention(args.embed, args.hidden)
    start = time.perf_counter()

    def report(step: int, loss: float) -> None:
        acc = exact_match(model, *reverse_task(heldout_rng, 200))
        print(f"step {step:5d}  loss {loss:.4f}  exact-match(200) {acc:.3f}  "
              f"{time.perf_counter() - start:.0f}s", flush=True)

    train(model, lambda: make_batch(*reverse_task(rng, args.batch)), args.steps, args.lr, PAD, 200, report)

    acc = exact_match(model, *reverse_task(heldout_rng, args.eval))
    print(f"final exact-match accuracy on {args.eval} fresh held-out inputs: {acc:.4f}")
    save_weights(model, args.out)
    print(f"wrote {args.out}  (E={args.embed}, H={args.hidden}, {time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
