"""The `cellserve` command: it parses, then calls into the package."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from cellserve.cli_types import positive
from cellserve.openmp_env import set_spin_default

# The comparison's peers, by name (cellserve.bench.peers.PEERS; repeated here so --help
# does not import the benchmark).
PEER_NAMES = ("triton", "mlserver", "ray-serve", "torchserve", "unbatched")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """cellserve's own warnings (a stale profile, ...) as one line a user reads, not Python's
    file, line number and source line; any other warning as Python shows it."""
    text = (f"warning: {message}\n" if category.__module__.startswith("cellserve")
            else warnings.formatwarning(message, category, filename, lineno, line))
    (file or sys.stderr).write(text)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    set_spin_default()  # before any command imports torch (see openmp_env.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    from cellserve.plan.json_io import OutputError

    try:
        return args.run(args, parser)
    except OutputError as exc:  # a --json path that cannot be written: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The `cellserve` parser: each subcommand is added by a function of its own (COMMANDS), which
    sets `run(args, parser)` as the subcommand's handler; `bench` subcommands likewise
    (BENCH_COMMANDS). Building it imports no torch."""
    parser = argparse.ArgumentParser(prog="cellserve", description="Inference server for recurrent neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the built-in models (the zoo)")
    p.set_defaults(run=_models)


def _models(args, parser) -> int:
    from cellserve.graph import zoo

    for name, entry in zoo.ZOO.items():
        print(f"{name:<16} {entry.description}")
    return 0


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the server on the zoo answering real requests, then a short engine benchmark")
    demo.add_argument("--skip-bench", action="store_true", help="only the server part")
    demo.add_argument("--json", type=Path, default=Path("bench-results/demo-engine.json"),
                      help="where the benchmark's results go (default: bench-results/demo-engine.json; "
                           "nothing is written with --skip-bench)")
    demo.set_defaults(run=lambda args, parser: _demo(args))


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for add in BENCH_COMMANDS:
        add(bench_sub)


def _add_bench_engine(bench_sub) -> None:
    eng = bench_sub.add_parser("engine", help="all engine policies and ONNX Runtime on one open-loop trace")
    eng.add_argument("--model", default="lstm-512", help="zoo model, or one of --model-repository (default: lstm-512)")
    eng.add_argument("--model-repository", type=Path, default=None,
                     help="a model repository holding --model (your own model; ONNX Runtime runs its own file)")
    eng.add_argument("--slo-ms", type=positive(float), default=200.0, help="latency SLO for goodput (default: 200)")
    eng.add_argument("--quick", action="store_true", help="a coarser ramp and shorter runs (a few minutes)")
    eng.add_argument("--bursty", action="store_true", help="bursty (two-state MMPP) arrivals instead of Poisson")
    eng.add_argument("--max-batch", type=positive(int), default=64, help="cellular's batch cap per cell type (default: 64)")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--repeats", type=positive(int), default=None,
                     help="runs at a rate that fails before it counts as failed; any pass passes (default 2)")
    eng.add_argument("--json", type=Path, default=Path("bench-results/engine.json"), help="where to write results")
    eng.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    eng.add_argument("--beam-width", type=positive(int), default=1,
                     help="an encoder-decoder's beam width, asked by every request (default: 1, greedy); "
                          "other models take only 1")
    eng.set_defaults(run=lambda args, parser: _bench_engine(args.model, args.slo_ms, args.quick, args.bursty,
                                                            args.max_batch, args.seed, args.json, args.plot,
                                                            args.repeats, args.beam_width, args.model_repository))


def _add_bench_server(bench_sub) -> None:
    sb = bench_sub.add_parser("server", help="the engine in-process vs the same engine behind HTTP (tritonclient)")
    sb.add_argument("--model", default="lstm-512", help="zoo model, or one of --model-repository (default: lstm-512)")
    sb.add_argument("--model-repository", type=Path, default=None, help="a model repository holding --model")
    sb.add_argument("--slo-ms", type=positive(float), default=200.0, help="latency SLO for goodput (default: 200)")
    sb.add_argument("--quick", action="store_true", help="a shorter sweep")
    sb.add_argument("--seed", type=int, default=0)
    sb.add_argument("--repeats", type=positive(int), default=None, help="runs at a rate that fails before it counts as failed; any pass passes (default 2)")
    sb.add_argument("--json", type=Path, default=Path("bench-results/server.json"), help="where to write results")
    sb.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    sb.set_defaults(run=lambda args, parser: _bench_server(args))


