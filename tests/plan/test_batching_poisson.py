"""The analytic batcher (plan/batching.py) against closed forms for Poisson arrivals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellserve.plan.batching import Service, evaluate
from cellserve.plan.batching_chain import Chain, step_matrices

SERVICE = Service(((1, 4.0), (8, 9.0), (32, 20.0)))


def poisson_pmf(rate_per_ms: float, B: int, T: float) -> np.ndarray:
    """N = min(B, 1 + Poisson(rate T)): the first request, then those arriving within T."""
    x = rate_per_ms * T
    p = np.array([math.exp(-x + k * math.log(x) - math.lgamma(k + 1)) if x > 0 else float(k == 0)
                  for k in range(B - 1)])
    return np.append(p, 1.0 - p.sum())


@pytest.mark.parametrize("rate,B,T", [(400.0, 2, 3.0), (400.0, 8, 5.0), (100.0, 16, 30.0), (1000.0, 32, 12.5)])
def test_poisson_pmf_is_the_truncated_poisson(rate, B, T):
    from cellserve.plan.batching_map import Map
    ev = evaluate(Map.poisson(rate), SERVICE, B, T)
    assert sum(ev.batch_pmf) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(ev.batch_pmf, poisson_pmf(rate / 1000, B, T), atol=1e-10)
    assert ev.mean_batch == pytest.approx(float(np.arange(1, B + 1) @ poisson_pmf(rate / 1000, B, T)), rel=1e-10)


def test_b1_and_t0_serve_every_request_alone():
    from cellserve.plan.batching_map import Map
    for B, T in [(1, 50.0), (8, 0.0)]:
        ev = evaluate(Map.poisson(500.0), SERVICE, B, T)
        assert ev.batch_pmf[0] == 1.0 and sum(ev.batch_pmf) == 1.0 and len(ev.batch_pmf) == B
        assert ev.mean_batch == 1.0
        assert ev.latency_percentile_ms == SERVICE.ms(1)


def test_huge_timeout_always_fills_the_batch():
    from cellserve.plan.batching_map import Map
    ev = evaluate(Map.poisson(1000.0), SERVICE, 8, 10_000.0)  # 10,000 arrivals expected in T
    assert ev.batch_pmf[-1] == pytest.approx(1.0, abs=1e-12)
    assert ev.mean_batch == pytest.approx(8.0, abs=1e-9)


def _b2_cdf(x: float, lam: float, T: float, s1: float, s2: float) -> float:
    """B = 2, Poisson: a timeout batch (prob e^-lam T) holds one request of latency T + s1; a
    full one the first request (latency X + s2, X ~ Exp(lam) given X <= T) and the second (s2)."""
    q = math.exp(-lam * T)
    mass = q * (x >= T + s1)
    if x >= s2:
        mass += (1 - q) + (1 - math.exp(-lam * min(x - s2, T)))
    return mass / (q + 2 * (1 - q))


@pytest.mark.parametrize("p", [50.0, 80.0, 95.0, 99.0])
def test_b2_latency_percentile_matches_its_closed_form(p):
    from cellserve.plan.batching_map import Map
    lam, T = 0.2, 6.0  # per ms
    svc = Service(((1, 3.0), (2, 3.5)))
    ev = evaluate(Map.poisson(lam * 1000), svc, 2, T, p)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _b2_cdf(mid, lam, T, 3.0, 3.5) >= p / 100 else (mid, hi)
    assert ev.latency_percentile_ms == pytest.approx(hi, abs=1e-3)


def _erlang_cdf(k: int, lam: float, w: float) -> float:
    """P(the sum of k Exp(lam) <= w); k = 0 is 0 surely."""
    if w < 0:
        return 0.0
    return 1.0 - sum(math.exp(-lam * w) * (lam * w) ** i / math.factorial(i) for i in range(k))


@pytest.mark.parametrize("T", [1_000.0, 1e6, 1e9])
@pytest.mark.parametrize("p", [50.0, 95.0, 99.9])
def test_a_timeout_far_beyond_the_fill_time_gives_the_full_batch_percentile(T, p):
    """Every batch fills (Poisson 400 req/s, B = 8, T >= 1 s): the request k-th in its batch
    waits an Erlang(B - k) and then s(B); the grid over [0, T] must not blur that wait."""
    from cellserve.plan.batching_map import Map
    lam, B = 0.4, 8
    ev = evaluate(Map.poisson(lam * 1000), SERVICE, B, T, p)

    def cdf(x):
        return sum(_erlang_cdf(B - k, lam, x - SERVICE.ms(B)) for k in range(1, B + 1)) / B
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cdf(mid) >= p / 100 else (mid, hi)
    assert ev.mean_batch == pytest.approx(8.0, abs=1e-9)
    assert ev.latency_percentile_ms == pytest.approx(hi, rel=1e-3)


def test_toeplitz_step_equals_the_dense_uniformization():
    d0 = np.array([[-1.22, 0.02], [0.005, -0.105]])
    d1 = np.array([[1.2, 0.0], [0.0, 0.1]])
    chain = Chain.build(d0, d1, 12)
    for h in (0.0, 0.3, 7.0, 80.0):
        e, i = chain.step(h)
        e2, i2 = step_matrices(chain.g, h)
        np.testing.assert_allclose(e, e2, atol=1e-13)
        np.testing.assert_allclose(i, i2, atol=1e-12)


def test_service_is_linear_between_given_sizes():
    assert SERVICE.ms(1) == 4.0 and SERVICE.ms(8) == 9.0
    assert SERVICE.ms(4) == pytest.approx(4.0 + 5.0 * 3 / 7)
    assert SERVICE.ms(20) == pytest.approx(9.0 + 11.0 * 12 / 24)
    assert Service(((4, 2.0), (8, 3.0))).ms(1) == 2.0  # below the smallest: the smallest's
