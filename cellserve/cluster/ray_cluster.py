"""`cellserve serve --ray [ADDRESS]`: engine workers as Ray actors, the OIP frontends here.

Start-up: load the models here (metadata, and to fail fast on a broken one), read the plan if
one is given, bind the ports, start or join Ray, reserve one placement-group bundle of
`--ray-cpus-per-worker` cores per worker (spread over the nodes), start each worker (an
EngineWorker actor in its bundle, its kernels on that many threads), then the same HTTP,
gRPC and metrics frontends as a plain `cellserve serve`, over a RayCore. With
`--ray-data-plane socket` (the default) each worker opens a socket (data_plane.py) and the
driver connects to every one before the ready line: requests go over those streams, Ray
keeps placement, load/unload, snapshots and death detection. The ready line is the same;
lines before it say where each worker runs and which data plane carries the requests.

Exit status, as `cellserve serve`: 0 after a clean stop, 1 when start-up failed (one line),
2 for a plan file that cannot be used (naming the field), or with `--replan-every` a model
without an SLO. With `--replan-every` the planner runs in the cluster (ray_replan_loop.py). Without Ray installed: 1, with a
line naming `pip install cellserve[ray]`.

Ray is imported here only: nothing under server/ imports this module or Ray.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading

from cellserve.server.settings import ServerSettings

_STARTUP_TIMEOUT_S = 300.0  # placement and model loading on a busy machine
_REACH_TIMEOUT_S = 5.0  # a Ray address's port must answer within this (see _unreachable)
_POLL_S = 0.5  # how often the driver refreshes each worker's costs and counters


def serve_ray(settings: ServerSettings, server_log=None) -> int:
    """`cellserve serve --ray`: the engines as Ray actors behind this process's frontends;
    `server_log` (server/log_settings.py) is the driver's log, as app.serve started it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("cellserve: error: --ray needs Ray, which is not installed here: pip install cellserve[ray]",
              file=sys.stderr, flush=True)
        return 1
    from cellserve.errors import CellserveError
    from cellserve.server.app import StartupError, _bind, _load_models

    profiles = None  # --core-allocation: model -> its kernel-versions profile
    try:  # the plan first: a file that cannot be used is told at once, before any model loads
        fams = _families(settings)  # --accuracy-scaling: family -> variants (else None)
        names = _model_names(settings) if fams is None else [v for vs in fams.values() for v in vs]
        layout = _layout(settings, names)
        if settings.core_allocation:
            from cellserve.cluster.ray_cores import read_profiles

            profiles = read_profiles(list(settings.core_allocation), names)
    except ValueError as exc:  # NexusError, PlanMismatch, a plan with no device, models that form no family,
        # or core-allocation profiles that do not fit (VersionProfileError, CoreAllocationError)
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        if fams is None:
            served = _load_models(settings)
        else:
            from cellserve.cluster.ray_accuracy import served_families

            served = served_families(fams, settings.default_slo_ms)
    except (CellserveError, ValueError) as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if profiles is not None:
        from cellserve.cluster.ray_cores import CoreAllocationError, tenants_of

        try:  # every model's SLO and cell types, before Ray starts
            tenants_of(served, list(profiles), profiles)
        except CoreAllocationError as exc:
            print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
            return 2
    try:
        sockets = _bind(settings)
        cluster = _Cluster(settings, layout)
    except (StartupError, CellserveError, ValueError) as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        return _run(settings, served, layout, sockets, cluster, fams, server_log, profiles)
    finally:
        cluster.close()


def _model_names(settings: ServerSettings) -> list[str]:
    """The names of the models the server will serve, without loading them."""
    if settings.model_repository is not None:
        root = settings.model_repository
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []
    from cellserve.graph import zoo

    return sorted(settings.zoo_models or zoo.names())


