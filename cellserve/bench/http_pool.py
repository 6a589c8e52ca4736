"""A lean HTTP/1.1 client for the load generator: keep-alive connections on asyncio, responses
parsed by httptools (llhttp, the parser uvicorn uses), request bytes built before the clock.

Why not tritonclient's aiohttp client: on this 2-core machine it spent 250-450 us of CPU per
request, which capped the generator near 450 req/s against a server that does nothing and
took that CPU from the server under test. This client only writes prepared bytes and reads a
status and a body.
"""

from __future__ import annotations

import asyncio
import json

import httptools


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.body: list[bytes] = []
        self.open = False
        self.answered = 0  # requests answered on this connection
        self.heard = False  # any byte of the current request's answer

    def connection_made(self, transport) -> None:
        self.transport, self.open = transport, True

    def data_received(self, data: bytes) -> None:
        self.heard = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"unparseable HTTP response: {exc}"))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status, body = self.parser.get_status_code(), b"".join(self.body)
        self.body = []
        self.answered += 1
        if not self.parser.should_keep_alive():
            self.open = False
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc) -> None:
        self._fail(ConnectionError(f"connection closed before the answer ({exc or 'by the server'})"))

    def _fail(self, exc: Exception) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def send(self, data: bytes) -> asyncio.Future:
        self.heard = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class HttpPool:
    """Keep-alive connections to one host:port, opened as concurrency needs them."""

    def __init__(self, address: str) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []
        self.resent = 0  # requests sent again after a reused connection closed under them

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.open:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        self._all.append(conn)
        return conn

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one prepared request; (status, body) of its answer.

        A kept-alive connection the server closes as idle may take a request in the moment
        its close is on the wire: the server never read it. As HTTP clients do, such a request
        (on a reused connection, closed before any byte of an answer) is sent once more on a
        new connection; any other failure is raised."""
        for attempt in (0, 1):
            conn = await self._connection()
            reused = conn.answered > 0
            try:
                answer = await conn.send(data)
            except ConnectionError:
                if attempt == 0 and reused and not conn.heard:
                    self.resent += 1
                    continue
                raise
            except BaseException:
                conn._fail(ConnectionError("request abandoned"))  # a half-read answer poisons the connection
                raise
            if conn.open:
                self._idle.append(conn)
            return answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._all.clear()

    # -- request bytes --

    def get(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode()

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_message(body: bytes) -> str:
    """The `error` of an Open Inference Protocol error body, else the body's start."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
