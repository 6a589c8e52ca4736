"""The `cellserve profile`, `cellserve simulate` and `cellserve bench sim` subcommands (added
to the parser by cli.py); parsing only: the work is in bench/profiler.py, sim/run.py and
bench/sim_bench.py."""

from __future__ import annotations

import sys
from pathlib import Path

from cellserve.cli_types import positive

from cellserve.engine.config import BACKEND_NAMES  # no torch there


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure a model's step costs on this machine (or model them for a GPU) "
                                       "and write the profile as JSON",
                       description="Measure, per cell type, the batched step at every batch size from 1 to "
                                   "--max-batch (mean, std, p99), a lone lane's step, a lane's start and finish "
                                   "per token; the plain ops, the engine's own costs and a decoder's steps while "
                                   "serving the benchmark trace; the weights' memory and the machine. With "
                                   "--gpu CLASS, a profile modelled for that GPU from this machine's host costs "
                                   "(marked \"modelled\": true).")
    p.add_argument("--model", required=True, help="zoo model, or a model of --model-repository")
    p.add_argument("--model-repository", type=Path, default=None, help="where to find a model not in the zoo")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=None, help="cell step backend (default: the best)")
    p.add_argument("--device", default="cpu", help="torch device to measure on (default: cpu)")
    p.add_argument("--threads", type=positive(int), default=None, help="CPU threads of the kernels")
    p.add_argument("--max-batch", type=positive(int), default=64, help="largest batch measured (default: 64)")
    p.add_argument("--no-stack-layers", dest="stack_layers", action="store_false",
                   help="profile the model with each layer a cell type of its own")
    p.add_argument("--gpu", default=None, metavar="CLASS",
                   help="write a modelled profile for this GPU class (t4, l4, a100, h100, h200) instead")
    p.add_argument("--quick", action="store_true", help="fewer samples per batch size")
    p.add_argument("--slo-ms", type=positive(float), default=None,
                   help="deadline of the requests served while profiling, so that the engine refuses and drops "
                        "past capacity as it will when serving (default: 200 ms, or ten times a lightly "
                        "loaded request's latency if longer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True, help="where to write the profile")
    p.set_defaults(run=_profile)


def _profile(args, parser) -> int:
    from cellserve.bench.profiler import profile_model
    from cellserve.engine.config import EngineConfig
    from cellserve.plan.profile import ProfileError
    from cellserve.server.repository import load_model

    deadline = args.slo_ms / 1e3 if args.slo_ms else None
    from cellserve.executor.kernel import device_problem

    problem = device_problem(args.device, args.backend)
    if problem:  # one line, as serve says it, not torch's traceback from deep in the profiler
        parser.exit(2, f"error: {problem}\n")
    try:
        model = load_model(args.model, args.model_repository)
        config = EngineConfig(max_batch=args.max_batch, backend=args.backend, device=args.device,
                              stack_layers=args.stack_layers)
        if args.gpu:
            from cellserve.plan.gpu_model import gpu_class, modelled_gpu_profile
            gpu = gpu_class(args.gpu)
            host = profile_model(model, config, args.threads, quick=True, seed=args.seed, deadline_s=deadline)
            from cellserve.graph.stacking import stack_layers
            served = stack_layers(model) if args.stack_layers else model
            profile = modelled_gpu_profile(served, host, gpu)
        else:
            profile = profile_model(model, config, args.threads, quick=args.quick, seed=args.seed,
                                    deadline_s=deadline)
    except (ValueError, ProfileError) as exc:
        parser.exit(2, f"error: {exc}\n")
    profile.to_json(args.json)
    print(f"wrote {args.json}: {profile.label()}")
    return 0


def add_simulate(sub) -> None:
    s = sub.add_parser("simulate", help="run engines in virtual time, their costs from profiles (results "
                                        "labelled simulated)",
                       description="Many engines, each serving every profiled model, behind a router, fed by "
                                   "the benchmarks' traces (WMT-like lengths, Poisson or bursty arrivals), in "
                                   "virtual time: the real engine and scheduler, with costs from the profiles. "
                                   "Writes JSON and a p99-against-load plot, every figure labelled simulated.")
    s.add_argument("--profile", type=Path, action="append", required=True, dest="profiles", metavar="PATH",
                   help="a profile from `cellserve profile` (repeatable: one per model)")
    s.add_argument("--model-repository", type=Path, default=None, help="where profiled non-zoo models live")
    s.add_argument("--engines", type=int, default=1, help="engines, each serving every model (default: 1)")
    s.add_argument("--router", default="least-finish", help="round-robin, least-finish (ask every engine; the default) or two-choices "
                        "(ask two at random: for many engines)")
    s.add_argument("--policy", default="cellular", help="the engines' batching policy (default: cellular)")
    s.add_argument("--max-batch", type=int, default=None, help="batch cap per cell type (default: the policy's)")
    s.add_argument("--slo-ms", type=positive(float), default=200.0, help="every request's deadline (default: 200)")
    rate = s.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rates", default=None, help="total offered rates, comma-separated, requests/s")
    rate.add_argument("--load", type=positive(float), default=None,
                      help="offer this share of the engines' simulated capacity (e.g. 0.5)")
    s.add_argument("--seconds", type=positive(float), default=10.0, help="simulated seconds of arrivals per rate (default: 10)")
    s.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1,
                   help="processes to run the engines in, up to one per engine (default: 1); the outcomes are the "
                        "same for any number, the wall time shorter with a core for each")
    s.add_argument("--json", type=Path, default=Path("bench-results/simulate.json"))
    s.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    s.set_defaults(run=_simulate)


