"""An independent check of a plan against its profiles and workload.

Written apart from the planner (it shares only the data classes): it re-derives latencies
from the profiles' points and checks every rule docs/planning.md states, so a planner bug
shows up as a problem here rather than as the planner agreeing with itself.
`check_plan` returns the problems found, each naming the device or session; [] is a feasible
plan.
"""

from __future__ import annotations

from cellserve.plan.nexus import Plan, Profiles, Workload

TOL_MS = 1e-6
TOL_RATE = 1e-6  # relative


def _latency(points: tuple[tuple[int, float], ...], batch: int) -> float | None:
    """ms of `batch` from profiled points: linear between them, the smallest's below them,
    none beyond the largest, never less than a smaller batch's."""
    pts = sorted(points)
    if batch > pts[-1][0]:
        return None
    worst = 0.0
    for b in range(1, batch + 1):
        below = [p for p in pts if p[0] <= b]
        above = [p for p in pts if p[0] >= b]
        if not below:
            ms = pts[0][1]
        else:
            (b0, m0), (b1, m1) = below[-1], above[0]
            ms = m0 if b1 == b0 else m0 + (m1 - m0) * (b - b0) / (b1 - b0)
        worst = max(worst, ms)
    return worst


def check_plan(plan: Plan, profiles: Profiles, workload: Workload) -> list[str]:
    problems: list[str] = []
    dp = profiles.device_types[workload.device_type]
    if plan.device_type != workload.device_type:
        problems.append(f"plan is for {plan.device_type!r}, the workload for {workload.device_type!r}")
    if len(plan.devices) > workload.max_devices:
        problems.append(f"{len(plan.devices)} devices, more than max_devices {workload.max_devices}")
    memo: dict[tuple, float | None] = {}

    def lat(points, b):
        key = (id(points), b)
        if key not in memo:
            memo[key] = _latency(points, b)
        return memo[key]

    # what each session asks: its SLO (a query node's: its share) and rate
    asked: dict[str, tuple[str, float, float]] = {s.id: (s.model, s.slo_ms, s.rate_rps) for s in workload.sessions}
    splits = {q.id: q for q in plan.queries}
    for q in workload.queries:
        split = splits.get(q.id)
        if split is None:  # unserved as a whole: no node may be on a device
            for node in q.root.walk():
                asked[q.node_id(node)] = (node.model, None, node.rate_rps)
            continue
        models = {n.model for n in q.root.walk()}
        if set(split.split_ms) != models or split.slo_ms != q.slo_ms:
            problems.append(f"query {q.id!r}: split {split.split_ms} at {split.slo_ms:g} ms, asked models "
                            f"{sorted(models)} at {q.slo_ms:g} ms")
        for path in q.paths():
            total = sum(split.split_ms.get(n.model, float("inf")) for n in path)
            if total > q.slo_ms + TOL_MS:
                problems.append(f"query {q.id!r}: path {'->'.join(n.model for n in path)} has shares summing to "
                                f"{total:g} ms, over its SLO {q.slo_ms:g}")
        for node in q.root.walk():
            asked[q.node_id(node)] = (node.model, split.split_ms.get(node.model), node.rate_rps)

    carried: dict[str, float] = {}
    for dev in plan.devices:
        where = f"device {dev.id}"
        d = dev.duty_cycle_ms
        groups: dict[object, list] = {}
        for a in dev.sessions:
            carried[a.id] = carried.get(a.id, 0.0) + a.rate_rps
            want = asked.get(a.id)
            if want is None:
                problems.append(f"{where}: session {a.id!r} is in no workload")
                continue
            if want[1] is None:
                problems.append(f"{where}: session {a.id!r} is a node of a query the plan has no split for")
            elif a.model != want[0] or abs(a.slo_ms - want[1]) > TOL_MS:
                problems.append(f"{where}: session {a.id!r} is model {a.model!r} at SLO {a.slo_ms:g}, "
                                f"asked {want[0]!r} at {want[1]}")
            if a.batch < a.rate_rps * d / 1000.0 - 1e-6:
                problems.append(f"{where}: session {a.id!r} batch {a.batch} < its arrivals per cycle "
                                f"{a.rate_rps * d / 1000.0:g}")
            prefix = dp.models[a.model].prefix
            groups.setdefault(prefix if prefix is not None else ("alone", a.id), []).append(a)
        busy = 0.0
        for key, members in groups.items():
            if len(members) == 1:
                ms = lat(dp.models[members[0].model].latency.points, members[0].batch)
            else:
                pre = dp.prefixes[key].points
                ms = lat(pre, sum(a.batch for a in members))
                for a in members:
                    own, shared = lat(dp.models[a.model].latency.points, a.batch), lat(pre, a.batch)
                    ms = None if ms is None or own is None or shared is None else ms + max(0.0, own - shared)
            if ms is None:
                problems.append(f"{where}: batch of {[a.id for a in members]} beyond its profile")
                continue
            busy += ms
            for a in members:
                if abs(a.latency_ms - ms) > TOL_MS or abs(a.worst_case_ms - (d + ms)) > TOL_MS:
                    problems.append(f"{where}: session {a.id!r} states latency {a.latency_ms:g} and worst case "
                                    f"{a.worst_case_ms:g} ms, computed {ms:g} and {d + ms:g}")
                if d + ms > a.slo_ms + TOL_MS:
                    problems.append(f"{where}: session {a.id!r} worst case {d:g} + {ms:g} ms over its SLO {a.slo_ms:g}")
        if busy > d + TOL_MS:
            problems.append(f"{where}: batches take {busy:g} ms, over the duty cycle {d:g}")
        if abs(dev.occupancy - busy / d) > 1e-6:
            problems.append(f"{where}: occupancy {dev.occupancy:g}, computed {busy / d:g}")

    for u in plan.unserved:
        carried[u.id] = carried.get(u.id, 0.0) + u.rate_rps
    for sid, (model, _, rate) in asked.items():
        got = carried.get(sid, 0.0)
        if abs(got - rate) > TOL_RATE * rate:
            problems.append(f"session {sid!r}: {got:g} req/s on devices and unserved, asked {rate:g}")
    return problems
