"""The `cellserve` command: it parses, then calls into the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The comparison's peers, by name (cellserve.bench.peers.PEERS; repeated here so --help
# does not import the benchmark).
PEER_NAMES = ("triton", "mlserver", "ray-serve", "torchserve", "unbatched")
# How cell steps run (cellserve.kernels.cell.BACKENDS; repeated so that --help does not import torch).
BACKEND_NAMES = ("fused", "onednn", "blas", "torch")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellserve", description="Inference server for recurrent neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the built-in models (the zoo)")

    demo = sub.add_parser("demo", help="the server on the zoo answering real requests, then a short engine benchmark")
    demo.add_argument("--skip-bench", action="store_true", help="only the server part")
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

    sb = bench_sub.add_parser("server", help="the engine in-process vs the same engine behind HTTP (tritonclient)")
    sb.add_argument("--model", default="lstm-512", help="zoo model (default: lstm-512)")
    sb.add_argument("--slo-ms", type=float, default=200.0, help="latency SLO for goodput (default: 200)")
    sb.add_argument("--quick", action="store_true", help="a shorter sweep")
    sb.add_argument("--seed", type=int, default=0)
    sb.add_argument("--repeats", type=int, default=None, help="runs per rate and side, best kept")
    sb.add_argument("--json", type=Path, default=Path("bench-results/server.json"), help="where to write results")
    sb.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")

    ld = bench_sub.add_parser("load", help="open-loop load against any Open Inference Protocol server",
                              description="Offer open-loop load (Poisson or bursty) to an OIP server over HTTP "
                                          "or gRPC, at fixed rates or a ramp, and report throughput, goodput "
                                          "and latency per rate. Without --url it starts `cellserve serve` on "
                                          "the zoo model and loads that.")
    ld.add_argument("--url", default=None, help="server address host:port (default: start cellserve on --model)")
    ld.add_argument("--model", default="lstm-512", help="model name (default: lstm-512)")
    ld.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ld.add_argument("--input", default="tokens", help="the model's token input (default: tokens)")
    ld.add_argument("--vocab", type=int, default=10000, help="token ids are drawn from [0, vocab)")
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
    ld.add_argument("--ceiling", action="store_true",
                    help="also measure this generator's own ceiling against a trivial endpoint")
    ld.add_argument("--seed", type=int, default=0)
    ld.add_argument("--json", type=Path, default=Path("bench-results/load.json"), help="where to write results")
    ld.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")

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

    srv = sub.add_parser("serve", help="serve models over the Open Inference Protocol (HTTP, gRPC) with metrics",
                         description="Serve a Triton-style model repository, or the zoo when none is given.")
    srv.add_argument("--model-repository", type=Path, default=None,
                     help="<repo>/<model>/<version>/model.onnx (+ optional config.pbtxt); default: the zoo")
    srv.add_argument("--model", action="append", default=[], dest="zoo_models", metavar="NAME",
                     help="serve only this zoo model (repeatable; without --model-repository)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    srv.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0: any free; -1: off)")
    srv.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0: any free; -1: off)")
    srv.add_argument("--metrics-port", type=int, default=8002,
                     help="Prometheus metrics port (default 8002; 0: any free; -1: off)")
    srv.add_argument("--device", default="cpu", help="torch device for the cells: cpu, cuda, cuda:1, ... (default cpu)")
    srv.add_argument("--threads", type=int, default=None,
                     help="CPU threads for the cell kernels (default: torch's, one per core)")
    srv.add_argument("--pin-threads", action=argparse.BooleanOptionalAction, default=True,
                     help="pin the kernel threads to one core each when they match the cores this process "
                          "may use (default: on; off when OMP_PROC_BIND, OMP_PLACES or GOMP_CPU_AFFINITY is set)")
    srv.add_argument("--stack-layers", action=argparse.BooleanOptionalAction, default=True,
                     help="step stacked forward layers (LSTM -> LSTM) as one cell type, one round per token "
                          "for all of them (default: on)")
    srv.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                     help="how cell steps run: fused (one C call per step; the default on CPUs with AVX-512), "
                          "onednn (the default on other CPUs), blas, or torch (any device; the default off the CPU)")
    srv.add_argument("--policy", default="cellular", help="batching policy: cellular, cellular-edf, padded, none")
    srv.add_argument("--max-batch", type=int, default=None, help="batch cap per cell type (default: the policy's)")
    srv.add_argument("--max-queue", type=int, default=4096, help="requests in the engine at once; more get 429")
    srv.add_argument("--slo-ms", type=float, default=None,
                     help="default deadline of zoo models' requests that send no timeout")
    srv.add_argument("--max-request-size", type=int, default=64 << 20, help="largest request body in bytes")
    srv.add_argument("--sequence-idle-timeout", type=float, default=60.0,
                     help="seconds before an idle sequence is released (a model's config may override)")
    srv.add_argument("--max-sequences", type=int, default=100_000, help="active sequences at once")
    srv.add_argument("--grace-period", type=float, default=30.0,
                     help="seconds in-flight requests get to finish after SIGTERM/SIGINT")

    inf = sub.add_parser("infer", help="send one inference request to a running server and print the answer")
    inf.add_argument("model", help="model name, e.g. seq2seq-reverse or lstm-512")
    inf.add_argument("text", nargs="?", default=None,
                     help="input as text: digits for seq2seq-reverse, words for the token models")
    inf.add_argument("--json", dest="json_input", default=None,
                     help='inputs as JSON instead: {"INPUT": nested list, ...}')
    inf.add_argument("--url", default=None, help="server address host:port (default: localhost:8000, "
                                                 "or localhost:8001 with --protocol grpc)")
    inf.add_argument("--protocol", choices=["http", "grpc"], default="http")
    inf.add_argument("--model-version", default="", help="version to ask for (default: the server's choice)")
    inf.add_argument("--timeout-ms", type=float, default=None, help="request deadline")

    args = parser.parse_args(argv)
    if args.command == "models":
        from cellserve.graph import zoo

        for name, entry in zoo.ZOO.items():
            print(f"{name:<16} {entry.description}")
        return 0
    if args.command == "demo":
        return _demo(args)
    if args.command == "serve":
        return _serve(args, parser)
    if args.command == "infer":
        from cellserve.client import infer_command

        return infer_command(args)
    if args.command == "bench" and args.bench_command == "engine":
        return _bench_engine(args.model, args.slo_ms, args.quick, args.bursty, args.max_batch, args.seed,
                             args.json, args.plot, args.repeats)
    if args.command == "bench" and args.bench_command == "server":
        return _bench_server(args)
    if args.command == "bench" and args.bench_command == "compare":
        return _bench_compare(args, parser)
    if args.command == "bench" and args.bench_command == "load":
        from cellserve.bench.load_cli import bench_load

        return bench_load(args, parser)
    parser.error("unknown command")
    return 2


def _serve(args, parser) -> int:
    import os

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # start-up failures are our one line, not gRPC core's log
    from cellserve.server.app import ServerSettings, serve

    for flag, value in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                        ("--metrics-port", args.metrics_port)):
        if not -1 <= value <= 65535:
            parser.error(f"{flag} must be a port number, 0 (any free port) or -1 (off), got {value}")
    positive = {"--max-queue": args.max_queue, "--max-request-size": args.max_request_size,
                "--sequence-idle-timeout": args.sequence_idle_timeout, "--max-sequences": args.max_sequences}
    if args.slo_ms is not None:
        positive["--slo-ms"] = args.slo_ms
    if args.max_batch is not None:
        positive["--max-batch"] = args.max_batch
    if args.threads is not None:
        positive["--threads"] = args.threads
    for flag, value in positive.items():
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.grace_period < 0:
        parser.error(f"--grace-period must be >= 0, got {args.grace_period}")
    if args.model_repository is not None and args.zoo_models:
        parser.error("--model picks zoo models; it cannot be combined with --model-repository")
    settings = ServerSettings(model_repository=args.model_repository, zoo_models=args.zoo_models, host=args.host,
                              http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                              device=args.device, policy=args.policy, max_batch=args.max_batch,
                              max_queue=args.max_queue, default_slo_ms=args.slo_ms,
                              max_request_bytes=args.max_request_size, sequence_idle_s=args.sequence_idle_timeout,
                              max_sequences=args.max_sequences, grace_s=args.grace_period, threads=args.threads,
                              pin_threads=args.pin_threads, stack_layers=args.stack_layers, backend=args.backend)
    return serve(settings)


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


def _bench_server(args) -> int:
    from cellserve.bench import server_bench

    if args.slo_ms <= 0 or (args.repeats is not None and args.repeats < 1):
        print("error: --slo-ms must be > 0 and --repeats >= 1", file=sys.stderr)
        return 2
    cfg = server_bench.ServerBenchConfig(model=args.model, slo_ms=args.slo_ms, quick=args.quick, seed=args.seed,
                                         repeats=args.repeats, json_path=args.json, plot_path=args.plot)
    report = server_bench.run(cfg)
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


if __name__ == "__main__":
    sys.exit(main())