def _simulate(args, parser) -> int:
    from cellserve.errors import ModelLoadError
    from cellserve.plan.profile import ProfileError
    from cellserve.sim.run import SimulateConfig, simulate

    try:
        rates = None if args.rates is None else [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.exit(2, f"error: --rates must be numbers separated by commas, got {args.rates!r}\n")
    try:
        cfg = SimulateConfig(profiles=args.profiles, engines=args.engines, router=args.router, policy=args.policy,
                             max_batch=args.max_batch, slo_ms=args.slo_ms, rates=rates, load=args.load,
                             seconds=args.seconds, bursty=args.arrivals == "bursty", seed=args.seed,
                             workers=args.workers, model_repository=args.model_repository, json_path=args.json, plot_path=args.plot)
        simulate(cfg)
    except (ValueError, ProfileError, ModelLoadError) as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


def add_bench_sim(bench_sub) -> None:
    b = bench_sub.add_parser("sim", help="the simulator against the real engine: same traces, same rates, "
                                         "cellular, padded and none")
    b.add_argument("--model", default="lstm-512", help="zoo model, or a model of --model-repository")
    b.add_argument("--model-repository", type=Path, default=None)
    b.add_argument("--slo-ms", type=positive(float), default=200.0, help="latency SLO (default: 200)")
    b.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    b.add_argument("--quick", action="store_true", help="shorter runs and a coarser ramp")
    b.add_argument("--max-batch", type=positive(int), default=64, help="cellular's batch cap (default: 64)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--repeats", type=positive(int), default=2,
                   help="real runs per rate, back to back; the report gives how far apart they were (default: 2)")
    b.add_argument("--json", type=Path, default=Path("bench-results/sim.json"))
    b.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    b.set_defaults(run=_bench_sim)


def _bench_sim(args, parser) -> int:
    from cellserve.bench import sim_bench

    cfg = sim_bench.SimBenchConfig(model=args.model, model_repository=args.model_repository, slo_ms=args.slo_ms,
                                   bursty=args.arrivals == "bursty", quick=args.quick, seed=args.seed,
                                   max_batch=args.max_batch, json_path=args.json, plot_path=args.plot,
                                   repeats=args.repeats)
    try:
        sim_bench.run(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
