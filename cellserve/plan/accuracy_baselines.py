"""The planners accuracy scaling is compared with, each a `Planner` (accuracy_control.py):
`(problem at the measured demand, previous plan or None) -> AccuracyPlan`, every plan one
that accuracy_check.check_plan accepts.

- `proteus`: the exact MILP (accuracy_milp.py).
- `highest_only` (Clipper-HA) and `lowest_only` (Clipper-HT): every family served by its most
  (least) accurate variant only. Devices are still shared among families by the same MILP
  restricted to that one variant per family, re-solved every period like Proteus, so the
  comparison isolates the choice of variant (Clipper itself has no cluster planner; its
  replicas are sized by hand).
- `infaas_greedy`: INFaaS-style greedy switching, no solver. From the previous placement, at
  each headroom of the ladder in turn: idle devices go to the family shortest of capacity
  (hosting its most accurate variant that runs there); while a family is short, one of its
  devices steps down to its next faster variant (the step that adds the most capacity), or,
  when none can, takes a device another family can spare; then each family with room steps
  devices up to their next more accurate variant (the most accurate gain first) while it
  stays covered. Routing is in proportion to the devices' capacities. It reacts to demand
  step by step from where it stands, as INFaaS's autoscaler does, where Proteus re-solves.
"""

from __future__ import annotations

from cellserve.plan.accuracy import AccuracyPlan, AccuracyProblem, effective_accuracy, headroom_ladder
from cellserve.plan.accuracy_milp import plan_accuracy


def proteus(problem: AccuracyProblem, previous: AccuracyPlan | None = None) -> AccuracyPlan:
    return plan_accuracy(problem, previous)


def _single(problem: AccuracyProblem, previous: AccuracyPlan | None, pick: str, label: str) -> AccuracyPlan:
    keep = {n: (f.best() if pick == "best" else f.worst()).name for n, f in problem.families.items()}
    plan = plan_accuracy(problem.restricted(keep), previous)
    return AccuracyPlan(plan.placement, plan.routing, plan.effective_accuracy, plan.headroom, plan.unserved_rps,
                        f"{label}: {plan.solver}")


def highest_only(problem: AccuracyProblem, previous: AccuracyPlan | None = None) -> AccuracyPlan:
    return _single(problem, previous, "best", "clipper-ha")


def lowest_only(problem: AccuracyProblem, previous: AccuracyPlan | None = None) -> AccuracyPlan:
    return _single(problem, previous, "worst", "clipper-ht")


class _Greedy:
    """One greedy pass at headroom h over a placement (device id -> variant or None)."""

    def __init__(self, problem: AccuracyProblem, placement: dict[str, str | None], h: float) -> None:
        self.p, self.h = problem, h
        self.types = {d.id: d.type for d in problem.devices}
        self.place = dict(placement)
        self.fam = {v.name: f.name for f in problem.families.values() for v in f.variants}
        # each family's variants that run on each type, most accurate first
        self.ladder = {(f.name, t): [v.name for v in sorted(f.variants, key=lambda v: -v.accuracy)
                                     if problem.capacity(t, v.name) > 0]
                       for f in problem.families.values() for t in problem.device_types()}

    def cap(self, dev: str) -> float:
        v = self.place[dev]
        return 0.0 if v is None else self.p.capacity(self.types[dev], v) / self.h

    def family_cap(self, family: str) -> float:
        return sum(self.cap(d) for d, v in self.place.items() if v is not None and self.fam[v] == family)

    def slack(self, family: str) -> float:
        return self.family_cap(family) - self.p.families[family].demand_rps

    def run(self) -> bool:
        for d in [d for d, v in self.place.items() if v is None]:
            for f in sorted(self.p.families, key=self.slack):
                if self.ladder[(f, self.types[d])]:
                    self.place[d] = self.ladder[(f, self.types[d])][0]
                    break
        for f in sorted(self.p.families, key=self.slack):
            while self.slack(f) < -1e-9 and (self._step_down(f) or self._borrow(f)):
                pass
        for f in self.p.families:
            while self._step_up(f):
                pass
        return all(self.slack(f) >= -1e-9 for f in self.p.families)

    def _moves(self, f: str, direction: int) -> list[tuple[float, str, str]]:
        out = []
        for d, v in self.place.items():
            if v is None or self.fam[v] != f:
                continue
            order = self.ladder[(f, self.types[d])]
            i = order.index(v) + direction
            if 0 <= i < len(order):
                gain = self.p.capacity(self.types[d], order[i]) / self.h - self.cap(d)
                out.append((gain, d, order[i]))
        return out

    def _step_down(self, f: str) -> bool:
        moves = [m for m in self._moves(f, +1) if m[0] > 0]
        if not moves:
            return False
        _, d, v = max(moves)
        self.place[d] = v
        return True

    def _borrow(self, f: str) -> bool:
        for d, v in sorted(self.place.items(), key=lambda x: -self.cap(x[0])):
            g = self.fam[v] if v is not None else None
            runs = self.ladder[(f, self.types[d])]
            if g == f or not runs or (g is not None and self.slack(g) - self.cap(d) < -1e-9):
                continue
            self.place[d] = runs[-1]  # the fastest: the borrower is short
            return True
        return False

    def _step_up(self, f: str) -> bool:
        acc = {v.name: v.accuracy for v in self.p.families[f].variants}
        for _, d, v in sorted(self._moves(f, -1), key=lambda m: -(acc[m[2]] - acc[self.place[m[1]]])):
            old = self.place[d]
            self.place[d] = v
            if self.slack(f) >= -1e-9:
                return True
            self.place[d] = old
        return False


def infaas_greedy(problem: AccuracyProblem, previous: AccuracyPlan | None = None) -> AccuracyPlan:
    start = {d.id: None for d in problem.devices}
    if previous is not None:
        start.update({d: v for d, v in previous.placement.items() if d in start})
    for h in headroom_ladder(problem.headroom):
        g = _Greedy(problem, start, h)
        if g.run():
            break
    routing, unserved, by_variant = {}, {}, {}
    for name, f in problem.families.items():
        devs = {d: g.cap(d) for d, v in g.place.items() if v is not None and g.fam[v] == name and g.cap(d) > 0}
        total = sum(devs.values())
        served = min(f.demand_rps, total)
        routing[name] = {d: c / total for d, c in devs.items()} if served > 0 else {}
        short = f.demand_rps - served
        unserved[name] = short if short > 1e-7 * max(1.0, f.demand_rps) else 0.0
        for d, share in routing[name].items():
            v = g.place[d]
            by_variant[v] = by_variant.get(v, 0.0) + share * served
    return AccuracyPlan(dict(g.place), routing, effective_accuracy(by_variant, problem), g.h, unserved, "infaas-greedy")
