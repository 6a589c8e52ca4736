"""The `cellserve plan accuracy` subcommand (added by cli_plan.add_plan); parsing only: the work
is in plan/accuracy_milp.py. Building the parser imports nothing heavy (no torch, no solver)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_accuracy(plan_sub) -> None:
    a = plan_sub.add_parser(
        "accuracy", help="choose model variants per device and route each family's demand (Proteus accuracy scaling)",
        description="Read PROBLEM (families of variants with accuracies and demands, devices, and per device type "
                    "and variant a capacity or a latency profile) and write PLAN: the variant each device hosts, "
                    "each family's routing shares, the effective accuracy, the headroom kept and the demand left "
                    "unserved. Solved exactly (a MILP, HiGHS). Formats: docs/accuracy-scaling.md.")
    a.add_argument("--problem", type=Path, required=True, metavar="PROBLEM.json", help="families, devices, capacities")
    a.add_argument("--json", type=Path, required=True, metavar="PLAN.json", help="where to write the plan")
    a.set_defaults(run=_plan_accuracy)


def _plan_accuracy(args, parser) -> int:
    from cellserve.plan.accuracy import AccuracyError
    from cellserve.plan.accuracy_check import check_plan
    from cellserve.plan.accuracy_io import load_problem, plan_to_dict, write_json
    from cellserve.plan.accuracy_milp import plan_accuracy

    try:
        problem = load_problem(args.problem)
    except AccuracyError as exc:
        parser.exit(2, f"error: {exc}\n")
    plan = plan_accuracy(problem)
    problems = check_plan(plan, problem)
    if problems:  # the planner's own bug: say so rather than write a plan that breaks its rules
        print("error: the plan fails its check:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    write_json(plan_to_dict(plan), args.json)
    hosting = sum(v is not None for v in plan.placement.values())
    line = (f"wrote {args.json}: effective accuracy {plan.effective_accuracy:.4f}, headroom {plan.headroom:g}, "
            f"{hosting}/{len(plan.placement)} devices hosting")
    unserved = sum(plan.unserved_rps.values())
    if unserved > 0:
        line += f", {unserved:g} req/s unserved"
    print(line)
    return 0