def _add_bench_load(bench_sub) -> None:
    ld = bench_sub.add_parser("load", help="open-loop load against any Open Inference Protocol server",
                              description="Offer open-loop load (Poisson or bursty) to an OIP server over HTTP "
                                          "or gRPC, at fixed rates or a ramp, and report throughput, goodput "
                                          "and latency per rate. Without --url it starts `cellserve serve` on "
                                          "the zoo model and loads that.")
    ld.add_argument("--url", default=None, help="server address host:port (default: start cellserve on --model)")
    ld.add_argument("--model", default="lstm-512", help="model name (default: lstm-512)")
    ld.add_argument("--model-repository", type=Path, default=None,
                    help="without --url: serve this repository (holding --model) instead of the zoo model")
    ld.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ld.add_argument("--input", default=None,
                    help="the model's sequence input (default: the served model's when cellserve is started "
                         "here, else tokens)")
    ld.add_argument("--vocab", type=int, default=None,
                    help="token ids are drawn from [0, vocab) (default: the served model's vocabulary, else 10000)")
    ld.add_argument("--features", default=None, metavar="SHAPE",
                    help="send float32 feature rows of this shape (e.g. 80, or 4x20) instead of token ids "
                         "(default: the served model's, when its input is feature rows)")
    ld.add_argument("--rates", default=None,
                    help="comma-separated requests/s to offer, e.g. 50,100,200 (default: a ramp)")
    ld.add_argument("--start-rps", type=float, default=20.0, help="the ramp's first rate (default: 20)")
    ld.add_argument("--factor", type=float, default=1.5, help="the ramp's step factor (default: 1.5)")
    ld.add_argument("--max-rps", type=float, default=5000.0, help="the ramp stops past this rate")
    ld.add_argument("--seconds", type=float, default=5.0, help="seconds of arrivals per rate (default: 5)")
    ld.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson",
                    help="Poisson, or a two-state Markov-modulated Poisson process (bursts of 4x)")
    ld.add_argument("--slo-ms", type=float, action="append", default=None,
                    help="latency SLO for goodput; repeat for several (default: 200)")
    ld.add_argument("--deadline", action="store_true",
                    help="send the (first) SLO as each request's timeout parameter")
    ld.add_argument("--pad-to-buckets", action="store_true",
                    help="pad tokens to length buckets and send `lengths` (for batchers that need equal shapes)")
    ld.add_argument("--json-tensors", action="store_true", help="JSON tensors instead of binary (HTTP)")
    ld.add_argument("--time-major", action="store_true",
                    help="send each sequence as [time, 1, ...] (a model whose input is [time, batch, ...]); "
                         "default [1, time, ...], or the served model's layout")
    ld.add_argument("--ceiling", action="store_true",
                    help="also measure this generator's own ceiling against a trivial endpoint")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--json", type=Path, default=Path("bench-results/load.json"), help="where to write results")
    ld.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    ld.set_defaults(run=_bench_load)


def _bench_load(args, parser) -> int:
    from cellserve.bench.load_cli import bench_load

    return bench_load(args, parser)


