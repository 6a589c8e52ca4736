"""The `cellserve plan pipeline` and `plan pipeline-sim` subcommands (added under `plan` by
cli_plan.add_plan) and `cellserve bench pipeline`; parsing only: the work is in
plan/pipeline_milp.py, plan/pipeline_sim.py and bench/pipeline_real.py. Building the parser
imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path

from cellserve.cli_types import int_in, positive


def add_pipeline(plan_sub) -> None:
    p = plan_sub.add_parser(
        "pipeline", help="plan models as pipelines of stages over pools of device types (PPipe)",
        description="Read models cut into blocks (latency per device type and batch, MB passed on, SLO, weight) "
                    "and pools of device types joined by a link, and write per model a set of pipelines (contiguous "
                    "stages, a device type and count per stage, one batch) maximising the minimum over models of "
                    "throughput / weight, solved as a MILP by HiGHS, with the no-pipelining baseline's objective "
                    "beside it. Formats: docs/pipelines.md.")
    p.add_argument("--blocks", type=Path, required=True, metavar="BLOCKS.json", help="models cut into blocks")
    p.add_argument("--pools", type=Path, required=True, metavar="POOLS.json", help="device pools and the link")
    p.add_argument("--json", type=Path, required=True, metavar="PLAN.json", help="where to write the plan")
    p.add_argument("--max-stages", type=positive(int), default=2,
                   help="most stages in one pipeline (default: 2; more widens the search)")
    p.add_argument("--time-limit", type=positive(float), default=10.0, metavar="SECONDS",
                   help="the solver's budget for the whole plan; past it the plan says its gap (default: 10)")
    p.add_argument("--mip-gap", type=float, default=1e-4,
                   help="relative gap at which the solver stops (default: 1e-4; 0 asks for a proven optimum)")
    p.set_defaults(run=_plan_pipeline)
    d = plan_sub.add_parser(
        "pipeline-sim", help="simulate a pipeline plan's data plane (PPipe's reservation batching): does it hold?",
        description="Run each model of a pipeline plan over Poisson arrivals in virtual time, through PPipe's "
                    "reservation-based adaptive batching (a batch reserves the first-free device of each stage; it "
                    "shrinks to 95% of the planned batch before the head request is dropped), and write per model "
                    "the SLO attainment, goodput and latencies (simulated), at --load x the planned throughput, or "
                    "the highest load at which --target of requests meet the SLO. Formats: docs/pipelines.md.")
    d.add_argument("--blocks", type=Path, required=True, metavar="BLOCKS.json", help="the models cut into blocks")
    d.add_argument("--pools", type=Path, required=True, metavar="POOLS.json", help="device pools and the link")
    d.add_argument("--plan", type=Path, required=True, metavar="PLAN.json", help="the plan to simulate")
    d.add_argument("--json", type=Path, required=True, metavar="RESULT.json", help="where to write the result")
    d.add_argument("--load", type=positive(float), default=None,
                   help="offer this multiple of each model's planned throughput (default: search for the highest "
                        "load that meets --target)")
    d.add_argument("--target", type=float, default=0.99,
                   help="share of requests that must meet the SLO in the search (default: 0.99)")
    d.add_argument("--seconds", type=positive(float), default=30.0, help="simulated seconds per run (default: 30)")
    d.add_argument("--warmup", type=float, default=2.0, metavar="SECONDS",
                   help="simulated seconds at the start whose arrivals are not counted (default: 2)")
    d.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="the arrivals' random seed (default: 0)")
    d.set_defaults(run=_simulate_pipeline)


def _plan_pipeline(args, parser) -> int:
    from cellserve.plan.pipeline import PipelineError
    from cellserve.plan.pipeline_check import check_plan
    from cellserve.plan.pipeline_io import load_blocks, load_pools, plan_to_dict, write_json
    from cellserve.plan.pipeline_milp import Options, plan

    if not 0 <= args.mip_gap < 1:
        parser.exit(2, f"error: --mip-gap must be in [0, 1), got {args.mip_gap}\n")
    try:
        blocks = load_blocks(args.blocks)
        pools = load_pools(args.pools)
    except PipelineError as exc:
        parser.exit(2, f"error: {exc}\n")
    result = plan(blocks, pools, Options(max_stages=args.max_stages, mip_gap=args.mip_gap,
                                         time_limit_s=args.time_limit))
    problems = check_plan(result, blocks, pools)
    if problems:  # the planner's own bug: say so rather than write a plan that cannot be kept
        print("error: the plan fails its feasibility check:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    write_json(plan_to_dict(result), args.json)
    ratio = (f", {result.objective / result.baseline_objective:.3g}x" if result.baseline_objective > 0 else "")
    pipes = sum(len(m.pipelines) for m in result.models.values())
    unserved = sorted(name for name, m in result.models.items() if not m.pipelines)
    print(f"wrote {args.json}: objective {result.objective:.6g} (no pipelining {result.baseline_objective:.6g}"
          f"{ratio}), {pipes} pipelines, gap {result.gap:.3g}, {result.solver}"
          + (f"; no pipeline can serve {unserved} within its SLO" if unserved else ""))
    return 0


def _simulate_pipeline(args, parser) -> int:
    from cellserve.plan.pipeline import PipelineError
    from cellserve.plan.pipeline_check import check_plan
    from cellserve.plan.pipeline_io import load_blocks, load_plan, load_pools, write_json
    from cellserve.plan.pipeline_sim import simulation_report

    if not 0 < args.target <= 1:
        parser.exit(2, f"error: --target must be in (0, 1], got {args.target}\n")
    if not 0 <= args.warmup < args.seconds:
        parser.exit(2, f"error: --warmup must be at least 0 and less than --seconds ({args.seconds:g}), "
                       f"got {args.warmup}\n")
    try:
        blocks, pools, plan = load_blocks(args.blocks), load_pools(args.pools), load_plan(args.plan)
    except PipelineError as exc:
        parser.exit(2, f"error: {exc}\n")
    problems = check_plan(plan, blocks, pools)
    if problems:  # a plan of other blocks or pools, or one that breaks the rules: nothing to simulate
        parser.exit(2, f"error: {args.plan} does not fit {args.blocks} and {args.pools}:\n  "
                       + "\n  ".join(problems[:20]) + "\n")
    report = simulation_report(plan, blocks, pools, args.load, args.seconds, args.warmup, args.seed, args.target)
    write_json(report, args.json)
    for name, m in report["models"].items():
        if "run" not in m:
            print(f"{name}: not simulated: {m['note']}")
            continue
        run = m["run"]
        bound = {"found": "", "above": "at least ", "below": "less than "}[m.get("search", "found")]
        what = (f"sustains {bound}{m['sustained_load']:.3g}x the plan ({m['sustained_rps']:.6g} req/s)"
                if args.load is None else f"at {args.load:g}x the plan")
        print(f"{name}: planned {m['planned_rps']:.6g} req/s; simulated, {what}: attainment "
              f"{run['attainment']:.4f}, goodput {run['goodput_rps']:.6g} req/s, mean batch {run['mean_batch']:.3g}")
    print(f"wrote {args.json} (simulated)")
    return 0


def add_bench_pipeline(bench_sub) -> None:
    p = bench_sub.add_parser(
        "pipeline", help="a real two-stage pipeline (a worker process per stage, one core each) against its plan",
        description="Cut a zoo model after one recurrent step, serve each part in a worker process pinned to one "
                    "core, time the parts, plan the pipeline with `plan pipeline`'s MILP, then drive the plan's "
                    "reservation data plane on the wall clock and find the highest load at which 99%% of requests "
                    "meet the SLO, against the plan's throughput and the simulator's. Writes JSON and a PNG. "
                    "docs/pipelines.md, \"A real pipeline\".")
    p.add_argument("--model", default="lstm-512", help="a zoo model with at least two recurrent steps "
                                                        "(default: lstm-512)")
    p.add_argument("--cut", type=int, default=0, metavar="K",
                   help="cut after recurrent step K, 0-based (default: 0)")
    p.add_argument("--tokens", type=positive(int), default=16, help="tokens per request (default: 16)")
    p.add_argument("--slo-ms", type=positive(float), default=100.0,
                   help="the SLO (default: 100; PPipe's 5x the batch-1 latency, about 18 ms here, leaves less room "
                        "than this machine's hand-overs vary, docs/pipelines.md)")
    p.add_argument("--seconds", type=positive(float), default=None,
                   help="seconds per real run (default: 10; 4 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer timings and bisection steps, shorter runs")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="arrivals' and requests' seed (default: 0)")
    p.add_argument("--json", type=Path, default=Path("bench-results/pipeline.json"), help="where to write results")
    p.add_argument("--plot", type=Path, default=None,
                   help="attainment against offered load, PNG (default: beside --json)")
    p.set_defaults(run=_bench_pipeline)


def _bench_pipeline(args, parser) -> int:
    import os

    from cellserve.bench.pipeline_real import plot, run, table
    from cellserve.cluster.pipeline_real import PipelineRunError
    from cellserve.errors import CellserveError
    from cellserve.graph.cut import CutError
    from cellserve.plan.json_io import OutputError, check_output, write_json
    from cellserve.plan.pipeline import PipelineError

    if len(os.sched_getaffinity(0)) < 2:
        print("error: a two-stage pipeline needs two cores; this process may use "
              f"{len(os.sched_getaffinity(0))}")
        return 2
    try:
        check_output(args.json)
    except OutputError as exc:
        print(f"error: {exc}")
        return 2
    try:
        report = run(args.model, args.cut, args.tokens, args.slo_ms, args.quick,
                     args.seconds or (4.0 if args.quick else 10.0), args.seed)
    except (CutError, PipelineError, PipelineRunError, CellserveError, KeyError) as exc:
        print(f"error: {exc}")
        return 2
    try:
        write_json(report, args.json)
        png = args.plot or args.json.with_suffix(".png")
        plot(report, png)
    except OutputError as exc:
        print(f"error: {exc}")
        return 2
    print(table(report))
    print(f"wrote {args.json} and {png}")
    return 0
