"""The cheapest (B, T) meeting an SLO (plan/batching_search.py) equals a brute-force optimum
over the same grid, every point evaluated in full."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from cellserve.plan.batching import Service, evaluate
from cellserve.plan.batching_map import Map
from cellserve.plan.batching_search import cheapest


def _brute(arrivals, service, slo, p, t_steps, max_b):
    best = None
    for B in range(1, min(service.max_batch, max_b) + 1):
        for j in range(0 if B == 1 else 1, 1 if B == 1 else t_steps + 1):
            ev = evaluate(arrivals, service, B, j * slo / t_steps, p)
            if ev.latency_percentile_ms > slo:
                continue
            key = (float(f"{ev.device_ms_per_request:.9g}"), -float(f"{ev.mean_batch:.9g}"), B, ev.timeout_ms)
            if best is None or key < best[0]:
                best = (key, ev)
    return None if best is None else best[1]


@settings(max_examples=12, deadline=None)
@given(rate=st.floats(20, 2000), base=st.floats(1, 10), per=st.floats(0.05, 2), slo=st.floats(5, 80),
       p=st.sampled_from([50.0, 90.0, 95.0, 99.0]), bursty=st.booleans())
def test_search_equals_the_brute_force_optimum(rate, base, per, slo, p, bursty):
    service = Service(tuple((b, base + per * b ** 0.8) for b in (1, 2, 4, 8)))
    arrivals = (Map.of([[-(rate * 3 + 10), 10], [10, -(rate / 3 + 10)]], [[rate * 3, 0], [0, rate / 3]])
                if bursty else Map.poisson(rate))
    got = cheapest(arrivals, service, slo, p, t_steps=6, max_b=8)
    want = _brute(arrivals, service, slo, p, 6, 8)
    if want is None:
        assert got.best is None
        return
    assert got.best is not None
    assert (got.best.max_batch, got.best.timeout_ms) == (want.max_batch, pytest.approx(want.timeout_ms))
    assert got.best.latency_percentile_ms <= slo
