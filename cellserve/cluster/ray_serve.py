"""Ray Serve's defaults, as a router over a pool of simulated devices: one deployment per
model, queue-length autoscaling, power-of-two-choices routing. (`@serve.batch` is the
engines' padded policy, set up in systems.py.)

The autoscaler (`Autoscaler`, the rule alone) follows Ray Serve's default policy: every
control interval it averages each deployment's ongoing requests per replica over a look-back
window, wants ceil(replicas * ongoing_per_replica / target) replicas (target 2), and acts
only once that wish has pointed the same way for the upscale (or downscale) delay. Ray's
delays (30 s up, 600 s down, 30 s look-back) are longer than a simulated run; they are
compressed by `time_scale` (reported with the results). Replicas take one device each from a
shared pool of N; a deployment that wants more than the pool has gets what is free.

Routing (`RayServeRouter`): two replicas of the request's deployment drawn at random, the one
with fewer ongoing requests. Every simulated engine loads every model, so a device moves
between deployments without a restart (Ray would start a replica: seconds, not simulated); a
replica scaled down stops receiving requests and drains, and its device returns to the pool
when idle.

The simulator asks routers for shortlists ahead of arrivals (sim/router.py); a shortlist here
is drawn from the replicas active when it is drawn, so a scaling decision reaches the routing
a few arrivals late. A draining replica stays on every shortlist until it is idle (and is
chosen only when no active replica is on it): an engine still running must meet arrivals that
may go to it, or the simulator would list the whole trace ahead with the old replicas.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

from cellserve.sim.router import Router

# Ray Serve's defaults (AutoscalingConfig), seconds
RAY_TARGET_ONGOING = 2.0
RAY_UPSCALE_DELAY_S = 30.0
RAY_DOWNSCALE_DELAY_S = 600.0
RAY_LOOK_BACK_S = 30.0
RAY_CONTROL_INTERVAL_S = 0.1
RAY_MAX_BATCH = 10  # @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.01)
RAY_BATCH_WAIT_S = 0.01


@dataclass(frozen=True)
class AutoscalingConfig:
    target_ongoing: float = RAY_TARGET_ONGOING
    upscale_delay_s: float = RAY_UPSCALE_DELAY_S
    downscale_delay_s: float = RAY_DOWNSCALE_DELAY_S
    look_back_s: float = RAY_LOOK_BACK_S
    interval_s: float = RAY_CONTROL_INTERVAL_S
    min_replicas: int = 1
    max_replicas: int = 1 << 30

    def compressed(self, time_scale: float) -> "AutoscalingConfig":
        """The delays and look-back times `time_scale` (the control interval kept)."""
        return AutoscalingConfig(self.target_ongoing, self.upscale_delay_s * time_scale,
                                 self.downscale_delay_s * time_scale, self.look_back_s * time_scale,
                                 self.interval_s, self.min_replicas, self.max_replicas)


@dataclass
class Autoscaler:
    """One deployment's replica count. Call `tick(now, ongoing, replicas)` every control
    interval with the deployment's ongoing requests (all replicas together); it returns the
    replica count wanted now (the current one until a delay has passed)."""

    config: AutoscalingConfig
    _samples: deque = field(default_factory=deque)  # (time, ongoing per replica)
    _since: float | None = None  # when the wish began pointing the current way
    _direction: int = 0

    def desired(self, replicas: int) -> int:
        """What the averaged load asks for: ceil(replicas * per_replica / target), within
        [min_replicas, max_replicas]."""
        if not self._samples:
            return replicas
        per_replica = sum(x for _, x in self._samples) / len(self._samples)
        want = math.ceil(replicas * per_replica / self.config.target_ongoing)
        return min(self.config.max_replicas, max(self.config.min_replicas, want))

    def tick(self, now: float, ongoing: float, replicas: int) -> int:
        self._samples.append((now, ongoing / max(replicas, 1)))
        while self._samples and self._samples[0][0] < now - self.config.look_back_s:
            self._samples.popleft()
        want = self.desired(replicas)
        direction = (want > replicas) - (want < replicas)
        if direction != self._direction:
            self._direction, self._since = direction, now
        if direction == 0:
            return replicas
        delay = self.config.upscale_delay_s if direction > 0 else self.config.downscale_delay_s
        if now - self._since >= delay:
            self._since = now  # the next change waits a delay again
            self._samples.clear()  # judge the new replicas by their own load
            return want
        return replicas


def ongoing(engine) -> int:
    """Requests a replica holds: in flight and queued (what Ray's router counts)."""
    return engine.active_requests + engine.queued_requests


class RayServeRouter(Router):
    """Deployments (one per model) over a shared pool of the simulation's engines; see the
    module's docstring. `initial` maps each model to its first replicas (engine names), which
    are also its min_replicas; `max_replicas` caps a model's replicas. Free devices wanted by
    several deployments at one tick are handed out one at a time to the one furthest below its
    wish."""

    name = "ray-serve"

    def __init__(self, models: list[str], engines: list, initial: dict[str, list[str]],
                 config: AutoscalingConfig, seed: int = 0, max_replicas: dict[str, int] | None = None) -> None:
        self.config = config
        self._rng = random.Random(seed)
        by_name = {e.name: e for e in engines}
        self.active: dict[str, list] = {m: [by_name[n] for n in initial.get(m, [])] for m in models}
        taken = {e.name for reps in self.active.values() for e in reps}
        self.free: list = [e for e in engines if e.name not in taken]
        self.draining: list = []
        limits = max_replicas or {}
        self.autoscalers = {m: Autoscaler(replace(config, min_replicas=max(1, len(self.active[m])),
                                                  max_replicas=limits.get(m, config.max_replicas)))
                            for m in models}
        self._next_tick = 0.0
        self.peak_replicas = len(taken)
        self.history: list[tuple[float, dict[str, int]]] = []  # (time, replicas per model) at each change

    def replicas(self) -> dict[str, int]:
        return {m: len(r) for m, r in self.active.items()}

    def shortlist(self, model, candidates):
        reps = self.active[model]
        pick = self._rng.sample(reps, 2) if len(reps) > 2 else list(reps)
        pick += [e for e in self.draining if e not in pick]
        if len(pick) < 2:
            # the loop calls `choose` (where the control loop runs) only for a shortlist of
            # two or more: pad with an engine `choose` will pass over (an idle one if any)
            spare = next((e for e in self.free + candidates if e not in pick), None)
            if spare is not None:
                pick.append(spare)
        return pick

    def choose(self, request, candidates, now):
        self._control(now)
        active = set(map(id, self.active[request.model]))
        live = [e for e in candidates if id(e) in active] or candidates
        return min(live, key=lambda e: (ongoing(e.engine), self._rng.random()))

    # ---- the control loop, run at arrivals (every interval of virtual time) ----

    def _control(self, now: float) -> None:
        while self._next_tick <= now:
            self._tick(self._next_tick)
            self._next_tick += self.config.interval_s

    def _tick(self, now: float) -> None:
        self.draining = [e for e in self.draining if not e.engine.idle() or self._park(e)]
        changed = False
        wants = {}
        for model, scaler in self.autoscalers.items():
            reps = self.active[model]
            wants[model] = want = scaler.tick(now, sum(ongoing(e.engine) for e in reps), len(reps))
            while want < len(reps) and len(reps) > scaler.config.min_replicas:
                victim = min(reps, key=lambda e: ongoing(e.engine))
                reps.remove(victim)
                self.draining.append(victim)
                changed = True
        while self.free:
            short = max(wants, key=lambda m: wants[m] - len(self.active[m]))
            if wants[short] <= len(self.active[short]):
                break
            self.active[short].append(self.free.pop(0))
            changed = True
        if changed:
            self.history.append((now, self.replicas()))
            in_use = sum(len(r) for r in self.active.values()) + len(self.draining)
            self.peak_replicas = max(self.peak_replicas, in_use)

    def _park(self, sim_engine) -> bool:
        """Return an idle drained device to the pool (False: it leaves the draining list)."""
        self.free.append(sim_engine)
        return False
