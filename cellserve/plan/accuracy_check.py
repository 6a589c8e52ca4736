"""An independent check of an accuracy-scaling plan against its problem.

Written apart from the planner (it shares only the data classes and reads their raw fields):
it derives capacities from `capacity_rps` and the latency points itself, and checks every
rule docs/accuracy-scaling.md states, so a planner bug shows up here rather than as the
planner agreeing with itself. It checks feasibility, not optimality (the tests compare the
planner with a brute force for that). `check_plan` returns the problems found, each naming
the device or family; [] is a plan that keeps the rules.
"""

from __future__ import annotations

from cellserve.plan.accuracy import AccuracyPlan, AccuracyProblem

TOL_REL = 1e-6
TOL_ABS = 1e-6


def _capacity(problem: AccuracyProblem, device_type: str, variant: str, slo_ms: float | None) -> float:
    given = problem.capacity_rps.get(device_type, {})
    if variant in given:
        return given[variant]
    points = problem.latency_ms.get(device_type, {}).get(variant)
    if points is None or slo_ms is None:
        return 0.0
    fits = [b * 1000.0 / ms for b, ms in points.points if 2.0 * ms <= slo_ms]
    return max(fits, default=0.0)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL_ABS + TOL_REL * max(abs(a), abs(b))


def check_plan(plan: AccuracyPlan, problem: AccuracyProblem) -> list[str]:
    problems: list[str] = []
    family_of = {v.name: (f.name, v.accuracy, f.slo_ms) for f in problem.families.values() for v in f.variants}
    devices = {d.id: d.type for d in problem.devices}

    # the headroom is one of the ladder's steps: problem.headroom - k * 0.05, or 1.0
    h = plan.headroom
    k = round((problem.headroom - h) / 0.05)
    if not (h == 1.0 or (k >= 0 and abs(problem.headroom - 0.05 * k - h) < 1e-9 and h >= 1.0)):
        problems.append(f"headroom {h:g} is not a step of the ladder from {problem.headroom:g} down to 1.0")

    if set(plan.placement) != set(devices):
        problems.append(f"placement covers devices {sorted(plan.placement)}, the problem has {sorted(devices)}")
    capacity: dict[str, float] = {}
    for dev, v in plan.placement.items():
        if v is None or dev not in devices:
            continue
        if v not in family_of:
            problems.append(f"device {dev!r} hosts {v!r}, a variant no family has")
            continue
        capacity[dev] = _capacity(problem, devices[dev], v, family_of[v][2])
        if capacity[dev] <= 0:
            problems.append(f"device {dev!r} of type {devices[dev]!r} hosts {v!r}, which cannot run there")

    served: dict[str, float] = {}
    for name, f in problem.families.items():
        if name not in plan.unserved_rps:
            problems.append(f"family {name!r} is missing from unserved_rps")
        u = plan.unserved_rps.get(name, 0.0)
        if u < 0 or u > f.demand_rps + TOL_ABS:
            problems.append(f"family {name!r}: unserved {u:g} req/s outside [0, demand {f.demand_rps:g}]")
        if u > TOL_ABS and h != 1.0:
            problems.append(f"family {name!r}: {u:g} req/s unserved at headroom {h:g}; the ladder goes to 1.0 first")
        served[name] = f.demand_rps - u
    for name in set(plan.unserved_rps) | set(plan.routing):
        if name not in problem.families:
            problems.append(f"plan names family {name!r}, which the problem lacks")

    load: dict[str, float] = {}
    by_accuracy = 0.0
    for name, f in problem.families.items():
        shares = plan.routing.get(name, {})
        if served[name] > TOL_ABS and not _close(sum(shares.values()), 1.0):
            problems.append(f"family {name!r}: routing shares sum to {sum(shares.values()):g}, not 1")
        if served[name] <= TOL_ABS and any(s > 0 for s in shares.values()):
            problems.append(f"family {name!r} serves nothing yet routes to {sorted(shares)}")
        for dev, share in shares.items():
            v = plan.placement.get(dev)
            if share < 0:
                problems.append(f"family {name!r}: negative share {share:g} to device {dev!r}")
            if v is None or family_of.get(v, ("",))[0] != name:
                if share > 0:
                    problems.append(f"family {name!r} is routed to device {dev!r}, which hosts {v!r}, "
                                    "no variant of that family")
                continue
            rate = share * served[name]
            load[dev] = load.get(dev, 0.0) + rate
            by_accuracy += rate * family_of[v][1]
    for dev, rate in load.items():
        limit = capacity.get(dev, 0.0) / h
        if rate > limit + TOL_ABS + TOL_REL * limit:
            problems.append(f"device {dev!r} ({plan.placement[dev]!r}) is routed {rate:g} req/s, over its capacity "
                            f"{capacity.get(dev, 0.0):g} / headroom {h:g} = {limit:g}")
    total = sum(load.values())
    acc = by_accuracy / total if total > 0 else 0.0
    if not _close(acc, plan.effective_accuracy):
        problems.append(f"effective_accuracy {plan.effective_accuracy:g}, computed {acc:g}")
    return problems
