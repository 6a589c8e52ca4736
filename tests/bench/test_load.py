"""The load generator's statistics, against a fake server whose latencies and failures are
known from each request (tests/bench/fake_oip_server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cellserve.bench.load import Sweep, Target, max_goodput, summarize_load, sweep_rates
from cellserve.bench.loadgen import RequestFormat, open_loop
from cellserve.bench.peers.base import free_port, spawn
from cellserve.bench.traces import TraceRequest, poisson_arrivals

FAKE = Path(__file__).parent / "fake_oip_server.py"
MS_PER_TOKEN = 2.0


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    port = free_port()
    server = spawn("fake", [sys.executable, str(FAKE), "--port", str(port), "--ms-per-token", str(MS_PER_TOKEN)],
                   f"127.0.0.1:{port}", tmp_path_factory.mktemp("fake") / "fake.log")
    server.wait_ready(30)
    yield server.address
    server.stop()


def _trace(n: int, rate: float, lengths: np.ndarray, first_tokens: np.ndarray) -> list[TraceRequest]:
    arrivals = poisson_arrivals(np.random.default_rng(1), rate, n)
    trace = []
    for i in range(n):
        tokens = np.full(int(lengths[i]), 9, dtype=np.int64)
        tokens[0] = first_tokens[i]
        trace.append(TraceRequest(i, float(arrivals[i]), tokens))
    return trace


def test_statistics_match_the_known_latencies_and_failures(fake_server):
    rng = np.random.default_rng(0)
    n = 200
    lengths = rng.choice([5, 40], size=n)                          # answered after 10 or 80 ms
    first = rng.choice([9, 1, 2, 3], size=n, p=[0.7, 0.1, 0.1, 0.1])  # ok, 429, 500, 504
    trace = _trace(n, 100.0, lengths, first)
    run = open_loop(fake_server, "fake", trace, fmt=RequestFormat(binary=False))
    row = summarize_load(run, 100.0, (45.0, 200.0))

    ok = first == 9
    assert row["requests"] == n
    assert row["counts"] == {"ok": int(ok.sum()), "rejected": int((first == 1).sum()),
                             "error": int((first == 2).sum()), "dropped": int((first == 3).sum())}
    assert "fake status 500" in row["first_error"]
    expected = np.sort(MS_PER_TOKEN * lengths[ok])
    for q in (50, 90, 99):
        measured = row[f"p{q}_ms"]
        want = float(np.percentile(expected, q))
        # never faster than the server's sleep (whose timer may fire up to ~1 ms early); the
        # client and loopback add a few ms at most
        assert want - 2 <= measured <= want + 15, (q, measured, want)
    span = max(o.finish_s for o in run.outcomes) - min(o.arrival_s for o in run.outcomes)
    assert row["throughput_rps"] == pytest.approx(ok.sum() / span)
    # 45 ms separates the 10 ms answers (good) from the 80 ms ones; 200 ms takes every answer
    assert row["goodput_rps"]["45"] == pytest.approx((ok & (lengths == 5)).sum() / span)
    assert row["goodput_rps"]["200"] == pytest.approx(ok.sum() / span)


def test_a_slow_server_does_not_slow_the_offered_load(fake_server):
    """Open loop: 300 ms answers, yet every request leaves on schedule."""
    n = 150
    trace = _trace(n, 150.0, np.full(n, 150), np.full(n, 9))
    run = open_loop(fake_server, "fake", trace, fmt=RequestFormat(binary=False))
    assert all(o.status == "ok" for o in run.outcomes)
    assert np.percentile(run.send_lag_s, 99) < 0.05  # a closed loop would lag by seconds
    latencies = [o.finish_s - o.arrival_s for o in run.outcomes]
    assert min(latencies) >= 0.298  # an event-loop timer may fire up to ~1 ms early
    # ~1 s of arrivals, each answered 0.3 s later: far from the 45 s it would take one at a time
    assert max(o.finish_s for o in run.outcomes) < trace[-1].arrival_s + 1.0


def test_unanswered_requests_are_counted_as_errors_not_lost(fake_server):
    trace = _trace(5, 50.0, np.array([5, 500, 5, 500, 5]), np.full(5, 9))  # 1 s answers
    run = open_loop(fake_server, "fake", trace, fmt=RequestFormat(binary=False), client_timeout_s=0.3)
    assert [o.status for o in run.outcomes] == ["ok", "error", "ok", "error", "ok"]
    assert "no answer within 0.3 s" in run.outcomes[1].reason


def test_ramp_stops_once_p99_passes_the_slo_twice(fake_server):
    """Lengths of ~25 tokens answer in ~50 ms: a 20 ms SLO is missed at every rate, so the
    ramp runs exactly two rates; a 1 s SLO is met at each, up to max_rps."""
    target = Target(fake_server, "fake", fmt=RequestFormat(binary=False))
    tight = Sweep(slos_ms=(20.0,), start_rps=20, factor=2, seconds_per_rate=0.5, min_requests=10)
    rows = sweep_rates(target, tight)
    assert [r["offered_rps"] for r in rows] == [20, 40]
    assert max_goodput(rows, 20.0) == 0.0
    loose = Sweep(slos_ms=(1000.0,), start_rps=20, factor=2, max_rps=80, seconds_per_rate=0.5, min_requests=10)
    rows = sweep_rates(target, loose)
    assert [r["offered_rps"] for r in rows] == [20, 40, 80]
    assert max_goodput(rows, 1000.0) == max(r["goodput_rps"]["1000"] for r in rows) > 0
