import json
import math

from cellserve.bench.results import RequestOutcome, RunStats, span_s, summarize


def _ok(request_id: int, arrival_s: float, latency_s: float) -> RequestOutcome:
    return RequestOutcome(request_id, arrival_s, arrival_s + latency_s, "ok")


def test_summarize_on_known_latencies():
    # 100 ok requests with latencies 1..100 ms, one arriving every 10 ms.
    outcomes = [_ok(i, i * 0.01, (i + 1) / 1000) for i in range(100)]
    stats = RunStats("p", 100.0, span_s(outcomes), outcomes, executed_flops=4e9, busy_s=0.5,
                     cell_steps=10, batch_size_sum=35, overhead_us_per_step=[3.0, 1.0, 2.0])
    summary = summarize(stats, slo_s=0.0505)  # between the 50 and 51 ms requests
    assert math.isclose(stats.duration_s, 0.99 + 0.1)
    assert math.isclose(summary["p50_ms"], 50.5)
    assert math.isclose(summary["p99_ms"], 99.01)
    assert math.isclose(summary["throughput_rps"], 100 / 1.09)
    assert math.isclose(summary["goodput_rps"], 50 / 1.09)
    assert summary["slo_misses"] == 50
    assert math.isclose(summary["mean_batch"], 3.5)
    assert math.isclose(summary["gflops"], 4.0 / 1.09)
    assert summary["overhead_us_per_step"] == 2.0
    assert summary["counts"] == {"ok": 100, "rejected": 0, "dropped": 0, "error": 0}


def test_rejected_dropped_and_errored_requests_are_slo_misses_not_latencies():
    outcomes = [_ok(0, 0.0, 0.010), _ok(1, 0.1, 0.020),
                RequestOutcome(2, 0.2, None, "rejected", "queue full"),
                RequestOutcome(3, 0.3, None, "dropped", "deadline"),
                RequestOutcome(4, 0.4, 0.45, "error", "boom")]
    summary = summarize(RunStats("p", 10.0, span_s(outcomes), outcomes), slo_s=1.0)
    assert summary["counts"] == {"ok": 2, "rejected": 1, "dropped": 1, "error": 1}
    assert summary["slo_misses"] == 3
    assert math.isclose(summary["p99_ms"], 10 + 0.99 * 10)  # over the two ok requests only
    assert math.isclose(summary["goodput_rps"], 2 / 0.45)


def test_summarize_without_ok_requests_reports_nan_latency_and_zero_rates():
    outcomes = [RequestOutcome(0, 0.0, None, "rejected")]
    summary = summarize(RunStats("p", 1.0, span_s(outcomes), outcomes), slo_s=1.0)
    assert math.isnan(summary["p50_ms"]) and math.isnan(summary["p99_ms"])
    assert summary["throughput_rps"] == summary["goodput_rps"] == summary["mean_batch"] == 0.0


def test_span_runs_from_first_arrival_to_last_finish_or_later_arrival():
    finishing_last = [_ok(0, 1.0, 0.5), _ok(1, 1.2, 2.0)]
    assert math.isclose(span_s(finishing_last), 2.2)
    arriving_last = [_ok(0, 1.0, 0.5), RequestOutcome(1, 4.0, None, "dropped")]
    assert math.isclose(span_s(arriving_last), 3.0)


def test_run_stats_round_trip_through_json():
    stats = RunStats("cellular", 12.5, 3.25,
                     [_ok(0, 0.0, 0.1), RequestOutcome(1, 0.5, None, "rejected", "full")],
                     executed_flops=1.5e9, busy_s=1.25, cell_steps=7, batch_size_sum=20,
                     overhead_us_per_step=[1.5, 2.5])
    assert RunStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
