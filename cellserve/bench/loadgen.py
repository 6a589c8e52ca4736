"""An open-loop load generator for any Open Inference Protocol server: over HTTP with a lean
keep-alive client (`http_pool.py`), over gRPC with a lean grpc.aio stub that sends prebuilt
`ModelInferRequest` bytes and reads back only the status.

Both clients are lean for the same reason: the generator shares the machine with the server,
and a generator that spends a core building and parsing messages measures itself. (tritonclient's
asyncio client spent about twice the CPU per request of the raw stub on gRPC.)

Open loop: each request is sent at its trace time whether or not earlier ones were answered,
so a slow server cannot slow the offered load down. Latency counts from the scheduled
arrival, so a generator that falls behind its schedule shows up in the latencies (and in
`send_lag_s`) instead of hiding them. Request bytes and tensors are built before the clock
starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from cellserve.bench.http_pool import HttpPool, error_message
from cellserve.bench.peers.base import pad_to_bucket
from cellserve.bench.results import RequestOutcome
from cellserve.bench.traces import StateInput, TraceRequest, one_sequence
from cellserve.datatypes import protocol_name

# Answers that are the server's refusals rather than failures, over HTTP and gRPC.
_STATUS = {"429": "rejected", "StatusCode.RESOURCE_EXHAUSTED": "rejected",
           "504": "dropped", "StatusCode.DEADLINE_EXCEEDED": "dropped"}
PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class RequestFormat:
    """How a trace's sequences (token ids or feature rows) become request tensors.

    binary: Triton's binary tensor extension (HTTP) instead of JSON numbers.
    pad_to_buckets: pad to LENGTH_BUCKETS and add `lengths`, for batchers that need equal shapes.
    deadline_ms: sent as the request's `timeout` parameter (microseconds), for servers that
    schedule by deadline; None sends none.
    time_major: each sequence as [T, 1, ...] (a model whose input is [time, batch, ...]), not [1, T, ...].
    states: the model's initial states or lengths beside the sequence (bench/traces.StateInput).
    """

    input_name: str = "tokens"
    binary: bool = True
    pad_to_buckets: bool = False
    deadline_ms: float | None = None
    time_major: bool = False
    states: tuple[StateInput, ...] = ()


@dataclass
class LoadRun:
    outcomes: list[RequestOutcome]
    send_lag_s: list[float] = field(default_factory=list)  # actual minus scheduled send time
    health_latencies_s: list[float] = field(default_factory=list)


def request_tensors(sequence: np.ndarray, fmt: RequestFormat) -> list[tuple[str, str, np.ndarray]]:
    """(name, datatype, array) of one request's inputs: batch 1, padded where asked (token ids:
    pad_to_buckets is for token rows)."""
    if sequence.dtype.kind in "iu":
        sent = pad_to_bucket(sequence) if fmt.pad_to_buckets else sequence.astype(np.int64)
    else:
        sent = sequence
    tensors = [(fmt.input_name, protocol_name(sent.dtype), one_sequence(sent, fmt.time_major))]
    if fmt.pad_to_buckets:
        tensors.append(("lengths", "INT32", np.array([[len(sequence)]], dtype=np.int32)))
    for state in fmt.states:
        value = state.value(len(sequence))
        tensors.append((state.name, protocol_name(value.dtype), value))
    return tensors


def http_request(pool: HttpPool, model: str, sequence: np.ndarray, fmt: RequestFormat) -> bytes:
    """The bytes of one inference request: JSON tensors, or Triton's binary extension."""
    inputs, raw = [], []
    for name, datatype, array in request_tensors(sequence, fmt):
        tensor = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if fmt.binary:
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        inputs.append(tensor)
    request = {"inputs": inputs}
    if fmt.deadline_ms:
        request["parameters"] = {"timeout": int(fmt.deadline_ms * 1e3)}
    header = json.dumps(request, separators=(",", ":")).encode()
    path = f"/v2/models/{model}/infer"
    if not fmt.binary:
        return pool.post(path, header)
    return pool.post(path, header + b"".join(raw), {"Content-Type": "application/octet-stream",
                                                    "Inference-Header-Content-Length": str(len(header))})


