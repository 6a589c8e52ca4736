"""`cellserve bench latency`: where a lightly loaded request's time goes, from the socket to
the socket, measured with the server's own tracing (docs/tracing.md).

It starts `cellserve serve --model M` (or `--model-repository DIR`) with every request traced (`--trace-config
level=TIMESTAMPS rate=1 triton,file=<temp>`), sends Poisson arrivals at --rate (10 req/s by
default), one request per arrival (WMT-like lengths, as the other benchmarks): JSON tensors over
HTTP, as `bench compare` sends them, or binary tensors over gRPC. Each request carries an id, so
that its trace and the client's end-to-end time (from the send to the last byte of the answer)
meet. The first --warm-up requests are sent and left out. It stops the server (the trace file is
written at the stop), reads the traces and prints per stage the p50/p90/p99 in microseconds and
the share of the client's end-to-end mean (latency_breakdown.py), and writes the JSON.

The figures are one machine's, at the load of one run: the command prints the machine, the
load and how many requests were traced beside them.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cellserve.cli_types import positive

PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class LatencyConfig:
    model: str = "lstm-512"
    protocol: str = "http"
    rate: float = 10.0  # Poisson arrivals per second
    requests: int = 300  # measured, after the warm-up
    warm_up: int = 20  # sent first and left out of the figures
    seed: int = 0
    server_args: tuple[str, ...] = ()
    model_repository: str | None = None  # serve --model of this repository, not of the zoo


def _requests(cfg: LatencyConfig, seq):
    """(id, arrival second, body) for every request, built before the clock starts: one
    sequence each in the model's input `seq` (bench/traces.SequenceInput)."""
    import numpy as np

    from cellserve.bench.loadgen import RequestFormat, grpc_request, request_tensors
    from cellserve.bench.traces import make_trace

    trace = make_trace(np.random.default_rng(cfg.seed), cfg.rate, cfg.warm_up + cfg.requests, seq.vocab or 0,
                       inputs=seq.sampler())
    fmt = RequestFormat(seq.name, time_major=seq.time_major, states=seq.states)
    out = []
    for r in trace:
        rid = f"w{r.request_id}" if r.request_id < cfg.warm_up else str(r.request_id - cfg.warm_up)
        if cfg.protocol == "http":
            inputs = [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.reshape(-1).tolist()}
                      for name, datatype, x in request_tensors(r.sequence, fmt)]
            body = json.dumps({"id": rid, "inputs": inputs}, separators=(",", ":")).encode()
        else:
            from tritonclient.grpc import service_pb2

            message = service_pb2.ModelInferRequest.FromString(grpc_request(cfg.model, r.sequence, fmt))
            message.id = rid
            body = message.SerializeToString()
        out.append((rid, r.arrival_s, body))
    return out


