"""The Open Inference Protocol over HTTP/REST (KServe v2), with Triton's binary tensor extension
(and Triton's generate extension, in streaming_http.py).

Every error is answered as `{"error": "..."}` with the status of its ServerError class; the
request body is read with a size limit before anything is parsed.

Overload and slow clients are met in the transport (`GuardedHttpProtocol`, uvicorn's httptools
protocol with guards), before any ASGI work: an inference request that arrives while the
admission bound is full is answered 429 from a canned response when its headers are parsed,
its body skipped unread; connections past --max-connections are answered 503 and closed; a
connection idle past --idle-timeout is closed, and one whose request headers take longer than
--read-timeout, or whose body stalls that long, is answered 408 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import zlib
from collections import deque
from dataclasses import dataclass
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cellserve.decimal_text import ascii_int
from cellserve.server import classification, codec
from cellserve.server.codec import ShapeCheck, declared_shape_check
from cellserve.server.core import Admission, Core, InferInput, InferOutput
from cellserve.server.errors import BadRequest, NotFound, Overloaded, ServerError, TooLarge, Unavailable
from cellserve.server.log_settings import LogSettingError
from cellserve.server.shared_memory import InSharedMemory, SystemSharedMemory, TensorPlace, tensor_place

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
# model_name and model_version: what the protocol's reference client (kserve) sends beside the URL
_REQUEST_FIELDS = {"id", "model_name", "model_version", "parameters", "inputs", "outputs"}
_INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_FIELDS = {"name", "parameters"}
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_GENERATE_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/generate(_stream)?")
RECEIVED = "cellserve.received"  # scope key: when the request's first byte was parsed (core.clock)
TRACE = "cellserve.trace"  # scope key: the request's trace, when the tracer sampled it (tracing.py)


def build_app(core: Core, max_request_bytes: int):
    """The HTTP frontend, an ASGI app."""
    # The bodies are the protocol's ({"live": bool}, {"ready": bool}); the status codes stay
    # 200 / 503, which tritonclient and Kubernetes probes read
    async def live(request: Request) -> Response:
        live = core.live()
        return JSONResponse({"live": live}, status_code=200 if live else 503)

    async def ready(request: Request) -> Response:
        ready = core.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(core.server_metadata())

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(core.model_metadata(p["model"], p.get("version", "")))

    async def model_config(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(core.model_config(p["model"], p.get("version", "")))

    async def model_statistics(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(core.model_statistics(p.get("model", ""), p.get("version", "")))

    async def repository_index(request: Request) -> Response:
        """Triton's model repository extension: POST v2/repository/index, body {} or {"ready": bool}."""
        doc = await _json_body(request, "the repository index request")
        if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
            raise BadRequest('the repository index request must be an object, {"ready": true|false} at most')
        return JSONResponse(core.repository_index(doc.get("ready", False)))

    async def repository_load(request: Request) -> Response:
        unload = request.url.path.endswith("/unload")
        doc = await _json_body(request, f"the {'unload' if unload else 'load'} request")
        if not isinstance(doc, dict) or not isinstance(doc.get("parameters", {}), dict):
            raise BadRequest('a load or unload request\'s body must be an object, {"parameters": {...}} at most')
        await core.load_model(request.path_params["model"], unload=unload, parameters=doc.get("parameters", {}))
        return JSONResponse({})

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        ready = core.model_ready(p["model"], p.get("version", ""))
        return JSONResponse({"name": p["model"], "ready": ready}, status_code=200 if ready else 503)

    async def trace_setting(request: Request) -> Response:
        """Triton's trace extension: GET/POST v2[/models/{model}]/trace/setting (docs/tracing.md)."""
        from cellserve.server.tracing import TraceSettingError

        model = request.path_params.get("model")
        if model is not None:
            core.model(model)  # 404 for a model this server does not serve
        if request.method == "GET":
            return JSONResponse(core.tracer.get(model))
        changes = await _json_body(request, "the trace setting request")
        try:
            return JSONResponse(core.tracer.update(changes, model))
        except TraceSettingError as exc:
            raise BadRequest(str(exc)) from exc

    async def log_settings(request: Request) -> Response:
        """Triton's logging extension: GET/POST v2/logging (server/log_settings.py)."""
        if request.method == "GET":
            return JSONResponse(core.log.get())
        changes = await _json_body(request, "the log settings request")
        try:
            return JSONResponse(core.log.update(changes))
        except LogSettingError as exc:
            raise BadRequest(str(exc)) from exc

    async def system_shared_memory(request: Request) -> Response:
        """Triton's system shared memory extension: POST .../region/{region}/register,
        GET [.../region/{region}]/status, POST [.../region/{region}]/unregister (shared_memory.py)."""
        region = request.path_params.get("region", "")
        action = request.url.path.rsplit("/", 1)[1]
        if action == "status":
            return JSONResponse(core.shared_memory.status(region))
        if action == "unregister":
            core.shared_memory.unregister(region)
            return JSONResponse({})
        doc = await _json_body(request, "the register request")
        if not isinstance(doc, dict):
            raise BadRequest(f"the register request must be an object, got {type(doc).__name__}")
        _no_unknown_fields(doc, {"key", "offset", "byte_size"}, "the register request")
        core.shared_memory.register(region, doc.get("key"), doc.get("offset", 0), doc.get("byte_size"))
        return JSONResponse({})

    async def cuda_shared_memory(request: Request) -> Response:
        """Triton's CUDA shared memory extension: nothing is ever registered (no GPU memory
        to share here): status lists none, unregistering all does nothing, the rest is refused."""
        region = request.path_params.get("region", "")
        action = request.url.path.rsplit("/", 1)[1]
        if action == "register":
            raise BadRequest("CUDA shared memory is not supported: this server has no GPU memory to share; "
                             "use system shared memory (/v2/systemsharedmemory)")
        if region:
            raise NotFound(f"no CUDA shared memory region {region!r} is registered")
        return JSONResponse([] if action == "status" else {})

    async def openapi_document(request: Request) -> Response:
        document = resources.files("cellserve.server").joinpath("openapi.json").read_bytes()
        return Response(document, media_type="application/json")

    from cellserve.server.streaming_http import GenerateEndpoint  # it imports this module

    infer = InferEndpoint(core, max_request_bytes)
    # Triton's generate extension (docs/streaming.md)
    generate = {False: GenerateEndpoint(core, max_request_bytes, stream=False),
                True: GenerateEndpoint(core, max_request_bytes, stream=True)}
    # POST inference and generate never reach these routes (fast_path takes them first); they
    # answer other methods on the same paths with 405, as any route does
    routes = [
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        *[Route(f"/v2/models/{{model}}{versions}/{kind}", generate[kind == "generate_stream"], methods=["POST"])
          for versions in ("", "/versions/{version}") for kind in ("generate", "generate_stream")],
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/stats", model_statistics),  # before /v2/models/{model}, which would take it
        Route("/v2/models/{model}/stats", model_statistics),
        Route("/v2/models/{model}/versions/{version}/stats", model_statistics),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/config", model_config),
        Route("/v2/models/{model}/versions/{version}/config", model_config),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_load, methods=["POST"]),
        Route("/v2/trace/setting", trace_setting, methods=["GET", "POST"]),
        Route("/v2/logging", log_settings, methods=["GET", "POST"]),
        Route("/v2/systemsharedmemory/status", system_shared_memory),
        Route("/v2/systemsharedmemory/unregister", system_shared_memory, methods=["POST"]),
        Route("/v2/systemsharedmemory/region/{region}/status", system_shared_memory),
        Route("/v2/systemsharedmemory/region/{region}/register", system_shared_memory, methods=["POST"]),
        Route("/v2/systemsharedmemory/region/{region}/unregister", system_shared_memory, methods=["POST"]),
        Route("/v2/cudasharedmemory/status", cuda_shared_memory),
        Route("/v2/cudasharedmemory/unregister", cuda_shared_memory, methods=["POST"]),
        Route("/v2/cudasharedmemory/region/{region}/status", cuda_shared_memory),
        Route("/v2/cudasharedmemory/region/{region}/register", cuda_shared_memory, methods=["POST"]),
        Route("/v2/cudasharedmemory/region/{region}/unregister", cuda_shared_memory, methods=["POST"]),
        Route("/v2/models/{model}/trace/setting", trace_setting, methods=["GET", "POST"]),
        Route("/openapi.json", openapi_document),
    ]
    handlers = {ServerError: _server_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)

    async def fast_path(scope, receive, send) -> None:
        """Inference requests skip Starlette's middleware and routing: a third of the
        frontend's Python time per request here, time it would hold the GIL the engine
        thread needs between its kernel calls."""
        raw = scope.get("raw_path")
        if raw is not None and b"%2f" in raw.lower():  # routes match the decoded path: refuse it before
            path = raw.decode("latin-1")               # 'gru-256%2Finfer' reaches .../gru-256/infer
            await JSONResponse({"error": f"no route {path!r}: no model name or route holds an encoded '/' "
                                         "(%2F)"}, status_code=404)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["path_params"] = {"model": match[1], "version": match[2] or ""}
                await infer(scope, receive, send)
                return
            match = _GENERATE_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["path_params"] = {"model": match[1], "version": match[2] or ""}
                await generate[match[3] is not None](scope, receive, send)
                return
        await app(scope, receive, send)

    return fast_path