def grpc_request(model: str, sequence: np.ndarray, fmt: RequestFormat) -> bytes:
    """The serialised `ModelInferRequest` of one request: tensors in `raw_input_contents` (what
    tritonclient sends for numpy inputs), the deadline as the `timeout` parameter."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, array in request_tensors(sequence, fmt):
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    if fmt.deadline_ms:
        request.parameters["timeout"].int64_param = int(fmt.deadline_ms * 1e3)
    return request.SerializeToString()


class _HttpSender:
    def __init__(self, address: str, model: str, trace: list[TraceRequest], fmt: RequestFormat):
        self.pool = HttpPool(address)
        self.requests = [http_request(self.pool, model, r.sequence, fmt) for r in trace]
        self.ready = self.pool.get("/v2/health/ready")

    async def send(self, i: int) -> tuple[str, str]:
        status, body = await self.pool.request(self.requests[i])
        if status == 200:
            return "ok", ""
        return _STATUS.get(str(status), "error"), f"{status}: {error_message(body)}"

    async def probe(self) -> None:
        await self.pool.request(self.ready)

    async def close(self) -> None:
        self.pool.close()


class _GrpcSender:
    _METHOD = "/inference.GRPCInferenceService/"

    def __init__(self, address: str, model: str, trace: list[TraceRequest], fmt: RequestFormat):
        # one HTTP/2 connection, as tritonclient opens; raised message limits as tritonclient sets
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)])
        # no (de)serialisers: requests go as prebuilt bytes, answers are not parsed
        self.infer = self.channel.unary_unary(self._METHOD + "ModelInfer")
        self.ready = self.channel.unary_unary(self._METHOD + "ServerReady")
        self.requests = [grpc_request(model, r.sequence, fmt) for r in trace]

    async def send(self, i: int) -> tuple[str, str]:
        try:
            await self.infer(self.requests[i])
            return "ok", ""
        except grpc.aio.AioRpcError as exc:
            return _STATUS.get(str(exc.code()), "error"), f"{exc.code()}: {exc.details()}"

    async def probe(self) -> None:
        await self.ready(service_pb2.ServerReadyRequest().SerializeToString())

    async def close(self) -> None:
        await self.channel.close()


async def run_open_loop(address: str, model: str, trace: list[TraceRequest], fmt: RequestFormat = RequestFormat(),
                        protocol: str = "http", client_timeout_s: float = 30.0,
                        health_every_s: float | None = None) -> LoadRun:
    """Send the trace to the server at `address` (host:port). Every request gets an outcome:
    one not answered within `client_timeout_s` counts as an error, never as lost."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    sender = (_HttpSender if protocol == "http" else _GrpcSender)(address, model, trace, fmt)
    outcomes: list[RequestOutcome | None] = [None] * len(trace)
    run = LoadRun(outcomes=[], send_lag_s=[0.0] * len(trace))
    try:
        start = time.perf_counter()

        async def one(i: int) -> None:
            sent = time.perf_counter() - start
            run.send_lag_s[i] = sent - trace[i].arrival_s
            try:
                status, reason = await asyncio.wait_for(sender.send(i), client_timeout_s)
            except asyncio.TimeoutError:
                status, reason = "error", f"no answer within {client_timeout_s:g} s"
            except Exception as exc:  # connection failures: counted, never lost
                status, reason = "error", f"{type(exc).__name__}: {exc}"
            finish = time.perf_counter() - start
            # From the schedule, or from the send when a timer fired a little early.
            outcomes[i] = RequestOutcome(trace[i].request_id, max(trace[i].arrival_s, sent), finish, status, reason)

        async def probe() -> None:
            t0 = None
            try:
                while True:
                    t0 = time.perf_counter()
                    await sender.probe()
                    run.health_latencies_s.append(time.perf_counter() - t0)
                    t0 = None
                    await asyncio.sleep(health_every_s)
            except asyncio.CancelledError:
                # a check still unanswered when the load ends counts with what it has waited,
                # so a server that hangs its health checks cannot show none
                if t0 is not None:
                    run.health_latencies_s.append(time.perf_counter() - t0)
                raise

        prober = asyncio.create_task(probe()) if health_every_s else None
        tasks = []
        for i, request in enumerate(trace):
            delay = request.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        if prober is not None:
            prober.cancel()
    finally:
        await sender.close()
    run.outcomes = [o for o in outcomes if o is not None]
    return run


def open_loop(address: str, model: str, trace: list[TraceRequest], **kw) -> LoadRun:
    """run_open_loop on a fresh event loop (uvloop where installed: it halves tritonclient's
    CPU per request, 250 vs 450 us here)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_open_loop(address, model, trace, **kw))
    return uvloop.run(run_open_loop(address, model, trace, **kw))
