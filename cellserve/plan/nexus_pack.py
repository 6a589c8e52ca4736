"""Planning and re-planning: saturate, residual, squishy bin packing, merging, epochs.

`plan(workload, profiles)` makes a plan from nothing; `replan(previous, workload, profiles)`
makes the next epoch's, moving as few sessions as it can. Both pass through the same steps:

1. Demands: every session, and every query node with its share of the query's SLO
   (nexus_query.split_query; a re-plan keeps a query's previous split).
2. Units: demands planned together. A demand is a unit of its own, except that demands of
   models sharing a prefix *and* the same SLO form one unit (as Nexus's code joins them: with
   different SLOs the loose one's batches would be bound by the tight one's).
3. Saturate: a unit gets floor(R / x) whole devices, x the most one device carries at any
   batch (vector) whose latency l meets 2 * l <= SLO, with duty cycle l. Invariant: a saturated
   device holds one unit and is never shared.
4. Residual: the rest of its rate, R - floor(R / x) * x < x, gets its own duty cycle d (of the
   candidates d = B / R_res for total batch B, and the saturated duty cycle, the one with the
   lowest occupancy l / d that is feasible alone: l <= d and d + l <= SLO).
5. Squishy bin packing: residual parts, largest occupancy first, each onto the shared device
   where occupancy after merging is highest (best fit); merging takes the smaller duty cycle,
   re-derives every batch from its rate and checks feasibility (nexus.device_load). No device
   fits: a new one. Then merging whole devices: the emptiest shared device is dissolved into
   the others when all its parts fit there (fresh plans only: it moves sessions).
6. Budget: beyond `max_devices`, the devices carrying the least rate are left out, what
   they carried is offered to the kept devices' spare room (best fit), and the rest is listed
   as unserved with the reason. Nothing is dropped silently: every
   demand's rate is on devices or under `unserved`.

A re-plan first keeps what it can: a unit's whole devices stay whole devices (more added, or
the surplus released), its residual stays on the shared device it was on; a shared device that
no longer fits sheds parts whose rates changed before others, and only what was shed or is
new is packed (no merging pass). Hence sessions whose rate did not change do not move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cellserve.plan.nexus import (Assignment, Costs, Demand, Device, DeviceLoad, Plan, Profiles, QuerySplit, Unserved,
                                  Workload, device_load)
from cellserve.plan.nexus_query import DEFAULT_GRID, path_budget_ok, split_query

RATE_TOLERANCE = 1e-9  # relative: rates closer than this are the same rate


@dataclass(frozen=True)
class Unit:
    """Demands planned together (see the module's docstring, step 2)."""

    members: tuple[Demand, ...]

    @property
    def key(self) -> frozenset[str]:
        return frozenset(m.id for m in self.members)

    @property
    def rate(self) -> float:
        return sum(m.rate_rps for m in self.members)

    @property
    def slo_ms(self) -> float:
        return min(m.slo_ms for m in self.members)


@dataclass(frozen=True)
class Part:
    """A unit's share on one device: the rate of each member carried there, and the duty cycle
    the unit would run at alone."""

    unit: Unit
    rates: tuple[float, ...]
    own_duty: float

    def entries(self) -> list[tuple[Demand, float]]:
        return list(zip(self.unit.members, self.rates))


@dataclass
class _Dev:
    id: int
    parts: list[Part]
    load: DeviceLoad
    saturated: bool

    def entries(self) -> list[tuple[Demand, float]]:
        return [e for p in self.parts for e in p.entries()]


def _batches_for_total(shares: tuple[float, ...], total: int) -> list[int]:
    return [max(1, math.ceil(p * total - 1e-9)) for p in shares]


def saturation(unit: Unit, costs: Costs) -> tuple[float, float] | None:
    """(rate one saturated device carries, its duty cycle) at the unit's best batch: the most
    requests/s at any batch meeting 2 * l <= SLO, members' batches in proportion to their rates;
    None when no batch meets it. For one session this is its largest batch meeting the SLO
    whenever throughput grows with batch size."""
    shares = tuple(m.rate_rps / unit.rate for m in unit.members)
    models = [m.model for m in unit.members]
    prefix = unit.members[0].prefix if len(unit.members) > 1 else None
    cap = sum(costs.cap(m) for m in models)
    best: tuple[float, float] | None = None
    for total in range(len(models), cap + 1):
        batches = _batches_for_total(shares, total)
        ms = costs.group_ms(prefix, models, batches)
        if ms is None or 2 * ms > unit.slo_ms + 1e-9:
            break  # latency does not fall as batches grow: no larger total meets it either
        rate = min(b / p for b, p in zip(batches, shares)) * 1000.0 / ms
        if best is None or rate >= best[0]:
            best = (rate, ms)
    return best


def residual_duty(unit: Unit, rates: tuple[float, ...], costs: Costs, sat_duty: float) -> float | None:
    """The duty cycle a residual part runs at alone: the feasible candidate with the lowest
    occupancy, the longer cycle on a tie (see step 4)."""
    total_rate = sum(rates)
    entries = list(zip(unit.members, rates))
    candidates = [sat_duty]
    cap = sum(costs.cap(m.model) for m in unit.members)
    for total in range(1, cap + 1):
        d = total * 1000.0 / total_rate
        if d > unit.slo_ms:
            break
        candidates.append(d)
    best: tuple[float, float] | None = None
    for d in candidates:
        load = device_load(costs, entries, d)
        if load is not None and (best is None or load.occupancy < best[0] - 1e-12
                                 or (load.occupancy <= best[0] + 1e-12 and d > best[1])):
            best = (load.occupancy, d)
    return None if best is None else best[1]


def _settle(costs: Costs, parts: list[Part], extra_duties: tuple[float, ...] = ()) -> DeviceLoad | None:
    """The device's load at the smallest of its parts' duty cycles (Nexus's shared duty cycle),
    else at any of `extra_duties` (a re-plan's previous cycle); None when none is feasible."""
    entries = [e for p in parts for e in p.entries()]
    for d in (min(p.own_duty for p in parts),) + extra_duties:
        load = device_load(costs, entries, d)
        if load is not None:
            return load
    return None


class _Packer:
    def __init__(self, costs: Costs, next_id: int) -> None:
        self.costs = costs
        self.devs: dict[int, _Dev] = {}
        self.shared: dict[int, _Dev] = {}  # the devices not saturated: where best fit looks
        self.next_id = next_id

    def new(self, parts: list[Part], saturated: bool, dev_id: int | None = None) -> None:
        load = _settle(self.costs, parts)
        assert load is not None, "a part alone is feasible at its own duty cycle"
        if dev_id is None:
            dev_id, self.next_id = self.next_id, self.next_id + 1
        self.put(_Dev(dev_id, parts, load, saturated))

    def put(self, dev: _Dev) -> None:
        self.devs[dev.id] = dev
        if not dev.saturated:
            self.shared[dev.id] = dev

    def drop(self, dev_id: int) -> None:
        del self.devs[dev_id]
        self.shared.pop(dev_id, None)

    def best_fit(self, part: Part, exclude: int | None = None) -> tuple[_Dev, DeviceLoad] | None:
        """The shared device whose occupancy after merging `part` is highest, and that load."""
        best = None
        # A part without a prefix adds at least its models' batch-1 latencies; on a device whose
        # duty cycle the merge keeps, the others' batches stay as they are, so a device without
        # that much spare time cannot take it (skipping it saves most feasibility checks)
        floor_ms = 0.0 if part.unit.members[0].prefix else sum(self.costs.table(m.model)[1] for m in part.unit.members)
        for dev in self.shared.values():
            if dev.id == exclude or dev.load.occupancy + 1e-12 >= 1.0:
                continue
            if part.own_duty >= dev.load.duty_ms and dev.load.busy_ms + floor_ms > dev.load.duty_ms + 1e-9:
                continue
            load = _settle(self.costs, dev.parts + [part])
            if load is not None and (best is None or load.occupancy > best[1].occupancy):
                best = (dev, load)
        return best

    def pack(self, parts: list[Part]) -> None:
        """Squishy bin packing: largest occupancy first, best fit, else a new device."""
        def alone(p: Part) -> float:
            return device_load(self.costs, p.entries(), p.own_duty).occupancy
        for part in sorted(parts, key=lambda p: (-alone(p), sorted(p.unit.key))):
            fit = self.best_fit(part)
            if fit is None:
                self.new([part], saturated=False)
            else:
                dev, load = fit
                dev.parts.append(part)
                dev.load = load

    def keep_budget(self, max_devices: int) -> list[Unserved]:
        """Keep the `max_devices` devices carrying the most rate; offer what the others carried
        to the kept devices' spare room (best fit); list the rest as unserved."""
        if len(self.devs) <= max_devices:
            return []
        served = sorted(self.devs.values(), key=lambda d: (-sum(r for _, r in d.entries()), d.id))
        for dev in served[max_devices:]:
            self.drop(dev.id)
        left: list[Part] = [p for d in served[max_devices:] for p in d.parts]
        unserved = []
        for part in left:
            fit = self.best_fit(part)
            if fit is None:
                unserved += _left_out(part, max_devices)
            else:
                dev, load = fit
                dev.parts.append(part)
                dev.load = load
        return unserved

    def merge_devices(self) -> None:
        """Dissolve the emptiest shared devices into others where all their parts fit."""
        for dev in sorted(self.shared.values(), key=lambda d: d.load.occupancy):
            if dev.id not in self.devs or len(self.devs) < 2:
                continue
            self.drop(dev.id)
            undo = []
            for part in dev.parts:
                fit = self.best_fit(part)
                if fit is None:
                    break
                target, load = fit
                undo.append((target, target.load))
                target.parts.append(part)
                target.load = load
            else:
                continue
            for target, load in reversed(undo):  # one part did not fit: put everything back
                target.parts.pop()
                target.load = load
            self.put(dev)


# ---- demands and units ----

def _demands(workload: Workload, costs: Costs, previous: Plan | None, grid: int):
    prefix_of = {m: e.prefix for m, e in costs.device.models.items()}
    demands = [Demand(s.id, s.model, s.slo_ms, s.rate_rps, prefix_of[s.model]) for s in workload.sessions]
    splits, unserved = [], []
    kept = {q.id: q for q in previous.queries} if previous else {}
    for q in workload.queries:
        old = kept.get(q.id)
        models = {n.model for n in q.root.walk()}
        if old is not None and old.slo_ms == q.slo_ms and set(old.split_ms) == models and path_budget_ok(q, old.split_ms):
            split = dict(old.split_ms)
        else:
            split = split_query(q, costs, grid)
        if split is None:
            unserved += [Unserved(q.node_id(n), n.model, q.slo_ms, n.rate_rps,
                                  f"query {q.id!r}: its SLO of {q.slo_ms:g} ms cannot be split so that every model "
                                  "meets 2 x its batch-1 latency along every path") for n in q.root.walk()]
            continue
        splits.append(QuerySplit(q.id, q.slo_ms, split))
        demands += [Demand(q.node_id(n), n.model, split[n.model], n.rate_rps, prefix_of[n.model]) for n in q.root.walk()]
    return demands, splits, unserved


def _units(demands: list[Demand], costs: Costs) -> tuple[list[tuple[Unit, tuple[float, float]]], list[Unserved]]:
    groups: dict[tuple, list[Demand]] = {}
    for d in demands:
        groups.setdefault((d.prefix, d.slo_ms) if d.prefix is not None else ("", d.id), []).append(d)
    out, unserved = [], []
    for members in groups.values():
        candidates = [Unit(tuple(members))] if len(members) > 1 else []
        sat = saturation(candidates[0], costs) if candidates else None
        if sat is not None:
            out.append((candidates[0], sat))
            continue
        for m in members:  # a group no batch serves in time may still serve its members apart
            unit = Unit((m,))
            sat = saturation(unit, costs)
            if sat is None:
                unserved.append(Unserved(m.id, m.model, m.slo_ms, m.rate_rps,
                                         f"SLO of {m.slo_ms:g} ms is below 2 x the latency of batch 1 "
                                         f"({2 * costs.table(m.model)[1]:g} ms): a request may wait one duty "
                                         "cycle, then its batch runs"))
            else:
                out.append((unit, sat))
    return out, unserved


def _split(unit: Unit, sat: tuple[float, float], costs: Costs) -> tuple[int, Part, Part | None]:
    """Whole devices, the part each carries, and the residual part (None when nothing is left)."""
    rate, duty = sat
    n = math.floor(unit.rate / rate + 1e-9)
    shares = tuple(m.rate_rps / unit.rate for m in unit.members)
    full = Part(unit, tuple(p * rate for p in shares), duty)
    rest = unit.rate - n * rate
    if rest <= RATE_TOLERANCE * unit.rate:
        return n, full, None
    rates = tuple(m.rate_rps - n * p * rate for m, p in zip(unit.members, shares))
    own = residual_duty(unit, rates, costs, duty)
    assert own is not None, "the saturated duty cycle carries any smaller rate"
    return n, full, Part(unit, rates, own)


# ---- plan, replan ----

def plan(workload: Workload, profiles: Profiles, grid: int = DEFAULT_GRID) -> Plan:
    """A plan from nothing (see the module's docstring)."""
    return replan(None, workload, profiles, grid)


def replan(previous: Plan | None, workload: Workload, profiles: Profiles, grid: int = DEFAULT_GRID) -> Plan:
    """The next epoch's plan for `workload` (its rates as now measured), keeping `previous`'s
    placements where they are still feasible (see the module's docstring)."""
    costs = Costs(profiles.device_types[workload.device_type])
    if previous is not None and previous.device_type != workload.device_type:
        previous = None
    demands, splits, unserved = _demands(workload, costs, previous, grid)
    units, more = _units(demands, costs)
    unserved += more
    old_devs = sorted(previous.devices, key=lambda d: (-d.occupancy, d.id)) if previous else []
    packer = _Packer(costs, 1 + max((d.id for d in old_devs), default=-1))
    old_ids = {d.id: {a.id for a in d.sessions} for d in old_devs}
    old_rates = {(d.id, a.id): a.rate_rps for d in old_devs for a in d.sessions}
    order = {d.id: k for k, d in enumerate(old_devs)}
    devices_of: dict[str, list[int]] = {}  # session id -> its previous devices
    for d in old_devs:
        for a in d.sessions:
            devices_of.setdefault(a.id, []).append(d.id)
    pending: dict[int, list[Part]] = {}
    to_pack: list[Part] = []
    claimed: set[int] = set()
    for unit, sat in units:
        n, full, rest = _split(unit, sat, costs)
        if n > workload.max_devices:  # more than the budget in whole devices: the surplus is unserved now
            unserved += _left_out(Part(unit, tuple(r * (n - workload.max_devices) for r in full.rates), 0.0),
                                  workload.max_devices)
            n = workload.max_devices
        touched = {i for m in unit.members for i in devices_of.get(m.id, ())}
        near = sorted(touched, key=order.__getitem__)  # in old_devs' order: fullest first
        mine = [i for i in near if old_ids[i] <= unit.key and i not in claimed]
        shared = [i for i in near if not old_ids[i] <= unit.key]
        for k in range(n):
            packer.new([full], saturated=True, dev_id=mine[k] if k < len(mine) else None)
        claimed.update(mine[:n])
        if rest is None:
            continue
        if shared:
            pending.setdefault(shared[0], []).append(rest)
        elif len(mine) > n:
            packer.new([rest], saturated=False, dev_id=mine[n])
            claimed.add(mine[n])
        else:
            to_pack.append(rest)
    durations = {d.id: d.duty_cycle_ms for d in old_devs}
    for dev_id, parts in pending.items():
        if dev_id in claimed:  # became some unit's own device; the parts waiting for it move
            to_pack += parts
            continue
        to_pack += _keep_what_fits(packer, dev_id, parts, durations[dev_id], old_rates)
    packer.pack(to_pack)
    if previous is None:
        packer.merge_devices()
    unserved += packer.keep_budget(workload.max_devices)
    devs = sorted(packer.devs.values(), key=lambda d: d.id)
    return Plan(workload.device_type, tuple(_device(d, workload.device_type) for d in devs), tuple(splits),
                tuple(_merge_unserved(unserved)))


def _keep_what_fits(packer: _Packer, dev_id: int, parts: list[Part], old_duty: float, old_rates) -> list[Part]:
    """Keep `parts` on their previous shared device, shedding first those whose rates changed
    (largest first), then others, until the rest fits; returns what was shed."""
    def changed(p: Part) -> bool:
        return any(abs(old_rates.get((dev_id, m.id), 0.0) - r) > RATE_TOLERANCE * r for m, r in p.entries())

    def weight(p: Part) -> float:
        return device_load(packer.costs, p.entries(), p.own_duty).occupancy
    order = sorted(parts, key=lambda p: (not changed(p), -weight(p), sorted(p.unit.key)))
    shed = []
    while order:
        load = _settle(packer.costs, order, (old_duty,))
        if load is not None:
            packer.put(_Dev(dev_id, order, load, saturated=False))
            break
        shed.append(order.pop(0))
    return shed


def _left_out(part: Part, max_devices: int) -> list[Unserved]:
    return [Unserved(m.id, m.model, m.slo_ms, r, f"max_devices ({max_devices}) reached: the devices carrying "
                                                 "the least rate were left out")
            for m, r in part.entries() if r > 0]


def _merge_unserved(items: list[Unserved]) -> list[Unserved]:
    """One entry per session and reason, rates summed."""
    merged: dict[tuple[str, str], Unserved] = {}
    for u in items:
        old = merged.get((u.id, u.reason))
        merged[(u.id, u.reason)] = u if old is None else Unserved(u.id, u.model, u.slo_ms, old.rate_rps + u.rate_rps,
                                                                  u.reason)
    return list(merged.values())


def _device(dev: _Dev, device_type: str) -> Device:
    load = dev.load
    sessions = [Assignment(m.id, m.model, m.slo_ms, b, r, ms, load.duty_ms + ms, m.prefix)
                for (m, r), b, ms in zip(dev.entries(), load.batches, load.latencies)]
    # by id: a device's sessions are a set, and a re-plan of an unchanged workload must give
    # the same plan whatever order it packed them in
    return Device(dev.id, device_type, load.duty_ms, load.occupancy, tuple(sorted(sessions, key=lambda a: a.id)))