def _families(settings: ServerSettings) -> dict[str, list[str]] | None:
    """With --accuracy-scaling, the variant families served (AccuracyScalingError, a
    ValueError, naming a --model that is in no family; ProfileError, one, naming an
    --accuracy-profiles file that cannot be used); else None."""
    if not settings.accuracy_scaling:
        return None
    from cellserve.cluster.ray_accuracy import resolve_families

    fams = resolve_families(list(settings.zoo_models or []))
    if settings.accuracy_profiles:  # read now, so that a file that cannot be used is told before Ray starts
        from cellserve.cluster.ray_accuracy_profile import load_profiles

        load_profiles(list(settings.accuracy_profiles), [v for vs in fams.values() for v in vs],
                      settings.engine.stack_layers)
    return fams


def _layout(settings: ServerSettings, names: list[str]):
    from cellserve.cluster.ray_plan import Layout, from_flags, from_plan
    from cellserve.plan.nexus_io import load_plan

    if settings.core_allocation:  # a worker of its own per model, on the cores the allocator gives it
        return Layout(tuple((name,) for name in names), {}, {})
    if settings.plan is None:
        return from_flags(names, settings.ray_workers or 2)
    plan = load_plan(settings.plan)
    if not plan.devices:
        raise ValueError(f"plan file '{settings.plan}' places nothing on any device: there would be no worker")
    return from_plan(plan, names, settings.plan)


