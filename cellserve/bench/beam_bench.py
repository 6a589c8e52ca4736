"""Per-request cost of beam search against greedy: the zoo's trained digit reverser served
through the graph path (encoder + decoder-step graph) by the engine, on this machine's CPU.

    python -m cellserve.bench.beam_bench [--out beam.json] [--widths 1,4] [--requests 64]
                                         [--rounds 5] [--threads 1]

Each round, for each width in turn (interleaved, so that load from other processes falls on
every width alike): `requests` requests of one row each (random digit strings of 1-12 digits,
the same strings for every width) submitted at once to a fresh engine and run until idle
(cellular batching; one request's beams and every other request's share each step), then the
same requests one at a time. Figures per width, medians over rounds:
- `load_s_per_request`: wall seconds of the loaded run / requests (the per-request cost);
- `busy_s_per_request`: the executor's busy seconds (kernel calls) / requests;
- `alone_ms`: mean latency of a request alone;
- `decoder_steps`, `mean_batch`: batched decoder steps of the loaded run and their mean lanes;
and each width's ratio to the first width's. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.seq2seq_examples import ReverserEncoder, ReverserStep, additive_spec
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo import seq2seq


def reverser_model(max_beam_width: int):
    """The trained digit reverser as an encoder plus a decoder-step graph."""
    m = seq2seq.load_trained()
    spec = dataclasses.replace(additive_spec(MaxLength(absolute=seq2seq.MAX_INPUT_DIGITS + 1)), bos=seq2seq.BOS,
                               eos=seq2seq.EOS, pad=seq2seq.PAD, output="reversed",
                               states=(("h", "h_next"), ("c", "c_next")), init=(("h", "h0"), ("c", "c0")),
                               max_beam_width=max_beam_width)
    return load_torch_seq2seq(ReverserEncoder(m), ReverserStep(m), spec, "rev", (torch.zeros((1, 3), dtype=torch.long),),
                              ["digits"], ["memory", "h0", "c0"])


def _run(model, sources: list[np.ndarray], width: int, together: bool) -> dict:
    engine = Engine([model], EngineConfig(profile=False))
    done: list = []
    t0 = time.perf_counter()
    latencies = []
    for src in sources:
        t1 = time.perf_counter()
        engine.submit(Request("rev", {"digits": src}, on_done=done.append, beam_width=width))
        if not together:
            engine.run_until_idle()
            latencies.append(time.perf_counter() - t1)
    engine.run_until_idle()
    wall = time.perf_counter() - t0
    bad = [r.reason for r in done if r.status is not Status.OK]
    if bad or len(done) != len(sources):
        raise RuntimeError(f"width {width}: {len(done)} answers for {len(sources)} requests; failures: {bad[:3]}")
    stats = engine.stats
    steps = stats.steps_by_type.get("rev/decoder", 0)
    return {"wall_s": wall, "busy_s": stats.busy_s, "alone_s": statistics.mean(latencies) if latencies else None,
            "decoder_steps": steps, "mean_batch": stats.lanes_by_type.get("rev/decoder", 0) / max(steps, 1)}


def measure(widths: list[int], requests: int, rounds: int, seed: int = 0) -> dict:
    model = reverser_model(max(widths))
    rng = np.random.default_rng(seed)
    digits, _ = seq2seq.reverse_task(rng, requests)
    sources = [np.array([seq2seq.encode_digits(s)], np.int64) for s in digits]
    _run(model, sources[:8], widths[-1], True)  # warm-up
    samples: dict[int, list] = {w: [] for w in widths}
    for _ in range(rounds):
        for w in widths:
            loaded = _run(model, sources, w, True)
            alone = _run(model, sources[: max(8, requests // 4)], w, False)
            samples[w].append((loaded, alone))
    out = {}
    for w in widths:
        loaded = [s[0] for s in samples[w]]
        alone = [s[1] for s in samples[w]]
        out[w] = {"load_s_per_request": statistics.median(r["wall_s"] for r in loaded) / requests,
                  "busy_s_per_request": statistics.median(r["busy_s"] for r in loaded) / requests,
                  "alone_ms": statistics.median(r["alone_s"] for r in alone) * 1e3,
                  "decoder_steps": statistics.median(r["decoder_steps"] for r in loaded),
                  "mean_batch": statistics.median(r["mean_batch"] for r in loaded)}
    base = out[widths[0]]
    for w in widths:
        for key in ("load_s_per_request", "busy_s_per_request", "alone_ms"):
            out[w][f"{key}_ratio"] = out[w][key] / base[key]
    return {"model": "seq2seq-reverse (graph path)", "requests": requests, "rounds": rounds,
            "threads": torch.get_num_threads(), "widths": {str(w): v for w, v in out.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="beam.json")
    p.add_argument("--widths", default="1,4")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths must be integers separated by commas, got {args.widths!r}")
    if not widths or min(widths) < 1:
        p.error(f"--widths must be integers >= 1, got {args.widths!r}")
    if args.requests < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--requests, --rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    result = measure(widths, args.requests, args.rounds)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'width':>5} {'per request (load)':>19} {'busy/request':>13} {'alone':>9} {'steps':>6} {'batch':>6}")
    for w, r in result["widths"].items():
        print(f"{w:>5} {r['load_s_per_request'] * 1e3:>15.2f} ms {r['busy_s_per_request'] * 1e3:>10.2f} ms "
              f"{r['alone_ms']:>6.2f} ms {r['decoder_steps']:>6.0f} {r['mean_batch']:>6.1f}   "
              f"x{r['load_s_per_request_ratio']:.2f} load, x{r['busy_s_per_request_ratio']:.2f} busy, "
              f"x{r['alone_ms_ratio']:.2f} alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