def _add_bench_compare(bench_sub) -> None:
    cmp = bench_sub.add_parser("compare", help="cellserve and peer servers (Triton, MLServer, Ray Serve, "
                                               "TorchServe, unbatched) side by side on the same traces",
                               description="Install (once, into their own environments) and start each peer on "
                                           "the same exported model and thread count, tune its batching over a "
                                           "small grid, ramp the same open-loop load against every server, and "
                                           "write a JSON report, a markdown table and plots.")
    cmp.add_argument("--model", default="lstm-512", help="zoo classifier (default: lstm-512)")
    cmp.add_argument("--slo-ms", type=float, nargs=2, default=[50.0, 200.0], metavar=("TIGHT", "LOOSE"),
                     help="the two SLOs (default: 50 200)")
    cmp.add_argument("--peers", default=",".join(PEER_NAMES),
                     help=f"comma-separated peers (default: all: {','.join(PEER_NAMES)}; empty: none)")
    cmp.add_argument("--threads", type=int, default=None, help="compute threads of every server (default: cores)")
    cmp.add_argument("--quick", action="store_true", help="shorter runs and a coarser ramp (under ten minutes "
                                                          "once the peers are installed)")
    cmp.add_argument("--no-install", action="store_true", help="skip peers that are not installed yet")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", type=Path, default=Path("bench-results/compare.json"),
                     help="where to write results (the table and plots go next to it)")
    cmp.set_defaults(run=_bench_compare)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking lines inside --flag-names."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def _add_serve(sub) -> None:
    from cellserve.config_args import add_flags
    from cellserve.server.settings import GROUPS, ServerSettings

    srv = sub.add_parser("serve", help="serve models over the Open Inference Protocol (HTTP, gRPC) with metrics",
                         formatter_class=_HelpFormatter,
                         description="Serve a Triton-style model repository, or the zoo when none is given. "
                                     "Every setting is a flag below and a key of the --config file (the "
                                     "engine's in its [engine] table); flags override the file.",
                         epilog="An annotated config file: docs/examples/serve.toml. "
                                "--print-config prints the effective settings in that form.")
    cfg = srv.add_argument_group("configuration")
    cfg.add_argument("--config", type=Path, default=None, metavar="FILE",
                     help="read settings from this TOML file first (keys as --print-config prints them; "
                          "relative paths in it are relative to the file); flags given too override it")
    cfg.add_argument("--print-config", action="store_true",
                     help="print the effective settings (defaults, --config file, flags) as TOML and exit")
    add_flags(srv, ServerSettings, GROUPS)
    srv.set_defaults(run=lambda args, parser: _serve(args, srv))


def _add_infer(sub) -> None:
    inf = sub.add_parser("infer", help="send one inference request to a running server and print the answer")
    inf.add_argument("model", nargs="?", default=None, help="model name, e.g. dates, seq2seq-reverse or lstm-512")
    inf.add_argument("text", nargs="?", default=None,
                     help="input as text: encoded with the vocabulary the model publishes (dates), else digits "
                          "for seq2seq-reverse, token ids ('12 7 93') for a model of token ids, or words for "
                          "the zoo's classifiers (hashed to ids; another model's words are refused: use ids or --json)")
    inf.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                     help="the model, as a flag (instead of MODEL)")
    inf.add_argument("--text", dest="text_flag", metavar="TEXT", default=None,
                     help="the text, as a flag (instead of TEXT)")
    inf.add_argument("--json", dest="json_input", metavar="JSON", default=None,
                     help='inputs as JSON instead: {"INPUT": nested list, ...}')
    inf.add_argument("--beam-width", type=int, metavar="K", default=None,
                     help="an encoder-decoder's beam width (request parameter beam_width; default: the model's)")
    inf.add_argument("--return-beams", action="store_true",
                     help="print every beam and its score (request parameter return_beams)")
    inf.add_argument("--url", default=None, help="server address host:port (default: localhost:8000, "
                                                 "or localhost:8001 with --protocol grpc)")
    inf.add_argument("--protocol", choices=["http", "grpc"], default="http")
    inf.add_argument("--model-version", default="", help="version to ask for (default: the server's choice)")
    inf.add_argument("--timeout-ms", type=float, default=None, help="request deadline")
    inf.set_defaults(run=_infer)


def _infer(args, parser) -> int:
    from cellserve.client import infer_command

    return infer_command(args)


def _serve(args, parser: argparse.ArgumentParser) -> int:
    """Settings from defaults, then the --config file, then the flags; a bad one exits 2 naming
    the flag or the file's key."""
    import os

    from cellserve.config_args import resolve
    from cellserve.server.settings import ServerSettings

    try:
        settings = resolve(ServerSettings, args, args.config)
    except ValueError as exc:
        parser.error(str(exc))
    if args.print_config:
        from cellserve.config import to_toml

        print(to_toml(settings), end="")
        return 0
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # start-up failures are our one line, not gRPC core's log
    try:
        from cellserve.server.app import serve

        return serve(settings)
    except KeyboardInterrupt:  # Ctrl-C before the server took its signals (loading models, binding)
        print("cellserve: interrupted during start-up", file=sys.stderr, flush=True)
        return 130


