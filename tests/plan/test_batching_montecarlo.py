"""The analytic batcher against a seeded Monte-Carlo simulation of the same batcher
(plan/batching_des.py, served at once), Poisson and bursty (MMPP) arrivals.

Tolerances come from the sample: the run's batches are cut into 40 consecutive blocks and each
estimate's standard error is the blocks' spread / sqrt(40) (batch means: consecutive batches
are correlated through the MAP's phase, so a plain binomial error would be too small); the
bound is 5 standard errors, and a bin the analytic side gives probability p gets at least the
binomial error sqrt(p (1 - p) / batches)."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.plan.batching import Service, evaluate, request_latency_cdf, pmf_and_start
from cellserve.plan.batching_chain import Chain
from cellserve.plan.batching_des import sample_arrivals, simulate
from cellserve.plan.batching_map import Map

SERVICE = Service(((1, 4.0), (8, 9.0), (16, 14.0)))
POISSON = Map.poisson(400.0)
BURSTY = Map.of([[-1220.0, 20.0], [5.0, -105.0]], [[1200.0, 0.0], [0.0, 100.0]])  # bursts of 1200/s, else 100/s
BLOCKS, Z = 40, 5.0


def _blocks(values: np.ndarray) -> np.ndarray:
    return np.array_split(values, BLOCKS)


@pytest.mark.parametrize("arrivals,requests", [pytest.param(POISSON, 150_000, id="poisson"),
                                               pytest.param(BURSTY, 400_000, id="bursty", marks=pytest.mark.slow)])
@pytest.mark.parametrize("B,T", [(2, 3.0), (8, 5.0), (16, 20.0), (8, 40.0)])
def test_batch_pmf_and_latency_match_the_simulation(arrivals, requests, B, T):
    ev = evaluate(arrivals, SERVICE, B, T, 95.0)
    assert sum(ev.batch_pmf) == pytest.approx(1.0, abs=1e-12)
    sim = simulate(sample_arrivals(arrivals, requests, np.random.default_rng(B * 1000 + int(T))), SERVICE, B, T)
    sizes = sim.batches[:-1]  # the last batch is cut by the end of the trace
    parts = _blocks(sizes)
    p = np.array(ev.batch_pmf)
    per_block = np.array([np.bincount(b, minlength=B + 1)[1:] / len(b) for b in parts])
    se = np.maximum(per_block.std(axis=0, ddof=1) / np.sqrt(BLOCKS), np.sqrt(p * (1 - p) / len(sizes)))
    empirical = np.bincount(sizes, minlength=B + 1)[1:] / len(sizes)
    assert np.all(np.abs(empirical - p) <= Z * se), (empirical, p, se)
    means = np.array([b.mean() for b in parts])
    assert abs(sizes.mean() - ev.mean_batch) <= Z * means.std(ddof=1) / np.sqrt(BLOCKS)

    # the request latency's distribution, at its percentile and at two other points
    chain = Chain.build(arrivals.D0 / 1000, arrivals.D1 / 1000, B)
    pmf, pi0 = pmf_and_start(chain, T)
    cdf = request_latency_cdf(chain, pi0, pmf, SERVICE, T)
    n_req = int(sizes.sum())
    lat = sim.latency_ms[:n_req]
    req_blocks = np.array_split(np.arange(len(sizes)), BLOCKS)
    ends = np.concatenate([[0], np.cumsum(sizes)])
    for x in (ev.latency_percentile_ms, SERVICE.ms(1) + T / 2, SERVICE.ms(B) + T / 3):
        fractions = np.array([(lat[ends[b[0]]:ends[b[-1] + 1]] <= x).mean() for b in req_blocks])
        f = cdf(x)
        se_f = max(fractions.std(ddof=1) / np.sqrt(BLOCKS), np.sqrt(f * (1 - f) / n_req))
        assert abs((lat <= x).mean() - f) <= Z * se_f + 1e-9, (x, (lat <= x).mean(), f, se_f)
