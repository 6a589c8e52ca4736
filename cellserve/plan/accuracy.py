"""Accuracy scaling (Proteus, Ahmad et al., ASPLOS 2024) as plain data: the problem and the plan.

What is planned: model *families* (one task, several *variants* trading accuracy for speed),
each with a demand in requests/s, onto a fixed set of devices of some types. A device hosts
at most one variant; a family's demand is split among the devices hosting its variants; a
device hosting variant v is routed at most capacity(type, v) / headroom requests/s; all demand
is routed; the plan maximises the *effective accuracy*, the demand-weighted mean accuracy of
the variants that serve it. When no plan routes all demand, the headroom is lowered in steps
of 0.05 down to 1.0 (`headroom_ladder`), and past that the plan serves the most demand it can
and lists the rest per family as unserved.

This module holds the data and the rules both the planner (accuracy_milp.py) and the
controller (accuracy_control.py) read: capacities, given or derived from a latency profile
(`AccuracyProblem.capacity`), and the ladder. JSON: accuracy_io.py; the independent check:
accuracy_check.py; the formats: docs/accuracy-scaling.md. Nothing here imports a solver.

Units: rates in requests per second, latencies in milliseconds, accuracies as fractions in
[0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cellserve.plan.profile import ProfileError

SCHEMA_VERSION = 1
# a quarter of spare room: with lazy batching a device routed 95% of its capacity violates
# 10-20% of its requests even under Poisson arrivals (docs/accuracy-scaling.md, Results)
DEFAULT_HEADROOM = 1.25
HEADROOM_STEP = 0.05
# the most headroom a problem may ask (a tenth of each device's capacity routed): the ladder
# solves one MILP per step down from it, so an unbounded one would run without end
MAX_HEADROOM = 10.0


class AccuracyError(ProfileError):
    """A problem or plan file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Variant:
    name: str
    accuracy: float  # in [0, 1]


@dataclass(frozen=True)
class Family:
    """A task served by interchangeable variants. `slo_ms` is needed only where a capacity is
    derived from a latency profile (and by the simulated evaluation's deadlines)."""

    name: str
    demand_rps: float
    variants: tuple[Variant, ...]
    slo_ms: float | None = None

    def best(self) -> Variant:
        """The most accurate variant (the first of equals)."""
        return max(self.variants, key=lambda v: v.accuracy)

    def worst(self) -> Variant:
        return min(self.variants, key=lambda v: v.accuracy)


@dataclass(frozen=True)
class Device:
    id: str
    type: str


@dataclass(frozen=True)
class LatencyPoints:
    """A variant's batch latencies on one device type: (batch, ms) at the profiled sizes,
    sorted by batch. Only the profiled sizes are ever run (Proteus's allowed batch sizes)."""

    points: tuple[tuple[int, float], ...]

    def best_batch(self, slo_ms: float) -> tuple[int, float] | None:
        """The capacity rule: among profiled batches whose latency is at most half the SLO, the
        one with the most requests/s (b * 1000 / l(b); the smaller of equals); None if even the
        smallest misses. Why half: a request may wait for one batch to finish before its own
        runs, so a batch of latency l gives a worst case of about 2 l."""
        best: tuple[int, float] | None = None
        for b, ms in self.points:
            if ms <= slo_ms / 2.0:
                rps = b * 1000.0 / ms
                if best is None or rps > best[1] + 1e-12:
                    best = (b, rps)
        return best


@dataclass(frozen=True)
class AccuracyProblem:
    """PROBLEM: families, devices, and per device type and variant either a capacity in
    requests/s (`capacity_rps`) or a latency profile (`latency_ms`) the capacity is derived
    from. A (type, variant) pair in neither cannot run: devices of that type never host it.
    Variant names are unique across families (the files key capacities by variant alone)."""

    families: dict[str, Family]
    devices: tuple[Device, ...]
    capacity_rps: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, LatencyPoints]] = field(default_factory=dict)
    headroom: float = DEFAULT_HEADROOM

    def family_of(self, variant: str) -> Family:
        for f in self.families.values():
            if any(v.name == variant for v in f.variants):
                return f
        raise KeyError(variant)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.family_of(name).variants if v.name == name)

    def capacity(self, device_type: str, variant: str) -> float:
        """Requests/s one device of `device_type` serves with `variant` (0: it cannot)."""
        given = self.capacity_rps.get(device_type, {}).get(variant)
        if given is not None:
            return given
        best = self.capacity_batch(device_type, variant)
        return 0.0 if best is None else best[1]

    def capacity_batch(self, device_type: str, variant: str) -> tuple[int, float] | None:
        """(batch, requests/s) of the latency-profile rule, or None (no profile, or no batch
        under half the SLO)."""
        points = self.latency_ms.get(device_type, {}).get(variant)
        if points is None:
            return None
        slo = self.family_of(variant).slo_ms
        return None if slo is None else points.best_batch(slo)

    def device_types(self) -> dict[str, int]:
        """Device type -> how many devices, in first-seen order."""
        counts: dict[str, int] = {}
        for d in self.devices:
            counts[d.type] = counts.get(d.type, 0) + 1
        return counts

    def total_demand(self) -> float:
        return sum(f.demand_rps for f in self.families.values())

    def with_demand(self, demand_rps: dict[str, float]) -> AccuracyProblem:
        """The same problem at other demands (families not named keep theirs): what the
        controller re-plans on each period."""
        fams = {n: replace(f, demand_rps=float(demand_rps.get(n, f.demand_rps))) for n, f in self.families.items()}
        return replace(self, families=fams)

    def restricted(self, keep: dict[str, str]) -> AccuracyProblem:
        """The same problem with each family in `keep` down to the one variant named: the
        single-variant baselines (Clipper-HA / -HT) are the planner run on this."""
        fams = {}
        for n, f in self.families.items():
            vs = tuple(v for v in f.variants if v.name == keep[n]) if n in keep else f.variants
            fams[n] = replace(f, variants=vs)
        return replace(self, families=fams)


@dataclass(frozen=True)
class AccuracyPlan:
    """PLAN: which variant each device hosts (None: idle), each family's routing (device id ->
    share of the family's *served* demand; the shares sum to 1 where anything is served), the
    effective accuracy of the served demand, the headroom the plan keeps, and per family the
    demand no device serves. `solver` says what made it (free text)."""

    placement: dict[str, str | None]
    routing: dict[str, dict[str, float]]
    effective_accuracy: float
    headroom: float
    unserved_rps: dict[str, float]
    solver: str = ""

    def served_rps(self, problem: AccuracyProblem) -> dict[str, float]:
        return {n: max(0.0, f.demand_rps - self.unserved_rps.get(n, 0.0)) for n, f in problem.families.items()}


def headroom_ladder(headroom: float) -> list[float]:
    """The headrooms tried in turn: `headroom`, then 0.05 less each step while above 1.0, then
    1.0 (rounded to 1e-9 so that 1.05 - 0.05 is 1.0)."""
    out, h = [], headroom
    while h > 1.0 + 1e-9:
        out.append(round(h, 9))
        h -= HEADROOM_STEP
    out.append(1.0)
    return out


def effective_accuracy(served_by_variant: dict[str, float], problem: AccuracyProblem) -> float:
    """Demand-weighted mean accuracy of what is served (variant -> requests/s); 0 if nothing is."""
    total = sum(served_by_variant.values())
    if total <= 0:
        return 0.0
    return sum(problem.variant(v).accuracy * r for v, r in served_by_variant.items()) / total
