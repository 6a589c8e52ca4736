"""The batcher on one server (plan/batching_queue.py) against the discrete-event simulation of
the same rule (plan/batching_des.py, mode "queue"), and `cellserve plan batching --single-server`.

The simulations are seeded and long enough that their own error (well under 1% at these
points) leaves the model's discretisation and approximations as what the tolerances bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cellserve.cli import main
from cellserve.plan.batching import Service, evaluate
from cellserve.plan.batching_des import sample_arrivals, simulate
from cellserve.plan.batching_map import BatchingError, Map
from cellserve.plan.batching_queue import _binomial_at_least, _expected_min_binomial, evaluate_single_server

SERVICE = Service(((1, 4.0), (8, 9.0), (16, 14.0)))
BURSTY = Map.of([[-420.0, 20.0], [5.0, -30.0]], [[400.0, 0.0], [0.0, 25.0]])  # bursts at 4x a 100/s mean


def _simulated(arrivals: Map, B: int, T: float, requests: int = 200_000):
    times = sample_arrivals(arrivals, requests, np.random.default_rng(B * 100 + int(T)))
    return simulate(times, SERVICE, B, T, "queue")


@pytest.mark.parametrize("arrivals,B,T", [
    pytest.param(Map.poisson(100.0), 2, 2.0, id="poisson-B2-T2"),  # the timer runs out during service
    pytest.param(Map.poisson(200.0), 8, 10.0, id="poisson-B8-T10"),
    pytest.param(Map.poisson(100.0), 2, 40.0, id="poisson-B2-T40"),  # batches filled by an arrival
    pytest.param(BURSTY, 8, 2.0, id="bursty-B8-T2", marks=pytest.mark.slow),
])
def test_mean_batch_and_p95_match_a_simulated_single_server(arrivals, B, T):
    ev = evaluate_single_server(arrivals, SERVICE, B, T, 95.0)
    sim = _simulated(arrivals, B, T)
    assert sum(ev.batch_pmf) == pytest.approx(1.0, abs=1e-9)
    assert ev.mean_batch == pytest.approx(sim.mean_batch, rel=0.02)
    assert ev.latency_percentile_ms == pytest.approx(sim.percentile_ms(95.0), rel=0.03)


def test_where_batches_wait_for_the_server_the_served_at_once_model_is_wrong():
    """The case for the single-server model: T shorter than a batch's service, so requests that
    arrive during one wait for it; the at-once model misses that wait, this one does not."""
    arrivals = Map.poisson(100.0)
    sim = _simulated(arrivals, 2, 2.0)
    single = evaluate_single_server(arrivals, SERVICE, 2, 2.0, 95.0)
    at_once = evaluate(arrivals, SERVICE, 2, 2.0, 95.0)
    p95 = sim.percentile_ms(95.0)
    assert abs(single.latency_percentile_ms - p95) / p95 < 0.03
    assert abs(at_once.latency_percentile_ms - p95) / p95 > 0.15


def test_without_queueing_the_two_models_agree():
    """Light load, a batch's service short against the gaps: a batch is never held back by
    the server, so the single-server chain must give the at-once model's exact figures."""
    arrivals = Map.poisson(10.0)
    fast = Service(((1, 0.5), (8, 1.0)))
    single = evaluate_single_server(arrivals, fast, 8, 20.0, 95.0)
    at_once = evaluate(arrivals, fast, 8, 20.0, 95.0)
    assert single.mean_batch == pytest.approx(at_once.mean_batch, rel=0.01)
    assert single.latency_percentile_ms == pytest.approx(at_once.latency_percentile_ms, rel=0.02)


def test_a_timeout_far_beyond_a_batchs_service_keeps_the_service_time():
    """T = 100 ms against batches of 1-1.6 ms: a grid made for T alone would be coarser than a
    batch's service, which then could not keep its mean; the grid stays finer than the service."""
    arrivals, fast = Map.poisson(50.0), Service(((1, 1.0), (4, 1.6)))
    ev = evaluate_single_server(arrivals, fast, 4, 100.0, 95.0)
    sim = simulate(sample_arrivals(arrivals, 100_000, np.random.default_rng(3)), fast, 4, 100.0, "queue")
    assert ev.mean_batch == pytest.approx(sim.mean_batch, rel=0.01)
    assert ev.latency_percentile_ms == pytest.approx(sim.percentile_ms(95.0), rel=0.01)
    assert ev.device_ms_per_request == pytest.approx(evaluate(arrivals, fast, 4, 100.0).device_ms_per_request, rel=0.01)


