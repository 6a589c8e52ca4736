"""The accuracy-scaling controller in the cluster (`serve --ray --accuracy-scaling`): the driver's loop.

A Replanner (ray_replan_loop.py) whose plans are Proteus's instead of Nexus's; its loop (a
tick every half second on the frontends' event loop), its loading, draining and unloading of
models on the workers and its handling of dead workers are the Replanner's own. Per tick:

1. fold the arrivals into the RateMeter (the families' mean request lengths);
2. at the first tick, make the AccuracyController (plan/accuracy_control.py) on a nominal
   demand (one request per period per family: nothing measured yet, so the most accurate
   plan that fits) and apply its plan; after that, every tick sets the controller's problem
   (the live workers as devices, each variant's latency profile the fixed one taken at
   start, below) and calls its `tick()`, which re-plans once a period (`--replan-every`,
   default 10 s) has passed, on the peak 1-second demand measured since the last plan,
   counted in rows (a request of k rows is k lanes of work, as capacities count lanes); a
   dead worker re-plans at once;
3. a new plan must pass plan/accuracy_check.check_plan (else it is logged and the last one
   kept); applying it: each worker loads the variant the plan places on it (awaited), then
   routes switch at once (AccuracyCore.routes: the plan's placement and weighted shares) and
   variants a worker no longer hosts drain and are unloaded (Replanner.drain).

Capacities are fixed at start (ray_accuracy_profile.py has the definitions): each variant's
l(b) is the mean over the workers of the profile each measured alone before serving (the
start-up snapshot's "variant_profiles"), or, given `--accuracy-profiles`, derived from those files;
never the engines' moving cost averages, which rise with the very load being planned for.
A worker the plan leaves idle keeps the variant it hosts (a fallback: see `apply`).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from cellserve.cluster.ray_accuracy import DEVICE_TYPE, build_problem
from cellserve.cluster.ray_accuracy_core import VariantRoutes
from cellserve.cluster.ray_accuracy_profile import mean_points
from cellserve.cluster.ray_replan import routes
from cellserve.cluster.ray_replan_loop import Replanner
from cellserve.plan.accuracy import DEFAULT_HEADROOM, AccuracyPlan
from cellserve.plan.accuracy_check import check_plan
from cellserve.plan.accuracy_control import PERIOD_S, AccuracyController, WeightedRouter


@dataclass(frozen=True)
class AccuracyApplied:
    """One plan applied: for the log and the tests."""

    epoch: int
    at: float  # monotonic seconds
    reason: str
    placement: dict[str, str | None]  # worker id -> the variant it hosts (None: idle or not loaded)
    demand_rps: dict[str, float]  # family -> the demand planned for
    effective_accuracy: float
    unserved_rps: dict[str, float]
    seconds: float  # from the decision to routes switched (planning and loading)


class AccuracyReplanner(Replanner):
    def __init__(self, core, fams: dict[str, list[str]], variant_served, accuracy: dict[str, float],
                 slo_ms: float, period_s: float | None, stack_layers: bool, died: tuple, first_line,
                 planner=None, headroom: float = DEFAULT_HEADROOM, log=print, rng: random.Random | None = None,
                 profiles: dict[str, list[tuple[int, float]]] | None = None):
        """`core`: the AccuracyCore; `fams`: family -> its served variants; `variant_served`:
        the variants' ServedModels (what the workers run; their SLO is the families'); `planner`:
        Proteus's MILP unless given (any accuracy_control.Planner); `profiles`: variant ->
        (batch, ms) points to plan with (from --accuracy-profiles files: ray_accuracy_profile.load_profiles);
        the variants without one take the workers' start-up profiles (their snapshots'
        "variant_profiles", read now: the snapshot taken at start)."""
        if planner is None:
            from cellserve.plan.accuracy_milp import plan_accuracy as planner
        super().__init__(core, variant_served, period_s or PERIOD_S, stack_layers, died, first_line, log=log)
        self.fams, self.accuracy, self.family_slo_ms = fams, accuracy, slo_ms
        self.family_of = {v: f for f, vs in fams.items() for v in vs}
        self.planner, self.headroom = planner, headroom
        self.rng = rng or random.Random()
        self.controller: AccuracyController | None = None
        self.applied: list[AccuracyApplied] = []
        self.planned_for: dict[str, float] = {}  # family -> the demand the last plan made was for
        self.capacity_rps: dict[str, float] = {}  # variant -> requests/s one worker serves (the last problem's)
        # variants with an --accuracy-profiles file take it; the others the workers' start-up measurement
        self.fixed_points = {**self.startup_points(), **(profiles or {})}
        self.profile_source = {v: ("--accuracy-profiles file" if v in (profiles or {}) else "measured by the workers at start")
                               for v in self.fixed_points}
        lacking = sorted(set(self.models) - set(self.fixed_points))
        if lacking:
            self.log(f"cellserve: ray: no profile of {', '.join(lacking)}: never placed")

    async def tick(self) -> None:
        now = time.monotonic()
        dead = self._fold(now)
        if not self.router.live():
            return
        if self.controller is None:
            nominal = {f: self.floor_rps for f in self.fams}
            self.controller = AccuracyController(self.problem(nominal), self._checked, time.monotonic, self.rng,
                                                 self.epoch_s)
            self.core.controller = self.controller
            await self.apply(self.controller.plan, "first plan, nominal demand", now)
        else:
            self.controller.problem = self.problem(self.controller.measured)
            if dead:
                plan = self._checked(self.controller.problem, self.controller.plan)
                self.controller.plan = plan
                await self.apply(plan, f"{', '.join(sorted(dead))} died: re-planned without it", now)
            else:
                plan = self.controller.tick()
                if plan is not None:
                    await self.apply(plan, f"period of {self.epoch_s:g} s, measured demand", now)
        await self.drain()

    def problem(self, demand: dict[str, float]):
        live = [w.id for w in self.router.live()]
        return build_problem(self.fams, self.accuracy, demand, self.family_slo_ms, live, self.variant_profiles(),
                             self.headroom)

    def startup_points(self) -> dict[str, list[tuple[int, float]]]:
        """Variant -> (batch, ms): the mean over the workers of the profiles in their start-up
        snapshots (a worker without one is left out; a variant none profiled has none)."""
        out = {}
        for v in self.models:
            got = [[(int(b), float(ms)) for b, ms in w.snapshot["variant_profiles"][v]]
                   for w in self.router.workers.values()
                   if w.snapshot and v in w.snapshot.get("variant_profiles", {})]
            if got:
                out[v] = mean_points(got)
        return out

    def variant_profiles(self) -> dict[str, list[tuple[int, float]]]:
        """Variant -> (batch, ms) on a worker: fixed for the server's life (module docstring)."""
        return self.fixed_points

    def _checked(self, problem, previous: AccuracyPlan | None) -> AccuracyPlan:
        """The planner's plan if it passes the independent check, else the previous one (logged).
        Each family is planned for at least one request per period (the floor), so that a family
        with no traffic keeps a variant loaded somewhere and its next request is answered."""
        problem = problem.with_demand({f.name: max(f.demand_rps, self.floor_rps)
                                       for f in problem.families.values()})
        self.planned_for = {f.name: f.demand_rps for f in problem.families.values()}
        self.capacity_rps = {v: problem.capacity(DEVICE_TYPE, v) for v in self.models}
        plan = self.planner(problem, previous)
        problems = check_plan(plan, problem)
        if problems and previous is not None:
            self.log(f"cellserve: ray: the new accuracy plan fails its check, the last one stays: {problems[0]}")
            return previous
        if problems:
            raise ValueError(f"the first accuracy plan fails its check: {problems[0]}")
        return plan

    async def apply(self, plan: AccuracyPlan, reason: str, now: float) -> None:
        live = self.router.live()
        want = {w.id: plan.placement.get(w.id) for w in live}
        # A fallback, not Proteus: a worker the plan leaves idle keeps the variant it hosts and
        # takes the family's requests the plan's shares do not route (AccuracyCore's fallback)
        # instead of unloading and leaving them nowhere to go. With the fixed profiles this
        # arises only when no variant has a batch under half the SLO (an SLO too tight for
        # the family on this machine); the plan itself gives spare devices copies.
        kept = self.core.routes.placement
        want = {w: (v if v is not None else kept.get(w)) for w, v in want.items()}
        loaded = {w.id: set(w.info.models) for w in live}
        await asyncio.gather(*(self.load(w, {want[w.id]}) for w in live
                               if want[w.id] is not None and want[w.id] not in loaded[w.id]))
        live = self.router.live()
        loaded = {w.id: set(w.info.models) for w in live}
        target = {w: ({v} if v is not None else set()) for w, v in want.items() if w in loaded}
        routed = routes(target, loaded)  # a variant none of its planned workers could load stays where it is
        self.router.set_routes(routed)
        self.drains.update(routed, loaded)
        placement = {w: (v if v is not None and v in loaded.get(w, ()) else None) for w, v in want.items()}
        self.core.routes = VariantRoutes(placement, WeightedRouter(plan, self.rng))
        self.plan_applied(plan, reason, now, placement)

    def plan_applied(self, plan: AccuracyPlan, reason: str, now: float, placement: dict[str, str | None]) -> None:
        self.epoch += 1
        before = self.applied[-1].placement if self.applied else {}
        self.moved_total += sum(1 for w, v in placement.items() if before.get(w, v) != v)
        demand = dict(self.planned_for)
        self.applied.append(AccuracyApplied(self.epoch, now, reason, placement, demand, plan.effective_accuracy,
                                            dict(plan.unserved_rps), time.monotonic() - now))
        where = "; ".join(f"{w}: {v or '-'}" for w, v in sorted(placement.items()))
        asked = ", ".join(f"{f} {r:.1f}/s" for f, r in sorted(demand.items()))
        unserved = {f: r for f, r in plan.unserved_rps.items() if r > 0}
        capacity = ", ".join(f"{v} {c:.0f}/s" for v, c in self.capacity_rps.items())
        self.log(f"cellserve: ray: accuracy plan {self.epoch} ({reason}): {where}; demand {asked}; effective "
                 f"accuracy {plan.effective_accuracy:.4f}; capacity per worker {capacity}" + (
                     f"; unserved {', '.join(f'{f} {r:.1f}/s' for f, r in sorted(unserved.items()))}"
                     if unserved else ""))


