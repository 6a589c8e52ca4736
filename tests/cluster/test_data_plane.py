"""The direct data plane's wire (cluster/data_plane.py), without Ray: frames round-trip arrays
of every dtype the models use, many calls in flight on one connection are answered by id in
any order, bad frames close only their own connection, and a broken connection fails its
pending calls as ConnectionLost."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellserve.cluster.data_plane import (
    PREFIX, Connection, ConnectionLost, DataPlaneServer, FrameError, call_frame, call_from, encode, read_frame,
    reply_frame, reply_from,
)
from cellserve.cluster.ray_worker import Call, Reply


def feed(buffers: list, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(bytes(b) for b in buffers))
    if eof:
        reader.feed_eof()
    return reader


def roundtrip(header: dict, arrays: dict):
    async def go():
        return await read_frame(feed(encode(header, arrays)))
    return asyncio.run(go())


DTYPES = [np.bool_, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64]


def test_arrays_of_several_dtypes_and_shapes_round_trip_exactly_and_writable():
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": (rng.random(shape) * 100).astype(dt)
              for i, (dt, shape) in enumerate(zip(DTYPES, [(3,), (1, 25), (2, 3, 5), (), (0,), (7, 1), (4, 0, 2),
                                                           (1,), (3, 3)]))}
    arrays["big-endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
    arrays["strided"] = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]  # not contiguous: sent compact
    header, got = roundtrip({"k": "v"}, arrays)
    assert header["k"] == "v" and list(got) == list(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        assert np.array_equal(got[name], a), name
        assert got[name].flags.writeable
        assert got[name].ctypes.data % 16 == 0 or got[name].size == 0  # each array aligned in its payload


@settings(max_examples=60, deadline=None)
@given(st.lists(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)),
                max_size=4))
def test_any_numeric_arrays_round_trip(arrays):
    sent = {f"x{i}": a for i, a in enumerate(arrays)}
    _, got = roundtrip({}, sent)
    for name, a in sent.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        assert np.array_equal(got[name], a, equal_nan=a.dtype.kind == "f")


def test_a_call_and_a_reply_keep_every_field():
    call = Call("lstm-512:1", {"tokens": np.arange(25, dtype=np.int64)[None]}, 0.125, 2, state_key="lstm-512:1/7/8",
                save_key="lstm-512:1/7/9", drop=["lstm-512:1/7/6", "lstm-512:1/7/5"], beam_width=4, return_beams=True)

    async def go():
        return call_from(*await read_frame(feed(call_frame(9, call))))
    rid, got = asyncio.run(go())
    assert rid == 9 and np.array_equal(got.inputs["tokens"], call.inputs["tokens"])
    assert (got.engine_model, got.timeout_s, got.priority, got.state_key, got.save_key, got.drop, got.beam_width,
            got.return_beams) == ("lstm-512:1", 0.125, 2, "lstm-512:1/7/8", "lstm-512:1/7/9",
                                  ["lstm-512:1/7/6", "lstm-512:1/7/5"], 4, True)
    reply = Reply("ok", "", {"probabilities": np.ones((1, 8), np.float32)}, None, 0.002, 0.0031)

    async def back():
        return reply_from(*await read_frame(feed(reply_frame(3, reply))))
    rid, got = asyncio.run(back())
    assert rid == 3 and (got.status, got.reason, got.queue_s, got.compute_s, got.engine_s) == ("ok", "", None, 0.002,
                                                                                                 0.0031)
    assert np.array_equal(got.outputs["probabilities"], reply.outputs["probabilities"])


def raw(header, payload: bytes = b"") -> list:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return [PREFIX.pack(len(text), len(payload)), text, payload]


@pytest.mark.parametrize("frame, says", [
    ([PREFIX.pack(1 << 21, 0)], "header length 2097152 is outside"),
    ([PREFIX.pack(10, 1 << 40)], "payload length 1099511627776 is over"),
    (raw(b"{nope"), "header is not JSON"),
    (raw([1, 2]), "header must be a JSON object, got list"),
    (raw({"arrays": [["x", "<i8", [2]]]}, b"\0" * 8), "'x'): [2] of <i8 needs 16 bytes at offset 0; the payload has 8"),
    (raw({"arrays": [["x", "<i8", [1]]]}, b"\0" * 32), "the arrays take 16 bytes; the payload has 32"),
    (raw({"arrays": [["x", "|O", [1]]]}, b"\0" * 16), "dtype '|O' is not bool, integer or float"),
    (raw({"arrays": [["x", "not-a-dtype", [1]]]}, b"\0" * 16), "dtype 'not-a-dtype' is not a numpy dtype"),
    (raw({"arrays": [["x", "<i8", [-1]]]}), "arrays[0] must be [name, dtype, [dims >= 0]]"),
    (raw({"arrays": {"x": 1}}), "header field 'arrays' must be a list, got dict"),
])
def test_a_bad_frame_is_refused_naming_what_is_wrong(frame, says):
    async def go():
        return await read_frame(feed(frame))
    with pytest.raises(FrameError) as err:
        asyncio.run(go())
    assert says in str(err.value)


def test_a_call_header_with_a_bad_field_is_refused_naming_it():
    with pytest.raises(FrameError, match="header field 'priority' must be an integer, got '1'"):
        call_from({"id": 1, "model": "m", "timeout_s": None, "priority": "1", "state_key": None, "save_key": None,
                   "drop": [], "beam_width": None, "return_beams": False}, {})
    with pytest.raises(FrameError, match="header field 'drop' must be a list of strings, got \\['a', 3\\]"):
        call_from({"id": 1, "model": "m", "timeout_s": None, "priority": 1, "state_key": None, "save_key": None,
                   "drop": ["a", 3], "beam_width": None, "return_beams": False}, {})
    with pytest.raises(FrameError, match="header field 'model' is missing"):
        call_from({"id": 1}, {})
    with pytest.raises(FrameError, match="only bool, integer and float arrays travel"):
        encode({}, {"s": np.array(["text"], dtype=object)})


def test_a_stream_cut_mid_frame_is_an_incomplete_read_and_a_clean_end_is_none():
    whole = b"".join(bytes(b) for b in encode({"id": 1}, {"x": np.arange(10)}))

    async def go(data):
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return await read_frame(r)
    assert asyncio.run(go(b"")) is None
    for cut in (5, PREFIX.size + 3, len(whole) - 1):
        with pytest.raises(asyncio.IncompleteReadError):
            asyncio.run(go(whole[:cut]))


# ---- a server and a connection over real sockets ----

class Echo:
    """A worker's submit: answers each call later (a random delay), out of order."""

    def __init__(self):
        self.seen = 0

    def __call__(self, call: Call, deliver) -> None:
        self.seen += 1
        out = {k: v * 2 for k, v in call.inputs.items()}
        reply = Reply("ok", call.engine_model, out, 0.0, 0.0, call.priority / 1000)
        asyncio.get_running_loop().call_later(random.random() * 0.01, deliver, reply)


