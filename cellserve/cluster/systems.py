"""The four systems `bench cluster` compares, each a deployment of the workload's sessions over
N simulated devices (one `Engine` with a `SimExecutor` per device, all in one `Simulation`):

- `nexus`: the Nexus planner (plan/nexus_pack.py) places sessions on devices and sets their
  batches from latency profiles derived from the devices' profiles (plan/nexus_cellular.py);
  the plan is made for the highest total rate whose plan fits the N devices (at least the
  offered rate), so devices the offered rate leaves spare carry every session's share of
  headroom for bursts rather than idling; each device is a cellular engine serving the
  sessions the plan gave it, batch cap the largest batch planned on it, with cellserve's
  admission and early drop (Nexus drops early too); a model's requests go to the least
  predicted finish among the devices the plan gave it. The planner is given the session
  rates (as Nexus's epochs measure them).
- `static`: what TF Serving / Triton users deploy: one model per device group, the devices
  split by load (rate / one device's capacity with that engine, measured in the simulator;
  largest remainders, at least one each), padded batches of at most STATIC_MAX_BATCH with a
  STATIC_BATCH_WAIT_S timeout, no admission control; power-of-two-choices routing within a
  group. (Every batch cap here is cut to the largest batch the profiles cover:
  `profiled_batch`.)
- `clipper`: the same groups and padded engines, each replica's batch cap set by Clipper's
  AIMD (clipper.py).
- `ray-serve`: Ray Serve's defaults (ray_serve.py): a deployment per model over the shared
  pool, queue-length autoscaling (target 2 ongoing requests per replica, delays compressed by
  `ray_time_scale`), power-of-two routing on ongoing requests, `@serve.batch` (10, 10 ms) as
  padded batches. Ray's default min_replicas (1) let the first deployment to scale take the
  whole pool and starve the others (replicas pending resources), so each deployment's
  min_replicas (and initial replicas) is its load share of half the pool and its
  max_replicas its load share of the whole pool plus one, as a user who knows the rates would
  set them; the autoscaler moves each deployment between the two.

A deployment is built fresh for each rate (`build`), so nothing carries over between runs.
`Deployment.arrivals(trace)` drops the requests of sessions a plan could not place at all
(counted as misses by the caller: `Deployment.unplaced`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cellserve.cluster.clipper import Aimd, attach_aimd
from cellserve.cluster.workload import Catalogue, rates

SYSTEMS = ("nexus", "static", "clipper", "ray-serve")
# An ablation, run only when asked for: static's groups on nexus's engines (cellular, admission
# and early drop), so that what the plan adds is told apart from what cellular batching adds.
ABLATIONS = ("static-cellular",)
DEVICE_TYPE = "cpu"  # one engine on this machine's CPU, as profiled
STATIC_MAX_BATCH = 16
STATIC_BATCH_WAIT_S = 0.005
CLIPPER_BATCH_WAIT_S = 0.005
MEAN_TOKENS = 25.0  # the traces' mean sentence length (bench/traces.py)
RAY_TIME_SCALE = 1.0 / 60.0  # Ray's 30 s upscale delay -> 0.5 s, 600 s downscale -> 10 s
RAY_MIN_SHARE = 0.5  # each deployment's min (and initial) replicas: this share of the pool, split by load


@dataclass
class Options:
    ray_time_scale: float = RAY_TIME_SCALE
    nexus_margin: float = 1.0  # scales the derived l(b) the planner sees (Nexus's code: 1.15)
    seed: int = 0


@dataclass
class Deployment:
    system: str
    simulation: object  # cellserve.sim.loop.Simulation
    devices: int
    unplaced: frozenset[str] = frozenset()  # sessions with no device at all
    info: dict = field(default_factory=dict)
    router: object = None

    @property
    def devices_used(self) -> int:
        if self.system == "ray-serve":
            return self.router.peak_replicas
        return self.devices

    def arrivals(self, trace: list) -> list:
        return [a for a in trace if a.model not in self.unplaced]


# ---- profiles the planners see ----

def latency_profiles(catalogue: Catalogue, margin: float = 1.0):
    """Nexus latency profiles (batch -> ms) of every session's model on the device type."""
    from cellserve.plan.nexus import DeviceProfiles, ModelEntry, Profiles
    from cellserve.plan.nexus_cellular import cellular_latency

    entries = {}
    for s in catalogue.sessions:
        model = catalogue.models[s.name]
        tokens = min(MEAN_TOKENS, model.max_sequence_length)
        entries[s.name] = ModelEntry(cellular_latency(catalogue.profiles[s.name], tokens, margin=margin))
    return Profiles({DEVICE_TYPE: DeviceProfiles(entries)})