class _Cluster:
    """Ray joined or started, the workers placed and started; `close()` undoes it all."""

    def __init__(self, settings: ServerSettings, layout):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cellserve.cluster.ray_router import WorkerState
        from cellserve.cluster.ray_worker import EngineWorker, WorkerSpec
        from cellserve.server.app import StartupError

        self.ray, self.pg, self.actors = ray, None, []
        address = settings.ray_address
        unreachable = _unreachable(address)
        if unreachable:  # Ray itself would retry for minutes, saying nothing a user can act on
            raise StartupError(f"--ray {address}: cannot join Ray: {unreachable} (start the cluster first, "
                               "`ray start --head`, or check the address)")
        try:
            if address == "local":
                ray.init(include_dashboard=False, logging_level="WARNING", configure_logging=True)
            else:
                ray.init(address=address, logging_level="WARNING")
        except Exception as exc:  # noqa: BLE001 - whatever Ray says, one line
            raise StartupError(f"--ray {address}: cannot start or join Ray: {_first_line(exc)}") from exc
        cpus = settings.ray_cpus_per_worker
        need = len(layout.workers) * cpus
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:
            raise StartupError(f"{_count(len(layout.workers), 'worker')} of {_count(cpus, 'core')} need {need} "
                               f"CPUs; the Ray cluster at {address} has {have:g} (--ray-workers, "
                               "--ray-cpus-per-worker, --plan)")
        self.pg = placement_group([{"CPU": cpus} for _ in layout.workers], strategy="SPREAD")
        try:
            ray.get(self.pg.ready(), timeout=_STARTUP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            raise StartupError(f"the Ray cluster did not grant {_count(len(layout.workers), 'bundle')} of "
                               f"{_count(cpus, 'core')} within {_STARTUP_TIMEOUT_S:g} s: {_first_line(exc)}") from exc
        worker_class = EngineWorker
        if settings.accuracy_scaling:  # workers whose models are the zoo's family variants
            from cellserve.cluster.ray_accuracy_worker import AccuracyWorker as worker_class
        actor = ray.remote(worker_class)
        for i, models in enumerate(layout.workers):
            spec = WorkerSpec(f"w{i}", tuple(models), settings.engine, cpus,
                              None if settings.model_repository is None else str(settings.model_repository.resolve()),
                              settings.default_slo_ms)
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
            self.actors.append(actor.options(num_cpus=cpus, scheduling_strategy=strategy, max_restarts=0,
                                             max_task_retries=0).remote(spec))
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=_STARTUP_TIMEOUT_S)
            snaps = ray.get([a.snapshot.remote() for a in self.actors], timeout=_STARTUP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a worker that failed to start: its own error, in one line
            raise StartupError(f"a Ray worker failed to start: {_first_line(exc)}") from exc
        self.workers = [WorkerState(info, handle) for info, handle in zip(infos, self.actors)]
        for w, snap in zip(self.workers, snaps):
            w.snapshot = snap
        self.addresses = None  # worker id -> its data-plane socket (--ray-data-plane socket)
        if settings.ray_data_plane == "socket":
            here = None  # behind Ray Client (ray://) this process is on no node: TCP to every worker
            if not address.startswith("ray://"):
                try:
                    here = ray.get_runtime_context().get_node_id()
                except Exception:  # noqa: BLE001 - no node known: TCP to every worker
                    pass
            try:
                found = ray.get([a.data_address.remote(here) for a in self.actors], timeout=_STARTUP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001
                raise StartupError(f"a Ray worker could not open its data-plane socket: {_first_line(exc)}") from exc
            self.addresses = {w.id: a for w, a in zip(self.workers, found)}

    def close(self) -> None:
        ray = self.ray
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
        if ray.is_initialized():
            ray.shutdown()


def _run(settings: ServerSettings, served, layout, sockets, cluster: _Cluster, fams=None,
         server_log=None, profiles=None) -> int:
    from cellserve import heap
    from cellserve.cluster.ray_core import RayCore, WorkerDied
    from cellserve.cluster.ray_metrics import ClusterCollector
    from cellserve.cluster.ray_router import Router
    from cellserve.server.app import Frontends, StartupError
    from cellserve.server.metrics import Metrics

    ray = cluster.ray
    died = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    async def ray_call(worker, c):
        try:
            return await worker.handle.infer.remote(c)
        except died as exc:
            raise WorkerDied(_first_line(exc)) from None

    call, conns = ray_call, {}
    if cluster.addresses is not None:  # the direct data plane: a stream per worker (data_plane.py)
        from cellserve.cluster.data_plane import Connection

        conns = {w.id: Connection(cluster.addresses[w.id], w.describe()) for w in cluster.workers}
        call = socket_call(conns, ray_call)

    router = Router(cluster.workers)
    for w in cluster.workers:
        router.update_costs(w, w.snapshot["costs"], w.snapshot["step_overhead_s"],
                            w.snapshot.get("admitting_share", 0.0))
    metrics = Metrics(None)
    if fams is not None:  # --accuracy-scaling: families served by variants (ray_accuracy_loop.py)
        from cellserve.cluster.ray_accuracy_loop import accuracy_core

        core = accuracy_core(settings, served, fams, router, call, metrics, died, _first_line,
                             log=lambda line: print(line, flush=True))
    else:
        core = RayCore(served, router, call, metrics, settings.sequence_idle_s, settings.max_sequences,
                       layout.gates, layout.unplanned, settings.engine.admission_headroom)
    core.default_timeout_s = settings.engine.default_timeout_s
    if server_log is not None:
        core.log = server_log
    if settings.replan_every_s is not None and fams is None:
        from cellserve.cluster.ray_replan_loop import Replanner

        plan = None
        if settings.plan is not None:  # the plan the workers started with is the first epoch's
            from cellserve.plan.nexus_io import load_plan

            plan = load_plan(settings.plan)
        try:
            core.replanner = Replanner(core, served, settings.replan_every_s, settings.engine.stack_layers, died,
                                       _first_line, plan,
                                       None if plan is None else {d.id: w.id for d, w in zip(plan.devices,
                                                                                                cluster.workers)},
                                       log=lambda line: print(line, flush=True))
        except ValueError as exc:  # a model without an SLO
            print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
            return 2
    metrics.registry.register(ClusterCollector(core))
    frontends = Frontends(core, settings, sockets)
    try:
        ports = frontends.start()
    except StartupError as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    if conns:  # connected before the ready line (a call meanwhile waits for its connection)
        try:
            asyncio.run_coroutine_threadsafe(_open_all(conns), frontends.loop).result(_STARTUP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - ConnectionLost naming the worker and address, or a timeout
            print(f"cellserve: error: the data plane: {_first_line(exc)}", file=sys.stderr, flush=True)
            return 1
    asyncio.run_coroutine_threadsafe(_poll(core, died, conns), frontends.loop)
    if core.replanner is not None:
        asyncio.run_coroutine_threadsafe(core.replanner.run(), frontends.loop)
    allocator = None
    if profiles is not None:  # --core-allocation: each worker on its first cores before the ready line
        from cellserve.cluster.ray_cores import start_allocation

        try:
            allocator = core.core_allocator = start_allocation(cluster, core, served, profiles,
                                                               log=lambda line: print(line, flush=True))
        except Exception as exc:  # noqa: BLE001 - a worker that could not be pinned: one line
            print(f"cellserve: error: --core-allocation: {_first_line(exc)}", file=sys.stderr, flush=True)
            frontends.stop(on_stopped=lambda: None)
            frontends.join(timeout=5.0)
            return 1

    stop = threading.Event()

    def on_signal(signum, frame):
        if not core.accepting:
            stop.set()
            return
        print(f"cellserve: {signal.Signals(signum).name}: stopping, {settings.grace_s:g} s grace", flush=True)
        core.accepting = False
        frontends.stop(on_stopped=stop.set)
        timer = threading.Timer(settings.grace_s, stop.set)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    heap.settle()
    for w in cluster.workers:
        print(f"cellserve: ray: {w.describe()}, pid {w.info.pid}: {', '.join(w.info.models)}", flush=True)
    print(f"cellserve: ray: data plane: {settings.ray_data_plane}"
          + (f" ({', '.join(f'{k} at {c.where()}' for k, c in conns.items())})" if conns else ""), flush=True)
    models = ", ".join(f"{s.name} (v{s.version})" for s in served)
    print(f"cellserve: serving {models}", flush=True)
    print(f"cellserve: ready: http={ports['http']} grpc={ports['grpc']} metrics={ports['metrics']}", flush=True)
    while not stop.wait(0.5):
        pass
    if allocator is not None:
        allocator.stop()
    frontends.join(timeout=5.0)  # the poller ends with the loop (it stops once not accepting)
    print("cellserve: stopped", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


def socket_call(conns: dict, fallback):
    """RayCore's `call` over the direct data plane: `conns` maps worker id -> data_plane.
    Connection. A lost connection is the worker's death (WorkerDied: RayCore retries once);
    a call whose inputs frames cannot carry (no model's dtype today) goes by `fallback`."""
    from cellserve.cluster.data_plane import ConnectionLost, FrameError
    from cellserve.cluster.ray_core import WorkerDied

    async def call(worker, c):
        try:
            return await conns[worker.id].call(c)
        except ConnectionLost as exc:
            raise WorkerDied(str(exc)) from None
        except FrameError:
            return await fallback(worker, c)
    return call


async def _open_all(conns: dict) -> None:
    await asyncio.gather(*(c.open() for c in conns.values()))
    lost = [c.lost for c in conns.values() if c.lost is not None]
    if lost:
        raise ConnectionError(lost[0])


async def _poll(core, died, conns: dict) -> None:
    """Refresh each live worker's cost tables and counters; a worker whose poll finds it dead
    leaves routing at once (requests in flight there find out from their own calls). Each dead
    worker is logged here, once, however it was found (a request's call, its socket, this
    poll, the planner), and its data-plane connection closed, failing what is pending on it (a
    node lost without its sockets closing: its calls end here, not never)."""
    seen: set[str] = set()  # dead workers reported here, once each, whoever found them dead
    while core.accepting:
        for w in core.router.workers.values():
            if w.alive or w.id in seen:
                continue
            seen.add(w.id)
            print(f"cellserve: ray: {w.describe()} died: {w.death}", flush=True)
            conn = conns.get(w.id)
            if conn is not None and conn.lost is None:  # found dead through Ray: fail what waits on its socket
                conn.lose(f"{w.describe()} died: {w.death}")
        for w in core.router.live():
            try:
                snap = await asyncio.wait_for(_await(w.handle.snapshot.remote()), timeout=5.0)
            except died as exc:
                core.mark_dead(w, _first_line(exc))
                continue
            except asyncio.TimeoutError:
                continue  # busy; its last tables stand
            w.snapshot = snap
            core.router.update_costs(w, snap["costs"], snap["step_overhead_s"], snap.get("admitting_share", 0.0))
        await asyncio.sleep(_POLL_S)


async def _await(ref):
    return await ref


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a HOST:PORT Ray address (a connection refused or timed out), or
    None: reachable, or an address Ray resolves itself (local, auto, or no port)."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or not host:
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_REACH_TIMEOUT_S).close()
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), type(exc).__name__)
    return line if len(line) <= 300 else line[:297] + "..."

