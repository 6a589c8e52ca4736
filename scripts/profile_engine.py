"""Drive the real engine alone at saturation, for a profiler (py-spy) and for steps/s figures.

One thread, no feeder: before each step the requests whose (real-time) arrival has come are
submitted, then `Engine.step()` runs, as `serve_forever` would (bench/engine_runner.py
`replay` is the real driver; it adds a feeder thread, which a profile of the engine's own time
does not want). Requests carry the bench's inputs (bench/decoder_workload.py for an
encoder-decoder, WMT-like token rows otherwise), Poisson arrivals at `--rate`, and a deadline
of `--timeout-ms` (admission, pricing and the drop check run as in `bench engine`).

    .venv/bin/python scripts/profile_engine.py --model seq2seq-reverse --rate 2500 --seconds 4
    py-spy record --native -r 500 -o /tmp/prof.svg -- .venv/bin/python scripts/profile_engine.py ...

Prints one JSON line: requests answered (by status), cell steps, steps/s and requests/s of the
run's wall time, device busy fraction (cell steps only), the engine's time off the device per
step (mean, median; Engine.stats.overhead_s), wall time off the cell steps and process CPU time
per request, runs the drop checks priced per request, mean batch. `--burst`: every request at once, no deadline (a closed-loop burst, as the bench's
capacity estimate): deterministic work, the figure to compare two versions of the code by.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cellserve import heap
from cellserve.bench.decoder_workload import workload
from cellserve.bench.traces import make_trace, sequence_input
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine, EngineStats
from cellserve.engine.request import Request, Status
from cellserve.server.repository import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="seq2seq-reverse")
    p.add_argument("--model-repository", default=None, help="where --model is, when not a zoo model")
    p.add_argument("--policy", default="cellular")
    p.add_argument("--rate", type=float, default=2500.0, help="offered requests per second (open loop)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--timeout-ms", type=float, default=200.0)
    p.add_argument("--burst", type=int, default=0, help="N requests at once, no deadline (closed loop)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="closed loop: keep this many requests in flight (a new one as each is answered), "
                        "--requests in all, each with --timeout-ms as its deadline")
    p.add_argument("--requests", type=int, default=4000, help="requests of a --concurrency run")
    p.add_argument("--beam-width", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--warmup", type=int, default=300, help="requests of a burst run first, not counted")
    args = p.parse_args(argv)

    model = load_model(args.model, Path(args.model_repository) if args.model_repository else None)
    work = workload(model, args.beam_width)
    seq = sequence_input(model)
    inputs = work.inputs or seq.sampler()
    padded = args.policy in ("padded", "none")
    engine = Engine([model], EngineConfig(policy=args.policy, max_batch=args.max_batch, device="cpu",
                                          admission=not padded, drop_late=not padded))
    rng = np.random.default_rng(args.seed)
    if args.warmup:  # caches, thread pools, the cost model's tables
        for item in make_trace(rng, 1.0, args.warmup, 0, inputs=inputs):
            engine.submit(Request(model.name, seq.request_inputs(item.sequence), beam_width=work.beam_width))
        engine.run_until_idle(timeout_s=120)
    heap.settle()
    engine.stats = EngineStats()
    answers: list = []
    closed = args.burst or args.concurrency
    n = args.burst or args.requests if closed else max(1, int(args.rate * args.seconds))
    trace = make_trace(rng, args.rate, n, 0, inputs=inputs)
    timeout = None if args.burst else args.timeout_ms / 1e3
    requests = [Request(model.name, seq.request_inputs(t.sequence), on_done=answers.append,
                        timeout_s=timeout, beam_width=work.beam_width) for t in trace]
    # how many may be submitted by now: all (burst), those answered plus the concurrency
    # (closed loop), or those whose arrival has come (open loop)
    if args.burst:
        due = lambda now: n  # noqa: E731
    elif args.concurrency:
        due = lambda now: len(answers) + args.concurrency  # noqa: E731
    else:
        arrivals = engine.clock.now() + np.array([t.arrival_s for t in trace])
        for r, a in zip(requests, arrivals.tolist()):
            r.arrival = a
        due = lambda now: int(np.searchsorted(arrivals, now, side="right"))  # noqa: E731
    start, cpu0 = time.perf_counter(), time.process_time()
    i = 0
    with engine.executors["default"].pinned(engine.config.pin_threads):
        while i < n or not engine.idle():
            for request in requests[i: due(engine.clock.now())]:
                engine.submit(request)
                i += 1
            if not engine.step() and i < n and not closed:
                time.sleep(max(0.0, min(requests[i].arrival - engine.clock.now(), 0.001)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    s = engine.stats
    statuses: dict[str, int] = {}
    for r in answers:
        statuses[r.status.value] = statuses.get(r.status.value, 0) + 1
    ok = statuses.get(Status.OK.value, 0)
    over = list(s.overhead_s)
    print(json.dumps({
        "model": args.model, "policy": args.policy, "beam_width": args.beam_width,
        "mode": (f"burst of {n}" if args.burst else
                 f"closed loop, {args.concurrency} in flight, timeout {args.timeout_ms:g} ms" if args.concurrency else
                 f"open loop {args.rate:g} req/s for {args.seconds:g} s, timeout {args.timeout_ms:g} ms"),
        "requests": n, "statuses": statuses, "wall_s": round(elapsed, 4),
        "ok_per_s": round(ok / elapsed, 1), "cell_steps": s.cell_steps,
        "steps_per_s": round(s.cell_steps / elapsed, 1),
        "mean_batch": round(s.batch_size_sum / max(s.cell_steps, 1), 2),
        "busy_fraction": round(s.busy_s / elapsed, 3),
        "host_us_per_step_mean": round(1e6 * sum(over) / max(len(over), 1), 1),
        "host_us_per_step_median": round(1e6 * statistics.median(over), 1) if over else None,
        "host_us_per_request": round(1e6 * (elapsed - s.busy_s) / max(len(answers), 1), 1),
        # runs the drop checks priced, over all checks: their work grows with the runs in flight
        "runs_checked_per_request": round(s.runs_checked / max(len(answers), 1), 2),
        # CPU time of the process (every thread) per answer: steadier than wall time on a
        # shared machine, where a descheduled engine's wall time counts but its CPU does not
        "cpu_us_per_request": round(1e6 * cpu / max(len(answers), 1), 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