def accuracy_core(settings, served, fams: dict[str, list[str]], router, call, metrics, died: tuple, first_line,
                  log=print):
    """serve_ray's core with --accuracy-scaling: an AccuracyCore over the families `served`,
    its `replanner` an AccuracyReplanner (ray_cluster runs it as it runs a Replanner)."""
    from cellserve.cluster.ray_accuracy import served_variants
    from cellserve.cluster.ray_accuracy_core import AccuracyCore
    from cellserve.graph.zoo import families

    names = [v for vs in fams.values() for v in vs]
    variants = {s.name: s for s in served_variants(names, settings.default_slo_ms)}
    family_of = {v: f for f, vs in fams.items() for v in vs}
    accuracy = {v: families.variant(v).accuracy for v in names}
    core = AccuracyCore(served, variants, family_of, accuracy, router, call, metrics,
                        sequence_idle_s=settings.sequence_idle_s, max_sequences=settings.max_sequences,
                        admission_headroom=settings.engine.admission_headroom)
    profiles = None
    paths = settings.accuracy_profiles  # --accuracy-profiles
    if paths:
        from cellserve.cluster.ray_accuracy_profile import load_profiles

        profiles = load_profiles([str(p) for p in paths], names, settings.engine.stack_layers)
    core.replanner = AccuracyReplanner(core, fams, list(variants.values()), accuracy, settings.default_slo_ms,
                                       settings.replan_every_s, settings.engine.stack_layers, died, first_line,
                                       log=log, profiles=profiles)
    return core