def _bench_engine(model, slo_ms, quick, bursty, max_batch, seed, json_path, plot, repeats=None,
                  beam_width=1, model_repository=None) -> int:
    from cellserve.bench import engine_bench
    from cellserve.errors import CellserveError

    cfg = engine_bench.BenchConfig(model=model, slo_ms=slo_ms, quick=quick, bursty=bursty, seed=seed,
                                   max_batch=max_batch, json_path=json_path, plot_path=plot, repeats=repeats,
                                   beam_width=beam_width, model_repository=model_repository)
    try:
        report = engine_bench.run(cfg)
    except (CellserveError, ValueError) as exc:  # ValueError: a model the bench cannot load or drive
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(engine_bench.table(report))
    print(f"wrote {cfg.json_path} and {cfg.plot_path or cfg.json_path.with_suffix('.png')}")
    return 0


def _bench_server(args) -> int:
    from cellserve.bench import server_bench
    from cellserve.errors import CellserveError

    cfg = server_bench.ServerBenchConfig(model=args.model, model_repository=args.model_repository, slo_ms=args.slo_ms,
                                         quick=args.quick, seed=args.seed, repeats=args.repeats, json_path=args.json,
                                         plot_path=args.plot)
    try:
        report = server_bench.run(cfg)
    except (CellserveError, ValueError) as exc:  # a model the bench cannot load or drive
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(server_bench.table(report))
    print(f"wrote {cfg.json_path} and {cfg.plot_path or cfg.json_path.with_suffix('.png')}")
    return 0


def _bench_compare(args, parser) -> int:
    from cellserve.bench import compare

    peers = tuple(p for p in args.peers.split(",") if p.strip())
    unknown = [p for p in peers if p not in PEER_NAMES]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}")
    tight, loose = args.slo_ms
    if not 0 < tight < loose:
        parser.error(f"--slo-ms needs 0 < TIGHT < LOOSE, got {tight:g} {loose:g}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    cfg = compare.CompareConfig(model=args.model, slos_ms=(tight, loose), peers=peers, quick=args.quick,
                                install=not args.no_install, seed=args.seed, json_path=args.json)
    if args.threads:
        cfg.threads = args.threads
    report = compare.run(cfg)
    print(compare.markdown_table(report))
    print(f"wrote {args.json}, {args.json.with_suffix('.md')} and the plots next to them")
    return 0


def _demo(args) -> int:
    from cellserve import demo

    code = demo.run()
    if code or args.skip_bench:
        return code
    print("\nshort engine benchmark (lstm-512, SLO 200 ms):")
    return _bench_engine("lstm-512", 200.0, True, False, 64, 0, args.json, None)


# Subcommands, in --help's order: each adds its parser to the subparsers it is given.
from cellserve import (cli_bench_plan, cli_cluster, cli_kernels, cli_partition, cli_pipeline, cli_plan,  # noqa: E402
                       cli_sim, cli_tenancy)  # (parsers only)

COMMANDS = (_add_models, _add_demo, _add_bench, _add_serve, _add_infer, cli_sim.add_profile,
            cli_tenancy.add_profile_versions, cli_sim.add_simulate, cli_plan.add_plan)
from cellserve.bench import latency as bench_latency  # noqa: E402  (its parser imports nothing heavy)
from cellserve.bench import soak as bench_soak  # noqa: E402  (its parser imports nothing heavy)
from cellserve.bench import accuracy_serve as bench_accuracy_serve  # noqa: E402  (its parser imports nothing heavy)

BENCH_COMMANDS = (_add_bench_engine, _add_bench_server, _add_bench_load, _add_bench_compare, cli_sim.add_bench_sim,
                  bench_soak.add_parser, bench_latency.add_parser, cli_plan.add_bench_planner, cli_cluster.add_bench_cluster,
                  cli_kernels.add_bench_kernels, cli_partition.add_bench_partition, cli_bench_plan.add_bench_plan,
                  bench_accuracy_serve.add_parser, cli_pipeline.add_bench_pipeline, cli_tenancy.add_bench_tenancy,
                  cli_tenancy.add_bench_tenancy_sim)


if __name__ == "__main__":
    sys.exit(main())
