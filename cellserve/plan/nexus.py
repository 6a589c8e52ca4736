"""Nexus's planning rules (Shen et al., SOSP 2019) as plain data and pure functions.

What is planned: sessions (a model, an SLO, a request rate) and queries (a tree of models
sharing one end-to-end SLO) onto devices of one type, from each model's latency profile
(batch size -> milliseconds). The result is a `Plan`: per device a duty cycle and, per session
on it, a batch and a rate. This module holds the data and the rules every part of the planner
keeps; packing and re-planning are in nexus_pack.py, epochs in nexus_epochs.py, the query
split in nexus_query.py, JSON in nexus_io.py, profiles of cellular engines in
nexus_cellular.py, an independent feasibility check in nexus_check.py. docs/planning.md describes the files and the rules.

Units: latencies and duty cycles in milliseconds, rates in requests per second, so a session
at rate r collects r * d / 1000 requests per duty cycle of d ms.

The rules (each function below states the one it keeps):
- a device runs a *duty cycle* of d ms: once per cycle each session on it runs one batch;
- a session at rate r on a device of duty cycle d runs batches of b = ceil(r * d / 1000);
- sessions whose models share a prefix run on one device as one batch through the prefix;
- the device keeps up when its batches' latencies fit the cycle: sum of latencies <= d;
- a request may just miss its session's batch, wait one cycle, then run in the next batch,
  so its worst-case latency is d + (latency of its batch), which must meet its SLO. On a
  device saturated by one session d is the batch's own latency, hence 2 * l(b) <= SLO.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from cellserve.plan.profile import ProfileError

SCHEMA_VERSION = 1
TOLERANCE_MS = 1e-9  # the planner's slack on its own inequalities (float rounding only)


class NexusError(ProfileError):
    """A profiles, sessions or plan file that cannot be used; the message names the field."""


# ---- profiles ----

@dataclass(frozen=True)
class LatencyProfile:
    """A batch's latency in ms, given at some batch sizes (`points`: (batch, ms), sorted by batch).

    Between two profiled batch sizes the latency is interpolated linearly; below the smallest
    profiled size it is the smallest's; batches beyond the largest are never used. A larger
    batch never costs less than a smaller one: the table is the running maximum of the
    interpolated values (measured profiles are noisy; the maximum is the conservative choice,
    and the planner's rules rely on latency not falling as batches grow)."""

    points: tuple[tuple[int, float], ...]
    table: tuple[float, ...] = field(init=False, repr=False, compare=False)  # [b] -> ms, b = 1..max; [0] = 0

    def __post_init__(self) -> None:
        pts = sorted(self.points)
        if not pts:
            raise NexusError("a latency profile needs at least one batch size")
        object.__setattr__(self, "points", tuple((int(b), float(ms)) for b, ms in pts))
        batches = [b for b, _ in pts]
        table = [0.0]
        for b in range(1, batches[-1] + 1):
            i = bisect.bisect_left(batches, b)
            if i == 0:
                ms = pts[0][1]
            elif batches[i] == b:
                ms = pts[i][1]
            else:
                (b0, m0), (b1, m1) = pts[i - 1], pts[i]
                ms = m0 + (m1 - m0) * (b - b0) / (b1 - b0)
            table.append(max(ms, table[-1]))
        object.__setattr__(self, "table", tuple(table))

    @property
    def max_batch(self) -> int:
        return len(self.table) - 1

    def ms(self, batch: int) -> float:
        """Latency of a batch of `batch` (1 .. max_batch)."""
        return self.table[batch]

    def to_dict(self) -> dict[str, float]:
        return {str(b): ms for b, ms in self.points}


@dataclass(frozen=True)
class ModelEntry:
    """One model on one device type. `prefix` names a prefix (see DeviceProfiles.prefixes)
    whose weights the model shares with others: on a device, the sessions of models with the
    same prefix run it as one batch, then each model's own suffix at its own batch."""

    latency: LatencyProfile
    prefix: str | None = None


@dataclass(frozen=True)
class DeviceProfiles:
    models: dict[str, ModelEntry]
    prefixes: dict[str, LatencyProfile] = field(default_factory=dict)  # the shared part alone, batch -> ms


@dataclass(frozen=True)
class Profiles:
    device_types: dict[str, DeviceProfiles]
    schema_version: int = SCHEMA_VERSION


# ---- what is asked ----

@dataclass(frozen=True)
class Session:
    id: str
    model: str
    slo_ms: float
    rate_rps: float


@dataclass(frozen=True)
class QueryNode:
    model: str
    rate_rps: float
    children: tuple["QueryNode", ...] = ()

    def walk(self):
        """This node, then its subtrees' nodes, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Query:
    """A tree of models: a request's work passes root to leaf, and every root-to-leaf path must
    finish within `slo_ms` (models appear at most once per query)."""

    id: str
    slo_ms: float
    root: QueryNode

    def node_id(self, node: QueryNode) -> str:
        """The session id a node is planned under."""
        return f"{self.id}/{node.model}"

    def paths(self) -> list[list[QueryNode]]:
        out: list[list[QueryNode]] = []

        def down(node, path):
            path = path + [node]
            if not node.children:
                out.append(path)
            for child in node.children:
                down(child, path)
        down(self.root, [])
        return out


@dataclass(frozen=True)
class Workload:
    device_type: str
    max_devices: int
    sessions: tuple[Session, ...] = ()
    queries: tuple[Query, ...] = ()
    schema_version: int = SCHEMA_VERSION


# ---- the plan ----

@dataclass(frozen=True)
class Assignment:
    """One session's share of a device: its batch per duty cycle and the rate it carries here.
    `latency_ms` is the latency of the batch it runs in (its prefix group's, when it has one);
    `worst_case_ms` = duty cycle + latency_ms."""

    id: str
    model: str
    slo_ms: float
    batch: int
    rate_rps: float
    latency_ms: float
    worst_case_ms: float
    prefix: str | None = None


@dataclass(frozen=True)
class Device:
    id: int  # stable across re-plans: a device keeps its id while it keeps serving
    device_type: str
    duty_cycle_ms: float
    occupancy: float  # sum of its batches' latencies / duty cycle
    sessions: tuple[Assignment, ...]


@dataclass(frozen=True)
class QuerySplit:
    id: str
    slo_ms: float
    split_ms: dict[str, float]  # model -> its share of the query's SLO


@dataclass(frozen=True)
class Unserved:
    """The rate of a session no device carries in this plan, and why."""

    id: str
    model: str
    slo_ms: float
    rate_rps: float
    reason: str


@dataclass(frozen=True)
class Plan:
    device_type: str
    devices: tuple[Device, ...]
    queries: tuple[QuerySplit, ...] = ()
    unserved: tuple[Unserved, ...] = ()
    schema_version: int = SCHEMA_VERSION

    @property
    def devices_used(self) -> int:
        return len(self.devices)


# ---- the rules ----

@dataclass(frozen=True)
class Demand:
    """A session as the planner sees it: a plain session or a query's node (its SLO the node's
    share of the query's)."""

    id: str
    model: str
    slo_ms: float
    rate_rps: float
    prefix: str | None = None


class Costs:
    """Latency lookups for one device type. A model with a prefix P costs, alone, its own
    profile; batched with other models of P, the group costs l_P(sum of batches) plus each
    model's suffix l_m(b) - l_P(b) (nexus_io refuses a model cheaper than its prefix)."""

    def __init__(self, device: DeviceProfiles) -> None:
        self.device = device
        self._suffix: dict[str, tuple[float, ...]] = {}

    def table(self, model: str) -> tuple[float, ...]:
        return self.device.models[model].latency.table

    def cap(self, model: str) -> int:
        """The largest batch a model runs alone."""
        return self.device.models[model].latency.max_batch

    def prefix_table(self, prefix: str) -> tuple[float, ...]:
        return self.device.prefixes[prefix].table

    def suffix(self, model: str) -> tuple[float, ...]:
        found = self._suffix.get(model)
        if found is None:
            own, pre = self.table(model), self.prefix_table(self.device.models[model].prefix)
            found = tuple(max(0.0, own[b] - pre[b]) for b in range(min(len(own), len(pre))))
            self._suffix[model] = found
        return found

    def group_ms(self, prefix: str | None, models: list[str], batches: list[int]) -> float | None:
        """Latency of one batch group: one model alone, or the models of one prefix batched
        through it. None when a batch exceeds what was profiled."""
        if prefix is None or len(models) == 1:
            (m,), (b,) = models, batches
            table = self.table(m)
            return table[b] if b < len(table) else None
        total = sum(batches)
        pre = self.prefix_table(prefix)
        if total >= len(pre):
            return None
        terms = [pre[total]]
        for m, b in zip(models, batches):
            suffix = self.suffix(m)
            if b >= len(suffix):
                return None
            terms.append(suffix[b])
        return math.fsum(terms)  # exactly: the members in another order give the same figure


def batch_for(rate_rps: float, duty_ms: float) -> int:
    """The batch a session at `rate_rps` runs per duty cycle: what arrives in one cycle,
    rounded up, at least 1 (keeps the queue from growing: arrivals per cycle <= batch)."""
    return max(1, math.ceil(rate_rps * duty_ms / 1000.0 - 1e-9))


def max_batch_for_slo(profile: LatencyProfile, slo_ms: float) -> int:
    """The largest batch b with 2 * l(b) <= SLO (0 when not even batch 1 meets it). Why twice:
    on a device saturated by the session the duty cycle is l(b), and a request that just missed
    a batch waits one cycle, then runs in the next."""
    half = slo_ms / 2.0 + TOLERANCE_MS
    return bisect.bisect_right(profile.table, half, lo=1) - 1


@dataclass(frozen=True)
class DeviceLoad:
    """A device's state at one duty cycle: per entry its batch and its group's latency."""

    duty_ms: float
    batches: tuple[int, ...]
    latencies: tuple[float, ...]  # per entry, its batch group's latency
    busy_ms: float  # sum over batch groups

    @property
    def occupancy(self) -> float:
        return self.busy_ms / self.duty_ms


def device_load(costs: Costs, entries: list[tuple[Demand, float]], duty_ms: float) -> DeviceLoad | None:
    """The load of `entries` (demand, rate carried here) at `duty_ms`, or None when infeasible.
    Feasible: every batch within its profile, the batch groups' latencies sum to at most the
    duty cycle, and every entry's worst case (duty cycle + its group's latency) meets its SLO."""
    batches = [batch_for(rate, duty_ms) for _, rate in entries]
    groups: dict[object, list[int]] = {}
    for i, (demand, _) in enumerate(entries):
        groups.setdefault(demand.prefix if demand.prefix is not None else ("alone", i), []).append(i)
    latencies = [0.0] * len(entries)
    groups_ms = []
    for key, members in groups.items():
        ms = costs.group_ms(key if isinstance(key, str) else None, [entries[i][0].model for i in members],
                            [batches[i] for i in members])
        if ms is None:
            return None
        groups_ms.append(ms)
        for i in members:
            if duty_ms + ms > entries[i][0].slo_ms + TOLERANCE_MS:
                return None
            latencies[i] = ms
    # summed exactly: the same sessions in another order (a re-plan's) give the same figure
    busy = math.fsum(groups_ms)
    if busy > duty_ms + TOLERANCE_MS:
        return None
    return DeviceLoad(duty_ms, tuple(batches), tuple(latencies), busy)
