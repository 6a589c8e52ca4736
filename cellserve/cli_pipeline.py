"""The `cellserve plan pipeline` subcommand (added under `plan` by cli_plan.add_plan); parsing
only: the work is in plan/pipeline_milp.py. Building the parser imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path

from cellserve.cli_types import positive


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
    ratio = result.objective / result.baseline_objective if result.baseline_objective > 0 else float("inf")
    pipes = sum(len(m.pipelines) for m in result.models.values())
    print(f"wrote {args.json}: objective {result.objective:.6g} (no pipelining {result.baseline_objective:.6g}, "
          f"{ratio:.3g}x), {pipes} pipelines, gap {result.gap:.3g}, {result.solver}")
    return 0
