"""The Open Inference Protocol over gRPC (KServe v2 / Triton `inference.GRPCInferenceService`).

Uses the message and service stubs that ship with tritonclient, on grpc.aio so the handlers
run on the same asyncio loop as the core. Every failure is answered with a status code and
a message: a ServerError with its own code, anything else with INTERNAL (and a log entry),
never with a stack trace. RPCs not implemented here answer UNIMPLEMENTED (the base class).
ModelStreamInfer (Triton's decoupled streaming: tokens as a decoder emits them) is in
streaming_grpc.py.

ModelInfer takes its request as bytes: a request that arrives while the core's admission
bound is full is refused RESOURCE_EXHAUSTED before its message is parsed. Connections are
bounded by gRPC core itself (--max-connections, --idle-timeout, and --read-timeout for the
HTTP/2 handshake), and so are calls waiting for the loop (--grpc-max-pending).
"""

from __future__ import annotations

import functools
import logging
import math

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cellserve.server import classification, codec
from cellserve.server.codec import ShapeCheck, declared_shape_check
from google.protobuf.message import DecodeError

from cellserve.server.core import Admission, Core, InferInput, InferOutput
from cellserve.server.log_settings import LogSettingError
from cellserve.server.shared_memory import InSharedMemory, SystemSharedMemory, tensor_place
from cellserve.server.model_config import model_config_message
from cellserve.server.statistics import statistics_message
from cellserve.server.errors import BadRequest, NotFound, ServerError

log = logging.getLogger(__name__)

# gRPC carries the message in a trailer; a huge one (a megabyte-long model name quoted back)
# would break the trailer itself, so messages are cut to this length.
MAX_MESSAGE_CHARS = 2000
_INT64_MAX = (1 << 63) - 1

# which typed InferTensorContents field carries each datatype (FP16 has none: raw only)
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}
_ALL_CONTENTS_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                        "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")


_SERVICE = "inference.GRPCInferenceService"


