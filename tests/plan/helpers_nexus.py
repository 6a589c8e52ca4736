"""Building profiles and workloads for the planner tests in a line each."""

from __future__ import annotations

from cellserve.plan.nexus import (DeviceProfiles, LatencyProfile, ModelEntry, Profiles, Query, QueryNode, Session,
                                  Workload)

DT = "gpu"


def linear(base: float, per: float, max_batch: int = 16) -> LatencyProfile:
    """l(b) = base + per * b, given at 1 and max_batch (interpolation fills the rest exactly)."""
    return LatencyProfile(((1, base + per), (max_batch, base + per * max_batch)))


def profiles(models: dict[str, LatencyProfile | tuple[LatencyProfile, str]],
             prefixes: dict[str, LatencyProfile] | None = None) -> Profiles:
    entries = {m: ModelEntry(*v) if isinstance(v, tuple) else ModelEntry(v) for m, v in models.items()}
    return Profiles({DT: DeviceProfiles(entries, prefixes or {})})


def workload(sessions: list[tuple[str, float, float]], queries: tuple[Query, ...] = (), max_devices: int = 1000,
             ids: list[str] | None = None) -> Workload:
    """sessions as (model, slo_ms, rate_rps), ids s0, s1, ... unless given."""
    ids = ids or [f"s{i}" for i in range(len(sessions))]
    return Workload(DT, max_devices, tuple(Session(i, m, slo, r) for i, (m, slo, r) in zip(ids, sessions)), queries)


def chain(query_id: str, slo_ms: float, *nodes: tuple[str, float]) -> Query:
    """A query whose models run one after another: nodes as (model, rate)."""
    node = None
    for model, rate in reversed(nodes):
        node = QueryNode(model, rate, () if node is None else (node,))
    return Query(query_id, slo_ms, node)
