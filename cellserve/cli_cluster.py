"""The `cellserve bench cluster` subcommand (added to the parser by cli.py); parsing only: the
work is in bench/cluster_bench.py. Building the parser imports nothing heavy (no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

SYSTEM_NAMES = ("nexus", "static", "clipper", "ray-serve")  # cluster/systems.py SYSTEMS (tests check)
ABLATION_NAMES = ("static-cellular",)  # cluster/systems.py ABLATIONS: only when asked for


def _device_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return counts


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers (req/s), got {text!r}") from None
    if not rates or any(not (r > 0 and r < float("inf")) for r in rates):
        raise argparse.ArgumentTypeError(f"must be positive rates in req/s, got {text!r}")
    return rates


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in SYSTEM_NAMES + ABLATION_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SYSTEM_NAMES + ABLATION_NAMES)}, got {text!r}")
    return names


def add_bench_cluster(bench_sub) -> None:
    b = bench_sub.add_parser(
        "cluster", help="simulated: Nexus planning vs static, Clipper and Ray Serve on N devices",
        description="On N simulated devices (this machine's measured profiles), find for each system the highest "
                    "total rate of a bursty multi-model workload (by default six sessions of three zoo models, "
                    "SLOs 50-500 ms, rates 1:20; or --sessions) at which at least 99% of requests finish within "
                    "their SLO, by a bracketed search. Writes JSON and a PNG beside it. Every figure is simulated.")
    b.add_argument("--devices", type=_device_counts, default=[16, 100], metavar="N[,N...]",
                   help="device counts (default: 16,100)")
    b.add_argument("--json", type=Path, default=Path("bench-results/cluster.json"),
                   help="where to write results (default: bench-results/cluster.json; the PNG beside it)")
    b.add_argument("--quick", action="store_true", help="shorter runs (2 simulated s) and one bisection")
    b.add_argument("--systems", type=_systems, default=SYSTEM_NAMES, metavar="S[,S...]",
                   help=f"systems to run (default: {','.join(SYSTEM_NAMES)}; also {','.join(ABLATION_NAMES)}, an "
                        "ablation: static's groups on nexus's cellular engines)")
    b.add_argument("--seconds", type=float, default=None, help="simulated seconds per rate (default: 4, quick: 2)")
    b.add_argument("--warmup", type=float, default=None, metavar="SECONDS",
                   help="requests arriving before this are not counted (default: 1, quick: 0.5)")
    b.add_argument("--bisections", type=int, default=None, help="bisection steps after bracketing (default: 2, quick: 1)")
    b.add_argument("--rates", type=_rates, default=None, metavar="R[,R...]",
                   help="run each system at exactly these total rates (req/s) instead of searching, to re-check "
                        "or narrow a bracket: each system's figure is the highest rate that passed, its bracket "
                        "that and the lowest failing rate above it (not with --start-from or --bisections)")
    b.add_argument("--seed", type=int, default=0, help="the first trace's seed (default: 0)")
    b.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="traces per rate, seeds SEED..SEED+K-1, their requests pooled: each trace is one draw of "
                        "the sessions' bursts, so more seeds make each rate's attainment less a matter of the draw "
                        "(default: 1; the run takes K times as long)")
    b.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="search up to N systems at once, each in a process of its own (default: 1; the figures "
                        "do not depend on it)")
    b.add_argument("--start-from", type=Path, default=None, metavar="REPORT.json",
                   help="start each search at a previous report's figure for the system, scaled by devices")
    b.add_argument("--sessions", type=Path, default=None, metavar="SESSIONS.json",
                   help='the workload: {"sessions": [{"id": NAME, "model": MODEL, "slo_ms": MS, "weight": W}, ...]}, '
                        "each session's share of the total rate its weight (or rate_rps, so a `plan nexus` sessions "
                        "file serves); id defaults to the model (default: six sessions of lstm-512, gru-256 and "
                        "seq2seq-reverse)")
    b.add_argument("--model-repository", type=Path, default=None, metavar="DIR",
                   help="where the sessions' models not in the zoo are (a model repository, as `serve` reads)")
    b.add_argument("--profiles-dir", type=Path, default=None, metavar="DIR",
                   help="where the models' profiles are, as MODEL-poisson-profile.json for each model of the "
                        "sessions (`cellserve profile --model MODEL --json DIR/MODEL-poisson-profile.json`; "
                        "default: the ones measured for this project, docs/results/sim, for the zoo's lstm-512, "
                        "gru-256 and seq2seq-reverse)")
    b.set_defaults(run=_bench_cluster)


def _bench_cluster(args, parser) -> int:
    from cellserve.bench.cluster_bench import ClusterConfig, catalogue_for, run
    from cellserve.cluster.workload import PROFILE_DIR

    try:
        cfg = ClusterConfig(devices=args.devices, json_path=args.json, quick=args.quick, systems=args.systems,
                            seconds=args.seconds, warmup_s=args.warmup, bisections=args.bisections, seed=args.seed,
                            seeds=args.seeds, start_from=args.start_from,
                            profile_dir=args.profiles_dir or PROFILE_DIR, sessions_path=args.sessions,
                            model_repository=args.model_repository, jobs=args.jobs, rates=args.rates)
        catalogue = catalogue_for(cfg)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    run(cfg, catalogue)
    return 0