def nexus_plan(catalogue: Catalogue, devices: int, total_rps: float, margin: float = 1.0):
    from cellserve.plan.nexus import Session, Workload
    from cellserve.plan.nexus_pack import plan

    session_rates = rates(catalogue.sessions, total_rps)
    workload = Workload(DEVICE_TYPE, devices, tuple(Session(s.name, s.name, s.slo_ms, session_rates[s.name])
                                                   for s in catalogue.sessions))
    return plan(workload, latency_profiles(catalogue, margin))


def planned_capacity(catalogue: Catalogue, devices: int, margin: float = 1.0) -> float:
    """The highest total rate (within 0.1%) whose Nexus plan fits `devices` with nothing
    unserved: bisection on the planner alone, no simulation. Kept in the catalogue's memo."""
    key = ("planned_capacity", devices, margin)
    if key not in catalogue.memo:
        def fits(rate: float) -> bool:
            return not nexus_plan(catalogue, devices, rate, margin).unserved

        lo, hi = 1.0, 2.0
        while fits(hi):
            lo, hi = hi, hi * 2
        while hi / lo > 1.001:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        catalogue.memo[key] = lo
    return catalogue.memo[key]


CAPACITY_REQUESTS = 200


def engine_capacity(catalogue: Catalogue, name: str, config) -> float:
    """Requests/s one simulated device with engine `config` serves of session `name`'s model
    when a burst of its requests (the traces' lengths, no deadlines) arrives at once: a
    closed-loop capacity, as an operator would measure one replica before sizing groups.
    Kept in the catalogue's memo per (base model, config)."""
    from cellserve.cluster.workload import session_arrivals
    from cellserve.sim.loop import Simulation

    session = next(s for s in catalogue.sessions if s.name == name)
    key = ("engine_capacity", session.base, repr(config))
    if key not in catalogue.memo:
        one = Catalogue((replace(session, weight=1.0),), {name: catalogue.models[name]},
                        {name: catalogue.profiles[name]})
        burst = [replace(a, time_s=0.0, timeout_s=None)
                 for a in session_arrivals(one, CAPACITY_REQUESTS, 1.0, seed=7)]
        sim = Simulation(seed=7)
        sim.add_engine([catalogue.models[name]], {name: catalogue.profiles[name]}, config)
        outcomes = sim.run(burst, drain_s=3600.0)
        catalogue.memo[key] = len(outcomes) / max(o.finish_s for o in outcomes)
    return catalogue.memo[key]


def split_by_load(catalogue: Catalogue, devices: int, config, share: float = 1.0) -> dict[str, int]:
    """Devices per session in proportion to its load (rate / one device's capacity with engine
    `config`), `share` of `devices` in all, at least one each, largest remainders."""
    sessions = catalogue.sessions
    total_devices = max(len(sessions), round(devices * share))
    if devices < len(sessions):
        raise ValueError(f"{devices} devices cannot give each of {len(sessions)} sessions its own")
    load = {s.name: s.weight / engine_capacity(catalogue, s.name, config) for s in sessions}
    spare = total_devices - len(sessions)
    total = sum(load.values())
    exact = {k: spare * v / total for k, v in load.items()}
    count = {k: 1 + math.floor(x) for k, x in exact.items()}
    left = total_devices - sum(count.values())
    for k in sorted(exact, key=lambda k: exact[k] - math.floor(exact[k]), reverse=True)[:left]:
        count[k] += 1
    return count


# ---- building each system ----

def _config(catalogue: Catalogue, **kw):
    from cellserve.engine.config import EngineConfig

    stack = next(iter(catalogue.profiles.values())).stack_layers
    return EngineConfig(profile=True, pin_threads=False, stack_layers=stack, **kw)


def profiled_batch(catalogue: Catalogue, batch: int) -> int:
    """`batch`, or the largest batch every model's profile covers if that is smaller (a
    profile measured with `--max-batch 8` prices no batch of 16: the system batches 8)."""
    return min(batch, min(p.max_batch for p in catalogue.profiles.values()))


def _padded(catalogue: Catalogue, max_batch: int, wait_s: float):
    return _config(catalogue, policy="padded", max_batch=profiled_batch(catalogue, max_batch), batch_timeout_s=wait_s,
                   admission=False, drop_late=False)


def build(system: str, catalogue: Catalogue, devices: int, total_rps: float, options: Options | None = None
          ) -> Deployment:
    """`system` deployed on `devices` simulated devices for the workload at `total_rps`."""
    options = options or Options()
    if system == "nexus":
        return _nexus(catalogue, devices, total_rps, options)
    if system in ("static", "clipper", "static-cellular"):
        return _grouped(system, catalogue, devices, options)
    if system == "ray-serve":
        return _ray_serve(catalogue, devices, options)
    raise ValueError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS + ABLATIONS)}")