async def serving(unix: bool):
    token = secrets.token_hex(8)
    server = DataPlaneServer(Echo(), token, "worker w0")
    if unix:
        address = await server.start(unix=f"\0cellserve-test-{token}")
    else:
        address = await server.start(host="127.0.0.1")
    return server, address


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
def test_many_calls_in_flight_on_one_connection_each_get_their_own_answer(unix):
    async def go():
        server, address = await serving(unix)
        conn = Connection(address, "worker w0")
        rng = np.random.default_rng(1)
        calls = [Call(f"m{i}", {"x": rng.integers(0, 100, (1, int(rng.integers(1, 30)))),
                                "f": rng.random((2, 3)).astype(np.float32)}, None, i) for i in range(300)]
        replies = await asyncio.gather(*(conn.call(c) for c in calls))
        for c, r in zip(calls, replies):
            assert r.reason == c.engine_model and r.engine_s == c.priority / 1000
            assert np.array_equal(r.outputs["x"], c.inputs["x"] * 2)
            assert np.array_equal(r.outputs["f"], c.inputs["f"] * 2)
        assert conn.lost is None and not conn._pending
        conn.lose("done")
        server.close()
    asyncio.run(go())


def test_a_truncated_or_stranger_frame_closes_only_that_connection(caplog):
    async def go():
        server, address = await serving(unix=False)
        good = Connection(address, "worker w0")
        assert (await good.call(Call("m", {"x": np.arange(3)}, None, 0))).reason == "m"
        # a stranger without the token: closed at once
        reader, writer = await asyncio.open_connection("127.0.0.1", address["port"])
        writer.writelines(encode({"hello": "wrong"}, {}))
        assert await reader.read() == b""
        # the right hello, then a frame cut short and the stream closed
        reader, writer = await asyncio.open_connection("127.0.0.1", address["port"])
        writer.writelines(encode({"hello": address["token"]}, {}))
        frame = b"".join(bytes(b) for b in call_frame(1, Call("m", {"x": np.arange(100)}, None, 0)))
        writer.write(frame[:-30])
        writer.write_eof()
        assert await reader.read() == b""
        # a frame with a bad length: closed, no answer
        reader, writer = await asyncio.open_connection("127.0.0.1", address["port"])
        writer.writelines(encode({"hello": address["token"]}, {}))
        writer.write(PREFIX.pack(1 << 30, 0))
        assert await reader.read() == b""
        # the good connection is untouched
        assert (await good.call(Call("n", {"x": np.arange(3)}, None, 0))).reason == "n"
        good.lose("done")
        server.close()
    with caplog.at_level(logging.WARNING, logger="cellserve.cluster.data_plane"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records]
    assert any("not a hello with this worker's token" in m for m in lines)
    assert any("closing the connection" in m and "bytes read on a total of" in m for m in lines)
    assert any("header length 1073741824 is outside" in m for m in lines)