def test_a_zero_timeout_still_batches_what_queued_during_a_service():
    arrivals = Map.poisson(250.0)
    ev = evaluate_single_server(arrivals, SERVICE, 8, 0.0, 95.0)
    sim = _simulated(arrivals, 8, 0.0)
    assert sim.mean_batch > 1.3  # what queued during a service goes as one batch
    assert ev.mean_batch == pytest.approx(sim.mean_batch, rel=0.02)
    assert ev.latency_percentile_ms == pytest.approx(sim.percentile_ms(95.0), rel=0.03)


def test_arrivals_beyond_what_the_server_can_serve_are_refused():
    with pytest.raises(BatchingError, match=r"cannot keep up: requests arrive at 1200/s .* at most 1142\.86/s"):
        evaluate_single_server(Map.poisson(1200.0), SERVICE, 16, 5.0)


def test_bad_points_are_refused_as_for_the_at_once_model():
    with pytest.raises(BatchingError, match="--max-batch 32 is beyond"):
        evaluate_single_server(Map.poisson(10.0), SERVICE, 32, 5.0)
    with pytest.raises(BatchingError, match="grid step must be a finite number of ms > 0"):
        evaluate_single_server(Map.poisson(10.0), SERVICE, 4, 5.0, step_ms=-1.0)
    with pytest.raises(BatchingError, match=r"grid step \(5 ms\) must not exceed the shortest service time \(4 ms\)"):
        evaluate_single_server(Map.poisson(10.0), SERVICE, 4, 5.0, step_ms=5.0)


def test_binomial_helpers_against_direct_sums():
    p = np.array([0.0, 0.2, 0.5, 0.93, 1.0])
    for trials in (0, 1, 5, 12):
        pmf = [[math.comb(trials, k) * x ** k * (1 - x) ** (trials - k) for k in range(trials + 1)] for x in p]
        for at_least in range(trials + 1):
            want = [sum(row[at_least:]) for row in pmf]
            assert _binomial_at_least(trials, p, at_least) == pytest.approx(want, abs=1e-12)
        for cap in (0, 1, 3, 20):
            want = [sum(min(cap, k) * row[k] for k in range(trials + 1)) for row in pmf]
            got = _expected_min_binomial(np.full(len(p), trials), p, np.full(len(p), cap))
            assert got == pytest.approx(want, abs=1e-12)


def _plan(tmp_path, *flags):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"poisson_rps": 100}))
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"latency_ms": {"1": 4.0, "8": 9.0, "16": 14.0}}))
    out = tmp_path / "plan.json"
    return main(["plan", "batching", "--arrivals", str(a), "--service", str(s), *flags, "--json", str(out)]), out


def test_the_cli_evaluates_a_point_on_one_server(tmp_path):
    code, out = _plan(tmp_path, "--single-server", "--max-batch", "2", "--timeout-ms", "2")
    assert code == 0
    plan = json.loads(out.read_text())
    assert plan["server"] == "single"
    assert plan["max_batch"] == 2 and plan["timeout_ms"] == 2.0
    assert plan["latency_percentile_ms"] == pytest.approx(
        evaluate_single_server(Map.poisson(100.0), SERVICE, 2, 2.0, 95.0).latency_percentile_ms)
    code, out = _plan(tmp_path, "--max-batch", "2", "--timeout-ms", "2")
    assert json.loads(out.read_text())["server"] == "at-once"


def test_the_cli_refuses_a_single_server_search(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _plan(tmp_path, "--single-server", "--slo-ms", "30")
    assert exc.value.code == 2
    assert "--single-server evaluates a given point" in capsys.readouterr().err
