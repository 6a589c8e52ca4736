"""`cellserve bench soak`, short: a mix of models, sequences and bad requests at a steady
rate; its verdict holds on a healthy server."""

from __future__ import annotations

import pytest

from cellserve.bench.soak import SoakConfig, run_soak


@pytest.mark.slow
def test_a_short_soak_passes_every_check():
    # a fixed, light rate and no deadlines: capacity and latency on a shared CI machine are
    # not what this test is about (the RSS bound is looser: half a minute has a short warm-up;
    # so is the health bound: a suite's machine stalled one check for 190 ms; a hung check is
    # still caught)
    report = run_soak(SoakConfig(models=("gru-256", "lstm-512"), minutes=0.5, rps=40, sample_s=3, deadline_ms=None,
                                 max_rss_growth=0.25, max_health_ms=2000.0), progress=lambda line: None)
    counts = report.counts
    assert counts["sent"] == counts["answered"] > 0
    assert counts.get("ok", 0) > 0 and counts.get("ok sequence", 0) > 0 and counts.get("bad, answered 400", 0) > 0
    failed = {name: check["detail"] for name, check in report.checks.items() if not check["ok"]}
    assert not failed, (failed, report.first_failures)
    # each sample's window: the failures since the last, and the answered requests' latency
    windows = [s["window"] for s in report.samples if "window" in s]
    assert windows and sum(w["failed"] for w in windows) == 0
    timed = [w for w in windows if "p99_ms" in w]
    assert timed and all(0 < w["p50_ms"] <= w["p99_ms"] <= w["max_ms"] for w in timed), timed
    assert report.capacity_rps is None and report.capacity_end_rps is None  # --rps: no capacity measured


def _scripted_server(statuses: list[int], bodies: list[bytes]):
    """An HTTP/1.1 endpoint answering each request with the next of `statuses` (then 200),
    recording each request's body: the other side of the soak client's retry policy."""
    import asyncio

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):  # the client closed its connection
                return
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            bodies.append(await reader.readexactly(length))
            status = statuses.pop(0) if statuses else 200
            writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\n{}" % status)
            await writer.drain()

    return asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("refusals, tries", [([429, 503, 429], 4), ([400], 1), ([429] * 10, 6)])
def test_a_failed_sequence_is_ended_with_retries_while_refused_for_load(monkeypatch, refusals, tries):
    import asyncio
    import json

    import cellserve.bench.soak as soak_module
    from cellserve.bench.soak import END_RETRY_PAUSES_S, _Soak

    monkeypatch.setattr(soak_module, "END_RETRY_PAUSES_S", tuple(p / 100 for p in END_RETRY_PAUSES_S))
    bodies: list[bytes] = []

    async def go():
        server = await _scripted_server(list(refusals), bodies)
        host, port = server.sockets[0].getsockname()[:2]
        soak = _Soak(SoakConfig(), f"{host}:{port}", rate=1.0)
        await soak._end_sequence("gru-256", 7)
        soak.pool.close()
        server.close()

    asyncio.run(go())
    # refused for load: tried again after each pause, up to one try per pause and a last;
    # any other answer (a 400 here) is final
    assert len(bodies) == tries
    ends = [json.loads(b)["parameters"] for b in bodies]
    assert all(p == {"sequence_id": 7, "sequence_end": True} for p in ends)


@pytest.mark.slow
def test_capacity_is_what_a_closed_loop_of_the_mix_sustains():
    from cellserve.bench.soak import measure_capacity
    from cellserve.server.launch import ServerProcess

    cfg = SoakConfig(models=("gru-256",), capacity_concurrency=8, capacity_seconds=1.5)
    server = ServerProcess("--model", "gru-256", "--grpc-port", "-1")
    try:
        capacity, burst = measure_capacity(server.http, cfg, warmup=40)
    finally:
        server.stop()
    # eight arrivals in flight for 1.5 s on a zoo model that answers in milliseconds: each
    # client completed more than one arrival in the window
    assert capacity > 8 / 1.5 and burst > 0


@pytest.mark.slow
def test_a_soak_at_a_share_of_capacity_measures_it_again_at_the_end():
    # the load is a share of the capacity measured at the start; the capacity measured again
    # once the soak is over tells whether the machine's speed moved meanwhile
    lines: list[str] = []
    report = run_soak(SoakConfig(models=("gru-256",), minutes=0.1, load=0.3, sample_s=2, deadline_ms=None,
                                 capacity_concurrency=8, capacity_seconds=1.5, max_rss_growth=0.25,
                                 max_health_ms=2000.0), progress=lines.append)
    assert report.capacity_rps > 8 / 1.5 and report.offered_rps == pytest.approx(0.3 * report.capacity_rps)
    assert report.capacity_end_rps > 8 / 1.5
    assert report.counts["sent"] == report.counts["answered"] > 0
    assert any(f"{report.capacity_end_rps:.0f} req/s sustained" in line for line in lines), lines
