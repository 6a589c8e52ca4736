"""Analytic batching (BATCH, SC 2020): a batcher that dispatches at B requests or T ms after the
first arrival, each batch served as soon as it is dispatched (no queue between batches).

`evaluate(arrivals, service, B, T, percentile)` gives the batch-size distribution at dispatch,
the mean batch, the device time per request and the request latency's percentile; the
cheapest (B, T) meeting an SLO is `plan/batching_search.py`. The maths (docs/batching.md):

- batch sizes: the transient of the level-phase chain (plan/batching_chain.py) over [0, T];
- latency of a request = its wait from arrival to dispatch + the service time of its batch,
  s(n), linear between the profile's sizes. Its distribution, over requests (not batches),
  is F(x) = sum_n H_n(x - s(n)) / E[N] with H_n(w) the expected number of requests per cycle
  that are in a batch of n and waited at most w. On the grid w_k = k T / K (K = `steps`) these
  are exact (up to floating point):
    timeout batch n < B (dispatched at T; the requests that waited <= w came after T - w):
      H_n(w_k) = n P(N = n) - sum_s alpha_{K-k}(s) lvl(s) [exp(G w_k) 1_n](s)   for w_k < T,
      n P(N = n) from T on (the first request waited exactly T: an atom there);
    full batch (dispatched at the B-th arrival tau, when tau <= T):
      H_B(w_k) = B P(N = B) - M(T - w_k) diag(lvl) exp(G w_k) d,
  alpha_j = pi0 exp(G t_j), M(t) = integral_0^t alpha, d the rates into a full dispatch.
  Between grid points H_n is interpolated linearly; the percentile is the smallest x with
  F(x) >= p, found by bisection.
- a timeout far beyond the time a batch takes to fill would leave the whole wait in the grid's
  first cell: the percentile is then computed for the shortest T' = T / 2^j by which a cycle is
  still filling with probability under `FILLING_TAIL` x (1 - p) / B. The two batchers act alike
  on every other cycle, so at most that share of requests, a millionth of the percentile's
  slack, can differ (`quantile_horizon`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from cellserve.plan.batching_chain import Chain, step_rows
from cellserve.plan.batching_map import BatchingError, Map

STEPS = 256  # grid points over [0, T] for the latency distribution
SCHEMA_VERSION = 1
FILLING_TAIL = 1e-6  # `quantile_horizon`: the share of (1 - p) the truncated cycles may hold


@dataclass(frozen=True)
class Service:
    """A batch's service time in ms, given at some sizes (`points`: (batch, mean ms)).

    Linear between two given sizes, the smallest's below the smallest; no batch beyond the
    largest. The values are used as given (not made monotone).

    `samples` (optional): for some of the given sizes, measured service times (ms), whose mean
    is that size's point (set from them). A size with samples has their distribution, one
    without a point mass at its mean; between two given sizes the quantile functions are
    interpolated linearly (so is the mean). The single-server model and the simulation use
    the distribution; the at-once model uses the means."""

    points: tuple[tuple[int, float], ...]
    samples: tuple[tuple[int, tuple[float, ...]], ...] = ()
    table: tuple[float, ...] = field(init=False, repr=False, compare=False)  # [n] -> ms; [0] unused

    def __post_init__(self) -> None:
        given = {int(b): tuple(sorted(float(x) for x in xs)) for b, xs in self.samples}
        for b, xs in given.items():
            if not xs:
                raise BatchingError(f"service samples of batch {b} are empty")
        means = dict((int(b), float(ms)) for b, ms in self.points)
        means.update((b, math.fsum(xs) / len(xs)) for b, xs in given.items())
        pts = sorted(means.items())
        if not pts:
            raise BatchingError("service.latency_ms is empty; it maps batch sizes to milliseconds")
        object.__setattr__(self, "points", tuple(pts))
        object.__setattr__(self, "samples", tuple(sorted(given.items())))
        sizes = [b for b, _ in pts]
        table = [0.0]
        for n in range(1, sizes[-1] + 1):
            (b0, m0), (b1, m1), w = self._between(n)
            table.append(m0 + (m1 - m0) * w)
        object.__setattr__(self, "table", tuple(table))

    @classmethod
    def measured(cls, latency_ms: dict) -> "Service":
        """From {batch: ms or a sequence of measured ms}."""
        points = tuple((b, float(v)) for b, v in latency_ms.items() if np.ndim(v) == 0)
        samples = tuple((b, tuple(float(x) for x in v)) for b, v in latency_ms.items() if np.ndim(v) != 0)
        return cls(points, samples)

    def _between(self, n: int) -> tuple[tuple[int, float], tuple[int, float], float]:
        """The given sizes around n and n's weight on the upper one (0 at or below the smallest)."""
        pts = self.points
        i = bisect.bisect_left([b for b, _ in pts], n)
        if i == 0 or pts[i][0] == n:
            p = pts[min(i, len(pts) - 1)]
            return p, p, 0.0
        (b0, m0), (b1, m1) = pts[i - 1], pts[i]
        return (b0, m0), (b1, m1), (n - b0) / (b1 - b0)

    @property
    def max_batch(self) -> int:
        return self.points[-1][0]

    def ms(self, n: int) -> float:
        return self.table[n]

    def bins(self, n: int, k: int) -> np.ndarray:
        """The distribution of s(n) as `k` equally likely values: the means of its quantile
        function over [i/k, (i+1)/k] (their mean is s(n) exactly)."""
        (b0, _), (b1, _), w = self._between(n)
        return (1.0 - w) * self._size_bins(b0, k) + w * self._size_bins(b1, k)

    def draw(self, n: int, u: float) -> float:
        """s(n) at quantile u in [0, 1): a draw when u is uniform."""
        (b0, _), (b1, _), w = self._between(n)
        return (1.0 - w) * self._size_quantile(b0, u) + w * self._size_quantile(b1, u)

    def _size_samples(self, b: int) -> tuple[float, ...]:
        for size, xs in self.samples:
            if size == b:
                return xs
        return (self.table[b],)

    def _size_quantile(self, b: int, u: float) -> float:
        xs = self._size_samples(b)
        return xs[min(int(u * len(xs)), len(xs) - 1)]

    def _size_bins(self, b: int, k: int) -> np.ndarray:
        xs = np.array(self._size_samples(b))
        # the quantile function's integral, exact at j / m and linear between
        integral = np.concatenate(([0.0], np.cumsum(xs))) / len(xs)
        at = np.interp(np.arange(k + 1) / k, np.arange(len(xs) + 1) / len(xs), integral)
        return np.diff(at) * k