async def enter_admission(core: Core, scope, receive, send) -> tuple[float, object] | None:
    """An inference request's first step: when it reached the server (core.clock) and its
    place in the admission bound, handed back with `core.admission.leave` once answered;
    None when the bound is full (answered 429 here, before the body is read)."""
    received = scope.get(RECEIVED)
    if received is None:  # served without GuardedHttpProtocol (another server, a test client)
        received = core.clock.now()
    try:
        return received, core.admission.enter()
    except Overloaded as exc:
        await _server_error_response(exc)(scope, receive, send)
        return None


class InferEndpoint:
    """POST /v2/models/{model}[/versions/{version}]/infer as a bare ASGI app, errors included
    (answered as the Starlette app's handlers answer them). Each request holds a place in the
    core's admission bound from before its body is read until its answer is written."""

    def __init__(self, core: Core, max_request_bytes: int):
        self.core, self.max_request_bytes = core, max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        entered = await enter_admission(self.core, scope, receive, send)
        if entered is None:
            return
        received, ticket = entered
        admission = self.core.admission
        failure = None
        traced = self.core.tracer.on  # off: nothing more per request
        try:
            try:
                response = await self._infer(scope, receive, received, traced)
            except ClientDisconnect as exc:
                failure = exc  # neither a success nor congestion, for the admission bound
                return  # no one to answer
            except asyncio.CancelledError:
                # uvicorn cancels what is still in flight when its graceful shutdown runs out:
                # answer as the protocol promises (503), not with uvicorn's plain-text 500, and
                # end the task here (re-raised, uvicorn would log it as a failure)
                if self.core.accepting:
                    raise
                failure = Unavailable("the server is shutting down: its grace period (--grace-period) ran out")
                await _server_error_response(failure)(scope, receive, send)
                return
            except ServerError as exc:
                failure, response = exc, _server_error_response(exc)
            except Exception as exc:  # noqa: BLE001 - a 500 that says what failed
                failure, response = exc, _internal_error_response(exc, "POST", scope["path"])
            trace = scope.get(TRACE) if traced else None
            if trace is None:
                await response(scope, receive, send)
            else:
                trace.stamp("HTTP_SEND_START")
                await response(scope, receive, send)
                trace.stamp("HTTP_SEND_END")
                self.core.tracer.finish(trace)
        finally:
            admission.leave(ticket, Admission.outcome(failure))

    async def _infer(self, scope, receive, received: float, traced: bool = False) -> Response:
        model, version = scope["path_params"]["model"], scope["path_params"].get("version", "")
        entry = self.core.model(model, version)  # 404 before reading a body for nobody
        trace = None
        if traced:
            trace = self.core.tracer.start(entry.name, entry.version)
            if trace is not None:
                scope[TRACE] = trace
                trace.stamp_s("HTTP_RECV_START", received)
        headers = {}
        for key, value in scope["headers"]:  # the first of repeated headers counts, as in Starlette
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        try:
            body = await _read_body(headers, receive, self.max_request_bytes)
            if trace is not None:
                trace.stamp("HTTP_RECV_END")
            infer_input, binary_outputs = parse_infer_request(body, headers.get(HEADER_LENGTH.lower()), model,
                                                              version, self.core.shared_memory,
                                                              declared_shape_check(entry))
        except ServerError as exc:  # a 400 (or 413) before the core saw it: counted as the core's are
            self.core.failed_before_infer(entry, exc, received)
            raise
        if trace is not None:
            trace.request_id = infer_input.request_id
            infer_input.trace = trace
        coding = accepted_coding(headers.get("accept-encoding"))
        with _cancelled_when_client_leaves(receive):
            return await self.core.infer(
                infer_input, received,
                encode=lambda result: compressed(encode_infer_response(result, binary_outputs), coding))