def test_a_connection_that_breaks_fails_its_pending_calls_and_every_later_one():
    async def go():
        got_call = asyncio.Event()
        writers = []

        async def swallow(reader, writer):  # a worker that takes calls, never answers, then dies
            writers.append(writer)
            await read_frame(reader)  # hello
            await read_frame(reader)
            got_call.set()
            await asyncio.sleep(3600)
        srv = await asyncio.start_server(swallow, "127.0.0.1")
        port = srv.sockets[0].getsockname()[1]
        conn = Connection({"host": "127.0.0.1", "port": port, "token": "t"}, "worker w1")
        pending = asyncio.ensure_future(conn.call(Call("m", {"x": np.arange(3)}, None, 0)))
        await got_call.wait()
        writers[0].transport.abort()  # the worker's process is gone: reset
        with pytest.raises(ConnectionLost, match="worker w1 .* at 127.0.0.1:"):
            await pending
        with pytest.raises(ConnectionLost):
            await conn.call(Call("m", {"x": np.arange(3)}, None, 0))
        srv.close()
        # nobody listening: the first call says it cannot connect
        dead = Connection({"host": "127.0.0.1", "port": port, "token": "t"}, "worker w2")
        with pytest.raises(ConnectionLost, match="cannot connect to worker w2 at 127.0.0.1"):
            await dead.call(Call("m", {}, None, 0))
    asyncio.run(go())


def test_lose_fails_pending_calls_with_the_reason_given():
    async def go():
        srv_box = []

        async def silent(reader, writer):
            srv_box.append(writer)
            await asyncio.sleep(3600)
        srv = await asyncio.start_server(silent, "127.0.0.1")
        conn = Connection({"host": "127.0.0.1", "port": srv.sockets[0].getsockname()[1], "token": "t"}, "worker w3")
        pending = asyncio.ensure_future(conn.call(Call("m", {}, None, 0)))
        await asyncio.sleep(0.05)
        conn.lose("Ray reports worker w3 dead: node removed")
        with pytest.raises(ConnectionLost, match="node removed"):
            await pending
        srv.close()
    asyncio.run(go())
