"""The batcher of plan/batching.py on one server: a batch forms only when the server is free,
at the B-th waiting request or T after the oldest waiting one, whichever comes first (at once
if either passed while the server was busy), and takes the oldest B. That is the engine's
`padded` policy, and Triton's dynamic batcher on one model instance; plan/batching.py's model
serves every batch the moment it is dispatched, which a busy server cannot.

`evaluate_single_server(arrivals, service, B, T, percentile)` gives the same Evaluation as
`batching.evaluate`. The method (docs/batching.md, "One server"): a discrete-time Markov chain
on a grid of step h ms, solved for its stationary law. Its state at a grid point:
- the MAP's phase;
- r, the steps until the server is free (0: free now);
- q, the requests waiting (not in service), and a, the oldest one's age, (a + 1/2) h: an
  arrival is taken to come mid-step.
Over a step, r counts down, the waiting age, and arrivals come by the MAP's counting matrices
for h (exact: the level chain's transient). At the grid point, a free server with q >= B, or
with the oldest aged T or more, dispatches n = min(q, B) and is busy for s(n): floor(s(n) / h)
or one step more, at random with the odds that make the mean exact (a deterministic round
would move the utilisation, and near saturation the queue with it). A service with a spread
(`Service.samples`) gives s(n) as SERVICE_BINS equally likely values, each rounded so; the
latency then mixes over them.

Two approximations, both where requests are left waiting after a full batch leaves (q > B):
the oldest of those is given the age the (n+1)-th oldest of q arrivals spread evenly over the
oldest's age would have; and a batch's requests other than its oldest are taken to have
arrived uniformly over the oldest's wait, except those of a batch a free server dispatched as
its B-th request came, which came in that last step. For Poisson arrivals the spread is the
exact conditional law where no batch left requests behind. docs/batching.md gives the errors
measured against the discrete-event simulation (plan/batching_des.py, mode "queue").

The latency of a request = its wait from arrival to dispatch + s(its batch's size); its
distribution, over requests, comes from the dispatches' rates at stationarity; the percentile
by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellserve.plan.batching import Evaluation, Service, _result, bisect_quantile, check_point
from cellserve.plan.batching_chain import step_rows
from cellserve.plan.batching_map import BatchingError, Map

STEPS_PER_SERVICE = 16  # default grid: this many steps in the shorter of s(1) and T ...
MAX_AGE_STEPS = 160  # ... coarsened so that T + 2 s(B) spans at most this many
MIN_SERVICE_STEPS = 4  # ... never so coarse that the shortest s(n) spans fewer steps (nor coarsened past it)
SERVICE_BINS = 16  # a service with a spread: each s(n) as this many equally likely values
AGE_CAP = 320  # an age cap (or a longest service) past this many steps doubles the step instead (default grid only)
ARRIVAL_TAIL = 1e-12  # the per-step arrival counts are kept to this tail
LUMP_TAIL = 1e-7  # the stationary mass allowed at the queue's and the age's caps
CONVERGED = 1e-10  # L1 change of the state over one (averaged) step at stationarity
MAX_STEPS = 200_000
EXTRAPOLATE_EVERY = 8  # blocks of iterates per extrapolation (see _SingleServerChain.solve)


@dataclass(frozen=True)
class SingleServerGrid:
    """The discretisation: step `step_ms`; a batch of n takes a time drawn from
    `service_bins[n - 1]` (equally likely values, ms; one value when the service has no
    spread), `service_ms[n - 1]` on average, and keeps the server busy for r steps with
    probability `service_pmf[n - 1, r]`; the timer fires at age index `timer_steps`."""

    step_ms: float
    service_bins: np.ndarray
    service_pmf: np.ndarray
    timer_steps: int

    @classmethod
    def choose(cls, service: Service, B: int, timeout_ms: float, step_ms: float | None = None) -> "SingleServerGrid":
        s = np.array(service.table[1:B + 1])
        bins = np.stack([service.bins(n, SERVICE_BINS if service.samples else 1) for n in range(1, B + 1)])
        if step_ms is None:
            shortest = bins.min()  # a spread's lowest bin: the grid resolves it where it can
            step_ms = min(shortest, timeout_ms) / STEPS_PER_SERVICE if timeout_ms > 0 else shortest / STEPS_PER_SERVICE
            step_ms = min(max(step_ms, (timeout_ms + 2 * s.max()) / MAX_AGE_STEPS), s.min() / MIN_SERVICE_STEPS)
            if timeout_ms > 0:  # T a whole number of steps
                step_ms = timeout_ms / math.ceil(timeout_ms / step_ms)
        if not (math.isfinite(step_ms) and step_ms > 0):
            raise BatchingError(f"the grid step must be a finite number of ms > 0, got {step_ms!r}")
        if step_ms > s.min():  # a batch would take a whole step at least: its mean could not be kept
            raise BatchingError(f"the grid step ({step_ms:g} ms) must not exceed the shortest service time "
                                f"({s.min():g} ms)")
        # each value: floor(v / h) steps or one more, with the odds that keep it (a value under
        # one step, in a spread's lowest bins only, takes one step: the server frees at a grid point)
        x = np.maximum(bins / step_ms, 1.0)
        lo = np.floor(x).astype(int)
        extra = x - lo
        pmf = np.zeros((B, int(lo.max()) + 2))
        rows = np.broadcast_to(np.arange(B)[:, None], lo.shape)
        np.add.at(pmf, (rows, lo), (1.0 - extra) / bins.shape[1])
        np.add.at(pmf, (rows, lo + 1), extra / bins.shape[1])
        # the first grid point at which an arrival's age (k + 1/2) h reaches T
        timer = max(0, math.ceil(timeout_ms / step_ms - 0.5 - 1e-9))
        return cls(float(step_ms), bins, pmf, timer)

    @property
    def service_ms(self) -> np.ndarray:
        """s(n) for n = 1 .. B: the bins' means."""
        return self.service_bins.mean(axis=1)


