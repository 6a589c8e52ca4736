"""The list-scheduling heuristic for graphs too large for the exact solver (and the exact
solver's first incumbent).

1. HEFT (Topcuoglu et al., 2002), append-only: nodes by upward rank (mean cost over the
   devices a node allows plus the longest mean path to the exit, transfers at their mean over
   ordered device pairs); each goes to the device where it finishes earliest, preferring
   devices whose memory budget it still fits.
2. Starts besides HEFT: every single device that every node allows, and for memory mode every
   node on its cheapest device other than the one whose memory is minimised.
3. Local search from each start (beyond SMALL nodes: from the best start only): move one node
   to another device, re-derive the order by list scheduling (the better of upward-rank and
   earliest-start order), keep the move when the plan's key (constraint violation, the mode's
   objective, makespan) falls; passes over the nodes until a pass changes nothing or the pass
   limit (8, beyond SMALL nodes 3) is spent.
The best plan over all starts is returned, so it is never worse (by that key) than any start,
single devices included. Deterministic: no clocks, no randomness.
"""

from __future__ import annotations

import heapq

from cellserve.plan.partition_eval import Evaluator, Schedule, primary, violation
from cellserve.plan.partition_graph import Problem

SMALL = 60  # nodes: up to this many, every start gets a full local search
Assignment = dict[str, str]
Order = dict[str, list[str]]


