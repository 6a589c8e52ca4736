"""The `cellserve plan nexus` and `cellserve bench planner` subcommands (added to the parser by
cli.py); parsing only: the work is in plan/nexus_pack.py and plan/nexus_bench.py. Building the
parsers imports nothing heavy (no torch)."""

from __future__ import annotations

import sys
from pathlib import Path

from cellserve.cli_types import int_in, positive


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan models onto devices ahead of serving")
    plan_sub = p.add_subparsers(dest="plan_command", required=True)
    n = plan_sub.add_parser(
        "nexus", help="plan sessions and queries onto devices as Nexus does (batch sizes, duty cycles, packing)",
        description="Read latency profiles (batch size -> ms per model and device type) and sessions (model, SLO, "
                    "rate; queries: trees of models sharing one SLO), and write a plan: per device a duty cycle "
                    "and, per session on it, a batch and a rate; what max_devices cannot serve is listed under "
                    "unserved with the reason. Formats: docs/planning.md.")
    n.add_argument("--profiles", type=Path, required=True, metavar="PROFILES.json", help="latency profiles")
    n.add_argument("--sessions", type=Path, required=True, metavar="SESSIONS.json", help="sessions and queries")
    n.add_argument("--json", type=Path, required=True, metavar="PLAN.json", help="where to write the plan")
    n.add_argument("--previous", type=Path, default=None, metavar="PLAN.json",
                   help="re-plan from this plan (the next epoch): keep sessions where they still fit")
    # the split's search grows with the square of the grid; a coarse one cannot split the SLO
    n.add_argument("--grid", type=int_in(10, 10_000), default=100,
                   help="steps a query's SLO is cut into for its split, 10 to 10000 (default: 100)")
    n.set_defaults(run=_plan_nexus)
    from cellserve.cli_pipeline import add_pipeline; add_pipeline(plan_sub)  # noqa: E702  (plan pipeline)
    from cellserve.cli_batching import add_batching; add_batching(plan_sub)  # noqa: E702  (plan batching)
    from cellserve.cli_partition import add_partition; add_partition(plan_sub)  # noqa: E702  (plan partition)
    from cellserve.cli_accuracy import add_accuracy; add_accuracy(plan_sub)  # noqa: E702  (plan accuracy)


def _plan_nexus(args, parser) -> int:
    from cellserve.plan.nexus import NexusError
    from cellserve.plan.nexus_check import check_plan
    from cellserve.plan.nexus_io import load_plan, load_profiles, load_workload, plan_to_dict, write_json
    from cellserve.plan.nexus_epochs import moved_sessions
    from cellserve.plan.nexus_pack import plan, replan

    try:
        profiles = load_profiles(args.profiles)
        workload = load_workload(args.sessions, profiles)
        previous = None if args.previous is None else load_plan(args.previous)
    except NexusError as exc:
        parser.exit(2, f"error: {exc}\n")
    result = plan(workload, profiles, args.grid) if previous is None else replan(previous, workload, profiles, args.grid)
    problems = check_plan(result, profiles, workload)
    if problems:  # the planner's own bug: say so rather than write a plan that cannot be kept
        print("error: the plan fails its feasibility check:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    write_json(plan_to_dict(result), args.json)
    unserved = sum(u.rate_rps for u in result.unserved)
    line = f"wrote {args.json}: {result.devices_used} devices"
    if previous is not None:
        line += f", {len(moved_sessions(previous, result))} sessions moved"
    if result.unserved:
        line += f", {unserved:g} req/s unserved ({len(result.unserved)} entries)"
    print(line)
    return 0


def add_bench_planner(bench_sub) -> None:
    b = bench_sub.add_parser("planner", help="the Nexus planner's speed on a random (seeded) workload",
                             description="Generate models, sessions and queries sized to need about --devices "
                                         "devices, plan them, check the plan, and write the wall time as JSON.")
    b.add_argument("--devices", type=positive(int), default=1000, help="devices the workload needs (default: 1000)")
    b.add_argument("--sessions", type=positive(int), default=200, help="sessions, query nodes included (default: 200)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", type=Path, default=Path("bench-results/planner.json"), help="where to write results")
    b.set_defaults(run=_bench_planner)


def _bench_planner(args, parser) -> int:
    from cellserve.plan.nexus_bench import run
    from cellserve.plan.nexus_io import write_json

    report = run(args.devices, args.sessions, args.seed)
    write_json(report, args.json)
    print(f"planned {report['sessions']} sessions onto {report['devices_used']} devices "
          f"(max {report['max_devices']}) in {report['plan_s']:.3f} s ({report['plan_cpu_s']:.3f} s CPU); "
          f"replan after a rate change {report['replan_s']:.3f} s ({report['replan_cpu_s']:.3f} s CPU), "
          f"{report['replan_moved']} sessions moved; wrote {args.json}")
    return 0 if report["feasible"] else 1
