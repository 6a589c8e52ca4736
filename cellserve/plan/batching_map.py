"""Arrival processes for the analytic batcher (plan/batching.py): Markovian arrival processes.

A MAP (D0, D1) on m phases: D0 holds the phase changes without an arrival (off the diagonal)
and minus the total rate of leaving each phase (on it), D1 the changes with one arrival. Rates
are per second, as in the ARRIVALS file. Poisson at rate r is the MAP ([[-r]], [[r]]).

`fit_mmpp2` fits a 2-state Markov-modulated Poisson process to a trace of arrival timestamps
by moments (method in its docstring); a trace that is not over-dispersed gets a Poisson fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellserve.plan.profile import ProfileError


class BatchingError(ProfileError):
    """An arrivals or service file (or a flag) that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Map:
    """A Markovian arrival process; `d0`, `d1` are m x m, rates per second.

    Valid when: both square and of one size, D1 >= 0, D0 >= 0 off its diagonal, every row of
    D0 + D1 sums to 0, and the process makes arrivals (D1 not all zero). `where` names the
    field in error messages."""

    d0: tuple[tuple[float, ...], ...]
    d1: tuple[tuple[float, ...], ...]

    @classmethod
    def of(cls, d0, d1, where: str = "map") -> "Map":
        """Checked construction from nested lists or arrays."""
        m = cls(_matrix(d0, f"{where}.D0"), _matrix(d1, f"{where}.D1"))
        m.validate(where)
        return m

    @classmethod
    def poisson(cls, rate_rps: float) -> "Map":
        if not (math.isfinite(rate_rps) and rate_rps > 0):
            raise BatchingError(f"poisson_rps must be a finite number > 0, got {rate_rps!r}")
        return cls(((-float(rate_rps),),), ((float(rate_rps),),))

    @property
    def D0(self) -> np.ndarray:
        return np.array(self.d0, dtype=float)

    @property
    def D1(self) -> np.ndarray:
        return np.array(self.d1, dtype=float)

    @property
    def phases(self) -> int:
        return len(self.d0)

    def validate(self, where: str = "map") -> None:
        d0, d1 = self.D0, self.D1
        m = d0.shape[0]
        if d0.shape != (m, m) or d1.shape != (m, m) or m == 0:
            raise BatchingError(f"{where}: D0 and D1 must be square matrices of one size, got "
                                f"{list(d0.shape)} and {list(d1.shape)}")
        scale = max(1.0, float(np.abs(d0).max()), float(np.abs(d1).max()))
        for i in range(m):
            for j in range(m):
                if d1[i, j] < 0:
                    raise BatchingError(f"{where}.D1[{i}][{j}] must be >= 0 (a rate), got {float(d1[i, j])!r}")
                if i != j and d0[i, j] < 0:
                    raise BatchingError(f"{where}.D0[{i}][{j}] must be >= 0 (a rate off the diagonal), "
                                        f"got {float(d0[i, j])!r}")
            total = d0[i].sum() + d1[i].sum()
            if abs(total) > 1e-9 * scale:
                raise BatchingError(f"{where}: row {i} of D0 + D1 must sum to 0 (a generator), sums to {total:g}")
            if d0[i, i] >= 0:
                raise BatchingError(f"{where}.D0[{i}][{i}] must be < 0 (minus the rate of leaving phase {i}), "
                                    f"got {d0[i, i]!r}")
        if not (d1 > 0).any():
            raise BatchingError(f"{where}.D1 is all zero: the process makes no arrivals")
        if not np.isfinite(self.rate_rps) or self.rate_rps <= 0:
            raise BatchingError(f"{where}: the stationary arrival rate is {self.rate_rps!r}; "
                                "the process must reach a phase that makes arrivals")

    @property
    def stationary(self) -> np.ndarray:
        """The time-stationary phase distribution: pi (D0 + D1) = 0, pi 1 = 1."""
        return _stationary(self.D0 + self.D1)

    @property
    def rate_rps(self) -> float:
        """Mean arrivals per second: pi D1 1."""
        return float(self.stationary @ self.D1.sum(axis=1))

    def to_dict(self) -> dict:
        return {"D0": [list(r) for r in self.d0], "D1": [list(r) for r in self.d1]}


