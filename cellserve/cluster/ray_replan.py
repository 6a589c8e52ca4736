"""The planner in the cluster, pure parts (`serve --ray --replan-every S`): no Ray, no engine.

The driver (ray_replan_loop.py) feeds these what it measures and applies what they decide:

- `RateMeter`: per model, the arrival rate and the mean request length (time steps), each an
  exponentially weighted moving average with a time constant of one epoch, fed where requests
  enter RayCore (before any shedding: what is offered, not what was let in). Bias-corrected,
  so the first epoch's figure is the plain mean over what was seen, not pulled towards 0.
- `latency_from_costs`: a model's Nexus latency profile l(b), b = 1 .. max_batch, from one
  worker's engine cost tables (what the router prices with): the tables become a
  `synthetic_profile` (plan/profile.py) whose cell types step in the tables' mean estimates and
  whose host step is the worker's per-batch overhead, and `cellular_latency`
  (plan/nexus_cellular.py) derives l(b) at the measured mean length, as for a measured profile.
- `assign_devices`: plan devices to workers. A device id that keeps serving keeps its worker;
  a new device goes to the free live worker that has the most of its models loaded already
  (ties: the lowest worker id); a worker with no device serves nothing new.
- `routes` and `Drains`: the difference between what each worker has loaded and what the plan
  wants there, as loads (before routing changes), routes (which workers take a model's new
  requests: the plan's, once loaded) and drains (a model a worker no longer serves is unloaded
  only once the driver has nothing of it outstanding there; the worker itself also refuses while
  it holds a sequence's state of it). A model never loses its last route while a live worker
  still has it loaded: if none of the plan's workers has it yet, the old ones keep serving it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cellserve.plan.nexus import LatencyProfile


def slos_ms(served, flag: str) -> tuple[dict, dict[str, float]]:
    """From the served models (every version): model name -> its graph (the first version's)
    and -> its SLO in ms (the tightest of its versions' slo_ms); ValueError naming `flag` and
    the models without one."""
    models, slo_ms = {}, {}
    for s in served:
        models.setdefault(s.name, s.model)
        slo = s.settings.default_timeout_s
        if slo is not None:
            slo_ms[s.name] = min(slo_ms.get(s.name, float("inf")), slo * 1e3)
    missing = sorted(set(models) - set(slo_ms))
    if missing:
        raise ValueError(f"{flag} plans each model by its SLO; models {missing} have none (set slo_ms "
                         "in their config.pbtxt parameters, or --slo-ms for zoo models)")
    return models, slo_ms


class _Ewma:
    """An exponentially weighted average of a quantity observed at irregular times, with
    time constant `tau_s`, bias-corrected (its weight so far divides it out)."""

    __slots__ = ("tau", "value", "norm")

    def __init__(self, tau_s: float):
        self.tau, self.value, self.norm = tau_s, 0.0, 0.0

    def fold(self, x: float, dt: float) -> None:
        a = 1.0 - math.exp(-dt / self.tau)
        self.value += a * (x - self.value)
        self.norm += a * (1.0 - self.norm)

    def get(self) -> float | None:
        return self.value / self.norm if self.norm > 0 else None


@dataclass
class _ModelMeter:
    rate: _Ewma
    count: int = 0  # arrivals since the last fold
    tokens: int = 0  # their summed lengths
    mean_tokens: float | None = None


class RateMeter:
    """Arrivals per model: `arrived(model, length)` on the request path (a counter bump),
    `fold(now)` now and then (each poll), `rates()` and `mean_tokens(model)` for the planner."""

    def __init__(self, tau_s: float, start: float):
        if not tau_s > 0:
            raise ValueError(f"the rate meter's time constant must be > 0, got {tau_s}")
        self.tau = tau_s
        self.last = start
        self.models: dict[str, _ModelMeter] = {}

    def arrived(self, model: str, length: int) -> None:
        m = self.models.get(model)
        if m is None:
            m = self.models[model] = _ModelMeter(_Ewma(self.tau))
        m.count += 1
        m.tokens += length

    def fold(self, now: float) -> None:
        """Close the window since the last fold: each model's rate over it enters its average
        with weight 1 - exp(-window / tau); its requests' mean length joins a running mean
        weighted alike."""
        dt = now - self.last
        if dt <= 0:
            return
        self.last = now
        for m in self.models.values():
            m.rate.fold(m.count / dt, dt)
            if m.count:
                mean = m.tokens / m.count
                a = 1.0 - math.exp(-dt / self.tau)
                m.mean_tokens = mean if m.mean_tokens is None else m.mean_tokens + a * (mean - m.mean_tokens)
            m.count = m.tokens = 0

    def rates(self) -> dict[str, float]:
        """Model -> requests/s, for every model seen so far."""
        return {name: m.rate.get() or 0.0 for name, m in self.models.items()}

    def mean_tokens(self, model: str) -> float | None:
        m = self.models.get(model)
        return None if m is None else m.mean_tokens


def latency_from_costs(model, tables: dict, step_overhead_s: float, max_batch: int, mean_tokens: float,
                       stack_layers: bool = True) -> LatencyProfile | None:
    """l(b) in ms for b = 1 .. max_batch of `model` (the graph Model, named as the engine
    names it, "name:version") from a worker's cost tables (ray_router.cost_snapshot's
    "tables"), or None when the worker has no table for one of its cell types (not measured)."""
    from cellserve.cluster.ray_router import cost_model_from
    from cellserve.plan.nexus_cellular import cellular_latency
    from cellserve.plan.profile import HostProfile, Timing, synthetic_profile

    base = synthetic_profile(model, 0.0, max_batch=max_batch, stack_layers=stack_layers,
                             host=HostProfile(max(step_overhead_s, 0.0), 0.0, 0.0, 0.0))
    if not base.cell_types or any(t not in tables.get("tables", {}) for t in base.cell_types):
        return None
    costs = cost_model_from({"tables": tables["tables"], "group_of": None}, max_batch).costs
    cells = {t: replace(c, step_s={b: Timing.fixed(costs[t](b)) for b in range(1, max_batch + 1)})
             for t, c in base.cell_types.items()}
    if any(c.step_s[1].mean <= 0 for c in cells.values()):
        return None
    return cellular_latency(replace(base, cell_types=cells), mean_tokens)


def mean_profile(profiles: list[LatencyProfile]) -> LatencyProfile:
    """The per-batch mean of several workers' profiles of one model (over the batches all cover)."""
    top = min(p.max_batch for p in profiles)
    return LatencyProfile(tuple((b, sum(p.ms(b) for p in profiles) / len(profiles)) for b in range(1, top + 1)))


def assign_devices(devices: dict[int, frozenset[str]], previous: dict[int, str], live: list[str],
                   loaded: dict[str, set[str]]) -> dict[int, str]:
    """Plan device id -> worker id (see the module's docstring). `devices`: each device's
    models; `previous`: the last assignment; `live`: live worker ids; `loaded`: what each has.
    Raises ValueError when there are more devices than live workers (the plan's budget is
    the live workers, so this is a bug)."""
    if len(devices) > len(live):
        raise ValueError(f"{len(devices)} plan devices for {len(live)} live workers")
    out = {d: w for d, w in previous.items() if d in devices and w in live}
    free = [w for w in sorted(live) if w not in out.values()]
    for d in sorted(set(devices) - set(out)):
        best = max(free, key=lambda w: (len(devices[d] & loaded.get(w, set())), -free.index(w)))
        out[d] = best
        free.remove(best)
    return out


def targets(devices: dict[int, frozenset[str]], assignment: dict[int, str], live: list[str]) -> dict[str, set[str]]:
    """Worker id -> the models the plan wants it to serve (empty for a worker with no device)."""
    out: dict[str, set[str]] = {w: set() for w in live}
    for d, w in assignment.items():
        out[w] |= devices[d]
    return out


def routes(target: dict[str, set[str]], loaded: dict[str, set[str]]) -> dict[str, set[str]]:
    """Worker id -> the models it takes new requests of: what the plan wants there and it has
    loaded; and a model none of the plan's workers has loaded yet stays where it is loaded."""
    out = {w: target.get(w, set()) & loaded.get(w, set()) for w in loaded}
    routed = set().union(*out.values()) if out else set()
    wanted = set().union(*target.values()) if target else set()
    for model in wanted - routed:
        for w, have in loaded.items():
            if model in have:
                out[w].add(model)
    return out


@dataclass
class Drains:
    """Models loaded on a worker that no longer take its new requests, waiting to be unloaded:
    a pair is *ready* once the driver has nothing of that model outstanding on that worker."""

    pending: set[tuple[str, str]] = field(default_factory=set)  # (worker id, model)

    def update(self, routed: dict[str, set[str]], loaded: dict[str, set[str]]) -> None:
        """After a routing change: every loaded model a worker is not routed is draining; one
        routed there again (the plan brought it back) is not."""
        self.pending = {(w, m) for w, have in loaded.items() for m in have if m not in routed.get(w, set())}

    def ready(self, outstanding: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
        """The pending pairs with nothing outstanding, in a stable order."""
        return sorted(p for p in self.pending if outstanding.get(p, 0) == 0)

    def done(self, worker: str, model: str) -> None:
        self.pending.discard((worker, model))

    def forget_worker(self, worker: str) -> None:
        self.pending = {p for p in self.pending if p[0] != worker}
