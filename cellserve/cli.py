"""The `cellserve` command: it parses, then calls into the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellserve", description="Inference server for recurrent neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the built-in models (the zoo)")

    demo = sub.add_parser("demo", help="the trained encoder-decoder answering, then a short engine benchmark")
    demo.add_argument("--skip-bench", action="store_true", help="only the encoder-decoder answers")
    demo.add_argument("--json", type=Path, default=Path("bench-results/demo-engine.json"))

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    eng = bench_sub.add_parser("engine", help="all engine policies and ONNX Runtime on one open-loop trace")
    eng.add_argument("--model", default="lstm-512", help="zoo model (default: lstm-512)")
    eng.add_argument("--slo-ms", type=float, default=200.0, help="latency SLO for goodput (default: 200)")
    eng.add_argument("--quick", action="store_true", help="a shorter sweep (under two minutes)")
    eng.add_argument("--bursty", action="store_true", help="bursty (two-state MMPP) arrivals instead of Poisson")
    eng.add_argument("--max-batch", type=int, default=64, help="cellular's batch cap per cell type (default: 64)")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--repeats", type=int, default=None,
                     help="runs of each policy at each rate, best kept (default: 1 with --quick, else 2)")
    eng.add_argument("--json", type=Path, default=Path("bench-results/engine.json"), help="where to write results")
    eng.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")

    args = parser.parse_args(argv)
    if args.command == "models":
        from cellserve.graph import zoo

        for name, entry in zoo.ZOO.items():
            print(f"{name:<16} {entry.description}")
        return 0
    if args.command == "demo":
        return _demo(args)
    if args.command == "bench" and args.bench_command == "engine":
        return _bench_engine(args.model, args.slo_ms, args.quick, args.bursty, args.max_batch, args.seed,
                             args.json, args.plot, args.repeats)
    parser.error("unknown command")
    return 2


def _bench_engine(model, slo_ms, quick, bursty, max_batch, seed, json_path, plot, repeats=None) -> int:
    from cellserve.bench import engine_bench
    from cellserve.errors import CellserveError

    if slo_ms <= 0 or max_batch < 1 or (repeats is not None and repeats < 1):
        print("error: --slo-ms must be > 0, --max-batch and --repeats >= 1", file=sys.stderr)
        return 2
    cfg = engine_bench.BenchConfig(model=model, slo_ms=slo_ms, quick=quick, bursty=bursty, seed=seed,
                                   max_batch=max_batch, json_path=json_path, plot_path=plot, repeats=repeats)
    try:
        report = engine_bench.run(cfg)
    except CellserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(engine_bench.table(report))
    print(f"wrote {cfg.json_path} and {cfg.plot_path or cfg.json_path.with_suffix('.png')}")
    return 0


def _demo(args) -> int:
    from cellserve.engine.engine import Engine
    from cellserve.engine.request import Request, Status
    from cellserve.graph import zoo
    from cellserve.graph.zoo.seq2seq import decode_digits, encode_digits

    model = zoo.load("seq2seq-reverse")
    engine = Engine([model])
    inputs = ["12345", "907", "31415926535", "2026", "8"]
    answers = {}
    for text in inputs:
        ids = np.array([encode_digits(text)], np.int64)
        engine.submit(Request(model.name, {"digits": ids}, on_done=lambda r, t=text: answers.__setitem__(t, r)))
    engine.run_until_idle()
    print("seq2seq-reverse (trained LSTM encoder-decoder with attention), all requests batched cell by cell:")
    for text in inputs:
        r = answers[text]
        out = decode_digits(r.outputs["reversed"][0]) if r.status is Status.OK else f"[{r.reason}]"
        mark = "ok" if out == text[::-1] else "WRONG"
        print(f"  {text:>12} -> {out:<12} {mark}")
    if args.skip_bench:
        return 0
    print("\nshort engine benchmark (lstm-512, SLO 200 ms):")
    return _bench_engine("lstm-512", 200.0, True, False, 64, 0, args.json, None)


if __name__ == "__main__":
    sys.exit(main())
