"""Train the zoo's date-normalisation encoder-decoder (dates.py) and write its weights.

    python -m cellserve.graph.zoo.train_dates --out cellserve/graph/zoo/weights/dates.npz

Fresh examples every step (date_task, seeded), teacher forcing, cross-entropy, Adam with a
linear decay. Deterministic for a given --seed and --threads (the thread count can change float
summation order, hence the final weights' last bits). The final line reports greedy and beam
accuracy (exact match of the whole ISO date) on --eval fresh held-out inputs, decoded one
request at a time by reference_decode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cellserve.graph.zoo.dates import (BOS, EOS, PAD, DatesModel, accuracy, date_task, encode_source,
                                       encode_target, save_weights)
from cellserve.graph.zoo.teacher_forcing import teacher_forcing_batch, train


def make_batch(srcs: list[str], tgts: list[str]):
    """-> src [B, S], src_lens [B], tgt_in [B, T] = BOS + target, tgt_out [B, T] = target + EOS."""
    return teacher_forcing_batch([encode_source(s) for s in srcs], [encode_target(t) for t in tgts], PAD, BOS, EOS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the .npz weights file to write")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", type=int, default=1000, help="held-out inputs for the final accuracies")
    p.add_argument("--beam", type=int, default=4, help="beam width of the final beam accuracy")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "threads", "eval", "beam"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    heldout_rng = np.random.default_rng([args.seed, 1])  # a different stream than training's

    model = DatesModel()
    start = time.perf_counter()

    def report(step: int, loss: float) -> None:
        model.eval()
        acc = accuracy(model, *date_task(heldout_rng, 200), beam_width=1)
        model.train()
        print(f"step {step:5d}  loss {loss:.4f}  greedy exact-match(200) {acc:.3f}  "
              f"{time.perf_counter() - start:.0f}s", flush=True)

    train(model, lambda: make_batch(*date_task(rng, args.batch)), args.steps, args.lr, PAD, 250, report)
    train_s = time.perf_counter() - start
    save_weights(model, args.out)
    print(f"wrote {args.out}  ({sum(p.numel() for p in model.parameters())} parameters, "
          f"trained in {train_s:.0f}s)", flush=True)

    model.eval()
    srcs, tgts = date_task(heldout_rng, args.eval)
    greedy = accuracy(model, srcs, tgts, beam_width=1)
    beam = accuracy(model, srcs, tgts, beam_width=args.beam)
    print(f"exact match on {args.eval} fresh held-out inputs: greedy {greedy:.4f}, beam {args.beam} {beam:.4f}")


if __name__ == "__main__":
    main()
