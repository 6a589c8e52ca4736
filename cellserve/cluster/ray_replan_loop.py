"""The planner running in the cluster (`serve --ray --replan-every S`): the driver's loop.

Every tick (half a second) on the frontends' event loop:
1. fold the arrivals counted where requests enter RayCore into each model's rate (RateMeter);
2. decide whether a plan is due: at once when a worker died (re-planned without it); the first
   plan one epoch (S seconds) after start; then nexus_epochs.replan_due's rule with epoch S: a
   new plan every S seconds, or early (not within S/3 of the last) when a model's measured
   rate leaves [0.8, 1.1] x its planned rate;
3. make it: sessions are the served models (id and model: its name), each with its SLO (the
   model's slo_ms: its default deadline) and its measured rate (at least one request per
   epoch, so that a model with no traffic stays placed somewhere); profiles are derived from
   the live workers' engine cost tables (ray_replan.latency_from_costs, the workers' mean);
   the budget is the live workers; nexus_pack.replan moves as few sessions as it can from the
   last plan (its devices on dead workers removed), and nexus_check.check_plan must pass (a
   plan failing it is logged and the last one kept);
4. apply it: devices to workers (ray_replan.assign_devices), models loaded where newly
   placed (EngineWorker.load, awaited), then at once the routes of new requests and the rate
   gates (planned rate x 1.1, the band's top; burst over the model's SLO) and the 429 reasons of
   models the plan leaves unserved; models a worker no longer serves drain and are unloaded
   (EngineWorker.unload) once nothing of them is outstanding there.

Sequences keep going to the worker holding their state; a model stays loaded there while it
holds any (the worker refuses the unload until they end or expire).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

from cellserve.cluster.ray_replan import (Drains, RateMeter, assign_devices, latency_from_costs, mean_profile, routes,
                                          slos_ms, targets)
from cellserve.cluster.ray_router import RateGate
from cellserve.plan.nexus import DeviceProfiles, ModelEntry, Plan, Profiles, Session, Workload
from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_epochs import RATE_BAND, moved_sessions, replan_due
from cellserve.plan.nexus_pack import replan

DEVICE_TYPE = "worker"  # one device type: the workers (each --ray-cpus-per-worker cores)
TICK_S = 0.5
DEFAULT_TOKENS = 16.0  # a model's mean request length until one of its requests is seen
GATE_FACTOR = RATE_BAND[1]  # up to the band's top the plan stands; beyond it, a re-plan is due


@dataclass(frozen=True)
class Applied:
    """One plan applied: for the log, the metrics and the tests."""

    epoch: int
    at: float  # monotonic seconds
    reason: str
    moved: tuple[str, ...]
    assignment: dict[int, str]  # plan device id -> worker id
    routes: dict[str, tuple[str, ...]]  # worker id -> models it takes new requests of
    unserved: dict[str, str]  # model -> why the plan serves none of it
    seconds: float  # from the decision to routes switched (planning and loading)


class Replanner:
    def __init__(self, core, served, epoch_s: float, stack_layers: bool, died: tuple, first_line,
                 plan: Plan | None = None, assignment: dict[int, str] | None = None, log=print):
        """`core`: the RayCore; `served`: its ServedModels; `died`: the exceptions of a call to a
        dead actor; `plan`/`assignment`: a plan already applied (serve --plan) and its devices'
        workers."""
        self.core, self.router = core, core.router
        self.epoch_s, self.stack_layers = epoch_s, stack_layers
        self.died, self.first_line, self.log = died, first_line, log
        self.models, self.slo_ms = slos_ms(served, "--replan-every")
        self.started = time.monotonic()
        self.meter = RateMeter(epoch_s, self.started)
        core.meter = self.meter
        self.plan, self.assignment = plan, dict(assignment or {})
        self.planned_at = self.started
        self.epoch = 0 if plan is None else 1
        self.moved_total = 0
        self.history: list[Applied] = []
        self.drains = Drains()
        self.dead: set[str] = set()
        self.profiles: dict = {}  # model -> its last derived LatencyProfile (kept when no worker reports it)
        self.floor_rps = 1.0 / epoch_s

    # ---- the loop ----

    async def run(self) -> None:
        while self.core.accepting:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - a planning bug must not stop serving
                self.log(f"cellserve: ray: re-planning failed: {type(exc).__name__}: {exc}")
            await asyncio.sleep(TICK_S)

    def _fold(self, now: float) -> set[str]:
        """Fold the rates measured until `now`; the workers found dead since the last call
        (their drains forgotten)."""
        self.meter.fold(now)
        dead = {w.id for w in self.router.workers.values() if not w.alive} - self.dead
        self.dead |= dead
        for w in dead:
            self.drains.forget_worker(w)
        return dead

    async def tick(self) -> None:
        now = time.monotonic()
        dead = self._fold(now)
        reason = None
        if dead:
            reason = f"{', '.join(sorted(dead))} died: re-planned without it"
        elif self.plan is None:
            if now - self.started >= self.epoch_s:
                reason = f"first plan, {now - self.started:.1f} s of measured rates"
        else:
            reason = replan_due(self.plan, self.planned_rates(), now - self.planned_at, self.epoch_s,
                                min_early_s=self.epoch_s / 3)
        if reason is not None:
            await self.replan(reason, now)
        await self.drain()

    def planned_rates(self) -> dict[str, float]:
        """Model -> the rate it is planned for now: measured, at least the floor."""
        rates = self.meter.rates()
        return {m: max(rates.get(m, 0.0), self.floor_rps) for m in self.models}

    # ---- planning ----

    def derive_profiles(self) -> dict:
        live = self.router.live()
        for name, model in self.models.items():
            tokens = self.meter.mean_tokens(name) or DEFAULT_TOKENS
            got = [p for w in live if w.snapshot
                   for p in [latency_from_costs(model, w.snapshot["costs"], w.snapshot["step_overhead_s"],
                                                w.info.max_batch, tokens, self.stack_layers)] if p is not None]
            if got:
                self.profiles[name] = mean_profile(got)
        return dict(self.profiles)

    def make_plan(self) -> tuple[Plan | None, Workload, Profiles, dict[str, str]]:
        live = self.router.live()
        profiles = self.derive_profiles()
        rates = self.planned_rates()
        sessions = tuple(Session(m, m, self.slo_ms[m], rates[m]) for m in sorted(self.models) if m in profiles)
        workload = Workload(DEVICE_TYPE, len(live), sessions)
        nexus_profiles = Profiles({DEVICE_TYPE: DeviceProfiles({m: ModelEntry(p) for m, p in profiles.items()})})
        no_profile = {m: "no worker has measured its step costs yet" for m in self.models if m not in profiles}
        previous = None
        if self.plan is not None:
            alive = {w.id for w in live}
            previous = replace(self.plan, devices=tuple(d for d in self.plan.devices
                                                        if self.assignment.get(d.id) in alive))
        if not sessions:
            return None, workload, nexus_profiles, no_profile
        return replan(previous, workload, nexus_profiles), workload, nexus_profiles, no_profile

    async def replan(self, reason: str, now: float) -> None:
        new, workload, profiles, no_profile = self.make_plan()
        if new is None:
            return
        problems = check_plan(new, profiles, workload)
        if problems:
            self.log(f"cellserve: ray: the new plan fails its check, the last one stays: {problems[0]}")
            return
        live = self.router.live()
        devices = {d.id: frozenset(a.model for a in d.sessions) for d in new.devices}
        loaded = {w.id: set(w.info.models) for w in live}
        assignment = assign_devices(devices, self.assignment, [w.id for w in live], loaded)
        want = targets(devices, assignment, [w.id for w in live])
        await asyncio.gather(*(self.load(w, want[w.id] - loaded[w.id]) for w in live if want[w.id] - loaded[w.id]))
        live = self.router.live()
        loaded = {w.id: set(w.info.models) for w in live}
        routed = routes({w: want.get(w, set()) for w in loaded}, loaded)
        self.router.set_routes(routed)
        self.drains.update(routed, loaded)
        self.core.gates, self.core.unplanned = self.gates(new), self.unplanned(new, no_profile)
        moved = tuple(sorted(moved_sessions(self.plan, new))) if self.plan is not None else ()
        self.plan, self.assignment, self.planned_at = new, assignment, now
        self.epoch += 1
        self.moved_total += len(moved)
        applied = Applied(self.epoch, now, reason, moved, dict(assignment),
                          {w: tuple(sorted(ms)) for w, ms in routed.items()}, dict(self.core.unplanned),
                          time.monotonic() - now)
        self.history.append(applied)
        where = "; ".join(f"{w}: {', '.join(ms) or '-'}" for w, ms in sorted(applied.routes.items()))
        self.log(f"cellserve: ray: plan epoch {self.epoch} ({reason}): {where}; moved "
                 f"{', '.join(moved) or 'none'}" + (f"; unserved {', '.join(sorted(applied.unserved))}"
                                                   if applied.unserved else ""))

    def gates(self, plan: Plan) -> dict[str, RateGate]:
        rates: dict[str, float] = {}
        for d in plan.devices:
            for a in d.sessions:
                rates[a.model] = rates.get(a.model, 0.0) + a.rate_rps
        return {m: RateGate(GATE_FACTOR * r, self.slo_ms[m] / 1e3) for m, r in rates.items()}

    def unplanned(self, plan: Plan, no_profile: dict[str, str]) -> dict[str, str]:
        placed = {a.model for d in plan.devices for a in d.sessions}
        out = {m: f"unserved: {u.reason}" for u in plan.unserved for m in [u.model] if m not in placed}
        out.update({m: why for m, why in no_profile.items() if m not in placed})
        return out

    # ---- applying ----

    async def load(self, worker, models: set[str]) -> None:
        try:
            worker.info = await worker.handle.load.remote(sorted(models))
        except self.died as exc:
            self._died(worker, exc)
        except Exception as exc:  # noqa: BLE001 - a model that fails to load there: it is not routed there
            self.log(f"cellserve: ray: {worker.describe()} could not load {', '.join(sorted(models))}: "
                     f"{self.first_line(exc)}")

    async def drain(self) -> None:
        """Unload every draining model that has nothing outstanding on its worker."""
        workers = self.router.workers
        outstanding = {(w, m): workers[w].by_model.get(m, 0) for w, m in self.drains.pending}
        by_worker: dict[str, list[str]] = {}
        for w, m in self.drains.ready(outstanding):
            if workers[w].alive:
                by_worker.setdefault(w, []).append(m)
        for w, models in by_worker.items():
            worker = workers[w]
            try:
                result = await worker.handle.unload.remote(models)
            except self.died as exc:
                self._died(worker, exc)
                continue
            worker.info = result["info"]
            for m in result["unloaded"]:
                self.drains.done(w, m)

    def _died(self, worker, exc) -> None:
        if self.router.mark_dead(worker, self.first_line(exc)):
            self.core.deaths.append(f"{worker.describe()}: {self.first_line(exc)}")  # logged by the poll