@dataclass(frozen=True)
class Evaluation:
    """What a (B, T) gives: `batch_pmf[n - 1]` = P(a dispatched batch holds n requests),
    `mean_batch` = E[N], `device_ms_per_request` = E[s(N)] / E[N] (the device time a request
    costs: the planner's cost), the request latency's `percentile` (in %) in ms."""

    max_batch: int
    timeout_ms: float
    batch_pmf: tuple[float, ...]
    mean_batch: float
    device_ms_per_request: float
    latency_percentile_ms: float
    percentile: float

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "max_batch": self.max_batch, "timeout_ms": self.timeout_ms,
                "batch_pmf": list(self.batch_pmf), "mean_batch": self.mean_batch,
                "latency_percentile_ms": self.latency_percentile_ms, "percentile": self.percentile,
                "device_ms_per_request": self.device_ms_per_request}


def check_point(service: Service, B: int, timeout_ms: float, percentile: float) -> None:
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise BatchingError(f"--max-batch must be an integer >= 1, got {B!r}")
    if B > service.max_batch:
        raise BatchingError(f"--max-batch {B} is beyond service.latency_ms's largest batch size "
                            f"({service.max_batch}); the service time is not extrapolated")
    if not (math.isfinite(timeout_ms) and timeout_ms >= 0):
        raise BatchingError(f"--timeout-ms must be a finite number >= 0, got {timeout_ms!r}")
    if not (0 < percentile < 100):
        raise BatchingError(f"--percentile must be in (0, 100), got {percentile!r}")


