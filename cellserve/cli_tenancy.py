"""`cellserve profile-versions` and `cellserve bench tenancy` (issue 19's CPU half, Veltair);
parsing only: the work is in bench/version_profiler.py and bench/tenancy.py. Building the
parser imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path

from cellserve.cli_types import int_in, positive


def _numbers(kind=float):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            import argparse

            raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    return parse


def add_profile_versions(sub) -> None:
    p = sub.add_parser(
        "profile-versions", help="time a model's kernel versions (thread counts of the fused step) alone and "
                                 "beside a process that takes part of a core; write the profile that serve "
                                 "--kernel-versions chooses from",
        description="For each recurrent cell type, each batch size 1, 2, 4, .. --max-batch and each thread count "
                    "1 .. --threads, the mean step time, steady and after a pause, with a burner process taking "
                    "each of --duties of the last kernel core; the level recorded is the interference meter's "
                    "reading. Takes about 15 s per cell type (5 s with --quick). docs/tenancy.md.")
    p.add_argument("--model", required=True, help="zoo model, or a model of --model-repository")
    p.add_argument("--model-repository", type=Path, default=None, help="where to find a model not in the zoo")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="kernel threads, as serve will run them (default: torch's, one per core)")
    p.add_argument("--duties", type=_numbers(float), default=(0.0, 0.25, 0.5, 1.0),
                   help="the burner's shares of one core, the first 0 (default: 0,0.25,0.5,1)")
    p.add_argument("--max-batch", type=positive(int), default=64, help="largest batch timed (default: 64)")
    p.add_argument("--no-stack-layers", dest="stack_layers", action="store_false",
                   help="profile each layer as a cell type of its own (as serve --no-stack-layers runs them; "
                        "bench tenancy-sim's layer blocks)")
    p.add_argument("--quick", action="store_true", help="shorter timings")
    p.add_argument("--json", type=Path, required=True, help="where to write the profile")
    p.set_defaults(run=_profile_versions)


def _profile_versions(args, parser) -> int:
    import torch

    from cellserve.bench.version_profiler import profile_versions, table
    from cellserve.engine.config import EngineConfig
    from cellserve.plan.json_io import OutputError, check_output
    from cellserve.server.repository import load_model

    try:
        check_output(args.json)
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_model(args.model, args.model_repository)
        profile = profile_versions(model, EngineConfig(stack_layers=args.stack_layers), tuple(args.duties),
                                   args.max_batch, args.quick)
        profile.to_json(args.json)
    except (ValueError, OutputError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(table(profile))
    print(f"wrote {args.json}: {len(profile.step_s)} cell type(s), versions {', '.join(profile.versions)}; "
          "others' load read at the levels: " + ", ".join(f"{x:.2f}" for x in profile.levels) + " cores")
    return 0


def add_bench_tenancy(bench_sub) -> None:
    p = bench_sub.add_parser(
        "tenancy", help="several models on one CPU beside an interfering process: kernel versions chosen by "
                        "interference against today's engine (Veltair)",
        description="--models (each its own SLO) are served under bursty arrivals at --load x the mix's "
                    "capacity measured here, while a burner process takes each of --duties of one kernel core. "
                    "Three ways run the same traces, interleaved: today's engine (every step on all threads), "
                    "the same engine with --kernel-versions (profiled first, unless --profile is given), and "
                    "one engine process per model on cores allocated by the models' profiles and the "
                    "interference measured per core. Writes JSON and a PNG of the requests within their SLO. "
                    "docs/tenancy.md.")
    p.add_argument("--models", type=lambda s: tuple(x for x in s.split(",") if x), default=("gru-256", "lstm-512"),
                   help="zoo models, comma-separated (default: gru-256,lstm-512)")
    p.add_argument("--slo-ms", type=_numbers(float), default=(10.0, 25.0),
                   help="each model's SLO, comma-separated, in --models' order (default: 10,25)")
    p.add_argument("--duties", type=_numbers(float), default=(0.0, 0.25, 0.5),
                   help="the burner's shares of one core, one condition each (default: 0,0.25,0.5)")
    p.add_argument("--load", type=positive(float), default=0.5,
                   help="offered load, as a share of the mix's capacity without interference (default: 0.5)")
    p.add_argument("--seconds", type=positive(float), default=20.0, help="seconds of arrivals per run (default: 20)")
    p.add_argument("--runs", type=positive(int), default=2, help="runs per engine and duty, interleaved (default: 2)")
    p.add_argument("--profile", type=Path, action="append", default=[], dest="profiles", metavar="V.json",
                   help="a kernel-versions profile (profile-versions) to serve with, one per model (default: "
                        "measured first, written beside --json)")
    p.add_argument("--allocation-period", type=positive(float), default=1.0, dest="allocation_period_s",
                   metavar="S", help="the allocated engines' cores are decided again every S seconds (default: 1)")
    p.add_argument("--quick", action="store_true", help="quick profiles and runs of at most 8 s")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="arrivals' and requests' seed (default: 0)")
    p.add_argument("--json", type=Path, default=Path("bench-results/tenancy.json"), help="where to write results")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: beside --json)")
    p.set_defaults(run=_bench_tenancy)


def _bench_tenancy(args, parser) -> int:
    import os

    from cellserve.bench.tenancy import TenancyConfig, run, table
    from cellserve.cluster.core_workers import CoreWorkerError
    from cellserve.plan.json_io import OutputError
    from cellserve.plan.versions import VersionProfileError

    if len(os.sched_getaffinity(0)) < 2:
        parser.exit(2, f"error: bench tenancy needs two cores (one shared with the burner); this process may use "
                       f"{len(os.sched_getaffinity(0))}\n")
    try:
        cfg = TenancyConfig(models=args.models, slo_ms=args.slo_ms, duties=args.duties, load=args.load,
                            seconds=args.seconds, runs=args.runs, seed=args.seed, quick=args.quick,
                            profiles=[str(p) for p in args.profiles], json=args.json,
                            plot=args.plot or args.json.with_suffix(".png"),
                            allocation_period_s=args.allocation_period_s)
        report = run(cfg)
    except (ValueError, OutputError, VersionProfileError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except CoreWorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(report))
    print(f"wrote {cfg.json} and {cfg.plot}")
    return 0


def _tenants(text: str) -> tuple:
    import argparse

    out = []
    for item in (x for x in text.split(",") if x.strip()):
        model, sep, slo = item.rpartition(":")
        try:
            if not sep or not model:
                raise ValueError
            out.append((model, float(slo)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"tenants are MODEL:SLO_MS, comma-separated; got {item!r}") from None
    return tuple(out)


def add_bench_tenancy_sim(bench_sub) -> None:
    p = bench_sub.add_parser(
        "tenancy-sim", help="many models sharing a large CPU, simulated: cores per layer block (Veltair) against "
                            "per model and today's round robin",
        description="In virtual time: tenants (a zoo model and its SLO each) on a CPU of --cores cores, bursty "
                    "arrivals that move between tenants, cellular batching per block; today's round robin over "
                    "every block on all cores, cores per model, and cores per layer block (both re-allocated every "
                    "--period s by measured rates). Step times on c cores modelled from the kernel-versions "
                    "profiles' 1- and 2-thread steps (Amdahl's law); every figure is simulated. docs/tenancy.md.")
    p.add_argument("--profile", type=Path, action="append", required=True, dest="profiles", metavar="V.json",
                   help="a kernel-versions profile (profile-versions) of each model the tenants use")
    p.add_argument("--tenants", type=_tenants, required=True, metavar="MODEL:SLO_MS,...",
                   help="the tenants, e.g. gru-256:10,lstm-512:25,gru-256:50 (a model may serve several)")
    p.add_argument("--model-repository", type=Path, default=None, help="where to find a model not in the zoo")
    p.add_argument("--cores", type=positive(int), default=32, help="the simulated CPU's cores (default: 32)")
    p.add_argument("--load", type=positive(float), default=0.6,
                   help="offered load, a share of the cores' capacity at one thread per step (default: 0.6)")
    p.add_argument("--seconds", type=positive(float), default=20.0,
                   help="simulated seconds of arrivals (default: 20; a 32-core CPU's load takes about 4 s of wall "
                        "time per simulated second, all three policies)")
    p.add_argument("--period", type=positive(float), default=1.0, dest="period_s",
                   help="seconds between re-allocations (default: 1)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="arrivals' seed (default: 0)")
    p.add_argument("--json", type=Path, default=Path("bench-results/tenancy-sim.json"), help="where to write results")
    p.set_defaults(run=_bench_tenancy_sim)


def _bench_tenancy_sim(args, parser) -> int:
    from cellserve.bench.tenancy_sim import SimTenancyConfig, panels_of, run, table
    from cellserve.plan.json_io import OutputError
    from cellserve.plan.versions import VersionProfile, VersionProfileError
    from cellserve.server.repository import load_model

    try:
        config = SimTenancyConfig(tenants=args.tenants, cores=args.cores, load=args.load, seconds=args.seconds,
                                  period_s=args.period_s, seed=args.seed, json=args.json)
        profiles = {}
        for path in args.profiles:
            p = VersionProfile.from_json(path)
            if p.model in profiles:
                raise ValueError(f"two profiles of model {p.model!r}")
            profiles[p.model] = p
        panels = {}
        for p in profiles.values():
            panels.update(panels_of(load_model(p.model, args.model_repository), p))
        report = run(config, profiles, panels)
    except (ValueError, OutputError, VersionProfileError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(table(report))
    print(f"simulated ({report['modelled']}); wrote {args.json}")
    return 0
