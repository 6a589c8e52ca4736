"""The cheapest (B, T) meeting a latency SLO, over a grid (docs/batching.md).

Cheapest = the least device time per request, E[s(N)] / E[N] (what BATCH minimises: a
serverless bill is service time x memory per request; with one device type the memory is
fixed); ties go to the larger mean batch, then the smaller B and T. With s(n) = a + b n this
is the largest mean batch, i.e. the fewest dispatches per request.

The grid: B = 1 .. the service profile's largest size (at most `max_b`), T = j * SLO / `t_steps`
for j = 0 .. t_steps (T = 0 and B = 1 are one plan: every request alone, reported as B = 1,
T = 0). The search is exhaustive over the grid without assuming monotonicity: every point's
batch pmf and cost come first (cheap: per B, one step matrix for SLO / t_steps and a product
per T), then points are taken cheapest first and the first whose percentile meets the SLO is
the answer. A point is skipped without computing its percentile when a bound already proves
it misses: the share of requests whose latency surely exceeds the SLO (those in batches whose
service alone exceeds it, and the first request of each timeout batch, which waits T) is over
1 - p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellserve.plan.batching import STEPS, Evaluation, Service, cost, evaluate
from cellserve.plan.batching_chain import Chain
from cellserve.plan.batching_map import BatchingError, Map

T_STEPS = 40
MAX_B = 128


@dataclass(frozen=True)
class Candidate:
    device_ms_per_request: float
    mean_batch: float
    B: int
    timeout_ms: float
    pmf: np.ndarray


@dataclass(frozen=True)
class SearchResult:
    """`best`: the cheapest point meeting the SLO, or None; `lowest`: the point with the lowest
    percentile among those evaluated (to say how close an infeasible SLO came); `evaluated`:
    how many percentiles were computed, of `points` grid points."""

    best: Evaluation | None
    lowest: Evaluation | None
    evaluated: int
    points: int


def candidates(arrivals: Map, service: Service, slo_ms: float, t_steps: int = T_STEPS,
               max_b: int = MAX_B) -> list[Candidate]:
    """Every grid point with its pmf and cost, cheapest first."""
    d0, d1 = arrivals.D0 / 1000.0, arrivals.D1 / 1000.0
    dt = slo_ms / t_steps
    alone = np.array([1.0])
    out = [Candidate(service.ms(1), 1.0, 1, 0.0, alone)]
    for B in range(2, min(service.max_batch, max_b) + 1):
        chain = Chain.build(d0, d1, B)
        e, i = chain.step(dt)
        a, ma = chain.start.copy(), np.zeros_like(chain.start)
        for j in range(1, t_steps + 1):
            a, ma = a @ e, ma + a @ i
            pi0 = chain.cycle_start(a, ma)
            pmf = chain.pmf(pi0 @ a, pi0 @ ma)
            mean, per_request = cost(pmf, service)
            out.append(Candidate(per_request, mean, B, j * dt, pmf))
    # costs equal to 9 digits are ties (a B far above what T lets arrive differs only in rounding):
    # the larger mean batch, then the smaller B and T, win
    out.sort(key=lambda c: (float(f"{c.device_ms_per_request:.9g}"), -float(f"{c.mean_batch:.9g}"), c.B, c.timeout_ms))
    return out


def surely_late_share(c: Candidate, service: Service, slo_ms: float) -> float:
    """A lower bound on the share of requests later than the SLO (the module docstring)."""
    n = np.arange(1, len(c.pmf) + 1)
    s = np.array([service.ms(k) for k in n])
    per_request = n * c.pmf / c.mean_batch
    late = float(per_request[s > slo_ms].sum())
    if c.B > 1:
        first = (s[:-1] <= slo_ms) & (s[:-1] + c.timeout_ms > slo_ms)
        late += float((c.pmf[:-1] / c.mean_batch)[first].sum())
    return late


def cheapest(arrivals: Map, service: Service, slo_ms: float, percentile: float = 95.0,
             t_steps: int = T_STEPS, max_b: int = MAX_B, steps: int = STEPS) -> SearchResult:
    """The cheapest grid point whose latency percentile is <= `slo_ms` (module docstring)."""
    if not (math.isfinite(slo_ms) and slo_ms > 0):
        raise BatchingError(f"--slo-ms must be a finite number > 0, got {slo_ms!r}")
    if not (0 < percentile < 100):
        raise BatchingError(f"--percentile must be in (0, 100), got {percentile!r}")
    cands = candidates(arrivals, service, slo_ms, t_steps, max_b)
    allowed = 1.0 - percentile / 100.0
    lowest, evaluated = None, 0
    for c in cands:
        if surely_late_share(c, service, slo_ms) > allowed + 1e-12:
            continue
        ev = evaluate(arrivals, service, c.B, c.timeout_ms, percentile, steps)
        evaluated += 1
        if lowest is None or ev.latency_percentile_ms < lowest.latency_percentile_ms:
            lowest = ev
        if ev.latency_percentile_ms <= slo_ms:
            return SearchResult(ev, lowest, evaluated, len(cands))
    return SearchResult(None, lowest, evaluated, len(cands))