async def _send_all(address: str, cfg: LatencyConfig, requests) -> tuple[dict[str, float], dict[str, str]]:
    """Open loop: each request at its arrival time. Returns end-to-end seconds of the answered
    ones by id, and the failures by id."""
    if cfg.protocol == "http":
        from cellserve.bench.http_pool import HttpPool, error_message

        pool = HttpPool(address)
        path = f"/v2/models/{cfg.model}/infer"
        wire = {rid: pool.post(path, body) for rid, _, body in requests}

        async def send(rid: str) -> str | None:
            status, body = await pool.request(wire[rid])
            return None if status == 200 else f"{status}: {error_message(body)}"

        close = pool.close
    else:
        import grpc

        channel = grpc.aio.insecure_channel(address)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        wire = {rid: body for rid, _, body in requests}

        async def send(rid: str) -> str | None:
            try:
                await infer(wire[rid])
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code()}: {exc.details()}"
            return None

        async def close() -> None:
            await channel.close()

    latencies: dict[str, float] = {}
    failures: dict[str, str] = {}

    async def one(rid: str) -> None:
        t0 = time.perf_counter()
        try:
            failure = await asyncio.wait_for(send(rid), 30.0)
        except Exception as exc:  # counted, never lost
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None:
            latencies[rid] = time.perf_counter() - t0
        else:
            failures[rid] = failure

    start = time.perf_counter()
    tasks = []
    for rid, arrival, _ in requests:
        delay = arrival - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rid)))
    await asyncio.gather(*tasks)
    result = close()
    if asyncio.iscoroutine(result):
        await result
    return latencies, failures


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(cfg: LatencyConfig, log=print) -> dict:
    """Run the benchmark; return the report (plain data, as written to --json)."""
    from cellserve.bench.latency_breakdown import breakdown
    from cellserve.bench.traces import sequence_input
    from cellserve.server.launch import ServerProcess, serve_model_args
    from cellserve.server.repository import load_model
    from cellserve.server.tracing import read_trace_files

    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {cfg.protocol!r}")
    repository = Path(cfg.model_repository) if cfg.model_repository else None
    requests = _requests(cfg, sequence_input(load_model(cfg.model, repository)))
    workdir = Path(tempfile.mkdtemp(prefix="cellserve-latency-"))
    trace_file = workdir / "trace.json"
    off = "--grpc-port" if cfg.protocol == "http" else "--http-port"
    args = [*serve_model_args(cfg.model, cfg.model_repository), off, "-1", "--metrics-port", "-1",
            "--trace-config", "level=TIMESTAMPS",
            "--trace-config", "rate=1", "--trace-config", f"triton,file={trace_file}", *cfg.server_args]
    log(f"starting cellserve serve {' '.join(args)}")
    server = ServerProcess(*args)
    try:
        address = server.http if cfg.protocol == "http" else server.grpc
        log(f"sending {len(requests)} requests ({cfg.warm_up} warm-up) at {cfg.rate:g} req/s (Poisson) over "
            f"{cfg.protocol} ...")
        latencies, failures = _run_loop(_send_all(address, cfg, requests))
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"the server exited with status {code}")
    traces = [t for t in read_trace_files(trace_file) if not str(t.get("request_id", "")).startswith("w")]
    measured = {rid: s for rid, s in latencies.items() if not rid.startswith("w")}
    rows = breakdown(traces, measured, cfg.protocol)
    return {
        "config": asdict(cfg),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "sent": len(requests) - cfg.warm_up,
        "answered": len(measured),
        "failed": {rid: why for rid, why in failures.items() if not rid.startswith("w")},
        "traced": len(traces),
        "note": "one machine's figures, at the load of this run (Poisson, one request per arrival); client and "
                "server share the machine",
        "rows": [asdict(r) for r in rows],
    }


def add_parser(bench_sub) -> None:
    """`cellserve bench latency`'s flags (imports nothing heavy: --help stays fast)."""
    p = bench_sub.add_parser("latency", help="where a lightly loaded request's time goes, per stage, from the "
                                             "server's own traces (docs/tracing.md)",
                             description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="lstm-512", help="zoo model, or one of --model-repository (default: lstm-512)")
    p.add_argument("--model-repository", type=Path, default=None, help="serve this repository, which holds --model")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http", help="http: JSON tensors; grpc: binary "
                                                                        "(default: http)")
    p.add_argument("--rate", type=positive(float), default=10.0, help="Poisson arrivals per second (default: 10)")
    p.add_argument("--requests", type=positive(int), default=300, help="requests measured (default: 300)")
    p.add_argument("--warm-up", type=int, default=20, help="requests sent first and left out (default: 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench-results/latency.json"), help="where to write the report")
    p.set_defaults(run=bench_latency)


def bench_latency(args, parser) -> int:
    from cellserve.bench.latency_breakdown import Row, format_table
    from cellserve.bench.traces import sequence_input
    from cellserve.server.repository import load_model

    try:
        sequence_input(load_model(args.model, args.model_repository))
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    if args.warm_up < 0:
        parser.error(f"--warm-up must be >= 0, got {args.warm_up}")
    cfg = LatencyConfig(args.model, args.protocol, args.rate, args.requests, args.warm_up, args.seed,
                        model_repository=str(args.model_repository) if args.model_repository else None)
    report = run(cfg)
    m = report["machine"]
    print(f"\n{cfg.model} over {cfg.protocol}: {report['traced']} traced requests of {report['sent']} sent "
          f"({report['answered']} answered), Poisson {cfg.rate:g} req/s, one request per arrival")
    print(f"one machine's figures ({m['host']}, {m['cpus']} CPUs, {report['date']}), at this run's load; "
          "client and server on the same machine")
    print(format_table([Row(**r) for r in report["rows"]]))
    if report["failed"]:
        first = next(iter(report["failed"].items()))
        print(f"{len(report['failed'])} requests failed (first: {first[0]}: {first[1]})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0 if not report["failed"] else 1
