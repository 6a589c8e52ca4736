"""Step costs learnt from the engine's own runs, and the finish-time predictions made from them.

A cell type's step time is kept per batch-size bucket (powers of two) as a moving average of
measured steps, seeded by a profile at start-up, and read back by interpolating between
measured buckets: step time is far from linear in the batch at small batches (BLAS switches
kernels), so a straight-line fit mispredicts badly (docs/performance.md, "Kernels").

Prediction: a request advances one step per *round*, in which every cell type with lanes
runs once (see scheduler.CellularPolicy). The engine prices a round at the load *committed*
to each cell type: the lanes of every admitted request that has yet to leave it, not just the
lanes there now, since requests in earlier layers arrive before a request admitted now leaves
(less urgent requests' lanes only as far as they fill a batch: admission.py _predicted_latency).
That errs on the slow side, which keeps admitted requests from being dropped later.

Costs learn only from steps that run, and admission decides which steps run: a bucket that
measured slow once (another process had the CPU, the start-up profile ran on a busy machine)
could keep the engine from ever admitting enough work to measure it again. Three guards:
a sample counts as at most 4x the bucket's mean; a batch is never priced above a smaller
measured batch scaled linearly (batching does not make a lane dearer); and an idle engine
prices at the fastest step ever measured per bucket.

Admission, the drop check and a router ask for the same few batch sizes many times between
two observations, so each table's estimates are kept until the table next changes.
"""

from __future__ import annotations

import math

_ALPHA = 0.05  # weight of a new sample in a bucket's moving average
_MAX_JUMP = 4.0  # a lasting slowdown is still learnt, 1.15x per sample
# A busy engine prices a step at no more than this factor times the fastest it has measured
# (see CostModel.priced_round; the per-step overhead comes on top): room for what contention
# adds under overload, not for estimates gone stale in a slow spell.
PREDICTION_BOUND = 16.0
# The share of its time an engine is priced to spend admitting, at most (see priced_round):
# beyond it the engine is refusing a flood, and each refusal is cheap.
MAX_ADMITTING_SHARE = 0.5


def _bucket(batch: int) -> int:
    """ceil(log2(batch)), 0 for a batch of 1 (or less)."""
    return (max(batch, 1) - 1).bit_length()


class StepCost:
    def __init__(self) -> None:
        self._mean: dict[int, float] = {}  # bucket -> seconds per step, moving average
        self._best: dict[int, float] = {}  # bucket -> fastest step measured
        self._buckets: list[int] = []  # measured buckets, ascending (both tables have the same)
        # estimates by batch size, of the mean table and of the best one, until it changes
        self._memo: tuple[dict[int, float], dict[int, float]] = ({}, {})

    def observe(self, batch: int, seconds: float) -> None:
        b = _bucket(batch)
        old = self._mean.get(b)
        if old is None:
            self._mean[b] = seconds
            self._buckets = sorted(self._mean)
        else:
            self._mean[b] = old + _ALPHA * (min(seconds, _MAX_JUMP * old) - old)
        self._memo[0].clear()
        if b not in self._best or seconds < self._best[b]:
            self._best[b] = seconds
            self._memo[1].clear()

    def __call__(self, batch: int, best: bool = False) -> float:
        memo = self._memo[best]
        estimate = memo.get(batch)
        if estimate is None:
            estimate = memo[batch] = self._estimate(batch, self._best if best else self._mean)
        return estimate

    def _estimate(self, batch: int, table: dict[int, float]) -> float:
        if not table:
            return 0.0
        b = _bucket(batch)
        buckets = self._buckets
        lower = upper = None
        cap = math.inf  # batching does not make a lane dearer: no more than a smaller batch, scaled
        for k in buckets:
            if k < b:
                lower = k
                cap = min(cap, table[k] * batch / (1 << k))
            elif k > b:
                upper = k
                break
        estimate = table.get(b)
        if estimate is None:
            if lower is not None and upper is not None:
                frac = (batch - (1 << lower)) / ((1 << upper) - (1 << lower))
                estimate = table[lower] + frac * (table[upper] - table[lower])
            else:
                nearest = lower if lower is not None else upper
                estimate = table[nearest] * max(batch / (1 << nearest), 1.0)
        return min(estimate, cap)


