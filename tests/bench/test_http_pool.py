"""The load generator's HTTP client (bench/http_pool.py): a request caught by the server closing
an idle kept-alive connection is sent again, once, on a new one; other failures are raised."""

from __future__ import annotations

import asyncio

import pytest

from cellserve.bench.http_pool import HttpPool

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def serve(answers_per_connection: int):
    """A server that answers `answers_per_connection` requests on each connection, then closes
    it on the next one without answering (as a server closing an idle connection does when a
    request is already on the wire). Returns (server, port, requests seen)."""
    seen = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(answers_per_connection):
            if not await reader.readuntil(b"\r\n\r\n"):
                break
            seen.append(1)
            writer.write(ANSWER)
            await writer.drain()
        try:
            await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def test_a_request_on_a_reused_connection_closed_under_it_is_sent_again_once():
    async def main():
        server, port, seen = await serve(answers_per_connection=1)
        pool = HttpPool(f"127.0.0.1:{port}")
        request = pool.get("/v2/health/ready")
        try:
            assert await pool.request(request) == (200, b"ok")  # opens a connection, keeps it alive
            assert await pool.request(request) == (200, b"ok")  # that one closes: sent again on a new one
        finally:
            pool.close()
            server.close()
        return pool.resent, len(seen)

    resent, answered = asyncio.run(main())
    assert resent == 1 and answered == 2


def test_a_new_connection_closed_before_its_answer_is_an_error():
    async def main():
        server, port, _ = await serve(answers_per_connection=0)
        pool = HttpPool(f"127.0.0.1:{port}")
        try:
            with pytest.raises(ConnectionError, match="connection closed before the answer"):
                await pool.request(pool.get("/v2/health/ready"))
        finally:
            pool.close()
            server.close()
        return pool.resent

    assert asyncio.run(main()) == 0
