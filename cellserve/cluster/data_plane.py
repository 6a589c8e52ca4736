"""The direct data plane of `serve --ray`: requests to engine workers over a socket each, not Ray.

Ray places the workers and runs their lifecycle (placement groups, load/unload, snapshots,
death detection); the requests themselves go over one persistent stream per worker (TCP to
the worker's node, or a Linux abstract Unix socket when the worker shares the driver's node),
many in flight at once, answers matched by request id. This module is the wire: frames, the
driver's `Connection` and the worker's `DataPlaneServer`. It imports neither Ray nor torch.

A frame (either way) is a 12-byte prefix, `!IQ`: the header's length H, the payload's length
P; then H bytes of a JSON object (the header); then P bytes of payload: the arrays' raw bytes
in the order the header's "arrays" lists them ([name, numpy dtype string, shape]), each
padded to a multiple of 16 bytes (so that every array starts aligned). Three kinds:
- hello (driver -> worker, first frame): {"hello": TOKEN}. The worker hands the token out
  through its Ray actor method only: a stranger reaching the port is closed at once.
- call (driver -> worker): {"id", "model", "timeout_s", "priority", "state_key", "save_key",
  "drop", "beam_width", "return_beams", "arrays"} - ray_worker.Call's fields.
- reply (worker -> driver): {"id", "status", "reason", "queue_s", "compute_s", "engine_s",
  "arrays"} - ray_worker.Reply's fields.

Contracts:
- Nothing from the network is unpickled: arrays are built with np.frombuffer from the dtype,
  shape and bytes (numeric and bool dtypes only; a frame naming another is refused).
- A frame that breaks the format (lengths over the bounds, a header that is not the JSON
  object of its kind, sizes that do not add up, a stream cut mid-frame) raises FrameError
  (or asyncio.IncompleteReadError for a cut stream); the worker then closes that connection
  with one log line and carries on serving the others.
- Driver side, a connection that breaks (EOF, reset, a bad frame from the worker) fails every
  call pending on it, and every later call, with ConnectionLost: the worker is taken for dead
  (the caller turns it into WorkerDied: retry once, sticky sequences lost, re-planning).
- Every call sent on a live connection gets exactly one reply (the worker's engine answers
  every request once); a reply whose id is not pending (its caller gave up) is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import struct

import numpy as np

from cellserve.cluster.ray_worker import Call, Reply

log = logging.getLogger(__name__)

PREFIX = struct.Struct("!IQ")  # header length, payload length
ALIGN = 16  # each array's bytes start at a multiple of this within the payload
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 32  # 4 GiB: far above --max-request-size; a length beyond it is garbage
CONNECT_TIMEOUT_S = 10.0
_KINDS = "biuf"  # bool, signed, unsigned, float: what the models take and give


class FrameError(ValueError):
    """A frame that breaks the format; the text names what was wrong."""


class ConnectionLost(Exception):
    """The connection to a worker broke (the worker is taken for dead); the text says how."""


# ---- frames ----

def encode(header: dict, arrays: dict) -> list:
    """The buffers of one frame (write them in order). FrameError for an array that cannot
    travel (a dtype other than bool/int/uint/float), before anything is written."""
    specs, buffers, size = [], [], 0
    for name, value in arrays.items():
        a = np.asarray(value)  # not ascontiguousarray: that makes a 0-d array 1-d
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        if a.dtype.kind not in _KINDS:
            raise FrameError(f"array {name!r} has dtype {a.dtype}: only bool, integer and float arrays travel")
        specs.append([name, a.dtype.str, list(a.shape)])
        raw = a.reshape(-1).view(np.uint8)
        buffers.append(memoryview(raw))
        pad = -raw.size % ALIGN
        if pad:
            buffers.append(bytes(pad))
        size += raw.size + pad
    text = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode()
    return [PREFIX.pack(len(text), size), text, *buffers]


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, dict] | None:
    """(header, arrays) of the next frame; None at a clean end of stream (between frames).
    Raises FrameError, or asyncio.IncompleteReadError for a stream cut mid-frame."""
    try:
        prefix = await reader.readexactly(PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    h, p = PREFIX.unpack(prefix)
    if not 2 <= h <= MAX_HEADER_BYTES:
        raise FrameError(f"header length {h} is outside [2, {MAX_HEADER_BYTES}]")
    if p > MAX_PAYLOAD_BYTES:
        raise FrameError(f"payload length {p} is over {MAX_PAYLOAD_BYTES}")
    try:
        header = json.loads(await reader.readexactly(h))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError(f"header must be a JSON object, got {type(header).__name__}")
    payload = bytearray(await reader.readexactly(p)) if p else bytearray()  # writable arrays
    return header, _arrays(header.get("arrays", []), payload)


def _arrays(specs, payload: bytearray) -> dict:
    if not isinstance(specs, list):
        raise FrameError(f"header field 'arrays' must be a list, got {type(specs).__name__}")
    out, offset = {}, 0
    for i, spec in enumerate(specs):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)
                and isinstance(spec[2], list) and all(type(d) is int and d >= 0 for d in spec[2])):
            raise FrameError(f"arrays[{i}] must be [name, dtype, [dims >= 0]], got {spec!r:.200}")
        name, dtype_text, shape = spec
        try:
            dtype = np.dtype(dtype_text)
        except TypeError:
            raise FrameError(f"arrays[{i}] ({name!r}): dtype {dtype_text!r} is not a numpy dtype") from None
        if dtype.kind not in _KINDS or dtype.hasobject:
            raise FrameError(f"arrays[{i}] ({name!r}): dtype {dtype_text!r} is not bool, integer or float")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(payload):
            raise FrameError(f"arrays[{i}] ({name!r}): {shape} of {dtype_text} needs {nbytes} bytes at offset "
                             f"{offset}; the payload has {len(payload)}")
        out[name] = np.frombuffer(payload, dtype, count, offset).reshape(shape)
        offset += nbytes + (-nbytes % ALIGN)
    if offset != len(payload):
        raise FrameError(f"the arrays take {offset} bytes; the payload has {len(payload)}")
    return out


def _field(header: dict, key: str, kinds: tuple, kind_name: str):
    if key not in header:
        raise FrameError(f"header field {key!r} is missing")
    value = header[key]
    if type(value) not in kinds:  # type(), not isinstance: True is no int here
        raise FrameError(f"header field {key!r} must be {kind_name}, got {value!r:.100}")
    return value


_INT, _NUM, _OPT_NUM = (int,), (int, float), (int, float, type(None))


def call_frame(request_id: int, call: Call) -> list:
    return encode({"id": request_id, "model": call.engine_model, "timeout_s": call.timeout_s,
                   "priority": call.priority, "state_key": call.state_key, "save_key": call.save_key,
                   "drop": list(call.drop),
                   "beam_width": call.beam_width, "return_beams": call.return_beams}, call.inputs)


def call_from(header: dict, arrays: dict) -> tuple[int, Call]:
    return _field(header, "id", _INT, "an integer"), Call(
        _field(header, "model", (str,), "a string"), arrays,
        _field(header, "timeout_s", _OPT_NUM, "a number or null"),
        _field(header, "priority", _INT, "an integer"),
        state_key=_field(header, "state_key", (str, type(None)), "a string or null"),
        save_key=_field(header, "save_key", (str, type(None)), "a string or null"),
        drop=_keys(header, "drop"),
        beam_width=_field(header, "beam_width", (int, type(None)), "an integer or null"),
        return_beams=_field(header, "return_beams", (bool,), "a boolean"))


def _keys(header: dict, name: str) -> list[str]:
    value = _field(header, name, (list,), "a list of strings")
    if not all(isinstance(key, str) for key in value):
        raise FrameError(f"header field {name!r} must be a list of strings, got {value!r:.100}")
    return value


def reply_frame(request_id: int, reply: Reply) -> list:
    return encode({"id": request_id, "status": reply.status, "reason": reply.reason, "queue_s": reply.queue_s,
                   "compute_s": reply.compute_s, "engine_s": reply.engine_s}, reply.outputs)


def reply_from(header: dict, arrays: dict) -> tuple[int, Reply]:
    return _field(header, "id", _INT, "an integer"), Reply(
        _field(header, "status", (str,), "a string"), _field(header, "reason", (str,), "a string"), arrays,
        _field(header, "queue_s", _OPT_NUM, "a number or null"),
        _field(header, "compute_s", _OPT_NUM, "a number or null"),
        _field(header, "engine_s", _NUM, "a number"))


# ---- the driver's end: one connection per worker ----

class Connection:
    """The driver's stream to one worker; `call` may be awaited by many at once (one loop).

    Opens on the first call (or `open()`), says hello with the worker's token, then a reader
    task matches replies to pending calls by id. `lose(why)` (the stream broke, or Ray found
    the worker dead) fails everything pending and everything after with ConnectionLost."""

    def __init__(self, address: dict, name: str):
        self.address, self.name = address, name  # {"unix": path} or {"host", "port"}; plus "token"
        self._writer: asyncio.StreamWriter | None = None
        self._opening: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self.lost: str | None = None  # why, once lost

    def where(self) -> str:
        a = self.address
        return "a unix socket" if "unix" in a else f"{a['host']}:{a['port']}"

    async def open(self) -> None:
        if self._writer is not None or self.lost is not None:
            return
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        a = self.address
        try:
            if "unix" in a:  # connected here: uvloop's open_unix_connection refuses abstract names
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(a["unix"])  # a local listener: at once
                except OSError:
                    sock.close()
                    raise
                sock.setblocking(False)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            else:  # bounded: an unreachable host would otherwise take the kernel's SYN retries (minutes)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(a["host"], a["port"]),
                                                        CONNECT_TIMEOUT_S)
            writer.writelines(encode({"hello": a["token"]}, {}))
        except (OSError, asyncio.TimeoutError) as exc:
            self.lose(f"cannot connect to {self.name} at {self.where()}: {exc or type(exc).__name__}")
            raise ConnectionLost(self.lost) from None
        self._writer = writer
        asyncio.ensure_future(self._read(reader))

    async def call(self, call: Call) -> Reply:
        """Send one call; its Reply. FrameError (nothing sent) for inputs that cannot travel;
        ConnectionLost once the connection is lost (before or while waiting)."""
        if self._writer is None:
            await self.open()
        if self.lost is not None:
            raise ConnectionLost(self.lost)
        self._next += 1
        request_id = self._next
        frame = call_frame(request_id, call)  # FrameError before anything is pending
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.writelines(frame)
            if self._writer.transport.get_write_buffer_size() > 1 << 20:
                await self._writer.drain()  # a slow reader: wait, rather than buffer without bound
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "closed the connection"
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    break
                request_id, reply = reply_from(*frame)
                future = self._pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (FrameError, asyncio.IncompleteReadError) as exc:
            why = f"sent a bad frame ({exc})"
        except OSError as exc:
            why = f"connection failed ({exc})"
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave calls waiting forever
            log.exception("%s: data plane: reading replies failed", self.name)
            why = f"reading replies failed ({type(exc).__name__}: {exc})"
        self.lose(f"{self.name} {why} at {self.where()}")

    def lose(self, why: str) -> None:
        """Take the worker for dead: fail what is pending (and all later calls) with why."""
        if self.lost is None:
            self.lost = why
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(self.lost))
        if self._writer is not None:
            self._writer.close()


# ---- the worker's end ----

class DataPlaneServer:
    """Takes calls on a socket and hands each to `submit(call, deliver)`, which must call
    `deliver(reply)` exactly once, on this loop's thread (ray_worker.EngineWorker._begin)."""

    def __init__(self, submit, token: str, name: str):
        self._submit, self._token, self.name = submit, token, name
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str | None = None, unix: str | None = None) -> dict:
        """Listen on a Unix socket path (a Linux abstract one when it starts with NUL) or on
        host, port 0; the address for Connection (with the token)."""
        if unix is not None:  # bound here, for the same reason as Connection's connect
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(unix)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
            return {"unix": unix, "token": self._token}
        self._server = await asyncio.start_server(self._serve, host)
        port = self._server.sockets[0].getsockname()[1]
        return {"host": host, "port": port, "token": self._token}

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or "a unix peer"
        try:
            hello = await read_frame(reader)
            if hello is None or hello[0].get("hello") != self._token:
                raise FrameError("the first frame is not a hello with this worker's token")
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    return
                request_id, call = call_from(*frame)
                self._submit(call, lambda reply, i=request_id: _send_reply(writer, i, reply))
        except (FrameError, asyncio.IncompleteReadError) as exc:
            log.warning("%s: data plane: closing the connection from %s: %s", self.name, peer, exc)
        except OSError as exc:
            log.warning("%s: data plane: the connection from %s failed: %s", self.name, peer, exc)
        except Exception:  # noqa: BLE001 - this connection ends; the worker and its others carry on
            log.exception("%s: data plane: closing the connection from %s", self.name, peer)
        finally:
            writer.close()


def _send_reply(writer: asyncio.StreamWriter, request_id: int, reply: Reply) -> None:
    if writer.transport.is_closing():
        return  # the driver went away: nobody waits for it
    try:
        frame = reply_frame(request_id, reply)
    except FrameError as exc:  # an output that cannot travel: still one answer
        frame = reply_frame(request_id, Reply("error", f"the answer cannot be sent back: {exc}"))
    writer.writelines(frame)
