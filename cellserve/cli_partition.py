"""The `cellserve plan partition` and `cellserve bench partition` subcommands; parsing and
loading only: the work is in plan/partition*.py. Building the parsers imports nothing heavy.
Exit codes: 0 written; 2 a file or flag that cannot be used (the error names it); 1 no plan
meets the SLO and budgets, or a plan failed its check (nothing is written)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellserve.cli_types import positive

DEFAULT_LENGTH = 25  # tokens: the mean request length of the benchmarks' traces


def _memory_budgets(text: str) -> dict[str, float]:
    """`gpu=MB` or `gpu=MB,cpu=MB`."""
    out = {}
    for part in text.split(","):
        dev, eq, mb = part.partition("=")
        try:
            value = float(mb)
        except ValueError:
            value = None
        if not eq or not dev or value is None or not value >= 0:
            raise argparse.ArgumentTypeError(f"must be DEVICE=MB (MB >= 0), or a comma list of them; got {part!r}")
        out[dev.strip()] = value
    return out


class _Budgets(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


def add_partition(plan_sub) -> None:
    p = plan_sub.add_parser(
        "partition", help="partition one model's cell types and plain ops between devices (CPU, GPU) for "
                          "latency, memory or throughput (Chrion)",
        description="Read a graph (nodes with a cost and memory per device, edges with megabytes, links between "
                    "devices), or build one from a model and its profiles, and write a plan: each node's device, "
                    "each device's order, the predicted makespan, memory and throughput. Exact (MILP through "
                    "HiGHS) up to 20 nodes, a HEFT-like heuristic beyond. Formats: docs/partition.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--graph", type=Path, metavar="GRAPH.json", help="the graph to partition")
    src.add_argument("--model", help="build the graph from this model (zoo, or of --model-repository) and --profiles")
    p.add_argument("--profiles", type=Path, action="append", default=[], metavar="P.json",
                   help="with --model: a `cellserve profile` file of the model (repeatable: a CPU one, and a CUDA "
                        "one if measured; without a CUDA one the GPU is modelled from the CPU's, see --gpu)")
    p.add_argument("--model-repository", type=Path, default=None, help="where to find a model not in the zoo")
    p.add_argument("--length", type=positive(int), default=DEFAULT_LENGTH,
                   help=f"with --model: tokens in the request planned for (default: {DEFAULT_LENGTH})")
    p.add_argument("--gpu", default="t4", metavar="CLASS",
                   help="with --model: the GPU class modelled when no CUDA profile is given, and whose host<->device "
                        "bandwidth prices the links (t4, l4, a100, h100, h200; default: t4)")
    p.add_argument("--write-graph", type=Path, default=None, metavar="GRAPH.json",
                   help="with --model: also write the graph built, for inspection or --graph")
    p.add_argument("--mode", choices=("latency", "memory", "throughput"), required=True)
    p.add_argument("--slo-ms", type=positive(float), default=None,
                   help="a request's makespan must stay within this (needed by memory mode; default: the graph's "
                        "slo_ms, if any)")
    p.add_argument("--device-memory", type=_memory_budgets, action=_Budgets, default=None, metavar="DEV=MB",
                   help="a device's memory budget in MB (repeatable, or a comma list: gpu=500,cpu=8000)")
    p.add_argument("--minimise-memory-on", default="gpu", metavar="DEV",
                   help="memory mode: the device whose memory is minimised (default: gpu)")
    p.add_argument("--solver", choices=("auto", "milp", "heuristic"), default="auto",
                   help="auto: the MILP up to 20 nodes, the heuristic beyond (default: auto)")
    p.add_argument("--time-limit", type=positive(float), default=60.0, metavar="S",
                   help="the MILP's time limit in seconds; past it the plan reports its gap (default: 60)")
    p.add_argument("--json", type=Path, required=True, metavar="PLAN.json", help="where to write the plan")
    p.set_defaults(run=_plan_partition)


def _graph_from_model(args):
    from cellserve.server.repository import load_model
    from cellserve.graph.stacking import stack_layers
    from cellserve.plan.gpu_model import gpu_class, modelled_gpu_profile
    from cellserve.plan.partition_graph import PartitionError
    from cellserve.plan.partition_model import build_graph, device_name
    from cellserve.plan.profile import ModelProfile

    if not args.profiles:
        raise PartitionError("--model needs --profiles P.json (a CPU profile from `cellserve profile --model "
                             f"{args.model} --json P.json`)")
    gpu = gpu_class(args.gpu)
    profiles, source = {}, {}
    for path in args.profiles:
        prof = ModelProfile.from_json(path)
        dev = device_name(prof)
        if dev in profiles:
            raise PartitionError(f"--profiles gives two {dev} profiles ({source[dev]['path']!r} and {str(path)!r})")
        profiles[dev] = prof
        source[dev] = {"path": str(path), "machine": prof.machine.name, "modelled": prof.modelled}
    if "cpu" not in profiles:
        raise PartitionError("--profiles needs a CPU profile (the request's input and output are on the host)")
    model = load_model(args.model, args.model_repository)
    if "gpu" not in profiles:
        served = stack_layers(model) if profiles["cpu"].stack_layers else model
        profiles["gpu"] = modelled_gpu_profile(served, profiles["cpu"], gpu)
        source["gpu"] = {"path": None, "machine": gpu.name, "modelled": True}
    source["links"] = {"gpu_class": gpu.name, "modelled": True}
    return build_graph(model, profiles, args.length, gpu, {"profiles": source})


def _plan_partition(args, parser) -> int:
    from cellserve.plan.partition import plan_partition
    from cellserve.plan.partition_check import check_plan
    from cellserve.plan.partition_graph import Infeasible, PartitionError, Problem
    from cellserve.plan.partition_io import graph_to_dict, load_graph, plan_to_dict, write_json

    try:
        if args.graph is not None:
            for flag, given in (("--profiles", args.profiles), ("--write-graph", args.write_graph)):
                if given:
                    raise PartitionError(f"{flag} goes with --model, not --graph")
            graph = load_graph(args.graph)
        else:
            graph = _graph_from_model(args)
            if args.write_graph is not None:
                write_json(graph_to_dict(graph), args.write_graph)
        budgets = {**graph.memory_budget_mb, **(args.device_memory or {})}
        problem = Problem(graph, args.mode, args.slo_ms if args.slo_ms is not None else graph.slo_ms, budgets,
                          args.minimise_memory_on if args.mode == "memory" else None)
    except ValueError as exc:  # PartitionError, ProfileError, a model that does not load
        parser.exit(2, f"error: {exc}\n")
    try:
        plan = plan_partition(problem, args.solver, args.time_limit)
    except Infeasible as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    problems = check_plan(plan, problem)
    if problems:  # the planner's own bug: say so rather than write a plan that cannot be kept
        print("error: the plan fails its check:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    write_json(plan_to_dict(plan), args.json)
    on = {d: len(v) for d, v in plan.order.items()}
    objective = "" if plan.mode == "latency" else f"{plan.objective} {plan.objective_value:.4g}, "
    print(f"wrote {args.json}: {plan.mode} mode, makespan {plan.makespan_ms:.4g} ms, "
          f"{objective}nodes per device {on}, {plan.solver} "
          f"(gap {plan.gap:.3g}) in {plan.solve_s:.3f} s")
    return 0


def add_bench_partition(bench_sub) -> None:
    b = bench_sub.add_parser(
        "partition", help="the partition planner: a 200-node graph's planning time, and modelled CPU+GPU plans "
                          "of the zoo against GPU-only and CPU-only",
        description="Plan a random 200-node graph (timed), and for each zoo model (CPU profile measured here, "
                    "GPU modelled) plan latency, memory and throughput modes against single-device baselines. "
                    "Writes JSON, a Markdown table and a PNG beside it; CPU+GPU figures are modelled.")
    b.add_argument("--json", type=Path, default=Path("bench-results/partition.json"), help="where to write results")
    b.add_argument("--profiles-dir", type=Path, default=None, metavar="DIR",
                   help="CPU profiles as DIR/MODEL.json; a missing one is measured (--quick) and written there")
    b.add_argument("--models", default=None, help="comma list of zoo models (default: the whole zoo)")
    b.add_argument("--gpu", default="t4", metavar="CLASS", help="the GPU class modelled (default: t4)")
    b.add_argument("--length", type=positive(int), default=DEFAULT_LENGTH,
                   help=f"tokens per request (capped at a model's maximum; default: {DEFAULT_LENGTH})")
    b.add_argument("--slo-factor", type=positive(float), default=1.5,
                   help="memory and throughput modes' SLO: this times the better single device's makespan "
                        "(default: 1.5)")
    b.add_argument("--nodes", type=positive(int), default=200, help="nodes of the random graph timed (default: 200)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(run=_bench_partition)


def _bench_partition(args, parser) -> int:
    from cellserve.plan.partition_bench import run, write_report
    from cellserve.plan.partition_graph import PartitionError

    try:
        models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
        profiles = _bench_profiles(models, args.profiles_dir)
        report = run(profiles, args.gpu, args.length, args.slo_factor, args.nodes, args.seed)
    except (PartitionError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    write_report(report, args.json)
    print(report["table"])
    print(f"wrote {args.json} (and .md, .png beside it)")
    return 0 if report["ok"] else 1


def _bench_profiles(models, directory):
    """{model: (Model, CPU ModelProfile)}: read from `directory` where there, else measured."""
    from cellserve.bench.profiler import profile_model
    from cellserve.server.repository import load_model
    from cellserve.engine.config import EngineConfig
    from cellserve.graph import zoo
    from cellserve.plan.profile import ModelProfile

    out = {}
    for name in models or zoo.names():
        model = load_model(name, None)
        path = None if directory is None else directory / f"{name}.json"
        if path is not None and path.exists():
            profile = ModelProfile.from_json(path)
        else:
            print(f"profiling {name} on this machine (quick)", flush=True)
            profile = profile_model(model, EngineConfig(), quick=True)
            if path is not None:
                profile.to_json(path)
        out[name] = (model, profile)
    return out
