"""Triton's generate extension over HTTP: `POST /v2/models/{m}[/versions/{v}]/generate` and
`.../generate_stream` (server-sent events). Formats: docs/streaming.md.

Request: a JSON object whose fields are the model's inputs by name (a JSON scalar or nested
arrays; leading dimensions of 1 are added up to the input's rank, a batch of one) plus an
optional `parameters` object; the request parameters timeout, priority and sequence_* may
also stand at the top level. Any other field is refused with 400 naming it.
Response (`/generate`): `{"model_name", "model_version", <output>: value, ...}`, each output
by name (a JSON scalar when it holds one element, else a flat row-major array), response
parameters as top-level fields. `/generate_stream` answers `text/event-stream`: per token a
decoder emits, `data: {"model_name", "model_version", <token output>: token, "batch_index",
"position", "triton_final_response": false}`, then the final answer as /generate's with
`"triton_final_response": true`. A failure before the first event is a plain JSON error with
its status; after it (the deadline passing mid-stream) the last event is `data: {"error":
..., "status": 504}`. A client that closes the connection cancels the request: its lanes are
released at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np

from cellserve.server import codec
from cellserve.server.core import Admission, Core, InferInput, InferOutput
from cellserve.server.errors import BadRequest, ServerError, Unavailable
from cellserve.server.http_frontend import (_internal_error_response, _read_body, _server_error_response,
                                            enter_admission)
from cellserve.server.streaming import StreamClosed, Token, TokenStream

# request parameters that may stand beside the inputs (Triton passes non-input fields as
# parameters; these are the ones this server reads)
PARAMETER_FIELDS = ("timeout", "priority", "sequence_id", "sequence_start", "sequence_end")
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class GenerateEndpoint:
    """POST .../generate (stream=False) or .../generate_stream (stream=True) as a bare ASGI
    app; each request holds a place in the core's admission bound until its answer ends."""

    def __init__(self, core: Core, max_request_bytes: int, stream: bool):
        self.core, self.max_request_bytes, self.stream = core, max_request_bytes, stream

    async def __call__(self, scope, receive, send) -> None:
        entered = await enter_admission(self.core, scope, receive, send)
        if entered is None:
            return
        received, ticket = entered
        admission = self.core.admission
        failure = None
        try:
            await self._serve(scope, receive, send, received)
        except StreamClosed as exc:
            failure = exc  # neither a success nor congestion, for the admission bound
            return  # the client went away: no one to answer
        except asyncio.CancelledError:
            if self.core.accepting:
                raise
            failure = Unavailable("the server is shutting down: its grace period (--grace-period) ran out")
            await _server_error_response(failure)(scope, receive, send)
        except ServerError as exc:
            failure = exc
            await _server_error_response(exc)(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - a 500 that says what failed
            failure = exc
            await _internal_error_response(exc, "POST", scope["path"])(scope, receive, send)
        finally:
            admission.leave(ticket, Admission.outcome(failure))

    async def _serve(self, scope, receive, send, received: float) -> None:
        """Answer the request; raises a ServerError to be answered as JSON (only before any
        event of a stream was sent)."""
        model, version = scope["path_params"]["model"], scope["path_params"].get("version", "")
        entry = self.core.model(model, version)  # 404 before reading a body for nobody
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        try:
            body = await _read_body(headers, receive, self.max_request_bytes)
            request = parse_generate_request(body, entry.model, model, version)
        except ServerError as exc:  # a 400 (or 413) before the core saw it: counted as infer's are
            self.core.failed_before_infer(entry, exc, received)
            raise
        stream = TokenStream(self.core, request, received, tokens=self.stream)
        # The body is read: the next message is the client going away (or our answer ending)
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(lambda _: stream.close())
        try:
            if self.stream:
                await _send_events(stream, send)
            else:
                async for event in stream:
                    if isinstance(event, InferOutput):
                        await _send_json(send, 200, generate_response(event))
        finally:
            watcher.cancel()
            stream.close()


async def _send_events(stream: TokenStream, send) -> None:
    started = False
    try:
        async for event in stream:
            doc = _token_event(event) if isinstance(event, Token) else {**generate_response(event),
                                                                         "triton_final_response": True}
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                started = True
            await send({"type": "http.response.body", "body": _sse(doc), "more_body": True})
    except ServerError as exc:
        if not started:
            raise  # nothing sent yet: a plain JSON error with its status
        await send({"type": "http.response.body", "body": _sse({"error": exc.message, "status": exc.http_status}),
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _sse(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


async def _send_json(send, status: int, doc: dict) -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---- formats ----

def _token_event(token: Token) -> dict:
    return {"model_name": token.model, "model_version": token.version, token.output: token.token,
            "batch_index": token.batch_index, "position": token.position, "triton_final_response": False}


def generate_response(result: InferOutput) -> dict:
    """The generate response object: outputs by name (one element: a scalar; else a flat
    row-major array), then the response's parameters as top-level fields."""
    doc = {"model_name": result.model, "model_version": result.version}
    for name, array in result.outputs.items():
        array = np.asarray(array)
        doc[name] = array.reshape(-1)[0].item() if array.size == 1 else codec.to_json_data(array)
    doc.update(result.parameters)
    return doc


def parse_generate_request(body: bytes, model, name: str, version: str) -> InferInput:
    """A generate request object as the core's InferInput; BadRequest naming what is wrong."""
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(doc).__name__}")
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' must be an object, got {parameters!r}")
    parameters = dict(parameters)
    specs = {spec.name: spec for spec in model.inputs}
    inputs = {}
    for key, value in doc.items():
        if key == "parameters":
            continue
        if key in specs:
            inputs[key] = _tensor(value, specs[key], f"input {key!r}")
        elif key in PARAMETER_FIELDS:
            if key in parameters:
                raise BadRequest(f"parameter {key!r} is given both at the top level and in 'parameters'")
            parameters[key] = value
        else:
            raise BadRequest(f"unknown field {key!r}: model {name!r} has inputs {sorted(specs)}; request "
                             f"parameters go in 'parameters' (or at the top level: {', '.join(PARAMETER_FIELDS)})")
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise BadRequest(f"missing input(s) {missing} of model {name!r}: give each as a top-level field")
    return InferInput(name, version, inputs, "", parameters)


def _no_duplicates(pairs: list) -> dict:
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise BadRequest(f"field {key!r} is given twice")
        doc[key] = value
    return doc


def _tensor(value: object, spec, where: str) -> np.ndarray:
    """A JSON scalar or nested arrays as a tensor of the input's dtype, with leading
    dimensions of 1 up to the input's rank."""
    shape = _nested_shape(value, where)
    rank = len(spec.shape)
    if len(shape) > rank:
        raise BadRequest(f"{where}: {len(shape)} levels of arrays, more than the input's rank {rank} "
                         f"(shape {list(spec.shape)})")
    shape = (1,) * (rank - len(shape)) + shape
    codec.check_shape(list(shape), where)
    return codec.from_json_data(value if isinstance(value, list) else [value], shape, np.dtype(spec.dtype), where)


def _nested_shape(value: object, where: str) -> tuple[int, ...]:
    """The shape of nested JSON arrays; BadRequest for ragged ones (every array at one depth
    must have the same length, and hold only arrays or only scalars)."""
    shape: list[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level, count = [value], 1
    for depth, size in enumerate(shape):
        if count * max(size, 1) > codec.MAX_ELEMENTS:
            raise BadRequest(f"{where}: more than {codec.MAX_ELEMENTS} values")
        following = []
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                raise BadRequest(f"{where}: ragged arrays: every array at depth {depth} must have {size} items")
            following.extend(item)
        level, count = following, math.prod(shape[: depth + 1])
    if any(isinstance(item, list) for item in level):
        raise BadRequest(f"{where}: ragged arrays: arrays and values mixed at depth {len(shape)}")
    return tuple(shape)
