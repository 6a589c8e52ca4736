"""The level-phase chain of a batcher that dispatches at B requests or T after the first.

A cycle starts when a request arrives at an empty buffer (time 0, level 1). The state is
(level k = requests waiting, 1 <= k <= B - 1; phase i of the MAP); D0 moves the phase, D1 adds
a request. Reaching level B dispatches a full batch at once (absorption); at time T the batch
is the level then. Dispatch empties the buffer, and the next cycle starts at the next arrival:
its phase distribution pi0 is the stationary law of the cycle-to-cycle phase chain.

All transient quantities come from two matrices for a time step h, E_h = exp(G h) and
I_h = integral_0^h exp(G u) du (G the chain's generator on the transient states), which
uniformization computes exactly up to a 1e-15 truncation, with scaling and squaring
(E_2h = E_h E_h, I_2h = I_h + E_h I_h). Everything is in milliseconds; rates per ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellserve.plan.batching_map import _stationary

_TAIL = 1e-15


@dataclass(frozen=True)
class Chain:
    """The transient generator for max batch `B` >= 2 and a MAP (d0, d1 per ms).

    States s = (k - 1) * m + i for level k = 1 .. B - 1 and phase i. `g` is S x S; `exit`
    (S x m) the rates from the last level into a full dispatch leaving the MAP in phase j;
    `level` (S,) each state's level; `start` (m x S) puts a cycle's first request in phase i."""

    B: int
    m: int
    d0: np.ndarray
    d1: np.ndarray
    g: np.ndarray
    exit: np.ndarray
    level: np.ndarray
    start: np.ndarray

    @classmethod
    def build(cls, d0: np.ndarray, d1: np.ndarray, B: int) -> "Chain":
        if B < 2:
            raise ValueError(f"a chain needs B >= 2, got {B}")
        m = d0.shape[0]
        levels = B - 1
        S = m * levels
        g = np.zeros((S, S))
        exit_ = np.zeros((S, m))
        for k in range(levels):
            blk = slice(k * m, (k + 1) * m)
            g[blk, blk] = d0
            if k + 1 < levels:
                g[blk, (k + 1) * m:(k + 2) * m] = d1
            else:
                exit_[blk, :] = d1
        level = np.repeat(np.arange(1, B), m).astype(float)
        start = np.zeros((m, S))
        start[:, :m] = np.eye(m)
        return cls(B, m, d0, d1, g, exit_, level, start)

    @property
    def size(self) -> int:
        return self.g.shape[0]

    def step(self, h: float) -> tuple[np.ndarray, np.ndarray]:
        """(E_h, I_h) = (exp(G h), integral_0^h exp(G u) du), S x S."""
        e, i = step_rows(self.d0, self.d1, self.B - 1, h)
        return toeplitz(e), toeplitz(i)

    def by_level(self, x: np.ndarray) -> np.ndarray:
        """Sum a (..., S) array over phases: (..., B - 1), index n - 1 for level n."""
        return x.reshape(*x.shape[:-1], self.B - 1, self.m).sum(axis=-1)

    def dispatch_phase(self, a_t: np.ndarray, ma_t: np.ndarray) -> np.ndarray:
        """(m x m): from a cycle's start phase to the phase at dispatch, given A(T) = start E_T and
        MA(T) = start I_T (a timeout leaves the phase it is in; a full batch the phase D1 leads to)."""
        return self.by_phase(a_t) + ma_t @ self.exit

    def by_phase(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(*x.shape[:-1], self.B - 1, self.m).sum(axis=-2)

    def cycle_start(self, a_t: np.ndarray, ma_t: np.ndarray) -> np.ndarray:
        """pi0: the stationary phase of a cycle's first request, just after it arrived."""
        after_arrival = np.linalg.solve(-self.d0, self.d1)  # phase j -> phase after the next arrival
        c = self.dispatch_phase(a_t, ma_t) @ after_arrival
        return _stationary(c - np.eye(self.m))

    def pmf(self, alpha_t: np.ndarray, m_t: np.ndarray) -> np.ndarray:
        """P(batch = n), n = 1 .. B, from alpha(T) = pi0 E_T and M(T) = pi0 I_T."""
        out = np.empty(self.B)
        out[:-1] = self.by_level(alpha_t)
        out[-1] = float(m_t @ self.exit.sum(axis=1))
        out = np.clip(out, 0.0, None)
        return out / out.sum()