@contextlib.contextmanager
def _cancelled_when_client_leaves(receive):
    """Within this block, the client closing its connection cancels the running task (the
    core then cancels the request in the engine, and a sequence's chunk does not count),
    and the block raises ClientDisconnect. Enter it only once the request's body is read:
    the next message uvicorn gives is then the client going away."""
    task = asyncio.current_task()
    watching = True

    def left(watcher: asyncio.Future) -> None:
        nonlocal watching
        if watching and not watcher.cancelled():
            watching = False
            task.cancel()

    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(left)
    try:
        yield
    except asyncio.CancelledError:
        if watching:  # cancelled from elsewhere (uvicorn's shutdown): not ours to handle
            raise
        task.uncancel()
        raise ClientDisconnect() from None
    finally:
        watching = False  # a disconnect noticed from here on is the answer's send's concern
        watcher.cancel()


async def _json_body(request: Request, what: str):
    """A settings request's JSON body ({} when empty); BadRequest naming `what` when it is not JSON."""
    body = await request.body()
    try:
        return json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from exc


def build_metrics_app(metrics) -> Starlette:
    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    handlers = {HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=[Route("/metrics", scrape)], exception_handlers=handlers)


# ---- errors ----

async def _server_error(request: Request, exc: ServerError) -> Response:
    return _server_error_response(exc)