class Heuristic:
    def __init__(self, problem: Problem, evaluator: Evaluator | None = None):
        self.p = problem
        self.g = problem.graph
        self.ev = evaluator or Evaluator(self.g)
        self.ids = self.g.node_ids()
        self.position = {n: i for i, n in enumerate(self.g.topological_order())}
        self.succ: dict[str, list[tuple[str, float]]] = {n: [] for n in self.ids}
        for e in self.g.edges:
            self.succ[e.src].append((e.dst, e.mb))
        self.budgets = problem.memory_budget_mb
        self.reverse_topo = sorted(self.ids, key=self.position.__getitem__, reverse=True)

    # ---- what a plan is worth ----

    def key(self, s: Schedule) -> tuple[float, float, float]:
        return (violation(s, self.p.slo_ms, self.budgets), primary(self.p.mode, s, self.p.memory_device), s.makespan)

    # ---- an order for an assignment ----

    def _transfer(self, mb: float, a: str, b: str) -> float:
        return 0.0 if a == b else self.g.links[(a, b)].transfer_ms(mb)

    def ranks(self, assignment: Assignment) -> dict[str, float]:
        """Upward rank under this assignment: a node's cost plus the longest path of costs and
        transfers from it to an exit."""
        rank: dict[str, float] = {}
        for n in self.reverse_topo:
            a = assignment[n]
            rank[n] = self.ev.cost[n][a] + max((self._transfer(mb, a, assignment[m]) + rank[m]
                                                for m, mb in self.succ[n]), default=0.0)
        return rank

    def _by_priority(self, assignment: Assignment, rank: dict[str, float]) -> Order:
        """Each device's order: of the ready nodes, the highest rank first."""
        indeg = {n: len(self.ev.preds[n]) for n in self.ids}
        ready = [(-rank[n], self.position[n], n) for n in self.ids if indeg[n] == 0]
        heapq.heapify(ready)
        order: Order = {d: [] for d in self.g.devices}
        while ready:
            _, _, n = heapq.heappop(ready)
            order[assignment[n]].append(n)
            for m, _ in self.succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    heapq.heappush(ready, (-rank[m], self.position[m], m))
        return order

    def etf_order(self, assignment: Assignment, rank: dict[str, float]) -> Order:
        """Each device's order by earliest start: of the ready nodes, the one that can start
        first on its device (the higher upward rank on a tie)."""
        indeg = {n: len(self.ev.preds[n]) for n in self.ids}
        free = {d: 0.0 for d in self.g.devices}
        arrive = {n: 0.0 for n in self.ids}
        # a heap of (earliest start when pushed, ...): a start only grows (its device gets
        # busier), so a popped entry whose start grew is pushed again with the new one
        heap = [(0.0, -rank[n], self.position[n], n) for n in self.ids if indeg[n] == 0]
        heapq.heapify(heap)
        order: Order = {d: [] for d in self.g.devices}
        while heap:
            est, r, pos, n = heapq.heappop(heap)
            d = assignment[n]
            now = max(free[d], arrive[n])
            if now > est:
                heapq.heappush(heap, (now, r, pos, n))
                continue
            free[d] = now + self.ev.cost[n][d]
            order[d].append(n)
            for m, mb in self.succ[n]:
                arrive[m] = max(arrive[m], free[d] + self._transfer(mb, d, assignment[m]))
                indeg[m] -= 1
                if indeg[m] == 0:
                    heapq.heappush(heap, (max(free[assignment[m]], arrive[m]), -rank[m], self.position[m], m))
        return order

    def schedule(self, assignment: Assignment) -> tuple[Order, Schedule]:
        """The better (by key) of two list schedules of `assignment`: by upward rank, and by
        earliest start."""
        rank = self.ranks(assignment)
        best = None
        for order in (self._by_priority(assignment, rank), self.etf_order(assignment, rank)):
            sched = self.ev.run(assignment, order)
            if best is None or better(self.key(sched), self.key(best[1])):
                best = (order, sched)
        return best

    # ---- starts ----

    def heft(self) -> Assignment:
        devices = self.g.devices
        pairs = [(a, b) for a in devices for b in devices]
        rank: dict[str, float] = {}
        for n in sorted(self.ids, key=self.position.__getitem__, reverse=True):
            costs = self.ev.cost[n]
            mean = sum(costs.values()) / len(costs)
            rank[n] = mean + max((sum(self._transfer(mb, a, b) for a, b in pairs if (a, b) in self.g.links or a == b)
                                  / len(pairs) + rank[m] for m, mb in self.succ[n]), default=0.0)
        order = sorted(self.ids, key=lambda n: (-rank[n], self.position[n]))
        # rank falls along every edge when costs are > 0; with zero costs a successor may tie,
        # and the position (topological) breaks the tie the right way
        assignment: Assignment = {}
        free = {d: 0.0 for d in devices}
        used = {d: 0.0 for d in devices}
        finish: dict[str, float] = {}
        for n in order:
            best = None
            for d, c in self.ev.cost[n].items():
                ready = free[d]
                for p, mb in self.ev.preds[n]:
                    ready = max(ready, finish[p] + self._transfer(mb, assignment[p], d))
                fits = used[d] + self.ev.mem[n].get(d, 0.0) <= self.budgets.get(d, float("inf")) + 1e-9
                cand = (not fits, ready + c, d)
                if best is None or cand < best:
                    best = cand
            _, eft, d = best
            assignment[n] = d
            finish[n] = free[d] = eft
            used[d] += self.ev.mem[n].get(d, 0.0)
        return assignment

    def starts(self) -> list[Assignment]:
        out = [self.heft()]
        for d in self.g.devices:
            if all(d in self.ev.cost[n] for n in self.ids):
                out.append({n: d for n in self.ids})
        if self.p.mode == "memory":
            off = {}
            for n in self.ids:
                others = {d: c for d, c in self.ev.cost[n].items() if d != self.p.memory_device}
                off[n] = min(others, key=others.get) if others else self.p.memory_device
            out.append(off)
        return out

    # ---- search ----

    def improve(self, assignment: Assignment, max_passes: int) -> tuple[Assignment, Order, Schedule]:
        assignment = dict(assignment)
        order, best = self.schedule(assignment)
        best_key = self.key(best)
        walk = sorted(self.ids, key=self.position.__getitem__)
        for _ in range(max_passes):
            changed = False
            for n in walk:
                here = assignment[n]
                for d in self.ev.cost[n]:
                    if d == here:
                        continue
                    assignment[n] = d
                    trial_order, trial = self.schedule(assignment)
                    trial_key = self.key(trial)
                    if better(trial_key, best_key):
                        order, best, best_key, here, changed = trial_order, trial, trial_key, d, True
                    assignment[n] = here
            if not changed:
                break
        return assignment, order, best

    def solve(self) -> tuple[Assignment, Order, Schedule]:
        """The best plan over every start after local search (see the module's docstring).
        Up to SMALL nodes every start is searched (up to 8 passes); beyond, every start is
        scheduled but only the best is searched, for 3 passes: a move costs a list schedule
        (O(nodes log nodes + edges)) and a pass tries every node, so this bounds the time at
        about 6 x nodes schedules."""
        small = len(self.ids) <= SMALL
        scheduled = []
        for start in self.starts():
            if all(start != s[0] for s in scheduled):
                order, sched = self.schedule(start)
                scheduled.append((start, order, sched))
        if not small:
            best = scheduled[0]
            for cand in scheduled[1:]:
                if better(self.key(cand[2]), self.key(best[2])):
                    best = cand
            scheduled = [best]
        best = None
        for start, order, sched in scheduled:
            found = self.improve(start, 8 if small else 3)
            if best is None or better(self.key(found[2]), self.key(best[2])):
                best = found
        return best


def better(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether key `a` beats key `b` lexicographically, a difference below 1e-9 relative
    counting as a tie (float rounding is no gain, and would let the search cycle)."""
    for x, y in zip(a, b):
        tol = 1e-9 * max(1.0, abs(x), abs(y))
        if x < y - tol:
            return True
        if x > y + tol:
            return False
    return False
