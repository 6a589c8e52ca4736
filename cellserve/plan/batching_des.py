"""A discrete-event simulation of the batcher plan/batching.py models, written apart from the
analytic code (it shares only the data classes): the reference the tests and
`batching_bench` hold the predictions to.

`sample_arrivals` draws arrival times (ms) from a MAP by simulating its phase process;
`simulate` runs the batcher over them in one of two modes:
- "at-once": each batch is served the moment it is dispatched (the model's assumption);
- "queue": one server, as the engine's `padded` policy: a batch forms only when the server is
  free, at the B-th waiting request or T after the oldest waiting one, whichever comes first
  (at once if either already passed), and takes the oldest B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellserve.plan.batching import Service
from cellserve.plan.batching_map import Map


@dataclass(frozen=True)
class SimResult:
    """`batches[i]`: the size of the i-th dispatched batch; `latency_ms[r]`: request r's
    latency (dispatch - arrival + service); `batch_of[r]`: the index of request r's batch."""

    batches: np.ndarray
    latency_ms: np.ndarray
    batch_of: np.ndarray

    @property
    def mean_batch(self) -> float:
        return float(self.batches.mean())

    def pmf(self, B: int) -> np.ndarray:
        return np.bincount(self.batches, minlength=B + 1)[1:B + 1] / len(self.batches)

    def percentile_ms(self, p: float) -> float:
        """The empirical p-th percentile (p in %): the smallest sample with F_n(x) >= p."""
        return float(np.quantile(self.latency_ms, p / 100.0, method="inverted_cdf"))


def sample_arrivals(arrivals: Map, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` arrival times (ms) of the MAP, started in its stationary phase."""
    d0, d1 = arrivals.D0 / 1000.0, arrivals.D1 / 1000.0
    m = d0.shape[0]
    if m == 1:
        return np.cumsum(rng.exponential(1.0 / d1[0, 0], size=count))
    out_rate = -d0.diagonal()
    # from phase i: jump to (j, arrival?) with probability rate / out_rate[i]
    jumps = np.concatenate([d0 - np.diag(d0.diagonal()), d1], axis=1) / out_rate[:, None]
    cum = np.cumsum(jumps, axis=1)
    phase = int(rng.choice(m, p=arrivals.stationary))
    t = 0.0
    times = np.empty(count)
    got = 0
    while got < count:
        holds = rng.exponential(1.0, size=4096)
        picks = rng.random(4096)
        for hold, u in zip(holds, picks):
            t += hold / out_rate[phase]
            j = min(int(np.searchsorted(cum[phase], u * cum[phase, -1], side="right")), 2 * m - 1)
            if j >= m:
                times[got] = t
                got += 1
                if got == count:
                    break
            phase = j % m
    return times


def simulate(times_ms: np.ndarray, service: Service, B: int, timeout_ms: float, mode: str = "at-once",
             rng: np.random.Generator | None = None) -> SimResult:
    """The batcher over sorted arrival times; see the module docstring for the modes. Each
    batch takes its size's mean service time, or with `rng` a draw from the service's
    distribution (`Service.draw`)."""
    if mode not in ("at-once", "queue"):
        raise ValueError(f"mode must be 'at-once' or 'queue', got {mode!r}")
    n = len(times_ms)
    latency = np.empty(n)
    batch_of = np.empty(n, dtype=int)
    sizes = []
    free = -np.inf  # when the server is next free (queue mode)
    i = 0
    while i < n:
        first = times_ms[i]
        start = first if mode == "at-once" else max(first, free)
        deadline = first + timeout_ms
        full_at = times_ms[i + B - 1] if i + B - 1 < n else np.inf
        if mode == "at-once":
            dispatch = full_at if full_at <= deadline else deadline
        else:
            dispatch = max(start, min(deadline, full_at))
        # everything that arrived by the dispatch (at most B) goes; ties at the deadline go too
        j = min(int(np.searchsorted(times_ms, dispatch, side="right")), i + B)
        size = j - i
        done = dispatch + (service.ms(size) if rng is None else service.draw(size, rng.random()))
        latency[i:j] = done - times_ms[i:j]
        batch_of[i:j] = len(sizes)
        sizes.append(size)
        free = done
        i = j
    return SimResult(np.array(sizes), latency, batch_of)
