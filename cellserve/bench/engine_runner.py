"""Replays a trace open-loop against a running Engine, as a server would see it.

A feeder thread submits each request at its arrival time, whatever the engine is doing (open
loop: a slow engine does not slow the offered load), while the engine runs its worker loop
in the calling thread (see Engine.serve_forever on why that should be the main thread).
Latency runs from the scheduled arrival, so any delay in noticing a request counts against
the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cellserve.bench.results import RequestOutcome, RunStats, span_s
from cellserve.bench.traces import TraceRequest, request_builder
from cellserve.engine.engine import Engine, EngineStats
from cellserve.engine.request import Request, Response, TraceStamps


@dataclass(frozen=True)
class Stream:
    """One model's share of a mixed replay: its requests and their deadline (None: none)."""

    model: str
    input_name: str
    trace: list[TraceRequest]
    timeout_s: float | None
    beam_width: int | None = None
    # the trace each request carries, by its TraceRequest's id (None: untraced); the engine
    # stamps its points on it (docs/tracing.md)
    traces: Callable[[int], TraceStamps] | None = None


def replay(engine: Engine, model: str, input_name: str, trace: list[TraceRequest], policy: str,
           rate_rps: float, timeout_s: float | None, drain_s: float = 30.0,
           beam_width: int | None = None, traces: Callable[[int], TraceStamps] | None = None) -> RunStats:
    """Serve `trace` on `engine`; requests carry `timeout_s` as their deadline (None: none).
    Requests still unanswered `drain_s` after the last arrival are aborted (reported as
    errors), so the engine is empty for the next run. `beam_width`: every request asks it
    (an encoder-decoder's search width; None: the model's default, and no parameter sent).
    `traces`: as Stream's."""
    (outcomes,) = replay_mix(engine, [Stream(model, input_name, trace, timeout_s, beam_width, traces)], drain_s)
    s = engine.stats
    return RunStats(policy=policy, rate_rps=rate_rps, duration_s=span_s(outcomes), outcomes=outcomes,
                    executed_flops=s.executed_flops, busy_s=s.busy_s, cell_steps=s.cell_steps,
                    batch_size_sum=s.batch_size_sum, overhead_us_per_step=[x * 1e6 for x in s.overhead_s])


def replay_mix(engine: Engine, streams: list[Stream], drain_s: float = 30.0,
               start_at: float | None = None) -> list[list[RequestOutcome]]:
    """Serve several models' traces at once (arrivals merged in time), as `replay` serves one;
    each stream's outcomes, in its trace's order of arrival. `engine.stats` holds the run's.
    `start_at`: the time on the engine's clock of the traces' zero (several processes replaying
    their parts of one trace agree on it; time.perf_counter is one clock for all processes on
    Linux); None: just after the requests are built."""
    engine.stats = EngineStats()
    responses: dict[int, Response] = {}
    total = sum(len(s.trace) for s in streams)
    done = threading.Event()
    lock = threading.Lock()

    def on_done(response: Response) -> None:
        with lock:
            responses[response.request_id] = response
            if len(responses) == total:
                done.set()

    ids: list[list[tuple[int, TraceRequest]]] = []
    requests = []
    for s in streams:
        inputs = request_builder(engine.models[s.model], s.input_name)
        mine = []
        for item in sorted(s.trace, key=lambda r: r.arrival_s):
            request = Request(s.model, inputs(item.sequence), on_done=on_done,
                              timeout_s=s.timeout_s, arrival=item.arrival_s, beam_width=s.beam_width,
                              trace=s.traces(item.request_id) if s.traces is not None else None)
            mine.append((request.request_id, item))
            requests.append(request)
        ids.append(mine)
    requests.sort(key=lambda r: r.arrival)
    # The clock starts once the requests are built (thousands take milliseconds, which are the
    # harness's, not the engine's: counted, they queued a burst before the first step of every
    # run), and the feeder's first arrival comes after the loop started.
    start = engine.clock.now() + 0.01 if start_at is None else start_at
    for request in requests:
        request.arrival += start

    def feed() -> None:
        for request in requests:
            delay = request.arrival - engine.clock.now()
            if delay > 0:
                time.sleep(delay)
            engine.submit(request)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    last = max((s.trace[-1].arrival_s for s in streams if s.trace), default=0.0)
    deadline = threading.Timer(drain_s + last, done.set)
    deadline.start()
    engine.serve_forever(done)
    deadline.cancel()
    feeder.join()
    engine.abort_all("benchmark run ended before this request finished")
    out = []
    with lock:
        for mine in ids:
            outcomes = []
            for request_id, item in mine:
                r = responses[request_id]
                outcomes.append(RequestOutcome(item.request_id, item.arrival_s, r.finish - start,
                                               RequestOutcome.status_of(r.status), r.reason))
            out.append(outcomes)
    return out
