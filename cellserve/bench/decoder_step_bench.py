"""One batched decoder step: the zoo digit reverser's hand-written `DecoderKernel` against the
same decoder exported as a decoder-step graph and run by `GraphDecoderKernel`.

    python -m cellserve.bench.decoder_step_bench [--out decoder_step.json] [--threads 1]

Times `step_batch` on the same lanes (memories of 1-12 positions, seeded) at batch 1, 8 and
32: the median of 300 steps after 20 warm-up steps, per kernel. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from cellserve.graph import zoo
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import ReverserEncoder, ReverserStep, additive_spec
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo import seq2seq
from cellserve.kernels.decoder import DecoderKernel, GraphDecoderKernel

BATCHES = (1, 8, 32)


def _kernels(device: torch.device):
    m = seq2seq.load_trained()
    spec = dataclasses.replace(additive_spec(MaxLength(absolute=seq2seq.MAX_INPUT_DIGITS + 1)), bos=seq2seq.BOS,
                               eos=seq2seq.EOS, output="reversed", states=(("h", "h_next"), ("c", "c_next")),
                               init=(("h", "h0"), ("c", "c0")))
    graph = load_torch_seq2seq(ReverserEncoder(m), ReverserStep(m), spec, "rev",
                               (torch.zeros((1, 3), dtype=torch.long),), ["digits"], ["memory", "h0", "c0"])
    hand = DecoderKernel(zoo.load("seq2seq-reverse").program[-1], device)
    zeros = np.zeros(m.hidden, np.float32)
    return m.hidden, {"DecoderKernel": (hand, lambda mem: hand.start(mem, zeros, zeros)),
                      "GraphDecoderKernel": (k := GraphDecoderKernel(graph.program[-1], device),
                                             lambda mem: k.start_lane(mem, None))}


def run(threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    hidden, kernels = _kernels(torch.device("cpu"))
    results = {}
    for label, (kernel, start) in kernels.items():
        for b in BATCHES:
            rng = np.random.default_rng(0)
            lanes = [start(rng.standard_normal((int(n), hidden)).astype(np.float32)) for n in rng.integers(1, 13, b)]
            slots = np.array([lane.slot for lane in lanes], np.int64)
            rows = np.array([lane.base for lane in lanes], np.int64)
            for _ in range(20):
                kernel.step_batch(slots, rows)
            samples = []
            for _ in range(300):
                t0 = time.perf_counter()
                kernel.step_batch(slots, rows)
                samples.append(time.perf_counter() - t0)
            results.setdefault(label, {})[str(b)] = {"median_us": float(np.median(samples) * 1e6),
                                                     "p90_us": float(np.percentile(samples, 90) * 1e6)}
            for lane in lanes:
                kernel.release(lane)
    return {"threads": threads, "batches": list(BATCHES), "step": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="decoder_step.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = run(args.threads)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for label, by_batch in result["step"].items():
        print(label, " ".join(f"b{b}: {v['median_us']:.0f} us" for b, v in by_batch.items()))


if __name__ == "__main__":
    main()