class CostModel:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.costs: dict[str, StepCost] = {}
        # cell type -> index of its executor, when several executors run at once (see
        # round_time); None: one executor runs every cell type, one after another
        self.group_of: dict[str, int] | None = None

    def observe(self, cell_type: str, batch: int, seconds: float) -> None:
        cost = self.costs.get(cell_type)
        if cost is None:
            cost = self.costs[cell_type] = StepCost()
        cost.observe(batch, seconds)

    def type_time(self, cell_type: str, lanes: int, best: bool = False) -> float:
        """Seconds for `lanes` lanes of one cell type to advance one step each."""
        cost = self.costs.get(cell_type)
        if lanes <= 0 or cost is None:
            return 0.0
        full, rest = divmod(lanes, self.max_batch)
        return full * cost(self.max_batch, best) + (cost(rest, best) if rest else 0.0)

    def batches(self, load: dict[str, int]) -> int:
        """Batches one round of `load` runs (a batch holds at most max_batch lanes of one cell
        type); with executors running at once, those of the executor that runs the most."""
        cap = self.max_batch
        if self.group_of is None:
            return sum(-(-n // cap) for n in load.values() if n > 0)
        per_group: dict[int, int] = {}
        for t, n in load.items():
            if n > 0:
                g = self.group_of.get(t, -1)
                per_group[g] = per_group.get(g, 0) + -(-n // cap)
        return max(per_group.values(), default=0)

    def round_time(self, load: dict[str, int], best: bool = False) -> float:
        """Seconds for one round with `load[type]` lanes in each cell type (at the fastest
        steps measured, with `best`). With executors running at once (`group_of`), a round
        takes as long as its busiest executor's cell types, one after another."""
        if self.group_of is not None:
            return self._concurrent_round_time(load, best)
        total = 0.0  # type_time's sum, inlined: admission, routing and the drop check call it often
        costs, cap = self.costs, self.max_batch
        for t, n in load.items():
            if n > 0:
                cost = costs.get(t)
                if cost is not None:
                    full, rest = divmod(n, cap)
                    total += full * cost(cap, best) + (cost(rest, best) if rest else 0.0)
        return total

    def priced_round(self, load: dict[str, int], shared: bool, step_overhead_s: float = 0.0,
                     admitting_share: float = 0.0) -> float:
        """A round of `load` as the engine prices it for admission and the drop check, and a
        router for picking an engine. Shared with other requests in flight: at the moving
        averages, never above PREDICTION_BOUND times the fastest steps (averages learnt beside a
        noisy neighbour must not price work far beyond what the device has shown it does),
        plus `step_overhead_s` per batch, stretched by the share of the engine's time that
        admitting arrivals takes (no step runs meanwhile). Alone: at the fastest steps. An idle
        engine has nothing running to learn from, and one slow spell, or the overhead of a
        burst before, must not refuse or drop a lone request the engine serves in time."""
        if self.group_of is not None:
            best = self._concurrent_round_time(load, True)
            if not shared:
                return best
            mean, batches = self._concurrent_round_time(load, False), self.batches(load)
        else:  # round_time twice and batches, in one pass: admission and the drop check call it often
            best = mean = 0.0
            batches = 0
            costs, cap = self.costs, self.max_batch
            for t, n in load.items():
                if n > 0:
                    full, rest = divmod(n, cap)
                    batches += full + (rest > 0)
                    cost = costs.get(t)
                    if cost is not None:
                        best += full * cost(cap, True) + (cost(rest, True) if rest else 0.0)
                        if shared:
                            mean += full * cost(cap) + (cost(rest) if rest else 0.0)
            if not shared:
                return best
        stepping = min(mean, PREDICTION_BOUND * best) + step_overhead_s * batches
        return stepping / (1.0 - min(admitting_share, MAX_ADMITTING_SHARE))

    def _concurrent_round_time(self, load: dict[str, int], best: bool) -> float:
        per_group: dict[int, float] = {}
        group_of = self.group_of
        for t, n in load.items():
            if n > 0:
                g = group_of.get(t, -1)
                per_group[g] = per_group.get(g, 0.0) + self.type_time(t, n, best)
        return max(per_group.values(), default=0.0)