def _nexus(catalogue: Catalogue, devices: int, total_rps: float, options: Options) -> Deployment:
    from cellserve.sim.loop import Simulation
    from cellserve.sim.router import LeastPredictedFinish

    planned_rps = max(total_rps, planned_capacity(catalogue, devices, options.nexus_margin))
    plan = nexus_plan(catalogue, devices, planned_rps, options.nexus_margin)
    sim = Simulation(LeastPredictedFinish(), seed=options.seed)
    cap = min(p.max_batch for p in catalogue.profiles.values())
    for device in plan.devices:
        names = sorted({a.model for a in device.sessions})
        batch = min(cap, max(a.batch for a in device.sessions))
        sim.add_engine([catalogue.models[n] for n in names], {n: catalogue.profiles[n] for n in names},
                       _config(catalogue, policy="cellular", max_batch=batch), name=f"device-{device.id}")
    placed = {a.model for d in plan.devices for a in d.sessions}
    unplaced = frozenset(s.name for s in catalogue.sessions) - placed
    info = {"planned_rps": planned_rps, "plan_devices": plan.devices_used,
            "unserved_rps": sum(u.rate_rps for u in plan.unserved),
            "batches": {f"device-{d.id}": {a.model: a.batch for a in d.sessions} for d in plan.devices}}
    return Deployment("nexus", sim, plan.devices_used, unplaced, info)


def _grouped(system: str, catalogue: Catalogue, devices: int, options: Options) -> Deployment:
    from cellserve.sim.loop import Simulation
    from cellserve.sim.router import TwoChoices

    cap = min(p.max_batch for p in catalogue.profiles.values())
    # Clipper's groups are sized as static's: an operator sizes replicas before AIMD runs
    cellular = _config(catalogue, policy="cellular", max_batch=cap)
    sized_by = cellular if system == "static-cellular" else _padded(catalogue, STATIC_MAX_BATCH, STATIC_BATCH_WAIT_S)
    split = split_by_load(catalogue, devices, sized_by)
    sim = Simulation(TwoChoices(seed=options.seed), seed=options.seed)
    controllers: dict[str, Aimd] = {}
    for s in catalogue.sessions:
        for i in range(split[s.name]):
            if system == "static":
                config = _padded(catalogue, STATIC_MAX_BATCH, STATIC_BATCH_WAIT_S)
            elif system == "static-cellular":
                config = cellular
            else:
                config = _padded(catalogue, 1, CLIPPER_BATCH_WAIT_S)
            name = f"{s.name}-{i}"
            engine = sim.add_engine([catalogue.models[s.name]], {s.name: catalogue.profiles[s.name]}, config,
                                    name=name).engine
            if system == "clipper":
                controllers[name] = Aimd(cap=1, max_cap=cap)
                attach_aimd(engine, controllers[name], s.slo_ms / 1e3)
    info = {"split": split}
    deployment = Deployment(system, sim, devices, frozenset(), info)
    if controllers:
        deployment.info["aimd"] = controllers
    return deployment


def _ray_serve(catalogue: Catalogue, devices: int, options: Options) -> Deployment:
    from cellserve.cluster.ray_serve import RAY_BATCH_WAIT_S, RAY_MAX_BATCH, AutoscalingConfig, RayServeRouter
    from cellserve.sim.loop import Simulation

    names = [s.name for s in catalogue.sessions]
    if devices < len(names):
        raise ValueError(f"{devices} devices cannot give each of {len(names)} deployments a replica")
    config = _padded(catalogue, RAY_MAX_BATCH, RAY_BATCH_WAIT_S)
    split = split_by_load(catalogue, devices, config, share=RAY_MIN_SHARE)
    sim = Simulation(seed=options.seed)
    engines = [sim.add_engine([catalogue.models[n] for n in names], catalogue.profiles, config, name=f"device-{i}")
               for i in range(devices)]
    initial, i = {}, 0
    for n in names:
        initial[n] = [f"device-{j}" for j in range(i, i + split[n])]
        i += split[n]
    autoscaling = AutoscalingConfig().compressed(options.ray_time_scale)
    maximum = {n: c + 1 for n, c in split_by_load(catalogue, devices, config).items()}
    router = RayServeRouter(names, engines, initial, autoscaling, seed=options.seed, max_replicas=maximum)
    sim.router = router
    info = {"autoscaling": autoscaling.__dict__, "min_replicas": split, "max_replicas": maximum}
    return Deployment("ray-serve", sim, devices, frozenset(), info, router)