def _server_error_response(exc: ServerError) -> Response:
    return JSONResponse({"error": exc.message}, status_code=exc.http_status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path!r}",
               405: f"method {request.method} is not allowed on {request.url.path!r}"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _internal_error_response(exc, request.method, request.url.path)


def _internal_error_response(exc: Exception, method: str, path: str) -> Response:
    log.exception("internal error on %s %s", method, path)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


# ---- request body ----

async def _read_body(headers: dict[str, str], receive, limit: int) -> bytes:
    """The body of an ASGI request; `headers` by lower-case name."""
    declared = headers.get("content-length")
    if (ascii_int(declared) or 0) > limit:
        raise TooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        return _inflate(body, encoding, limit)
    if encoding != "identity":
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    return body


_GZIP_MAGIC = b"\x1f\x8b"


def _inflate(packed: bytes, encoding: str, limit: int) -> bytes:
    """A gzip (one member or several, as gzip itself may write them) or zlib-wrapped deflate
    body, inflated to at most `limit` bytes; anything after its end is refused."""
    parts, size = [], 0
    while True:
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            part = inflater.decompress(packed, limit + 1 - size)
        except zlib.error as exc:
            raise BadRequest(f"request body is not valid {encoding} data: {exc}") from exc
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise TooLarge(f"decompressed request body is over the limit of {limit} bytes")
        if not inflater.eof:
            raise BadRequest(f"request body is cut short: its {encoding} data does not end")
        parts.append(part)
        packed = inflater.unused_data
        if not packed:
            return b"".join(parts)
        if encoding != "gzip" or not packed.startswith(_GZIP_MAGIC):
            raise BadRequest(f"request body has {len(packed)} byte(s) after the end of its {encoding} data")


def parse_infer_request(body: bytes, header_length: str | None, model: str, version: str,
                        shared_memory: SystemSharedMemory, limits: ShapeCheck | None = None
                        ) -> tuple[InferInput, dict[str, bool]]:
    """Decode an inference request (JSON, or JSON then binary tensors, or tensors in
    `shared_memory`'s regions). Returns it and, per output to return, whether it goes back
    as binary. `limits` checks each input's declared shape before its data is decoded."""
    if header_length is not None:
        if ascii_int(header_length) is None or len(header_length) > 18 or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} {header_length!r} must be an integer no larger than the body "
                             f"({len(body)} bytes)")
        split = int(header_length)
        header, binary = body[:split], memoryview(body)[split:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError) as exc:  # also: nesting too deep, integers too long
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(doc).__name__}")
    _no_unknown_fields(doc, _REQUEST_FIELDS, "request")
    version = _check_url_fields(doc, model, version)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {request_id!r}")
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' must be an object, got {parameters!r}")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise BadRequest(f"parameter 'binary_data_output' must be a boolean, got {binary_default!r}")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of input tensors")
    inputs, offset = {}, 0
    for i, tensor in enumerate(raw_inputs):
        array, used = _parse_input(tensor, i, binary[offset:], shared_memory, limits)
        if tensor["name"] in inputs:
            raise BadRequest(f"input {tensor['name']!r} is given twice")
        offset += used
        inputs[tensor["name"]] = array
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input")

    outputs, binary_outputs, classification, places = None, {}, {}, {}
    if "outputs" in doc:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest(f"'outputs' must be a list, got {type(raw_outputs).__name__}")
        outputs = [] if raw_outputs else None  # none named: all of them, as over gRPC
        for i, out in enumerate(raw_outputs):
            name, as_binary, classes, place = _parse_output(out, i, binary_default, shared_memory)
            if name in binary_outputs:
                raise BadRequest(f"output {name!r} is requested twice")
            outputs.append(name)
            binary_outputs[name] = as_binary
            if classes is not None:
                classification[name] = classes
            if place is not None:
                places[name] = place
    return InferInput(model, version, inputs, request_id, parameters, outputs, classification, places), \
        binary_outputs or {"*": binary_default}