def evaluate_single_server(arrivals: Map, service: Service, B: int, timeout_ms: float, percentile: float = 95.0,
                           step_ms: float | None = None) -> Evaluation:
    """The batcher (B, T = `timeout_ms`) on one server under `arrivals` (module docstring)."""
    check_point(service, B, timeout_ms, percentile)
    grid = SingleServerGrid.choose(service, B, timeout_ms, step_ms)
    most = float((np.arange(1, B + 1) / grid.service_ms).max()) * 1000.0
    if arrivals.rate_rps >= most:
        raise BatchingError(f"one server cannot keep up: requests arrive at {arrivals.rate_rps:.6g}/s on average and "
                            f"batches of at most {B} serve at most {most:.6g}/s (the queue would grow without end)")
    while True:
        try:
            std, fill = _SingleServerChain(arrivals, grid, B, coarsen=step_ms is None).solve()
            break
        except _TooFine as exc:  # waits or a batch far longer than the grid was made for: a coarser one
            if 2 * grid.step_ms > grid.service_ms.min() / MIN_SERVICE_STEPS:
                raise BatchingError(f"{exc} outgrow the single-server model's grid ({AGE_CAP} steps of "
                                    f"{grid.step_ms:g} ms, and a batch must span {MIN_SERVICE_STEPS} steps on "
                                    f"average){_TOO_FINE_WHY[str(exc)]}") from None
            grid = SingleServerGrid.choose(service, B, timeout_ms, 2 * grid.step_ms)
    pmf = np.zeros(B)
    q_of = np.arange(std.shape[0])
    np.add.at(pmf, np.minimum(q_of[1:], B) - 1, std[1:].sum(axis=1))
    pmf[B - 1] += fill.sum()
    if pmf.sum() <= 0:
        raise BatchingError("the single-server chain dispatched nothing (no arrivals?)")
    pmf /= pmf.sum()
    x = _latency_quantile(std, fill, grid, percentile / 100.0)
    return _result(B, timeout_ms, pmf, service, x, percentile)


class _TooFine(Exception):
    """The waits, or the longest service, outgrow the grid: AGE_CAP steps would not hold them
    (the message says which: a key of _TOO_FINE_WHY)."""


_TOO_FINE_WHY = {"waits": ": the server is too close to overload at these arrivals for this B",
                 "the longest service times": ": the service's spread is too wide against its shortest mean"}


