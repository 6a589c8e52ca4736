"""The `cellserve plan batching` subcommand (added under `cellserve plan` by cli_plan.py);
parsing only: the work is in plan/batching*.py. Building the parser imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path


def add_batching(plan_sub) -> None:
    b = plan_sub.add_parser(
        "batching", help="batch size B and timeout T for a batcher that dispatches at B requests or T after the first",
        description="Analytic batching (BATCH): from an arrival process (a MAP, Poisson, or a trace fitted by a "
                    "2-state MMPP) and a service time per batch size, the batch-size distribution at dispatch and "
                    "the request latency's percentile; with --slo-ms the cheapest (B, T) on a grid meeting it "
                    "(least device time per request), with --max-batch and --timeout-ms that point evaluated. "
                    "Each batch is served as soon as it is dispatched; with --single-server a batch waits for the "
                    "one server to be free. Formats and maths: docs/batching.md.")
    b.add_argument("--arrivals", type=Path, required=True, metavar="ARRIVALS.json",
                   help='{"map": {"D0": [[..]], "D1": [[..]]}} or {"poisson_rps": ..} or {"trace": PATH} (per second)')
    b.add_argument("--service", type=Path, required=True, metavar="SERVICE.json",
                   help='{"latency_ms": {"1": .., "4": .., ...}} (linear between the given sizes; a size may give '
                        'a list of measured times, their spread used by --single-server)')
    b.add_argument("--percentile", type=float, default=95.0, metavar="P",
                   help="the latency percentile, in (0, 100) (default: 95)")
    b.add_argument("--slo-ms", type=float, default=None, metavar="MS",
                   help="find the cheapest (B, T) whose latency percentile is at most MS")
    b.add_argument("--max-batch", type=int, default=None, metavar="B", help="evaluate this B (with --timeout-ms)")
    b.add_argument("--timeout-ms", type=float, default=None, metavar="T", help="evaluate this T (with --max-batch)")
    b.add_argument("--single-server", action="store_true",
                   help="one server: a batch forms only when the previous one is done (cellserve's padded policy, "
                        "Triton's dynamic batcher on one model instance); evaluates --max-batch and --timeout-ms")
    b.add_argument("--json", type=Path, required=True, metavar="PLAN.json", help="where to write the plan")
    b.set_defaults(run=_plan_batching)


def _plan_batching(args, parser) -> int:
    from cellserve.plan.batching import evaluate
    from cellserve.plan.batching_io import load_arrivals, load_service, plan_to_dict, write_json
    from cellserve.plan.batching_map import BatchingError
    from cellserve.plan.batching_queue import evaluate_single_server
    from cellserve.plan.batching_search import MAX_B, T_STEPS, cheapest

    point = (args.max_batch, args.timeout_ms)
    if args.slo_ms is not None and any(x is not None for x in point):
        parser.exit(2, "error: give either --slo-ms or --max-batch with --timeout-ms, not both\n")
    if args.slo_ms is None and None in point:
        parser.exit(2, "error: give --slo-ms, or both --max-batch and --timeout-ms\n")
    if args.single_server and args.slo_ms is not None:
        parser.exit(2, "error: --single-server evaluates a given point (--max-batch and --timeout-ms); the --slo-ms "
                       "search uses the served-at-once model\n")
    try:
        arrivals = load_arrivals(args.arrivals)
        service = load_service(args.service)
        if args.slo_ms is None:
            if args.single_server:
                ev = evaluate_single_server(arrivals, service, args.max_batch, args.timeout_ms, args.percentile)
            else:
                ev = evaluate(arrivals, service, args.max_batch, args.timeout_ms, args.percentile)
            plan = plan_to_dict(ev, arrivals, single_server=args.single_server)
        else:
            found = cheapest(arrivals, service, args.slo_ms, args.percentile)
            if found.best is None:
                near = "" if found.lowest is None else (
                    f"; the lowest found is {found.lowest.latency_percentile_ms:.4g} ms at B={found.lowest.max_batch}, "
                    f"T={found.lowest.timeout_ms:.4g} ms")
                print(f"error: no (B, T) on the grid (B <= {min(service.max_batch, MAX_B)}, T in {T_STEPS} steps of "
                      f"the SLO) has a p{args.percentile:g} latency <= {args.slo_ms:g} ms{near}",
                      file=sys.stderr)
                return 1
            ev = found.best
            plan = plan_to_dict(ev, arrivals, args.slo_ms, {"grid_points": found.points,
                                                           "percentiles_evaluated": found.evaluated})
    except BatchingError as exc:
        parser.exit(2, f"error: {exc}\n")
    write_json(plan, args.json)
    print(f"wrote {args.json}: B={ev.max_batch}, T={ev.timeout_ms:g} ms, mean batch {ev.mean_batch:.3f}, "
          f"p{ev.percentile:g} latency {ev.latency_percentile_ms:.3f} ms, "
          f"{ev.device_ms_per_request:.3f} device-ms per request")
    return 0
