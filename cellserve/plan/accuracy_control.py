"""The accuracy-scaling controller as plain, clock-injected code (no server): it measures each
family's demand, re-plans every period (10 s, as Proteus) on the demand measured since the
last plan, and routes each request by weighted random choice from the current plan's
routing. The simulated evaluation (accuracy_sim.py) drives it with virtual time; a server
would drive it with a monotonic clock and call `observe` and `route` per request and `tick`
from its loop.

What plans is any `Planner`: `(problem at the measured demand, previous plan or None) ->
plan` (Proteus's MILP and the baselines, accuracy_baselines.py).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from cellserve.plan.accuracy import AccuracyPlan, AccuracyProblem

Planner = Callable[[AccuracyProblem, "AccuracyPlan | None"], AccuracyPlan]
PERIOD_S = 10.0


class WeightedRouter:
    """Routes a family's request to a device with probability its share in the plan."""

    def __init__(self, plan: AccuracyPlan, rng: random.Random) -> None:
        self._rng = rng
        self._table: dict[str, tuple[list[str], list[float]]] = {}
        for family, shares in plan.routing.items():
            devices, cumulative, total = [], [], 0.0
            for dev, share in shares.items():
                if share > 0:
                    total += share
                    devices.append(dev)
                    cumulative.append(total)
            if devices:
                self._table[family] = (devices, cumulative)

    def route(self, family: str) -> str | None:
        """A device id, or None when the plan routes nothing of `family`."""
        entry = self._table.get(family)
        if entry is None:
            return None
        devices, cumulative = entry
        i = bisect.bisect_right(cumulative, self._rng.random() * cumulative[-1])
        return devices[min(i, len(devices) - 1)]


@dataclass
class DemandMeter:
    """Arrivals per family since `start`, counted in windows of `window_s`.

    `rates(now, estimate)`: "mean" is the arrivals over the time elapsed; "peak" is the highest
    rate of any window (a last window shorter than half a window is left out), so that a burst
    that began late in the period is planned for at its own rate, not diluted by the calm
    before it. The controller's default is "peak" (see docs/accuracy-scaling.md)."""

    start: float
    window_s: float = 1.0
    counts: dict[str, list[int]] = field(default_factory=dict)

    def observe(self, family: str, now: float) -> None:
        windows = self.counts.setdefault(family, [])
        i = int((now - self.start) / self.window_s)
        while len(windows) <= i:
            windows.append(0)
        windows[i] += 1

    def rates(self, now: float, estimate: str = "peak") -> dict[str, float]:
        elapsed = now - self.start
        if elapsed <= 0:
            return {f: 0.0 for f in self.counts}
        if estimate == "mean":
            return {f: sum(w) / elapsed for f, w in self.counts.items()}
        full = int(elapsed / self.window_s)
        last = elapsed - full * self.window_s
        out = {}
        for f, w in self.counts.items():
            rates = [c / self.window_s for c in w[:full]]
            if last >= self.window_s / 2 and len(w) > full:
                rates.append(w[full] / last)
            out[f] = max(rates, default=sum(w) / elapsed)
        return out


class AccuracyController:
    """Plans at construction on the problem's own demand (a controller starting up knows some
    demand, or plans for what it was given), then every `period_s`: `tick()` re-plans once the
    period has passed since the last plan, on each family's demand measured since then
    (`DemandMeter`, `estimate` "peak" or "mean"); families with no arrivals measure 0."""

    def __init__(self, problem: AccuracyProblem, planner: Planner, clock: Callable[[], float],
                 rng: random.Random, period_s: float = PERIOD_S, estimate: str = "peak",
                 window_s: float = 1.0) -> None:
        if estimate not in ("peak", "mean"):
            raise ValueError(f"estimate must be 'peak' or 'mean', got {estimate!r}")
        self.problem = problem
        self._planner = planner
        self._clock = clock
        self._rng = rng
        self.period_s = period_s
        self.estimate = estimate
        self.window_s = window_s
        self.plan = planner(problem, None)
        self.plans = 1
        self.router = WeightedRouter(self.plan, rng)
        self._meter = DemandMeter(clock(), window_s)
        self.measured: dict[str, float] = {f.name: f.demand_rps for f in problem.families.values()}

    def observe(self, family: str) -> None:
        """Count one arrival of `family` (every request, routed or not)."""
        self._meter.observe(family, self._clock())

    def route(self, family: str) -> str | None:
        return self.router.route(family)

    def due(self) -> bool:
        return self._clock() - self._meter.start >= self.period_s - 1e-12

    def tick(self) -> AccuracyPlan | None:
        """Re-plan if a period has passed since the last plan: the new plan (also `self.plan`,
        and routing follows it from now on), else None."""
        if not self.due():
            return None
        now = self._clock()
        rates = self._meter.rates(now, self.estimate)
        self.measured = {f: rates.get(f, 0.0) for f in self.problem.families}
        self.plan = self._planner(self.problem.with_demand(self.measured), self.plan)
        self.plans += 1
        self.router = WeightedRouter(self.plan, self._rng)
        self._meter = DemandMeter(now, self.window_s)
        return self.plan