async def start_grpc(core: Core, host: str, port: int, max_message_bytes: int, max_connections: int = 4096,
                     idle_timeout_s: float = 5.0, read_timeout_s: float = 10.0,
                     max_pending: int = 128) -> tuple[grpc.aio.Server, int]:
    """Create, bind and start the gRPC server; return it and the port actually bound (port 0
    picks a free one). Raises OSError if the port cannot be bound. `max_pending`: see
    _backlog_options."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC sets SO_REUSEPORT by default, which would let a second server bind a port in
        # use without any error; a port in use must fail the start instead
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", max_connections),
        # a connection with no RPC in flight this long gets GOAWAY (clients reconnect at will)
        ("grpc.max_connection_idle_ms", int(idle_timeout_s * 1000)),
        # a client must finish the HTTP/2 handshake this soon (slowloris, gRPC's way)
        ("grpc.server_handshake_timeout_ms", int(read_timeout_s * 1000)),
        *_backlog_options(max_pending),
    ]
    server = grpc.aio.server(options=options)
    servicer = InferenceServicer(core)
    handlers = _method_handlers(servicer)
    # ModelInfer gets the request's bytes: admission is checked before they are parsed
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInferBytes, request_deserializer=None,
        response_serializer=service_pb2.ModelInferResponse.SerializeToString)
    # and ModelStreamInfer each request's: one that is not a message is answered in the stream
    # (a deserializer's error ended the whole stream, and every request still open in it)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, request_deserializer=None,
        response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind" (older versions returned 0 instead)
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}: the address is in use or not available")
    await server.start()
    return server, bound


def _backlog_options(max_pending: int) -> list[tuple[str, int]]:
    """gRPC core's bound on calls that arrived but that the asyncio loop has not yet taken.

    Why: a call waits there before any of our code runs, so neither the admission bound nor
    the deadline sees it; under overload the backlog grew to gRPC core's default of 3,000 calls,
    seconds of waiting, and the calls taken from it were late or refused at a cost of ~0.25 ms of
    CPU each (docs/performance.md). Bounded, the excess is refused by gRPC core itself, in C,
    before it costs the loop anything. Past half the bound it refuses a growing share of new
    calls (random early detection), past the bound all of them. gRPC core answers those calls
    CANCELLED, with no message: its own status, not settable from Python, and not counted in
    the server's metrics (they never reach it). Half, not a quarter: a quarter (32 of 128)
    refused 1 in 50 of a burst of 50 concurrent calls on an idle server; under 3x overload the
    two gave the same goodput within this machine's noise (docs/performance.md)."""
    return [("grpc.server.max_pending_requests", max(1, max_pending // 2)),
            ("grpc.server.max_pending_requests_hard_limit", max_pending)]


def _method_handlers(servicer) -> dict:
    """The service's method handlers as the generated stub registers them."""

    class Capture:
        handlers: dict = {}

        def add_generic_rpc_handlers(self, generic_handlers) -> None:
            pass

        def add_registered_method_handlers(self, service, handlers) -> None:
            self.handlers = dict(handlers)

    capture = Capture()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    if "ModelInfer" not in capture.handlers:
        raise RuntimeError("tritonclient's generated gRPC stub registered no ModelInfer handler")
    return capture.handlers


def _answers_errors(handler):
    """Turn exceptions from an RPC handler into gRPC status codes with a message.

    A ServerError (a refusal, a bad request) sets the status and returns: gRPC sends it with
    the call's end, as it would send a response. `context.abort` sends the status in a batch
    of its own and then unwinds the handler with an exception, which under overload, where
    most calls are refused, costs the event loop time the engine's answers need."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except ServerError as exc:
            context.set_code(exc.grpc_code)
            context.set_details(_cut(exc.message))
            return None  # discarded: a call ending with an error status sends no message
        except Exception as exc:  # noqa: BLE001 - a bug must answer INTERNAL, not kill the RPC silently
            log.exception("internal error in gRPC %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, _cut(f"internal error: {type(exc).__name__}: {exc}"))

    return wrapper


def _cut(message: str) -> str:
    message = message or "error"  # a status without a message tells the client nothing
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    @_answers_errors
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.core.live())

    @_answers_errors
    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.core.ready())

    @_answers_errors
    async def ModelReady(self, request, context):
        # an unknown model or version is not ready, not an error: Triton answers ready=false,
        # so that `if not client.is_model_ready(m)` works over gRPC as over HTTP (a 404 there)
        try:
            ready = self.core.model_ready(request.name, request.version)
        except NotFound:
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    @_answers_errors
    async def ServerMetadata(self, request, context):
        meta = self.core.server_metadata()
        return service_pb2.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                                  extensions=meta["extensions"])

    @_answers_errors
    async def ModelMetadata(self, request, context):
        meta = self.core.model_metadata(request.name, request.version)

        def tensors(specs):
            return [service_pb2.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"],
                                                                     shape=t["shape"]) for t in specs]

        return service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                                 platform=meta["platform"], inputs=tensors(meta["inputs"]),
                                                 outputs=tensors(meta["outputs"]))

    @_answers_errors
    async def ModelConfig(self, request, context):
        config = model_config_message(self.core.model_config(request.name, request.version))
        return service_pb2.ModelConfigResponse(config=config)

    @_answers_errors
    async def RepositoryIndex(self, request, context):
        index = self.core.repository_index(request.ready)
        return service_pb2.RepositoryIndexResponse(models=[service_pb2.RepositoryIndexResponse.ModelIndex(**m)
                                                           for m in index])

    @_answers_errors
    async def RepositoryModelLoad(self, request, context):
        await self.core.load_model(request.model_name, parameters=dict(request.parameters))
        return service_pb2.RepositoryModelLoadResponse()

    @_answers_errors
    async def RepositoryModelUnload(self, request, context):
        await self.core.load_model(request.model_name, unload=True, parameters=dict(request.parameters))
        return service_pb2.RepositoryModelUnloadResponse()

    @_answers_errors
    async def ModelStatistics(self, request, context):
        return statistics_message(self.core.model_statistics(request.name, request.version))

    @_answers_errors
    async def ModelInfer(self, request, context):
        received = self.core.clock.now()
        client_timeout_s = _client_timeout(context)
        entry = self.core.model(request.model_name, request.model_version)  # NOT_FOUND before decoding anything
        infer_input = self._parse(request, entry, received, client_timeout_s)
        return await self.core.infer(infer_input, received, encode=encode_infer_response)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's decoupled streaming: tokens as a decoder emits them, then each request's
        answer; errors per request in the stream (streaming_grpc.py)."""
        from cellserve.server.streaming_grpc import model_stream_infer  # it imports this module

        await model_stream_infer(self.core, request_iterator, context)

    @_answers_errors
    async def ModelInferBytes(self, data: bytes, context):
        """ModelInfer, registered in its place, from the request's serialized bytes."""
        received = self.core.clock.now()
        client_timeout_s = _client_timeout(context)
        admission = self.core.admission
        ticket = admission.enter()  # RESOURCE_EXHAUSTED before a byte is parsed
        failure = None
        try:
            try:
                request = service_pb2.ModelInferRequest.FromString(data)
            except DecodeError as exc:
                raise BadRequest(f"the request is not a valid ModelInferRequest message: {exc}") from exc
            entry = self.core.model(request.model_name, request.model_version)  # NOT_FOUND before decoding tensors
            tracer = self.core.tracer
            trace = tracer.start(entry.name, entry.version, request.id) if tracer.on else None
            if trace is None:
                infer_input = self._parse(request, entry, received, client_timeout_s)
                return await self.core.infer(infer_input, received, encode=encode_infer_response)
            return await self._traced_infer(request, entry, received, client_timeout_s, trace, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            admission.leave(ticket, Admission.outcome(failure))


    def _parse(self, request, entry, received: float, client_timeout_s: float | None) -> InferInput:
        """The request's InferInput, with the call's own deadline; a bad one is counted as the
        core counts its own 400s, then raised."""
        try:
            infer_input = parse_infer_request(request, self.core.shared_memory, declared_shape_check(entry))
        except ServerError as exc:
            self.core.failed_before_infer(entry, exc, received)
            raise
        infer_input.client_timeout_s = client_timeout_s
        return infer_input

    async def _traced_infer(self, request, entry, received: float, client_timeout_s: float | None, trace, context):
        """ModelInfer of a sampled request: its stamps (docs/tracing.md); the trace is kept
        when gRPC reports the call done (GRPC_SEND_END), failed calls included. gRPC core reads
        the message before any Python runs, so the first stamp is GRPC_WAITREAD_END."""
        tracer = self.core.tracer
        trace.stamp_s("GRPC_WAITREAD_END", received)

        def done(_context) -> None:
            trace.stamp("GRPC_SEND_END")
            tracer.finish(trace)

        context.add_done_callback(done)
        infer_input = self._parse(request, entry, received, client_timeout_s)
        infer_input.trace = trace
        response = await self.core.infer(infer_input, received, encode=encode_infer_response)
        trace.stamp("GRPC_SEND_START")
        return response

    @_answers_errors
    async def TraceSetting(self, request, context):
        """Triton's trace extension: the settings of the server, or of request.model_name
        (a setting sent with no value clears a model's own); INVALID_ARGUMENT names a bad one."""
        from cellserve.server.tracing import TraceSettingError

        model = request.model_name or None
        if model is not None:
            self.core.model(model)  # NOT_FOUND for a model this server does not serve
        changes = {key: (list(value.value) if len(value.value) != 1 else value.value[0]) if value.value else None
                   for key, value in request.settings.items()}
        try:
            settings = self.core.tracer.update(changes, model) if changes else self.core.tracer.get(model)
        except TraceSettingError as exc:
            raise BadRequest(str(exc)) from exc
        response = service_pb2.TraceSettingResponse()
        for key, value in settings.items():
            response.settings[key].value.extend(value if isinstance(value, list) else [value])
        return response

    @_answers_errors
    async def LogSettings(self, request, context):
        """Triton's logging extension: the settings after applying the request's (none: as
        they are); INVALID_ARGUMENT names a bad one (server/log_settings.py)."""
        changes = {}
        for key, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            if kind is None:
                raise BadRequest(f"log setting {key!r} has no value")
            changes[key] = getattr(value, kind)
        try:
            settings = self.core.log.update(changes) if changes else self.core.log.get()
        except LogSettingError as exc:
            raise BadRequest(str(exc)) from exc
        response = service_pb2.LogSettingsResponse()
        for key, value in settings.items():
            if isinstance(value, bool):
                response.settings[key].bool_param = value
            elif isinstance(value, int):
                response.settings[key].uint32_param = value
            else:
                response.settings[key].string_param = value
        return response

    # ---- Triton's shared memory extensions (shared_memory.py) ----

    @_answers_errors
    async def SystemSharedMemoryRegister(self, request, context):
        self.core.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return service_pb2.SystemSharedMemoryRegisterResponse()

    @_answers_errors
    async def SystemSharedMemoryStatus(self, request, context):
        response = service_pb2.SystemSharedMemoryStatusResponse()
        for region in self.core.shared_memory.status(request.name):
            response.regions[region["name"]].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    @_answers_errors
    async def SystemSharedMemoryUnregister(self, request, context):
        self.core.shared_memory.unregister(request.name)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    @_answers_errors
    async def CudaSharedMemoryRegister(self, request, context):
        raise BadRequest("CUDA shared memory is not supported: this server has no GPU memory to share; "
                         "use system shared memory (SystemSharedMemoryRegister)")

    @_answers_errors
    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise NotFound(f"no CUDA shared memory region {request.name!r} is registered")
        return service_pb2.CudaSharedMemoryStatusResponse()

    @_answers_errors
    async def CudaSharedMemoryUnregister(self, request, context):
        if request.name:
            raise NotFound(f"no CUDA shared memory region {request.name!r} is registered")
        return service_pb2.CudaSharedMemoryUnregisterResponse()


# ---- request ----

def parse_infer_request(request: service_pb2.ModelInferRequest, shared_memory: SystemSharedMemory,
                        limits: ShapeCheck | None = None) -> InferInput:
    """Decode a ModelInferRequest into the core's InferInput, or raise BadRequest. Inputs in
    `shared_memory`'s regions are read from there; raw_input_contents holds the others'.
    `limits` checks each input's declared shape before its data is decoded."""
    if not request.inputs:
        raise BadRequest("the request has no inputs")
    places = [tensor_place(_parameters(t.parameters), f"input {t.name!r}") if t.parameters else None
              for t in request.inputs]
    raw = list(request.raw_input_contents)
    if raw:
        sent = sum(place is None for place in places)
        if len(raw) != sent:
            raise BadRequest(f"raw_input_contents has {len(raw)} entries for {sent} inputs not in shared memory; "
                             "send one per input, in order")
        typed = [t.name for t in request.inputs if _has_contents(t)]
        if typed:
            raise BadRequest(f"input(s) {typed} have typed contents while raw_input_contents is used; "
                             "send all inputs one way")
    inputs = {}
    for i, (tensor, place) in enumerate(zip(request.inputs, places)):
        if not tensor.name:
            raise BadRequest(f"inputs[{i}] needs a name")
        where = f"input {tensor.name!r}"
        if tensor.name in inputs:
            raise BadRequest(f"{where} is given twice")
        codec.no_misplaced_params(tensor.parameters, where)
        dtype = codec.dtype_of(tensor.datatype, where)
        shape = codec.check_shape(list(tensor.shape), where)
        if limits is not None:
            limits(tensor.name, shape, where)
        if place is not None:
            if _has_contents(tensor):
                raise BadRequest(f"{where}: is in shared memory, and has contents too")
            inputs[tensor.name] = codec.from_raw(shared_memory.read(place, where), shape, dtype, where)
        elif raw:
            inputs[tensor.name] = codec.from_raw(raw.pop(0), shape, dtype, where)
        else:
            inputs[tensor.name] = _from_contents(tensor, shape, dtype, where)

    outputs, classes, output_places = None, {}, {}
    if request.outputs:
        outputs = []
        for i, out in enumerate(request.outputs):
            if not out.name:
                raise BadRequest(f"outputs[{i}] needs a name")
            where = f"output {out.name!r}"
            if out.name in outputs:
                raise BadRequest(f"{where} is requested twice")
            codec.no_misplaced_params(out.parameters, where, output=True)
            outputs.append(out.name)
            if not out.parameters:
                continue
            params = _parameters(out.parameters)
            if classification.PARAMETER in params:
                classes[out.name] = classification.class_count(params[classification.PARAMETER], where)
            place = shared_memory.output_place(params, where)
            if place is not None:
                output_places[out.name] = place
    return InferInput(request.model_name, request.model_version, inputs, request.id,
                      _parameters(request.parameters), outputs, classes, output_places)


def _has_contents(tensor) -> bool:
    return any(len(getattr(tensor.contents, f)) for f in _ALL_CONTENTS_FIELDS)


def _from_contents(tensor, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """A tensor from the typed InferTensorContents field its datatype uses."""
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise BadRequest(f"{where}: {tensor.datatype} data can only be sent in raw_input_contents")
    wrong = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(tensor.contents, f))]
    if wrong:
        raise BadRequest(f"{where}: {tensor.datatype} data goes in contents.{field}, got {', '.join(wrong)}")
    values = getattr(tensor.contents, field)
    if not values:
        raise BadRequest(f"{where}: no data (use raw_input_contents or contents.{field})")
    expected = math.prod(shape)
    if len(values) != expected:
        raise BadRequest(f"{where}: shape {list(shape)} needs {expected} values, got {len(values)}")
    if dtype.kind in "iu":  # int_contents and uint_contents are 32-bit: INT8/16 and UINT8/16 must fit
        array = np.array(values, np.int64 if dtype.kind == "i" else np.uint64)
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(f"{where}: a value does not fit {tensor.datatype}")
        return array.astype(dtype).reshape(shape)
    return np.array(values, dtype).reshape(shape)


def _parameters(parameters) -> dict:
    """The request's InferParameter map as {name: python value}, which the core checks."""
    out = {}
    for name, param in parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise BadRequest(f"parameter {name!r} has no value")
        out[name] = getattr(param, kind)
    return out


# ---- response ----

def encode_infer_response(result: InferOutput) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=result.model, model_version=result.version,
                                              id=result.request_id)
    for name, array in result.outputs.items():
        if isinstance(array, InSharedMemory):  # written there: the answer says where
            tensor = response.outputs.add(name=name, datatype=array.datatype, shape=list(array.shape))
            for key, value in array.parameters().items():
                _set_parameter(tensor.parameters[key], value)
            # tritonclient finds an output's raw contents by its position among the outputs
            response.raw_output_contents.append(b"")
            continue
        array = np.asarray(array)
        response.outputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(codec.to_raw(array))  # tritonclient reads raw contents
    for name, value in result.parameters.items():
        _set_parameter(response.parameters[name], value)
    return response


def _set_parameter(param, value) -> None:
    if isinstance(value, bool):  # before int: bool is an int in Python
        param.bool_param = value
    elif isinstance(value, int):
        if value > _INT64_MAX:  # a uint64 sequence id
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _client_timeout(context) -> float | None:
    """The seconds left of the call's own deadline (a tritonclient `client_timeout`), or None
    when the client set none: the request's deadline when shorter than its timeout parameter."""
    remaining = context.time_remaining()
    # a deadline already past still needs a positive timeout (the engine refuses 0): the call ends now anyway
    return None if remaining is None or remaining > 1e8 else max(remaining, 1e-6)
