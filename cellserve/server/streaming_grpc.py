"""gRPC `ModelStreamInfer`, as Triton serves it for decoupled models (docs/streaming.md).

One bidirectional stream carries any number of ModelInferRequests, each answered on its own
and at once (their responses may interleave; match them by `id`):
- a decoder model: one response per emitted token (the token as the decoder's output
  tensor, shape [1, 1]; parameters `triton_final_response` false, `batch_index`, `position`),
  then a final response holding the whole answer as ModelInfer gives it, with
  `triton_final_response` true;
- any other model: that final response only.
A request that fails gets one response whose `error_message` starts with its gRPC status
name (`INVALID_ARGUMENT: ...`, `DEADLINE_EXCEEDED: ...`) and whose `infer_response` carries
its id and model; the stream goes on for the others. The stream ends when the client has
sent its last request and every request is answered. A client that cancels the stream or goes
away cancels its requests still running: their lanes are released at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from cellserve.server.codec import declared_shape_check
from cellserve.server.core import Admission, Core
from cellserve.server.errors import BadRequest, ServerError
from cellserve.server.grpc_frontend import _cut, _set_parameter, encode_infer_response, parse_infer_request
from cellserve.server.streaming import Token, TokenStream

log = logging.getLogger(__name__)

_READ_ALL = object()  # the client sent its last request
_ANSWERED = object()  # one request got its last response


async def model_stream_infer(core: Core, requests, context) -> None:
    """Serve one ModelStreamInfer call: read `requests` (an async iterator of serialized
    ModelInferRequests), write ModelStreamInferResponses with `context.write`."""
    out: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    async def read() -> None:
        try:
            async for request in requests:
                out.put_nowait(_OPENED)  # before _READ_ALL can be: the stream waits for its answer
                try:  # the server hands the stream's messages undecoded (grpc_frontend.start_grpc)
                    request = service_pb2.ModelInferRequest.FromString(request)
                except DecodeError as exc:  # this request's answer: the stream goes on
                    out.put_nowait(_error(service_pb2.ModelInferRequest(), BadRequest(
                        f"a request of the stream is not a valid ModelInferRequest message: {exc}")))
                    out.put_nowait(_ANSWERED)
                    continue
                task = asyncio.ensure_future(_answer(core, request, out.put_nowait))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            out.put_nowait(_READ_ALL)

    reader = asyncio.ensure_future(read())
    open_requests, reading = 0, True
    try:
        while reading or open_requests:
            item = await out.get()
            if item is _READ_ALL:
                reading = False
            elif item is _ANSWERED:
                open_requests -= 1
            elif isinstance(item, _Opened):
                open_requests += 1
            else:
                await context.write(item)
        await reader  # raises what broke the request stream, if anything did
    finally:  # the client went away (this call is cancelled) or the stream broke
        reader.cancel()
        for task in list(tasks):
            task.cancel()


class _Opened:
    """A request started: the stream stays open until its _ANSWERED."""


_OPENED = _Opened()


def _token(request, token: Token) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelInferResponse(model_name=token.model, model_version=token.version, id=request.id)
    response.outputs.add(name=token.output, datatype="INT64", shape=[1, 1])
    response.raw_output_contents.append(np.array([token.token], "<i8").tobytes())
    for name, value in (("triton_final_response", False), ("batch_index", token.batch_index),
                        ("position", token.position)):
        _set_parameter(response.parameters[name], value)
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def _final(response: service_pb2.ModelInferResponse) -> service_pb2.ModelStreamInferResponse:
    _set_parameter(response.parameters["triton_final_response"], True)
    return service_pb2.ModelStreamInferResponse(infer_response=response)


def _error(request, exc: ServerError) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelInferResponse(model_name=request.model_name,
                                              model_version=request.model_version, id=request.id)
    _set_parameter(response.parameters["triton_final_response"], True)
    return service_pb2.ModelStreamInferResponse(error_message=_cut(f"{exc.grpc_code.name}: {exc.message}"),
                                                infer_response=response)


async def _answer(core: Core, request, put) -> None:
    """All the responses of one request of the stream; never raises (but when cancelled)."""
    received = core.clock.now()
    admission = core.admission
    failure = stream = None
    try:
        ticket = admission.enter()
    except ServerError as exc:
        put(_error(request, exc))
        put(_ANSWERED)
        return
    try:
        entry = core.model(request.model_name, request.model_version)  # NOT_FOUND before decoding tensors
        try:
            parsed = parse_infer_request(request, core.shared_memory, declared_shape_check(entry))
        except ServerError as exc:  # a 400 before the core saw it: counted as the core's are (as ModelInfer's)
            core.failed_before_infer(entry, exc, received)
            raise
        stream = TokenStream(core, parsed, received, encode=encode_infer_response)
        async for event in stream:
            if isinstance(event, Token):
                put(_token(request, event))
            else:
                put(_final(event))
    except ServerError as exc:
        failure = exc
        put(_error(request, exc))
    except asyncio.CancelledError as exc:
        failure = exc  # the client went away: neither a success nor congestion, for the bound
        raise
    except Exception as exc:  # noqa: BLE001 - a bug answers this request, not the stream
        log.exception("internal error in a ModelStreamInfer request")
        failure = exc
        internal = ServerError(f"internal error: {type(exc).__name__}: {exc}")
        put(_error(request, internal))
    finally:
        if stream is not None:
            stream.close()
        admission.leave(ticket, Admission.outcome(failure))
        put(_ANSWERED)