def _check_url_fields(doc: dict, model: str, version: str) -> str:
    """The body's model_name and model_version (sent by clients such as kserve's) must agree
    with the URL; a model_version where the URL names none picks that version. Returns the
    version to serve."""
    name = doc.get("model_name")
    if name is not None:
        if not isinstance(name, str):
            raise BadRequest(f"'model_name' must be a string, got {name!r}")
        if name != model:
            raise BadRequest(f"'model_name' {name!r} in the body contradicts the model {model!r} in the URL")
    body_version = doc.get("model_version")
    if body_version is not None:
        if not isinstance(body_version, str):
            raise BadRequest(f"'model_version' must be a string, got {body_version!r}")
        if body_version and version and body_version != version:
            raise BadRequest(f"'model_version' {body_version!r} in the body contradicts version {version!r} "
                             "in the URL")
        version = version or body_version
    return version


def _parse_input(tensor: object, index: int, binary: memoryview, shared_memory: SystemSharedMemory,
                 limits: ShapeCheck | None = None) -> tuple[np.ndarray, int]:
    if not isinstance(tensor, dict):
        raise BadRequest(f"inputs[{index}] must be an object, got {type(tensor).__name__}")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] needs a 'name' (a non-empty string)")
    where = f"input {name!r}"
    _no_unknown_fields(tensor, _INPUT_FIELDS, where)
    shape = codec.check_shape(tensor.get("shape"), where)
    if limits is not None:
        limits(name, shape, where)
    dtype = codec.dtype_of(tensor.get("datatype"), where)
    params = tensor.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    codec.no_misplaced_params(params, where)
    place = tensor_place(params, where)
    if place is not None:
        if "data" in tensor or "binary_data_size" in params:
            raise BadRequest(f"{where}: is in shared memory, and has 'data' or binary_data_size too")
        return codec.from_raw(shared_memory.read(place, where), shape, dtype, where), 0
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in tensor:
            raise BadRequest(f"{where}: has both 'data' and binary_data_size")
        if size > len(binary):
            raise BadRequest(f"{where}: binary_data_size {size} runs past the end of the body "
                             f"({len(binary)} bytes left)")
        return codec.from_raw(binary[:size], shape, dtype, where), size
    if "data" not in tensor:
        raise BadRequest(f"{where}: needs 'data' (or binary_data_size with the binary extension)")
    return codec.from_json_data(tensor["data"], shape, dtype, where), 0


def _parse_output(out: object, index: int, binary_default: bool,
                  shared_memory: SystemSharedMemory) -> tuple[str, bool, int | None, TensorPlace | None]:
    """(name, whether it goes back as binary, the top classes asked for or None, where in
    shared memory it goes or None)."""
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
        raise BadRequest(f"outputs[{index}] must be an object with a 'name' string")
    where = f"output {out['name']!r}"
    _no_unknown_fields(out, _OUTPUT_FIELDS, where)
    params = out.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    codec.no_misplaced_params(params, where, output=True)
    as_binary = params.get("binary_data", binary_default)
    if not isinstance(as_binary, bool):
        raise BadRequest(f"{where}: binary_data must be a boolean, got {as_binary!r}")
    classes = params.get(classification.PARAMETER)
    return (out["name"], as_binary, None if classes is None else classification.class_count(classes, where),
            shared_memory.output_place(params, where))


