"""`cellserve bench planner`: the Nexus planner's speed on a random, seeded workload.

The workload: 24 models (a third of them in prefix families sharing an encoder), profiled at
batch sizes 1, 2, 4, ..., 64 with latency growing a little less than linearly; sessions with
SLOs of 50-500 ms and rates spread 20x, a fifth of them as query nodes (trees of 2-4 models);
rates scaled so that the devices the sessions need at their best batches come to 95% of
`devices`, and `max_devices` = `devices`. It times one plan from nothing and one re-plan after
every rate moved by up to 5%, and checks both with the independent checker (outside the timing).
"""

from __future__ import annotations

import datetime
import platform
import random
import time

from cellserve.plan.nexus import (DeviceProfiles, LatencyProfile, ModelEntry, Profiles, Query, QueryNode, Session,
                                  Workload, max_batch_for_slo)
from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_epochs import moved_sessions
from cellserve.plan.nexus_pack import plan, replan

BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEVICE_TYPE = "gpu"


def _profile(base: float, per: float) -> LatencyProfile:
    return LatencyProfile(tuple((b, base + per * b ** 0.9) for b in BATCHES))


def workload(devices: int, sessions: int, seed: int = 0) -> tuple[Profiles, Workload]:
    """Profiles and a workload as the module's docstring describes, the same for the same seed."""
    rng = random.Random(seed)
    prefixes = {f"enc{i}": (rng.uniform(3, 12), rng.uniform(0.3, 1.5)) for i in range(3)}
    models: dict[str, ModelEntry] = {}
    for i in range(24):
        if i % 3 == 0:
            name = f"enc{i % 9 // 3}"
            base, per = prefixes[name]
            extra = (rng.uniform(0.5, 3), rng.uniform(0.05, 0.4))
            models[f"m{i}"] = ModelEntry(_profile(base + extra[0], per + extra[1]), name)
        else:
            models[f"m{i}"] = ModelEntry(_profile(rng.uniform(2, 20), rng.uniform(0.2, 3)))
    device = DeviceProfiles(models, {p: _profile(b, k) for p, (b, k) in prefixes.items()})
    profiles = Profiles({DEVICE_TYPE: device})
    names = sorted(models)

    def need(model: str, slo: float, rate: float) -> float:
        lat = models[model].latency
        b = max_batch_for_slo(lat, slo)
        return rate / (b * 1000.0 / lat.ms(b)) if b else 0.0

    plain, queries, estimates = [], [], []
    n_query_nodes = sessions // 5
    while n_query_nodes > 1:
        size = min(n_query_nodes, rng.randint(2, 4))
        chosen = rng.sample(names, size)
        slo = rng.choice((200.0, 300.0, 400.0, 500.0))
        nodes = [QueryNode(m, rng.uniform(1, 20)) for m in chosen]
        root = QueryNode(nodes[0].model, nodes[0].rate_rps, tuple(nodes[1:]))  # a root fanning out
        queries.append(Query(f"q{len(queries)}", slo, root))
        estimates += [("q", len(queries) - 1, n.model, slo / 2, n.rate_rps) for n in nodes]
        n_query_nodes -= size
    for i in range(sessions - len(estimates)):
        m = rng.choice(names)
        slo = rng.uniform(50, 500)
        plain.append(Session(f"s{i}", m, slo, rng.uniform(1, 20)))
        estimates.append(("s", i, m, slo, plain[-1].rate_rps))
    scale = 0.95 * devices / max(sum(need(m, slo, r) for _, _, m, slo, r in estimates), 1e-9)
    plain = [Session(s.id, s.model, s.slo_ms, s.rate_rps * scale) for s in plain]
    queries = [_scaled(q, scale) for q in queries]
    return profiles, Workload(DEVICE_TYPE, devices, tuple(plain), tuple(queries))


def _scaled(q: Query, factor: float) -> Query:
    def node(n: QueryNode) -> QueryNode:
        return QueryNode(n.model, n.rate_rps * factor, tuple(node(c) for c in n.children))
    return Query(q.id, q.slo_ms, node(q.root))


def jittered(w: Workload, seed: int, spread: float = 0.05) -> Workload:
    """The same workload with every rate times a factor in [1 - spread, 1 + spread]."""
    rng = random.Random(seed)

    def node(n: QueryNode) -> QueryNode:
        return QueryNode(n.model, n.rate_rps * rng.uniform(1 - spread, 1 + spread), tuple(node(c) for c in n.children))
    sessions = tuple(Session(s.id, s.model, s.slo_ms, s.rate_rps * rng.uniform(1 - spread, 1 + spread))
                     for s in w.sessions)
    queries = tuple(Query(q.id, q.slo_ms, node(q.root)) for q in w.queries)
    return Workload(w.device_type, w.max_devices, sessions, queries)


def run(devices: int, sessions: int, seed: int = 0) -> dict:
    profiles, w = workload(devices, sessions, seed)
    # wall time is the goal's measure; CPU time too, since a shared machine's wall time
    # includes waiting for a core
    t0, c0 = time.perf_counter(), time.process_time()
    first = plan(w, profiles)
    plan_s, plan_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    w2 = jittered(w, seed + 1)
    t0, c0 = time.perf_counter(), time.process_time()
    second = replan(first, w2, profiles)
    replan_s, replan_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    problems = check_plan(first, profiles, w) + check_plan(second, profiles, w2)
    offered = sum(s.rate_rps for s in w.sessions) + sum(n.rate_rps for q in w.queries for n in q.root.walk())
    return {"benchmark": "planner", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "python": platform.python_version(), "seed": seed, "devices": devices,
            "sessions": len(w.sessions) + sum(1 for q in w.queries for _ in q.root.walk()),
            "queries": len(w.queries), "models": len(profiles.device_types[DEVICE_TYPE].models),
            "max_devices": w.max_devices, "devices_used": first.devices_used, "offered_rps": offered,
            "unserved_rps": sum(u.rate_rps for u in first.unserved), "plan_s": plan_s,
            "plan_cpu_s": plan_cpu_s, "replan_s": replan_s, "replan_cpu_s": replan_cpu_s, "replan_devices_used": second.devices_used,
            "replan_moved": len(moved_sessions(first, second)), "feasible": not problems,
            "check_problems": problems[:20]}