def _matrix(x: object, where: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(x, (list, tuple, np.ndarray)) or len(x) == 0:
        raise BatchingError(f"{where} must be a non-empty list of rows, got {x!r}")
    rows = []
    for i, row in enumerate(x):
        if not isinstance(row, (list, tuple, np.ndarray)):
            raise BatchingError(f"{where}[{i}] must be a list of numbers, got {row!r}")
        out = []
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise BatchingError(f"{where}[{i}][{j}] must be a finite number, got {v!r}")
            out.append(float(v))
        if len(out) != len(x):
            raise BatchingError(f"{where}[{i}] has {len(out)} entries; a {len(x)} x {len(x)} matrix needs {len(x)}")
        rows.append(tuple(out))
    return tuple(rows)


def _stationary(q: np.ndarray) -> np.ndarray:
    """pi q = 0, pi 1 = 1 for a generator (or, with q = P - I, a stochastic matrix P)."""
    m = q.shape[0]
    a = np.vstack([q.T, np.ones(m)])
    b = np.zeros(m + 1)
    b[-1] = 1.0
    pi, *_ = np.linalg.lstsq(a, b, rcond=None)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


# ---- fitting a trace ----

def _idc(times: np.ndarray, window: float) -> float:
    """Index of dispersion of counts: Var N / E N over consecutive windows of `window` seconds."""
    edges = np.arange(times[0], times[-1], window)
    if len(edges) < 3:
        return float("nan")
    counts = np.diff(np.searchsorted(times, edges))
    mean = counts.mean()
    return float(counts.var() / mean) if mean > 0 else float("nan")


def _mmpp2(rate: float, kappa: float, c: float, p1: float) -> Map | None:
    """The MMPP2 with mean rate `rate`, switching speed kappa = r1 + r2, IDC excess c (see
    fit_mmpp2) and time share p1 in the high state; None when it needs a negative rate."""
    delta = math.sqrt(c * kappa * rate / (2 * p1 * (1 - p1)))
    lo = rate - p1 * delta
    hi = lo + delta
    if lo < 0:
        return None
    r1, r2 = (1 - p1) * kappa, p1 * kappa  # leaving the high state, leaving the low state
    return Map(((-(r1 + hi), r1), (r2, -(r2 + lo))), ((hi, 0.0), (0.0, lo)))


def _interarrival_scv(m: Map) -> float:
    """Squared coefficient of variation of the stationary inter-arrival time of a MAP."""
    d0, d1 = m.D0, m.D1
    p = np.linalg.solve(-d0, d1)  # phase after the next arrival
    phi = _stationary(p - np.eye(m.phases))
    inv = np.linalg.inv(-d0)
    one = np.ones(m.phases)
    m1 = phi @ inv @ one
    m2 = 2 * phi @ inv @ inv @ one
    return float(m2 / m1 ** 2 - 1)


def fit_mmpp2(timestamps, where: str = "trace") -> Map:
    """A 2-state MMPP fitted to arrival timestamps (seconds) by moments.

    1. mean rate = (n - 1) / (last - first);
    2. the index of dispersion of counts IDC(t) = Var N(t) / E N(t) of an MMPP2 is
       1 + c (1 - (1 - exp(-kappa t)) / (kappa t)) with kappa = r1 + r2 (switching speed) and
       c = 2 (l1 - l2)^2 r1 r2 / (kappa^3 rate); kappa and c are fitted by least squares to the
       trace's IDC at 12 window lengths from 2 / rate to a tenth of the trace (kappa on a log grid,
       c in closed form for each);
    3. the time share p1 of the high state by matching the inter-arrival times' squared
       coefficient of variation (grid over p1; l1, l2, r1, r2 then follow).
    A trace with IDC excess c <= 0.05 (Poisson-like or regular) gets a Poisson fit."""
    t = np.sort(np.asarray(timestamps, dtype=float))
    if t.ndim != 1 or len(t) < 100:
        raise BatchingError(f"{where}: needs at least 100 arrival timestamps to fit, got {t.size}")
    if not np.isfinite(t).all():
        raise BatchingError(f"{where}: timestamps must be finite numbers of seconds")
    span = t[-1] - t[0]
    if span <= 0:
        raise BatchingError(f"{where}: the timestamps span no time")
    rate = (len(t) - 1) / span
    windows = np.geomspace(2 / rate, span / 10, 12) if span / 10 > 2 / rate else np.array([])
    pts = [(w, _idc(t, w)) for w in windows]
    pts = [(w, v) for w, v in pts if math.isfinite(v)]
    if len(pts) < 3:
        return Map.poisson(rate)
    w = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts]) - 1.0
    best = (math.inf, 0.0, 1.0)
    for kappa in np.geomspace(0.01 / w[-1], 100 / w[0], 400):
        g = 1 - (1 - np.exp(-kappa * w)) / (kappa * w)
        c = max(0.0, float(g @ y / (g @ g)))
        err = float(((y - c * g) ** 2).sum())
        if err < best[0]:
            best = (err, c, float(kappa))
    _, c, kappa = best
    if c <= 0.05:
        return Map.poisson(rate)
    gaps = np.diff(t)
    target = float(gaps.var() / gaps.mean() ** 2)
    fits = []
    for p1 in np.linspace(0.01, 0.99, 99):
        m = _mmpp2(rate, kappa, c, float(p1))
        if m is not None:
            fits.append((abs(_interarrival_scv(m) - target), m))
    if not fits:
        return Map.poisson(rate)
    return min(fits, key=lambda f: f[0])[1]