def pmf_and_start(chain: Chain, timeout_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """(batch pmf, pi0) for one T."""
    e, i = chain.step(timeout_ms)
    a_t, ma_t = chain.start @ e, chain.start @ i
    pi0 = chain.cycle_start(a_t, ma_t)
    return chain.pmf(pi0 @ a_t, pi0 @ ma_t), pi0


def cost(pmf: np.ndarray, service: Service) -> tuple[float, float]:
    """(mean batch, device ms per request) of a batch pmf."""
    n = np.arange(1, len(pmf) + 1)
    mean = float(pmf @ n)
    return mean, float(pmf @ np.array([service.ms(k) for k in n])) / mean


def evaluate(arrivals: Map, service: Service, B: int, timeout_ms: float, percentile: float = 95.0,
             steps: int = STEPS) -> Evaluation:
    """The batcher (B, T = `timeout_ms`) under `arrivals`, its batches served by `service`."""
    check_point(service, B, timeout_ms, percentile)
    if B == 1 or timeout_ms == 0:  # every batch is the first request alone
        pmf = np.zeros(B)
        pmf[0] = 1.0
        return _result(B, timeout_ms, pmf, service, service.ms(1), percentile)
    chain = Chain.build(arrivals.D0 / 1000.0, arrivals.D1 / 1000.0, B)
    pmf, pi0 = pmf_and_start(chain, timeout_ms)
    p = percentile / 100.0
    horizon = quantile_horizon(chain, pi0, timeout_ms, FILLING_TAIL * (1.0 - p) / B)
    pmf_h, pi0_h = (pmf, pi0) if horizon == timeout_ms else pmf_and_start(chain, horizon)
    x = latency_quantile(chain, pi0_h, pmf_h, service, horizon, p, steps)
    return _result(B, timeout_ms, pmf, service, x, percentile)


def still_filling(chain: Chain, pi0: np.ndarray, t_ms: float) -> float:
    """P(a cycle that starts in phase law `pi0` has not dispatched a full batch by `t_ms`)."""
    blocks, _ = step_rows(chain.d0, chain.d1, chain.B - 1, t_ms)
    return float(pi0 @ blocks.sum(axis=(0, 2)))


def quantile_horizon(chain: Chain, pi0: np.ndarray, timeout_ms: float, tail: float) -> float:
    """The shortest T / 2^j (j >= 0) by which a cycle is still filling with probability < `tail`,
    halving while the half still qualifies; T itself when its half does not (module docstring)."""
    t = timeout_ms
    for _ in range(64):
        if still_filling(chain, pi0, t / 2) >= tail:
            break
        t /= 2
    return t


def _result(B, timeout_ms, pmf, service, x, percentile) -> Evaluation:
    mean, per_request = cost(pmf, service)
    return Evaluation(B, float(timeout_ms), tuple(float(p) for p in pmf), mean, per_request, float(x),
                      float(percentile))


def wait_tables(chain: Chain, pi0: np.ndarray, pmf: np.ndarray, timeout_ms: float, steps: int):
    """(grid, H) with grid w_k = k T / K and H[k, n - 1] = H_n(w_k) (module docstring); the row
    k = K holds the left limits at T (before the timeout batches' first requests).

    exp(G w) is block upper-triangular Toeplitz over levels (G is, and a leading block of an
    upper-triangular product is the product of the leading blocks), so its first block row R_k
    (m x S) carries all of it: [exp(G w_k) 1_n](k1, i) is the row sum of block n - k1 of R_k,
    and the H_n sum over k1 is a convolution over levels."""
    K = steps
    h = timeout_ms / K
    e, i = chain.step(h)
    S, B, m = chain.size, chain.B, chain.m
    L = B - 1
    rows = np.empty((K + 1, m + 1, S))  # [k]: alpha_k, then R_k (first block row of E^k)
    rows[0, 0], rows[0, 1:] = pi0 @ chain.start, chain.start
    for k in range(K):
        rows[k + 1] = rows[k] @ e
    alpha = rows[:, 0]
    mint = np.zeros((K + 1, S))
    mint[1:] = np.cumsum(alpha[:-1] @ i, axis=0)
    blocks = rows[:, 1:].reshape(K + 1, m, L, m)  # [k, i, offset, j]
    g = blocks.sum(axis=-1) * np.arange(L)  # [k, i, d] = d * F_k[i, d]
    a_rev = alpha[::-1].reshape(K + 1, L, m).transpose(0, 2, 1)  # [k, i, level - 1] of alpha_{K - k}
    size = 2 * L  # the convolution over levels, by FFT (no wrap-around at 2L)
    conv = np.fft.irfft(np.fft.rfft(a_rev, size) * np.fft.rfft(g, size), size)[:, :, :L]
    H = np.empty((K + 1, B))
    H[:, :-1] = conv.sum(axis=1)
    v = (blocks @ chain.d1.sum(axis=1))[:, :, ::-1]  # [k, i, level - 1]: exp(G w_k) d
    m_rev = mint[::-1].reshape(K + 1, L, m)
    H[:, -1] = B * pmf[-1] - np.einsum("kli,l,kil->k", m_rev, np.arange(1, B, dtype=float), v)
    return np.linspace(0.0, timeout_ms, K + 1), H


def request_latency_cdf(chain: Chain, pi0: np.ndarray, pmf: np.ndarray, service: Service, timeout_ms: float,
                        steps: int = STEPS):
    """F(x) = P(a request's latency <= x ms), x a float (module docstring)."""
    grid, H = wait_tables(chain, pi0, pmf, timeout_ms, steps)
    B, K = chain.B, steps
    h = timeout_ms / K
    s = np.array([service.ms(k) for k in range(1, B + 1)])
    total = np.arange(1, B + 1) * pmf  # H_n at and beyond T
    mean = float(total.sum())
    cols = np.arange(B)

    def cdf(x: float) -> float:
        w = x - s
        pos = np.clip(w / h, 0.0, K)
        lo = np.minimum(pos.astype(int), K - 1)
        frac = pos - lo
        inside = (1 - frac) * H[lo, cols] + frac * H[lo + 1, cols]
        vals = np.where(w < 0, 0.0, np.where(w >= timeout_ms, total, inside))
        return float(vals.sum()) / mean

    return cdf


def latency_quantile(chain: Chain, pi0: np.ndarray, pmf: np.ndarray, service: Service, timeout_ms: float,
                     p: float, steps: int = STEPS) -> float:
    """The smallest x (ms) with F(x) >= p, F the request latency's distribution, by bisection."""
    cdf = request_latency_cdf(chain, pi0, pmf, service, timeout_ms, steps)
    s = [service.ms(k) for k in range(1, chain.B + 1)]
    return bisect_quantile(cdf, min(s), max(s) + timeout_ms, p)


def bisect_quantile(cdf, lo: float, hi: float, p: float) -> float:
    """The smallest x in [lo, hi] with cdf(x) >= p, cdf non-decreasing with cdf(hi) >= p, by
    bisection to 1e-9 relative."""
    if cdf(lo) >= p:
        return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if cdf(mid) >= p:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9 * max(1.0, hi):
            break
    return hi