def _no_unknown_fields(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown} in {where}; allowed: {sorted(allowed)}")


# ---- response ----

def encode_infer_response(result: InferOutput, binary_outputs: dict[str, bool]) -> Response:
    doc = {"model_name": result.model, "model_version": result.version, "outputs": []}
    if result.request_id:
        doc["id"] = result.request_id
    if result.parameters:
        doc["parameters"] = result.parameters
    blobs = []
    for name, array in result.outputs.items():
        if isinstance(array, InSharedMemory):  # written there: the answer says where
            doc["outputs"].append({"name": name, "datatype": array.datatype, "shape": list(array.shape),
                                   "parameters": array.parameters()})
            continue
        array = np.asarray(array)
        tensor = {"name": name, "datatype": codec.datatype_of(array.dtype), "shape": list(array.shape)}
        if binary_outputs.get(name, binary_outputs.get("*", False)):
            raw = codec.to_raw(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = codec.to_json_data(array)
        doc["outputs"].append(tensor)
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def accepted_coding(accept: str | None) -> str | None:
    """The content coding an Accept-Encoding header asks answers in, of those Triton offers
    (gzip, then deflate), or None for none."""
    if not accept:
        return None
    weights = {}
    for item in accept.split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        weights[name.strip().lower()] = q
    return next((c for c in ("gzip", "deflate") if weights.get(c, 0.0) > 0), None)


def compressed(response: Response, coding: str | None) -> Response:
    """An inference answer in `coding` (as Triton answers a client that asks: tritonclient's
    response_compression_algorithm); the binary header length stays the uncompressed body's."""
    if coding is None:
        return response
    body = (gzip.compress(response.body, compresslevel=1, mtime=0) if coding == "gzip"
            else zlib.compress(response.body, 1))
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
    return Response(body, media_type=response.media_type, headers={**headers, "Content-Encoding": coding})


# ---- transport: admission at the headers, connection limits, slow clients ----

@dataclass
class ConnectionLimits:
    """What GuardedHttpProtocol enforces, and what it counts (read by the metrics)."""

    max_connections: int = 4096
    idle_timeout_s: float = 5.0  # between requests (and before the first)
    read_timeout_s: float = 10.0  # a request's headers, in all; its body, between two reads
    refused: int = 0  # connections over max_connections
    timed_out: int = 0  # requests too slow to arrive (408)
    open: int = 0


def guarded_protocol(core: Core, limits: ConnectionLimits) -> type:
    """GuardedHttpProtocol bound to a core and its limits, for uvicorn.Config(http=...)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"core": core, "limits": limits})


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, guarded (see the module docstring).

    Per connection, what the client owes and by when: "idle" (a next request, within the idle
    timeout), "headers" (from a request's first byte, within the read timeout), "body" (more
    of it, within the read timeout of the last bytes) or nothing while the server works on a
    request. One timer per connection checks it, re-armed only when it fires early, so a
    request's progress costs a float store, not a timer.

    Relies on uvicorn's HttpToolsProtocol callbacks (on_message_begin, on_headers_complete,
    on_body, on_message_complete, on_response_complete, _start_asgi_task, send_400_response)
    and its `cycle` (with `more_body`) and `pipeline`; the tests in tests/server/test_overload.py
    pin the behaviour.
    """

    core: Core
    limits: ConnectionLimits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._owed: str | None = None
        self._deadline = 0.0
        self._timer = None
        self._timer_at = 0.0
        self._began = 0.0
        self._shed = False  # the request being parsed was answered 429 at its headers
        self._running = None  # the cycle of the request being answered
        self._unparsable: str | None = None  # a 400 owed once the requests before it are answered

    # -- connections --

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.limits.open += 1
        if len(self.connections) > self.limits.max_connections:
            self.limits.refused += 1
            self._answer_and_close(503, f"too many open connections: this server's limit is "
                                        f"{self.limits.max_connections} (--max-connections); retry later")
            return
        self._expect("idle", self.limits.idle_timeout_s)

    def connection_lost(self, exc) -> None:
        self.limits.open -= 1
        self._owed = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)
        # uvicorn tells only the last request parsed that the client went away; with requests
        # pipelined the one being answered is an earlier one: it would go on (not cancelled)
        # and write its answer to the closed transport (an error in the log)
        running = self._running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()

    def _start_asgi_task(self, cycle, app) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        if self._unparsable is not None:  # the parser stopped at a bad request: nothing after it is read
            return
        if self._owed == "idle":  # any byte starts a request: its headers are now owed
            self._expect("headers", self.limits.read_timeout_s)
        elif self._owed == "body":  # progress: the body's clock starts again
            self._deadline = self.loop.time() + self.limits.read_timeout_s
        super().data_received(data)

    # -- parser callbacks --

    def on_message_begin(self) -> None:
        self._began = self.core.clock.now()
        if self._owed != "headers":
            self._expect("headers", self.limits.read_timeout_s)
        super().on_message_begin()
        self.scope[RECEIVED] = self._began

    def on_headers_complete(self) -> None:
        self._expect("body", self.limits.read_timeout_s)
        expectation = next((value for name, value in self.headers if name == b"expect"), None)
        if expectation is not None and expectation.lower() != b"100-continue" and not self._busy():
            # an expectation this server cannot meet: RFC 9110 says 417 (a client would wait for a
            # 100 Continue that never comes, until the read timeout)
            self._shed = True  # what follows of the request is skipped
            self._answer_and_close(417, f"Expect: {expectation.decode('latin-1')!r} cannot be met; this server "
                                        "knows only 100-continue")
            return
        if self.core.admission.full() and self._is_infer() and not self._busy():
            self._shed_request()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._shed:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._shed:
            self._shed = False
            self._expect("idle", self.limits.idle_timeout_s)
            return
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete:  # answered before its body was read
            self._expect("idle", self.limits.idle_timeout_s)
        else:
            self._owed = None  # the server's turn

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self._unparsable is not None:  # written now if no other answer is owed before it
            self.send_400_response(self._unparsable)
            return
        if self._owed is None and not pipelined:
            self._expect("idle", self.limits.idle_timeout_s)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser cannot read, written once the requests parsed
        before them are answered: written at once, it overtook their answers and closed the
        connection under them (a valid request pipelined before a malformed one went
        unanswered). A request cut off by the bad bytes (its headers read, its body not) is
        never run."""
        cut = self.cycle if self.cycle is not None and self.cycle.more_body else None
        if cut is not None and cut is not self._running:
            self.pipeline = deque(entry for entry in self.pipeline if entry[0] is not cut)
        running = self._running
        if (running is not None and running is not cut and not running.response_complete) or self.pipeline:
            self._unparsable, self._owed = msg, None
            return
        self._unparsable = None
        super().send_400_response(msg)

    # -- shedding --

    def _is_infer(self) -> bool:
        if self.parser.get_method() != b"POST":
            return False
        url = self.url
        query = url.find(b"?")
        return (url if query < 0 else url[:query]).endswith(b"/infer")

    def _busy(self) -> bool:
        """A response is still owed on this connection: a canned one would overtake it."""
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def _shed_request(self) -> None:
        admission = self.core.admission
        admission.shed += 1
        # A client that waits for 100-continue may never send the body the parser would skip
        keep = self.parser.should_keep_alive() and not self.expect_100_continue
        self._shed = True  # its body, in this read or later ones, is skipped
        self._write(429, admission.refusal(), close=not keep)

    # -- timeouts --

    def _expect(self, owed: str, seconds: float) -> None:
        self._owed = owed
        self._deadline = self.loop.time() + seconds
        if self._timer is None or self._timer_at > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._owed is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._check)
            return
        owed, self._owed = self._owed, None
        if owed == "idle":
            self.transport.close()
            return
        self.limits.timed_out += 1
        seconds = self.limits.read_timeout_s
        if owed == "headers":
            message = f"the request's headers did not arrive within {seconds:g} s (--read-timeout)"
        else:
            message = f"the request's body stalled: no bytes for {seconds:g} s (--read-timeout)"
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # a response is half written: nothing more can be said
        else:
            self._answer_and_close(408, message)

    def _answer_and_close(self, status: int, message: str) -> None:
        self._owed = None
        self._write(status, message, close=True)

    def _write(self, status: int, message: str, close: bool) -> None:
        body = json.dumps({"error": message}).encode()
        reason = {408: b"Request Timeout", 417: b"Expectation Failed", 429: b"Too Many Requests",
                  503: b"Service Unavailable"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n" % (
            status, reason, len(body), b"connection: close\r\n" if close else b"")
        self.transport.write(head + body)
        if close:
            self.transport.close()