class _SingleServerChain:
    """The chain of the module docstring, X[phase, r, q, a], with its caps on q and a grown
    until the stationary mass at them is under LUMP_TAIL."""

    def __init__(self, arrivals: Map, grid: SingleServerGrid, B: int, coarsen: bool = False):
        d0, d1 = arrivals.D0 / 1000.0, arrivals.D1 / 1000.0
        self.grid, self.B, self.m, self.coarsen = grid, B, d0.shape[0], coarsen
        h = grid.step_ms
        self.R = grid.service_pmf.shape[1] - 1
        if coarsen and self.R > AGE_CAP:
            raise _TooFine("the longest service times")
        self.Q = B + 4  # the caps grow (doubling) while the mass at them is over LUMP_TAIL
        self.A = grid.timer_steps + self.R + 4
        J = 1
        while True:
            counts, _ = step_rows(d0, d1, J + 1, h)
            if 1.0 - counts.sum(axis=(0, 2)).min() < ARRIVAL_TAIL or J >= 200:
                break
            J += 1
        self.counts = counts  # [j, i, k]: j arrivals in a step, phase i -> k
        self.at_least = np.cumsum(counts.sum(axis=2)[::-1], axis=0)[::-1]  # [j, i]: >= j arrivals
        self.full_steps = np.nonzero(grid.service_pmf[B - 1])[0]  # a full batch's service lengths
        self.X = np.zeros((self.m, self.R + 1, self.Q + 1, self.A + 1))
        self.X[:, 0, 0, 0] = arrivals.stationary
        self._plan_dispatch()

    def _plan_dispatch(self) -> None:
        """Which of a free server's (q, a) dispatch at a grid point (`ready`), and where the
        requests left behind a full batch go: `leftover[q - B - 1][a, k]` = P(the oldest of
        them has age index k | q waiting, the oldest at index a), their oldest being the
        (B+1)-th oldest of q arrivals spread evenly over the oldest's age (module docstring):
        a fraction Beta(q - B, B) of it, binned as floor((a + 1/2) x)."""
        B, Q, A, g = self.B, self.Q, self.A, self.grid
        q = np.arange(Q + 1)[:, None]
        a = np.arange(A + 1)[None, :]
        self.ready = (q >= 1) & ((q >= B) | (a >= g.timer_steps))
        self.ready[B + 1:] = False  # more than B waiting: a full batch, the rest left behind (step)
        self.ready_at = np.nonzero(self.ready)
        self.ready_n = self.ready_at[0]  # each ready entry's batch: all q of them
        edges = np.clip(np.arange(A + 2)[None, :] / (np.arange(A + 1)[:, None] + 0.5), 0.0, 1.0)
        self.leftover = np.stack([np.diff(_binomial_at_least(qq - 1, edges, qq - B), axis=1)
                                  for qq in range(B + 1, Q + 1)]) if Q > B else np.zeros((0, A + 1, A + 1))

    def _age_and_arrive(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step's ageing of the waiting and arrivals, on an array [phase, ..., q, a]:
        (the aged array, the result)."""
        aged = np.empty_like(X)
        aged[..., 0, :] = X[..., 0, :]
        aged[..., 1:, 0] = 0.0
        aged[..., 1:, 1:] = X[..., 1:, :-1]
        aged[..., 1:, -1] += X[..., 1:, -1]
        Q = X.shape[-2] - 1
        out = self._mix(self.counts[0], aged)
        for j in range(1, min(len(self.counts), Q + 1)):
            moved = self._mix(self.counts[j], aged)
            out[..., j:Q, :] += moved[..., :Q - j, :]
            out[..., Q, :] += moved[..., Q - j:, :].sum(axis=-2)
        return aged, out

    @staticmethod
    def _mix(c: np.ndarray, X: np.ndarray) -> np.ndarray:
        """sum_i c[i, k] X[i] for every phase k: scaled sums (np.tensordot copies a
        transposed X into a matrix product, several times slower at these shapes)."""
        out = np.empty_like(X)
        for k in range(c.shape[1]):
            np.multiply(X[0], c[0, k], out=out[k])
            for i in range(1, c.shape[0]):
                out[k] += c[i, k] * X[i]
        return out

    def step(self, X: np.ndarray, record: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """X one step on; with `record` = (std [q, a], fill [q_prev, a]), add this step's
        dispatches to it (module docstring: fill are those a free server made as its B-th came)."""
        R = self.R
        busy = np.zeros_like(X)
        busy[:, :R] = X[:, 1:]  # r counts down; the r = 1 of before is free now
        _, Y = self._age_and_arrive(busy)
        aged_free, Yw = self._age_and_arrive(X[:, 0])  # free before the step: q < B, a < T
        if record is not None:
            std, fill = record
            for q_prev in range(min(self.B, aged_free.shape[1])):
                need = self.B - q_prev
                if need < len(self.at_least):
                    fill[q_prev] += (aged_free[:, q_prev, :] * self.at_least[need][:, None]).sum(axis=0)
        g, B = self.grid, self.B
        for free, was_free in ((Y[:, 0], False), (Yw, True)):
            # at most B waiting: all go, none left
            mass = free[:, self.ready]  # [phase, entry]
            free[:, self.ready] = 0.0
            by_n = np.zeros((self.m, B + 1))
            for i in range(self.m):
                by_n[i] = np.bincount(self.ready_n, mass[i], minlength=B + 1)
            if record is not None:
                keep = mass.sum(axis=0)
                if was_free:  # a free server's full batches are the fill events
                    keep = np.where(self.ready_n >= B, 0.0, keep)
                record[0][self.ready_at] += keep
            Y[:, :, 0, 0] += by_n[:, 1:] @ g.service_pmf
            # more than B waiting: a full batch goes, the rest wait with a new oldest
            if self.Q > B:
                full = free[:, B + 1:].copy()  # [phase, q - B - 1, a]
                free[:, B + 1:] = 0.0
                if record is not None and not was_free:
                    record[0][B + 1:] += full.sum(axis=0)
                left = np.matmul(full.transpose(1, 0, 2), self.leftover).transpose(1, 0, 2)  # [phase, left - 1, k]
                for r in self.full_steps:
                    Y[:, r, 1:self.Q - B + 1] += left * g.service_pmf[B - 1, r]
        Y[:, 0] += Yw
        return Y

    def solve(self) -> tuple[np.ndarray, np.ndarray]:
        """Iterate to the stationary law, growing the caps while mass sits at them; then one
        recorded step. Each block of steps ends with one lazy step (the mean of the state and
        its next), which damps a periodic chain; every EXTRAPOLATE_EVERY blocks the iterates
        are extrapolated to their limit (reduced rank extrapolation: the affine combination
        whose next block would change least), as a chain that mixes slowly (a bursty MAP's
        phases) would otherwise take many thousands of steps."""
        steps, block = 0, max(50, self.R)
        history = []
        while True:
            if steps > MAX_STEPS:
                raise BatchingError(f"the single-server chain did not settle within {MAX_STEPS:,} steps of "
                                    f"{self.grid.step_ms:g} ms (the server may be overloaded: more work arrives "
                                    f"than it can serve)")
            X = self.X
            for _ in range(block):
                X = self.step(X)
            nxt = 0.5 * (X + self.step(X))
            steps += block + 1
            change = float(np.abs(nxt - X).sum())
            history.append(self.X)
            self.X = nxt
            if self.X[:, :, -1].sum() > LUMP_TAIL:
                self._grow(q=True)
                history = []
            elif self.X[..., -1].sum() > LUMP_TAIL:
                self._grow(q=False)
                history = []
            elif change < CONVERGED:
                break
            elif len(history) == EXTRAPOLATE_EVERY:
                self.X = _extrapolated(history + [self.X])
                history = []
        std = np.zeros((self.Q + 1, self.A + 1))
        fill = np.zeros((self.B, self.A + 1))
        self.step(self.X, (std, fill))
        return std, fill

    def _grow(self, q: bool) -> None:
        """Double the cap on the queue (q) or on the age, keeping the state."""
        pad = [(0, 0)] * 4
        if q:
            pad[2] = (0, self.Q)
            self.Q *= 2
        else:
            if self.coarsen and 2 * self.A > AGE_CAP:
                raise _TooFine("waits")
            pad[3] = (0, self.A)
            self.A *= 2
        self.X = np.pad(self.X, pad)
        self._plan_dispatch()


def _extrapolated(iterates: list[np.ndarray]) -> np.ndarray:
    """Reduced rank extrapolation of a linear fixed-point iteration's iterates x_0 .. x_k:
    sum_i g_i x_i with sum g = 1 minimising |sum_i g_i (x_{i+1} - x_i)|; kept a distribution
    (negative entries cut, total 1). The last iterate when the system is singular."""
    x = np.stack([it.reshape(-1) for it in iterates])
    u = np.diff(x, axis=0)
    gram = u @ u.T
    try:
        g = np.linalg.solve(gram + 1e-30 * np.trace(gram) * np.eye(len(u)), np.ones(len(u)))
    except np.linalg.LinAlgError:
        return iterates[-1]
    if not np.all(np.isfinite(g)) or g.sum() == 0:
        return iterates[-1]
    g /= g.sum()
    out = np.clip(g @ x[:-1], 0.0, None)
    total = out.sum()
    return (out / total).reshape(iterates[-1].shape) if total > 0 else iterates[-1]


def _binomial_pmf(trials: np.ndarray | int, p: np.ndarray, k: int) -> np.ndarray:
    """P(Binomial(trials, p) = k), elementwise (0 where k > trials; exact at p = 0 and 1)."""
    trials = np.broadcast_to(np.asarray(trials), p.shape)
    top = int(trials.max()) if trials.size else 0
    log_factorial = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, max(top, k) + 1)))))
    inside = (p > 0) & (p < 1)
    x = np.where(inside, p, 0.5)
    left = np.maximum(trials - k, 0)
    pk = np.exp(log_factorial[trials] - log_factorial[k] - log_factorial[left] + k * np.log(x) + left * np.log1p(-x))
    pk = np.where(inside, pk, np.where(p <= 0, float(k == 0), (k == trials).astype(float)))
    return np.where(k > trials, 0.0, pk)


def _binomial_at_least(trials: int, p: np.ndarray, k: int) -> np.ndarray:
    """P(Binomial(trials, p) >= k), elementwise over p."""
    return np.clip(sum((_binomial_pmf(trials, p, i) for i in range(k, trials + 1)), np.zeros_like(p)), 0.0, 1.0)


def _expected_min_binomial(trials: np.ndarray, p: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """E[min(cap, Binomial(trials, p))], elementwise: the sum over k < cap of P(X > k)."""
    out, cdf = np.zeros_like(p), np.zeros_like(p)
    for k in range(int(cap.max()) if cap.size else 0):
        cdf += _binomial_pmf(trials, p, k)
        out += np.where(cap > k, np.clip(1.0 - cdf, 0.0, 1.0), 0.0)
    return out


def _latency_quantile(std: np.ndarray, fill: np.ndarray, grid: SingleServerGrid, p: float) -> float:
    """The smallest x with P(latency <= x) >= p, from the dispatch rates (module docstring)."""
    bins, h = grid.service_bins, grid.step_ms
    B = len(bins)
    q, a = np.nonzero(std > 0)
    rate, n = std[q, a], np.minimum(q, B)
    oldest = (a + 0.5) * h
    fq, fa = np.nonzero(fill > 0)
    frate, f_oldest = fill[fq, fa], (fa + 0.5) * h
    requests = float((rate * n).sum() + frate.sum() * B)

    def share_over(x: float) -> float:
        over = 0.0
        for k in range(bins.shape[1]):  # each equally likely service value
            w = x - bins[n - 1, k]  # the wait that puts a request of this batch over x
            spread = np.clip((oldest - w) / oldest, 0.0, 1.0)  # a uniform arrival's odds to have waited more
            others = np.where(n == q, (q - 1) * spread, _expected_min_binomial(q - 1, spread, n - 1))
            over += float((rate * ((oldest > w) + others)).sum())
            wf = x - bins[B - 1, k]
            spread_f = np.clip((f_oldest - wf) / f_oldest, 0.0, 1.0)
            old = np.where(fq >= 1, (f_oldest > wf) + (fq - 1) * spread_f, 0.0)
            new = (B - fq) * np.clip((h - wf) / h, 0.0, 1.0)  # came in the last step
            over += float((frate * (old + new)).sum())
        return over / (requests * bins.shape[1])

    return bisect_quantile(lambda x: 1.0 - share_over(x), 0.0, float(bins.max() + (std.shape[1] + 2) * h), p)
