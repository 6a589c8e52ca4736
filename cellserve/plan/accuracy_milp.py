"""The accuracy-scaling plan as a mixed-integer program, solved exactly by HiGHS (`highspy`).

Formulation (docs/accuracy-scaling.md states it with the same names). Devices of one type are
interchangeable, so the program counts devices per (type, variant) group instead of choosing a
variant per device: that removes the symmetry that makes a per-device program slow, and loses
nothing (a per-device solution maps to counts with the same objective, and counts map back by
splitting a group's load evenly over its devices). For each type t with N_t devices and each
variant v that can run on t (capacity c_tv > 0):

    n_tv  integer in [0, N_t]   devices of type t hosting v
    z_tv  >= 0                  requests/s routed to those devices
    sum_v n_tv <= N_t                       each device hosts at most one variant
    z_tv <= (c_tv / h) * n_tv               a device is routed at most capacity / headroom
    sum_{t, v in f} z_tv = D_f              all of family f's demand is routed
    maximise sum a_v z_tv                   (/ total demand: the effective accuracy)

No product of a routing share and a placement binary appears (Proteus's code has one and solves
a non-convex program with a 50% gap): routing is in requests/s, so the program is linear.

The headroom ladder: the program is solved at h = headroom, headroom - 0.05, ..., 1.0, and
the first feasible one is the plan. If none is, the demand rows become `<= D_f` and, at
h = 1.0, the program first maximises sum z (the most demand served), then, holding that, the
accuracy; what is not served is reported per family.

After solving, a variant's load is shared by the devices hosting it in proportion to their
capacities, and idle devices (those the program left spare, or gave a variant without load)
each take a copy of the most utilised variant that runs on them, which then shares its load
too: the accuracy is unchanged and no device is busier, so a burst before the next re-plan
meets the most spare room (Proteus's code, too, puts a variant on every device).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

from cellserve.plan.accuracy import AccuracyError, AccuracyPlan, AccuracyProblem, effective_accuracy, headroom_ladder
from cellserve.plan.highs import silent_highs

MIP_REL_GAP = 1e-9  # solved to optimality (HiGHS's default gap is 1e-4)


@dataclass(frozen=True)
class _Group:
    device_type: str
    family: str
    variant: str
    accuracy: float
    capacity: float  # requests/s per device


def _groups(problem: AccuracyProblem) -> list[_Group]:
    out = []
    for t in problem.device_types():
        for f in problem.families.values():
            for v in f.variants:
                c = problem.capacity(t, v.name)
                if c > 0:
                    out.append(_Group(t, f.name, v.name, v.accuracy, c))
    return out


def _solve(problem: AccuracyProblem, groups: list[_Group], h: float, mode: str,
           min_served: float = 0.0) -> tuple[list[int], list[float]] | None:
    """One program. mode "all": demand rows `= D_f`, maximise accuracy; "most": `<= D_f`,
    maximise the demand served; "accurate": `<= D_f` and served >= min_served, maximise
    accuracy. Returns (n, z) per group, or None when infeasible."""
    import highspy
    import numpy as np

    if not groups:  # nothing can run anywhere: HiGHS calls an empty model "Empty", not solved
        return None if mode == "all" and problem.total_demand() > 0 else ([], [])
    inf = highspy.kHighsInf
    hs = silent_highs()
    hs.setOptionValue("mip_rel_gap", MIP_REL_GAP)
    counts = problem.device_types()
    k = len(groups)
    for g in groups:  # columns 0..k-1: n; k..2k-1: z
        hs.addVar(0.0, float(counts[g.device_type]))
    for g in groups:
        hs.addVar(0.0, inf)
    for i in range(k):
        hs.changeColIntegrality(i, highspy.HighsVarType.kInteger)
        hs.changeColCost(k + i, groups[i].accuracy if mode != "most" else 1.0)
    hs.changeObjectiveSense(highspy.ObjSense.kMaximize)

    def row(lo: float, hi: float, idx: list[int], vals: list[float]) -> None:
        hs.addRow(lo, hi, len(idx), np.array(idx, dtype=np.int32), np.array(vals, dtype=np.float64))

    for t, n_t in counts.items():
        idx = [i for i, g in enumerate(groups) if g.device_type == t]
        if idx:
            row(-inf, float(n_t), idx, [1.0] * len(idx))
    for i, g in enumerate(groups):
        row(-inf, 0.0, [k + i, i], [1.0, -g.capacity / h])
    for f in problem.families.values():
        idx = [k + i for i, g in enumerate(groups) if g.family == f.name]
        lo = f.demand_rps if mode == "all" else 0.0
        if not idx:
            if lo > 0:
                return None  # no device type can run any of its variants
            continue
        row(lo, f.demand_rps, idx, [1.0] * len(idx))
    if mode == "accurate" and k:
        row(min_served, inf, list(range(k, 2 * k)), [1.0] * k)
    hs.run()
    status = hs.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    if status != highspy.HighsModelStatus.kOptimal:
        raise AccuracyError(f"HiGHS ended with {hs.modelStatusToString(status)} at headroom {h:g} ({mode})")
    col = list(hs.getSolution().col_value)
    n = [int(round(x)) for x in col[:k]]
    # Polish: the MIP's counts are integral only to within its tolerance (0.9999996 devices
    # routes 4e-5 req/s less than one device); with the counts fixed at their integers the
    # routing is an LP, solved again to full precision.
    for i in range(k):
        hs.changeColIntegrality(i, highspy.HighsVarType.kContinuous)
        hs.changeColBounds(i, float(n[i]), float(n[i]))
    hs.run()
    if hs.getModelStatus() == highspy.HighsModelStatus.kOptimal:
        col = list(hs.getSolution().col_value)
    z = [max(0.0, min(col[k + i], groups[i].capacity * n[i] / h)) for i in range(k)]
    return n, z


def _to_plan(problem: AccuracyProblem, groups: list[_Group], n: list[int], z: list[float], h: float,
             all_routed: bool, solver: str, previous: dict[str, str | None]) -> AccuracyPlan:
    """Devices from the counts, then spares spread (see the module's docstring): each variant's
    load is shared by the devices hosting it in proportion to their capacities (one
    utilisation per variant, at most 1 / h since the program keeps z <= capacity / h), and
    each idle device, in the problem's order, hosts the variant with load that runs on it and
    has the highest utilisation; a device no such variant runs on stays idle.

    Which device of a type takes which variant is free (the program counts devices), so the
    devices that hosted a variant in `previous` keep it where the counts allow, and an idle
    device keeps its previous variant when that one has load and is at least 80% as utilised
    as the most utilised: a re-plan then switches few devices (a switch stops a device while
    the new variant loads)."""
    types = {d.id: d.type for d in problem.devices}
    placement: dict[str, str | None] = {d.id: None for d in problem.devices}
    hosts: dict[str, list[str]] = {}
    by_variant: dict[str, float] = {}
    want = [n[i] if z[i] > 0 else 0 for i in range(len(groups))]  # hosting without load: spare
    for i, g in enumerate(groups):
        if z[i] > 0:
            by_variant[g.variant] = by_variant.get(g.variant, 0.0) + z[i]
            hosts.setdefault(g.variant, [])
    for keep in (True, False):  # first the devices that hosted the variant before, then any
        for i, g in enumerate(groups):
            for d in problem.devices:
                if want[i] == 0:
                    break
                if d.type == g.device_type and placement[d.id] is None and \
                        (not keep or previous.get(d.id) == g.variant):
                    placement[d.id] = g.variant
                    hosts[g.variant].append(d.id)
                    want[i] -= 1

    def room(v: str) -> float:
        return sum(problem.capacity(types[d], v) for d in hosts[v])

    for dev in [d.id for d in problem.devices if placement[d.id] is None]:
        runs = [v for v in hosts if problem.capacity(types[dev], v) > 0]
        if runs:
            v = max(runs, key=lambda v: by_variant[v] / room(v))
            before = previous.get(dev)
            if before in runs and by_variant[before] / room(before) >= 0.8 * by_variant[v] / room(v):
                v = before
            placement[dev] = v
            hosts[v].append(dev)
    routing, unserved = {}, {}
    for name, f in problem.families.items():
        load = {}
        for v in (v.name for v in f.variants if v.name in hosts):
            total = room(v)
            load.update({d: by_variant[v] * problem.capacity(types[d], v) / total for d in hosts[v]})
        served = sum(load.values())
        routing[name] = {dev: r / served for dev, r in load.items()} if served > 0 else {}
        short = 0.0 if all_routed else f.demand_rps - served
        unserved[name] = short if short > 1e-7 * max(1.0, f.demand_rps) else 0.0
    return AccuracyPlan(placement, routing, effective_accuracy(by_variant, problem), h, unserved, solver)


def plan_accuracy(problem: AccuracyProblem, previous: AccuracyPlan | None = None) -> AccuracyPlan:
    """The plan of the highest effective accuracy that routes all demand at the highest
    headroom of the ladder that allows it; else, at headroom 1.0, the most demand served, the
    most accurately (the module's docstring states the program). `previous` (the last
    period's plan) changes only which device hosts what, never the objective."""
    before = {} if previous is None else dict(previous.placement)
    groups = _groups(problem)
    solver = f"highspy {version('highspy')} (MILP, relative gap {MIP_REL_GAP:g})"
    for h in headroom_ladder(problem.headroom):
        sol = _solve(problem, groups, h, "all")
        if sol is not None:
            return _to_plan(problem, groups, *sol, h, True, solver, before)
    most = _solve(problem, groups, 1.0, "most")
    assert most is not None  # serving nothing is always feasible
    best = sum(most[1])
    sol = _solve(problem, groups, 1.0, "accurate", best * (1 - 1e-9) - 1e-9)
    return _to_plan(problem, groups, *(sol or most), 1.0, False, solver, before)
