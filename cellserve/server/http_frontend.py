"""The Open Inference Protocol over HTTP/REST (KServe v2), with Triton's binary tensor extension.

Every error is answered as `{"error": "..."}` with the status of its ServerError class; the
request body is read with a size limit before anything is parsed.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cellserve.server import codec
from cellserve.server.core import Core, InferInput, InferOutput
from cellserve.server.errors import BadRequest, ServerError, TooLarge

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
_REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
_INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_FIELDS = {"name", "parameters"}
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


def build_app(core: Core, max_request_bytes: int):
    """The HTTP frontend, an ASGI app."""
    async def live(request: Request) -> Response:
        return Response(status_code=200 if core.live() else 503)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if core.ready() else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(core.server_metadata())

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(core.model_metadata(p["model"], p.get("version", "")))

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        return Response(status_code=200 if core.model_ready(p["model"], p.get("version", "")) else 503)

    async def openapi_document(request: Request) -> Response:
        document = resources.files("cellserve.server").joinpath("openapi.json").read_bytes()
        return Response(document, media_type="application/json")

    infer = InferEndpoint(core, max_request_bytes)
    # POST inference never reaches these two routes (fast_path takes it first); they answer
    # other methods on the same paths with 405, as any route does
    routes = [
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/versions/{version}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready),
        Route("/openapi.json", openapi_document),
    ]
    handlers = {ServerError: _server_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)

    async def fast_path(scope, receive, send) -> None:
        """Inference requests skip Starlette's middleware and routing: a third of the
        frontend's Python time per request here, time it would hold the GIL the engine
        thread needs between its kernel calls."""
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["path_params"] = {"model": match[1], "version": match[2] or ""}
                await infer(scope, receive, send)
                return
        await app(scope, receive, send)

    return fast_path


class InferEndpoint:
    """POST /v2/models/{model}[/versions/{version}]/infer as a bare ASGI app, errors included
    (answered as the Starlette app's handlers answer them)."""

    def __init__(self, core: Core, max_request_bytes: int):
        self.core, self.max_request_bytes = core, max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        try:
            response = await self._infer(scope, receive)
        except ClientDisconnect:
            return  # no one to answer
        except ServerError as exc:
            response = _server_error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a 500 that says what failed
            response = _internal_error_response(exc, "POST", scope["path"])
        await response(scope, receive, send)

    async def _infer(self, scope, receive) -> Response:
        model, version = scope["path_params"]["model"], scope["path_params"].get("version", "")
        self.core.model(model, version)  # 404 before reading a body for nobody
        headers = {}
        for key, value in scope["headers"]:  # the first of repeated headers counts, as in Starlette
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        body = await _read_body(headers, receive, self.max_request_bytes)
        infer_input, binary_outputs = parse_infer_request(body, headers.get(HEADER_LENGTH.lower()), model, version)
        result = await self.core.infer(infer_input)
        return encode_infer_response(result, binary_outputs)


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
    if declared is not None and declared.isdigit() and int(declared) > limit:
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
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BadRequest(f"request body is not valid {encoding} data: {exc}") from exc
        if len(body) > limit or inflater.unconsumed_tail:
            raise TooLarge(f"decompressed request body is over the limit of {limit} bytes")
    elif encoding != "identity":
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    return body


def parse_infer_request(body: bytes, header_length: str | None, model: str,
                        version: str) -> tuple[InferInput, dict[str, bool]]:
    """Decode an inference request (JSON, or JSON then binary tensors). Returns it and, per
    output to return, whether it goes back as binary."""
    if header_length is not None:
        if not header_length.isdigit() or len(header_length) > 18 or int(header_length) > len(body):
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
        array, used = _parse_input(tensor, i, binary[offset:])
        if tensor["name"] in inputs:
            raise BadRequest(f"input {tensor['name']!r} is given twice")
        offset += used
        inputs[tensor["name"]] = array
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input")

    outputs, binary_outputs = None, {}
    if "outputs" in doc:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest(f"'outputs' must be a list, got {type(raw_outputs).__name__}")
        outputs = []
        for i, out in enumerate(raw_outputs):
            name, as_binary = _parse_output(out, i, binary_default)
            if name in binary_outputs:
                raise BadRequest(f"output {name!r} is requested twice")
            outputs.append(name)
            binary_outputs[name] = as_binary
    return InferInput(model, version, inputs, request_id, parameters, outputs), \
        binary_outputs or {"*": binary_default}


def _parse_input(tensor: object, index: int, binary: memoryview) -> tuple[np.ndarray, int]:
    if not isinstance(tensor, dict):
        raise BadRequest(f"inputs[{index}] must be an object, got {type(tensor).__name__}")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] needs a 'name' (a non-empty string)")
    where = f"input {name!r}"
    _no_unknown_fields(tensor, _INPUT_FIELDS, where)
    shape = codec.check_shape(tensor.get("shape"), where)
    dtype = codec.dtype_of(tensor.get("datatype"), where)
    params = tensor.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
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


def _parse_output(out: object, index: int, binary_default: bool) -> tuple[str, bool]:
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
        raise BadRequest(f"outputs[{index}] must be an object with a 'name' string")
    _no_unknown_fields(out, _OUTPUT_FIELDS, f"output {out['name']!r}")
    params = out.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"output {out['name']!r}: 'parameters' must be an object")
    as_binary = params.get("binary_data", binary_default)
    if not isinstance(as_binary, bool):
        raise BadRequest(f"output {out['name']!r}: binary_data must be a boolean, got {as_binary!r}")
    return out["name"], as_binary


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
