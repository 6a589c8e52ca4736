"""The load generator's statistics: exact on a run whose times are given, then against a fake
server whose latencies and failures are known from each request (tests/bench/fake_oip_server.py).

Against the fake server the times are real: a loaded machine only adds to them, so latencies
are bounded below by the server's sleep and above with a margin (0.5 s, not milliseconds),
and the statistics are checked against the run's own measured latencies."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cellserve.bench.load import LoadReport, Sweep, Target, max_goodput, summarize_load, sweep_rates, table
from cellserve.bench.loadgen import LoadRun, RequestFormat, open_loop
from cellserve.bench.peers.base import free_port, spawn
from cellserve.bench.results import RequestOutcome
from cellserve.bench.traces import TraceRequest, poisson_arrivals

FAKE = Path(__file__).parent / "fake_oip_server.py"
MS_PER_TOKEN = 2.0
SLACK_S = 0.5  # what a loaded machine may add to a fake answer's latency (client, loopback, scheduling)


def test_summary_of_a_run_with_given_times():
    """No server, no clock: outcomes with known arrival and finish times."""
    latencies_ms = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    outcomes = [RequestOutcome(i, i * 0.1, i * 0.1 + ms / 1e3, "ok") for i, ms in enumerate(latencies_ms)]
    outcomes += [RequestOutcome(10, 0.05, 0.06, "rejected", "429: queue full"),
                 RequestOutcome(11, 0.15, 0.2, "dropped", "504: late"),
                 RequestOutcome(12, 0.25, None, "error", "no answer within 1 s"),
                 RequestOutcome(13, 0.35, 0.4, "error", "500: boom")]
    run = LoadRun(outcomes=outcomes, send_lag_s=[0.001] * 13 + [0.101])
    row = summarize_load(run, 10.0, (45.0, 1000.0))
    span = 0.9 + 0.1  # first arrival 0.0, last finish 0.9 + 100 ms
    assert row["requests"] == 14
    assert row["counts"] == {"ok": 10, "rejected": 1, "dropped": 1, "error": 2}
    assert row["first_error"] == "no answer within 1 s"
    assert row["rejected_reasons"] == ["429: queue full"] and row["dropped_reasons"] == ["504: late"]
    assert "rejected_reasons" not in summarize_load(LoadRun(outcomes=outcomes[:10], send_lag_s=[0.0]), 10.0, (45.0,))
    shown = table(LoadReport(Target("h:1", "m"), Sweep(slos_ms=(45.0, 1000.0)), [row]))
    assert shown.splitlines()[-1] == "first error (at 10.0 req/s): no answer within 1 s"  # what, not only how many
    assert row["p50_ms"] == pytest.approx(55.0)
    assert row["p90_ms"] == pytest.approx(91.0)
    assert row["p99_ms"] == pytest.approx(99.1)
    assert row["throughput_rps"] == pytest.approx(10 / span)
    assert row["goodput_rps"] == {"45": pytest.approx(4 / span), "1000": pytest.approx(10 / span)}
    assert row["within_slo"] == {"45": 4, "1000": 10}
    assert row["realized_rps"] == pytest.approx(13 / 0.9)
    assert row["send_lag_p99_ms"] == pytest.approx(float(np.percentile(run.send_lag_s, 99)) * 1e3)


def _start_fake(tmp_path_factory, *extra: str):
    port = free_port()
    server = spawn("fake", [sys.executable, str(FAKE), "--port", str(port), "--ms-per-token", str(MS_PER_TOKEN),
                            *extra], f"127.0.0.1:{port}", tmp_path_factory.mktemp("fake") / "fake.log")
    server.wait_ready(30)
    return server


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    server = _start_fake(tmp_path_factory)
    yield server.address
    server.stop()


def test_health_checks_are_summarised_beside_the_load():
    outcomes = [RequestOutcome(0, 0.0, 0.01, "ok")]
    run = LoadRun(outcomes=outcomes, send_lag_s=[0.0], health_latencies_s=[0.002, 0.004, 0.250])
    health = summarize_load(run, 1.0, (100.0,))["health"]
    assert health["checks"] == 3
    assert health["p50_ms"] == pytest.approx(4.0)
    assert health["max_ms"] == pytest.approx(250.0)
    assert "health" not in summarize_load(LoadRun(outcomes=outcomes, send_lag_s=[0.0]), 1.0, (100.0,))


@pytest.mark.slow  # a real load for a second
def test_a_slow_health_check_shows_in_the_load_report(tmp_path_factory):
    """Health answered after 300 ms, checked every 100 ms: each check waits its 300 ms, and one
    still unanswered when the load ends counts with what it had waited."""
    server = _start_fake(tmp_path_factory, "--health-ms", "300")
    try:
        trace = _trace(20, 20.0, np.full(20, 5), np.full(20, 9))
        run = open_loop(server.address, "fake", trace, fmt=RequestFormat(binary=False), health_every_s=0.1)
    finally:
        server.stop()
    assert all(o.status == "ok" for o in run.outcomes)
    finished = run.health_latencies_s[:-1]  # the last may be the one cut short
    assert len(finished) >= 1
    assert min(finished) >= 0.298  # an event-loop timer may fire up to ~1 ms early


def _trace(n: int, rate: float, lengths: np.ndarray, first_tokens: np.ndarray) -> list[TraceRequest]:
    arrivals = poisson_arrivals(np.random.default_rng(1), rate, n)
    trace = []
    for i in range(n):
        tokens = np.full(int(lengths[i]), 9, dtype=np.int64)
        tokens[0] = first_tokens[i]
        trace.append(TraceRequest(i, float(arrivals[i]), tokens))
    return trace


@pytest.mark.slow  # a real load for seconds
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
    # each latency is the fake's: never under its sleep (whose timer may fire up to ~1 ms
    # early), over it by what the client, loopback and a loaded machine add
    by_id = {o.request_id: o for o in run.outcomes}
    latencies = np.array([by_id[i].finish_s - by_id[i].arrival_s for i in np.flatnonzero(ok)])
    known = MS_PER_TOKEN * lengths[ok] / 1e3
    assert np.all(latencies >= known - 0.002), (latencies - known).min()
    assert np.all(latencies <= known + SLACK_S), (latencies - known).max()
    # the summary is of those latencies
    for q in (50, 90, 99):
        assert row[f"p{q}_ms"] == pytest.approx(np.percentile(latencies, q) * 1e3)
    span = max(o.finish_s for o in run.outcomes) - min(o.arrival_s for o in run.outcomes)
    assert row["throughput_rps"] == pytest.approx(ok.sum() / span)
    for slo_ms in (45, 200):
        assert row["goodput_rps"][str(slo_ms)] == pytest.approx(np.sum(latencies <= slo_ms / 1e3) / span)


@pytest.mark.slow  # a real load for seconds
def test_a_slow_server_does_not_slow_the_offered_load(fake_server):
    """Open loop: 300 ms answers, yet every request leaves on schedule."""
    n = 150
    trace = _trace(n, 150.0, np.full(n, 150), np.full(n, 9))
    run = open_loop(fake_server, "fake", trace, fmt=RequestFormat(binary=False))
    assert all(o.status == "ok" for o in run.outcomes)
    latencies = [o.finish_s - o.arrival_s for o in run.outcomes]
    assert min(latencies) >= 0.298  # an event-loop timer may fire up to ~1 ms early
    # A closed loop sends each request once the one before is answered: the last would leave
    # ~45 s late, all would be done ~45 s after the first arrival. Open loop, on schedule
    # within what a loaded machine delays a timer, all done ~0.3 s after the last arrival.
    assert np.percentile(run.send_lag_s, 99) < SLACK_S
    assert max(o.finish_s for o in run.outcomes) < trace[-1].arrival_s + 0.3 + 2 * SLACK_S


@pytest.mark.slow  # a real load for seconds
def test_unanswered_requests_are_counted_as_errors_not_lost(fake_server):
    # 10 ms answers and 3 s ones, a 1 s client timeout: far from both, on a loaded machine too
    trace = _trace(5, 50.0, np.array([5, 1500, 5, 1500, 5]), np.full(5, 9))
    run = open_loop(fake_server, "fake", trace, fmt=RequestFormat(binary=False), client_timeout_s=1.0)
    assert [o.status for o in run.outcomes] == ["ok", "error", "ok", "error", "ok"]
    assert "no answer within 1 s" in run.outcomes[1].reason


@pytest.mark.slow  # a real load for seconds
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