def step_matrices(g: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """(exp(G h), integral_0^h exp(G u) du) for a sub-generator G (off-diagonal >= 0, rows <= 0).

    Uniformization with rate L = max exit rate: exp(G u) = sum_n Poisson(L u; n) P^n with
    P = I + G / L, so the integral is sum_n P^n P(Poisson(L h) > n) / L. Both sums have
    non-negative terms (no cancellation). A step with L h > 1 is halved until it is not and
    squared back up."""
    S = g.shape[0]
    eye = np.eye(S)
    if h <= 0 or S == 0:
        return eye.copy(), np.zeros((S, S))
    rate = float(max(-g.diagonal().min(), 1e-300))
    halvings = max(0, int(np.ceil(np.log2(rate * h))))
    hs = h / 2 ** halvings
    x = rate * hs
    p = eye + g / rate
    term = eye.copy()
    weight = np.exp(-x)
    tail = 1.0 - weight  # P(Poisson(x) > n)
    e = weight * term
    integral = tail * term
    n = 0
    while tail > _TAIL and n < 200:
        n += 1
        term = term @ p
        weight *= x / n
        tail = max(tail - weight, 0.0)
        e += weight * term
        integral += tail * term
    integral /= rate
    for _ in range(halvings):
        integral = integral + e @ integral
        e = e @ e
    return e, integral


# ---- the same on block upper-triangular Toeplitz matrices ----
# G is block upper-bidiagonal Toeplitz over levels (D0 on the diagonal, D1 above it), and so is
# every power, exponential and integral of it: such a matrix is its first block row, L blocks
# of m x m, and a product is a convolution of blocks (L^2 m^3 work instead of L^3 m^3).

def toeplitz_mul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first block row of X Y, given those of X and Y ((L, m, m) each)."""
    L = x.shape[0]
    z = np.zeros_like(x)
    for a in range(L):
        z[a:] += x[a] @ y[:L - a]
    return z


def toeplitz(blocks: np.ndarray) -> np.ndarray:
    """The full (L m x L m) matrix of a first block row (L, m, m)."""
    L, m, _ = blocks.shape
    off = np.arange(L)[None, :] - np.arange(L)[:, None]  # k2 - k1
    full = np.where((off >= 0)[:, :, None, None], blocks[np.clip(off, 0, None)], 0.0)
    return full.transpose(0, 2, 1, 3).reshape(L * m, L * m)


def step_rows(d0: np.ndarray, d1: np.ndarray, levels: int, h: float) -> tuple[np.ndarray, np.ndarray]:
    """First block rows ((levels, m, m)) of exp(G h) and integral_0^h exp(G u) du for the
    chain's G on `levels` levels; the uniformization of `step_matrices`, in Toeplitz form."""
    m = d0.shape[0]
    e = np.zeros((levels, m, m))
    e[0] = np.eye(m)
    if h <= 0:
        return e, np.zeros_like(e)
    rate = float(max(-d0.diagonal().min(), 1e-300))
    halvings = max(0, int(np.ceil(np.log2(rate * h))))
    x = rate * h / 2 ** halvings
    p0, p1 = np.eye(m) + d0 / rate, d1 / rate
    term = e.copy()
    weight = np.exp(-x)
    tail = 1.0 - weight
    out = weight * term
    integral = tail * term
    n = 0
    while tail > _TAIL and n < 200:
        n += 1
        nxt = term @ p0
        nxt[1:] += term[:-1] @ p1
        term = nxt
        weight *= x / n
        tail = max(tail - weight, 0.0)
        out += weight * term
        integral += tail * term
    integral /= rate
    for _ in range(halvings):
        integral = integral + toeplitz_mul(out, integral)
        out = toeplitz_mul(out, out)
    return out, integral
