"""One batched decoder step of the zoo digit reverser (a decoder-step graph run by
`GraphDecoderKernel`): compiled (graph/step_compile.py, what serving runs) against the same
graph interpreted node by node (graph/decoder_graph.interpret_step_graph).

    python -m cellserve.bench.decoder_step_bench [--out decoder_step.json] [--threads 1]
                                                 [--rounds 30] [--steps 20] [--requests 512]

Times `step_batch` on the same lanes (memories of 1-12 positions, seeded) at batch 1, 8 and
32. The kernels are interleaved: each of `rounds` rounds runs `steps` timed steps of every
kernel in turn (after warm-up), so that load from other processes falls on all of them
alike; the figure is the median (and p90) over all timed steps. Then, end to end, the zoo's
`seq2seq-reverse` in an Engine: `--requests` one-row requests (1-12 digits, seeded) submitted
at once, the wall time of run_until_idle (median of 5 rounds) and how many answers are the
exact reversal. Writes JSON and prints a table with the compiled step's speed-up over the interpreted one. (Until 2026-12 the zoo's
reverser had a hand-written kernel too; docs/decoders.md keeps the figures against it.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.decoder_graph import device_constants
from cellserve.graph.seq2seq_examples import ReverserEncoder, ReverserStep, additive_spec
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo import seq2seq
from cellserve.kernels.decoder import GraphDecoderKernel

BATCHES = (1, 8, 32)


def _kernels(device: torch.device) -> tuple[int, dict]:
    """{label: (kernel, start(memory) -> lane)} for the kernels compared."""
    m = seq2seq.load_trained()
    spec = dataclasses.replace(additive_spec(MaxLength(absolute=seq2seq.MAX_INPUT_DIGITS + 1)), bos=seq2seq.BOS,
                               eos=seq2seq.EOS, output="reversed", states=(("h", "h_next"), ("c", "c_next")),
                               init=(("h", "h0"), ("c", "c0")))
    graph = load_torch_seq2seq(ReverserEncoder(m), ReverserStep(m), spec, "rev",
                               (torch.zeros((1, 3), dtype=torch.long),), ["digits"], ["memory", "h0", "c0"])
    kernels = {}
    compiled = GraphDecoderKernel(graph.program[-1], device)
    interpreted = GraphDecoderKernel(graph.program[-1], device)
    interpreted.constants = device_constants(graph.program[-1].graph, device, compiled=False)
    kernels["GraphDecoderKernel"] = (compiled, lambda mem: compiled.start_lane(mem, None))
    kernels["GraphDecoderKernel (interpreted)"] = (interpreted, lambda mem: interpreted.start_lane(mem, None))
    return m.hidden, kernels


def run(threads: int = 1, rounds: int = 30, steps: int = 20) -> dict:
    torch.set_num_threads(threads)
    hidden, kernels = _kernels(torch.device("cpu"))
    results: dict = {label: {} for label in kernels}
    for b in BATCHES:
        placed = {}
        for label, (kernel, start) in kernels.items():
            rng = np.random.default_rng(b)  # the same memories for every kernel
            lanes = [start(rng.standard_normal((int(n), hidden)).astype(np.float32)) for n in rng.integers(1, 13, b)]
            placed[label] = (lanes, np.array([lane.slot for lane in lanes], np.int64),
                             np.array([lane.base for lane in lanes], np.int64))
            for _ in range(20):
                kernel.step_batch(*placed[label][1:])
        samples: dict = {label: [] for label in kernels}
        for _ in range(rounds):
            for label, (kernel, _) in kernels.items():
                slots, rows = placed[label][1:]
                for _ in range(steps):
                    t0 = time.perf_counter()
                    kernel.step_batch(slots, rows)
                    samples[label].append(time.perf_counter() - t0)
        for label, (kernel, _) in kernels.items():
            results[label][str(b)] = {"median_us": float(np.median(samples[label]) * 1e6),
                                      "p90_us": float(np.percentile(samples[label], 90) * 1e6)}
            for lane in placed[label][0]:
                kernel.release(lane)
    return {"threads": threads, "rounds": rounds, "steps_per_round": steps, "batches": list(BATCHES),
            "step": results}


def engine_batch(requests: int, rounds: int = 5) -> dict:
    """The zoo reverser served by an Engine: `requests` submitted at once, per round."""
    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.engine.request import Request
    from cellserve.graph import zoo

    engine = Engine([zoo.load("seq2seq-reverse")], EngineConfig())
    srcs, _ = seq2seq.reverse_task(np.random.default_rng(7), requests)
    times, got = [], {}
    for _ in range(rounds):
        got = {}
        for i, s in enumerate(srcs):
            engine.submit(Request("seq2seq-reverse", {"digits": np.array([seq2seq.encode_digits(s)])},
                                  on_done=lambda r, i=i: got.__setitem__(i, r)))
        t0 = time.perf_counter()
        engine.run_until_idle()
        times.append(time.perf_counter() - t0)
    exact = sum(seq2seq.decode_digits([t for t in np.asarray(got[i].outputs["reversed"])[0] if t != seq2seq.PAD])
                == s[::-1] for i, s in enumerate(srcs))
    median = float(np.median(times))
    return {"requests": requests, "rounds": rounds, "median_s": median, "requests_per_s": requests / median,
            "exact": int(exact)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="decoder_step.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=512, help="end-to-end engine batch (0: skip)")
    args = parser.parse_args()
    result = run(args.threads, args.rounds, args.steps)
    if args.requests:
        result["engine"] = engine_batch(args.requests)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    base = result["step"]["GraphDecoderKernel (interpreted)"]
    for label, by_batch in result["step"].items():
        cells = []
        for b, v in by_batch.items():
            ratio = f" ({v['median_us'] / base[b]['median_us']:.2f}x interpreted)" if label == "GraphDecoderKernel" else ""
            cells.append(f"b{b}: {v['median_us']:.0f} us{ratio}")
        print(f"{label:34s}", "  ".join(cells))
    if "engine" in result:
        e = result["engine"]
        print(f"engine: {e['requests']} requests at once in {e['median_s'] * 1e3:.0f} ms ({e['requests_per_s']:.0f} req/s), "
              f"{e['exact']}/{e['requests']} exact")


if __name__ == "__main__":
    main()
