"""Cores shared by models, for real: which cores each engine process (cluster/core_workers.py)
runs on, decided again every period as load and interference move (Veltair's allocation, at
the granularity of a model).

Every `period_s` the allocator reads each model's arrival rate over the last periods (smoothed)
and, per core, the load other processes put on it (executor/interference.CoreLoadMeter); then

- **how many cores** each unit gets: plan/tenancy.allocate (its profiled step times against
  its share of the SLO), when there are at least as many cores as units; one each otherwise;
- **which cores**: plan/tenancy.place_cores: the tightest unit (largest predicted share of its
  SLO) takes the quietest cores, so a neighbour's core goes to the unit with the most slack;
  units beyond the cores share the least loaded ones (others' load plus the CPU the units
  already there were measured to use);

and moves the workers whose cores changed (CoreWorker.repin, between two of their steps).
Loads under NOISE_FLOOR cores count as none, and a unit keeps its cores unless others are
quieter by NOISE_FLOOR, so that the meter's noise moves nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cellserve.executor.interference import CoreLoadMeter
from cellserve.executor.versions import NOISE_FLOOR
from cellserve.plan.tenancy import Tenant, Unit, allocate, place_cores, predicted_share

PERIOD_S = 1.0
RATE_SMOOTHING = 0.5  # weight of the last period's measured rate
KEEP_DECISIONS = 3600  # the last decisions kept (an hour's at the default period), for reports


@dataclass
class Decision:
    """One period's allocation: per unit, its cores; what it was decided from."""

    at: float
    cores: list[tuple[int, ...]]
    rates_rps: list[float]
    others: dict[int, float]
    moved: list[int] = field(default_factory=list)  # units whose cores changed

    def to_dict(self) -> dict:
        return {"at_s": self.at, "cores": [list(c) for c in self.cores], "rates_rps": self.rates_rps,
                "others": {str(c): x for c, x in self.others.items()}, "moved": self.moved}


def decide(tenants: list[Tenant], rates_rps: list[float], others: dict[int, float],
           current: list[tuple[int, ...]] | None = None,
           demand: list[float] | None = None) -> list[tuple[int, ...]]:
    """Cores per unit (one unit per tenant) for these rates and others' load per core (see
    the module); `demand`: each unit's measured CPU use in cores (None: not measured yet);
    a unit keeps its `current` cores unless others are quieter by NOISE_FLOOR. Plain data in
    and out."""
    if len(rates_rps) != len(tenants):
        raise ValueError(f"{len(rates_rps)} rates for {len(tenants)} tenants: one each")
    units = [Unit(i, tuple(range(len(t.blocks)))) for i, t in enumerate(tenants)]
    cores = len(others)
    sizes = allocate(tenants, units, rates_rps, cores) if cores >= len(units) else [1] * len(units)
    shares = [predicted_share(tenants[i], units[i], rates_rps[i], sizes[i]) for i in range(len(units))]
    quiet = {c: (x if x >= NOISE_FLOOR else 0.0) for c, x in others.items()}
    return place_cores(sizes, shares, quiet, current, demand, margin=NOISE_FLOOR)


class CoreAllocator:
    """Keeps `workers` (one per tenant, in order; each with `cores` and `repin`) on the cores
    `decide` gives, every `period_s`, on a thread of its own between `start` and `stop`.
    `rates(now, period_s)`: each tenant's arrivals per second over the last period, as counted
    where requests enter. `on_decision`: called with each period's Decision, after its moves;
    `on_error`: with why a period failed (a worker gone; the next period tries again).
    `meter`, `clock`: injected for tests."""

    def __init__(self, workers: list, tenants: list[Tenant], cores: tuple[int, ...],
                 rates: Callable[[float, float], list[float]], period_s: float = PERIOD_S,
                 meter: CoreLoadMeter | None = None, clock: Callable[[], float] = time.perf_counter,
                 on_decision: Callable[[Decision], None] | None = None,
                 on_error: Callable[[str], None] | None = None):
        if len(workers) != len(tenants):
            raise ValueError(f"{len(workers)} workers for {len(tenants)} tenants: one each")
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.workers, self.tenants, self.cores = workers, tenants, tuple(sorted(cores))
        self.period_s, self._rates, self._clock = period_s, rates, clock
        self._on_decision, self._on_error = on_decision, on_error
        self.meter = meter or CoreLoadMeter(self.cores)
        self.smoothed: list[float] | None = None
        self.moves = 0  # workers moved, all periods
        self.decisions: deque[Decision] = deque(maxlen=KEEP_DECISIONS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> Decision:
        """One period: measure, decide, move the workers whose cores changed."""
        now = self._clock()
        others = dict(self.meter.sample({w.pid: w.cores for w in self.workers}))
        measured = self._rates(now, self.period_s)
        if self.smoothed is None:
            self.smoothed = list(measured)
        else:
            self.smoothed = [s + RATE_SMOOTHING * (m - s) for s, m in zip(self.smoothed, measured)]
        used = [self.meter.used.get(w.pid) for w in self.workers]
        demand = None if None in used else used
        cores = decide(self.tenants, self.smoothed, others, [tuple(w.cores) for w in self.workers], demand)
        moved = []
        for u, (w, c) in enumerate(zip(self.workers, cores)):
            if tuple(w.cores) != c:
                w.repin(c)
                if tuple(w.cores) == c:  # a worker that could not move (gone) keeps its cores
                    moved.append(u)
        self.moves += len(moved)
        decision = Decision(now, cores, list(self.smoothed), others, moved)
        self.decisions.append(decision)
        if self._on_decision is not None:
            self._on_decision(decision)
        return decision

    def start(self) -> None:
        """Read the meter once (a load is the difference of two readings), then tick every
        period until `stop`: the first decision comes one period after the start."""
        self._stop.clear()
        self.meter.sample({w.pid: w.cores for w in self.workers})
        self._thread = threading.Thread(target=self._loop, name="cellserve-core-allocator", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a period that failed (a worker gone): the next tries again
                if self._on_error is not None:
                    self._on_error(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
