"""`cellserve serve`: load the models, bind the ports, run the engine in the main thread and
the protocol frontends (HTTP, gRPC, metrics) on an asyncio loop in a second thread.

Lifecycle: on SIGTERM or SIGINT the server stops accepting (readiness turns false, new
inference gets 503), lets in-flight requests finish within the grace period, answers whatever
is left with an error, and exits 0. A start-up failure (a broken model, a port in use) prints
one line and exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time

import uvicorn

from cellserve import heap
from cellserve.engine.engine import Engine
from cellserve.errors import CellserveError
from cellserve.plan.versions import VersionProfile, VersionProfileError
from cellserve.server.core import Core
from cellserve.server.http_frontend import ConnectionLimits, build_app, build_metrics_app, guarded_protocol
from cellserve.server.log_settings import LogSettingError, ServerLog
from cellserve.server.metrics import Metrics
from cellserve.server.repository import (ServedModel, load_repository, load_repository_model, load_zoo,
                                         repository_fingerprints, repository_models)
from cellserve.server.settings import DEFAULT_POLL_S, ServerSettings

log = logging.getLogger("cellserve.server")


# ServerSettings lives in cellserve/server/settings.py (no torch there, so that `cellserve serve
# --help` stays fast); it is re-exported here. A setting added there, with setting(...), is a
# flag and a config file key with nothing else to write.


class StartupError(Exception):
    pass


def start_log(settings: ServerSettings) -> ServerLog | None:
    """The server's log, written as its --log-* settings say from now on; None (after one
    line on stderr) when its file cannot be opened."""
    server_log = ServerLog.from_settings(settings)
    try:
        server_log.install()
    except LogSettingError as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return None
    return server_log


def serve(settings: ServerSettings) -> int:
    """Run a server with these (validated) settings until SIGTERM/SIGINT; the exit status: 0
    after a clean stop, 1 when start-up failed (one line on stderr)."""
    server_log = start_log(settings)
    if server_log is None:
        return 2
    if settings.ray_address is not None:  # the engines as Ray actors; Ray is imported only there
        from cellserve.cluster.ray_cluster import serve_ray

        return serve_ray(settings, server_log)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    placement = settings.engine.placement
    try:  # a plan or profile file that cannot be read is told at once (exit 2), before any model loads
        if placement not in (None, "auto"):
            from cellserve.engine.placement import read_plan

            read_plan(placement)
        if settings.engine.kernel_versions:
            for path in settings.engine.kernel_versions:
                try:
                    VersionProfile.from_json(path)
                except VersionProfileError as exc:
                    raise VersionProfileError(f"--kernel-versions: {exc}") from None
    except ValueError as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        _check_device(settings.engine.device, settings.engine.backend)
        polling = settings.model_control_mode == "poll"
        # taken before the models are read: a folder changed while they load is reloaded at the first poll
        fingerprints = repository_fingerprints(settings.model_repository) if polling else {}
        served = _load_models(settings)
        executors = plan = None
        if placement is not None:  # the engine's executors and placement map (docs/partition.md)
            from cellserve.engine.placement import PlacementError, engine_placement

            try:
                executors, plan = engine_placement([s.model for s in served], settings.engine)
            except PlacementError as exc:
                print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
                return 2
        sockets = _bind(settings)
        try:
            engine = Engine([s.model for s in served], settings.engine, executors=executors, placement=plan)
        except VersionProfileError as exc:  # profiles this server cannot use, as a plan it cannot serve (exit 2)
            print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
            return 2
        if placement is not None:
            groups = ", ".join(f"{n} (cores {','.join(map(str, ex.cores))})" if ex.cores else n
                               for n, ex in executors.items())
            print(f"cellserve: placement {placement}: executors {groups}", flush=True)
        _warm_up(engine, served)
    except (CellserveError, StartupError, ValueError) as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - whatever failed, start-up ends with one line
        print(f"cellserve: error: start-up failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    metrics = Metrics(engine)
    from cellserve.server.tracing import Tracer, parse_trace_config  # validated with the settings

    core = Core(served, engine, metrics, settings.sequence_idle_s, settings.max_sequences,
                tracer=Tracer(parse_trace_config(settings.trace_config)), log=server_log,
                repository=settings.model_repository if settings.model_control_mode != "none" else None,
                poll_s=(settings.repository_poll_s or DEFAULT_POLL_S) if polling else None, fingerprints=fingerprints)
    frontends = Frontends(core, settings, sockets)
    try:
        ports = frontends.start()
    except StartupError as exc:
        print(f"cellserve: error: {exc}", file=sys.stderr, flush=True)
        # exit now: a gRPC server that failed to bind aborts the interpreter's normal teardown
        os._exit(1)

    engine_stop = threading.Event()
    cut_short = []  # why requests still running when the engine stops are answered with an error

    def stop_now(why: str) -> None:
        if not engine_stop.is_set():
            cut_short.append(why)
            engine_stop.set()

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if not core.accepting:  # a second signal: stop now
            print(f"cellserve: {name} again: stopping now, requests still running get an error", flush=True)
            stop_now(f"{name} again stopped it before its grace period ended")
            return
        print(f"cellserve: {name}: stopping, {settings.grace_s:g} s grace", flush=True)
        core.accepting = False
        frontends.stop(on_stopped=engine_stop.set)
        deadline = threading.Timer(settings.grace_s, stop_now, args=(f"its grace period of {settings.grace_s:g} s "
                                                                     "(--grace-period) ran out",))
        deadline.daemon = True  # must not keep the process alive once everything stopped
        deadline.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    heap.settle()  # start-up's objects out of the collector's full passes (see heap.py)
    models = ", ".join(f"{s.name} (v{s.version})" for s in served)
    print(f"cellserve: serving {models or 'no model yet (load one: POST v2/repository/models/NAME/load)'}", flush=True)
    print(f"cellserve: ready: http={ports['http']} grpc={ports['grpc']} metrics={ports['metrics']}", flush=True)
    engine.serve_forever(engine_stop)  # the main thread: see Engine.serve_forever
    engine.abort_all("the server is shutting down" + (f": {cut_short[0]}" if cut_short else ""))
    frontends.join(timeout=5.0)
    try:
        core.tracer.close()  # the traces not yet written (docs/tracing.md)
    except OSError as exc:
        print(f"cellserve: error: cannot write the trace file: {exc}", file=sys.stderr, flush=True)
    print("cellserve: stopped", flush=True)
    # A signal that lands in the interpreter's teardown would meet the default handler and
    # end the process with a failure status: it is stopping already.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


def _warm_up(engine: Engine, served: list[ServedModel]) -> None:
    """Each model's config.pbtxt warm-up samples, run before the server says it is ready
    (server/warmup.py); a sample that fails ends the start (ModelLoadError naming it)."""
    from cellserve.server.warmup import warm_up_before_serving

    for entry in served:
        if entry.warmup:
            started = time.perf_counter()
            where = f"model {entry.name!r} version {entry.version}"
            run = warm_up_before_serving(engine, entry.engine_name, entry.warmup, where)
            print(f"cellserve: {where} warmed up: {run} request(s) of {len(entry.warmup)} model_warmup "
                  f"sample(s) in {time.perf_counter() - started:.2f} s", flush=True)


def _check_device(device: str, backend: str | None) -> None:
    from cellserve.executor.kernel import device_problem

    problem = device_problem(device, backend)
    if problem:
        raise StartupError(problem)


def _load_models(settings: ServerSettings) -> list[ServedModel]:
    if settings.model_control_mode == "explicit":  # only those of --load-model, at start
        root = settings.model_repository
        names = repository_models(root) if "*" in settings.load_models else sorted(set(settings.load_models))
        return [s for name in names for s in load_repository_model(root, name)]
    if settings.model_repository is not None:
        return load_repository(settings.model_repository)
    return load_zoo(settings.zoo_models or None, settings.default_slo_ms)


def _bind(settings: ServerSettings) -> dict[str, socket.socket]:
    """Bind the HTTP ports before anything else starts, so that a port in use is one clear error."""
    sockets = {}
    for name, port in (("http", settings.http_port), ("metrics", settings.metrics_port)):
        if port < 0:
            continue
        # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
        # proto says TCP, and with Nagle on, a keep-alive response waits 40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, port))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen for {name} on {settings.host}:{port}: {exc.strerror}") from exc
        sock.listen(2048)
        sockets[name] = sock
    return sockets


class Frontends:
    """The asyncio side: uvicorn for HTTP and metrics, grpc.aio for gRPC, the sequence sweeper.

    Inference admission is bounded in the frontends, before requests are decoded, at most
    the engine's max_active (--max-inflight) in flight; HTTP connections are bounded and
    timed by GuardedHttpProtocol, gRPC's by gRPC core (the same three settings)."""

    def __init__(self, core: Core, settings: ServerSettings, sockets: dict[str, socket.socket]):
        self.core, self.settings, self.sockets = core, settings, sockets
        core.admission.configure(ceiling=settings.engine.max_active)
        self.limits = ConnectionLimits(settings.max_connections, settings.idle_timeout_s, settings.read_timeout_s)
        core.metrics.watch_frontends(core.admission, self.limits)
        self.loop = _new_event_loop()
        self._thread = threading.Thread(target=self._run, name="cellserve-frontends", daemon=True)
        self._started = threading.Event()
        self._ports: dict[str, str] = {}
        self._error: str | None = None
        self._uvicorn: list[uvicorn.Server] = []
        self._grpc = None
        self._stopping: asyncio.Event | None = None
        self._on_stopped = lambda: None

    def start(self) -> dict[str, str]:
        self._thread.start()
        self._started.wait()
        if self._error:
            raise StartupError(self._error)
        return self._ports

    def stop(self, on_stopped) -> None:
        """Stop accepting and wind down (from any thread); call on_stopped once all is closed."""
        self._on_stopped = on_stopped
        self.loop.call_soon_threadsafe(self._stopping.set)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        try:
            tasks = await self._start_all()
        except Exception as exc:  # noqa: BLE001 - reported as the one start-up line
            self._error = str(exc)
            self._started.set()
            return
        self._started.set()
        background = [asyncio.create_task(self._sweep_sequences())]
        if self.core.poll_s is not None:
            background.append(asyncio.create_task(self._poll_repository()))
        await self._stopping.wait()
        for task in background:
            task.cancel()
        for server in self._uvicorn:
            server.should_exit = True  # stop accepting; in-flight requests finish
        if self._grpc is not None:
            await self._grpc.stop(self.settings.grace_s + 5)  # the engine answers what is left at grace_s
        await asyncio.gather(*tasks, return_exceptions=True)
        self._on_stopped()

    async def _start_all(self) -> list[asyncio.Task]:
        s = self.settings
        self._ports = {"http": "off", "grpc": "off", "metrics": "off"}
        if s.grpc_port >= 0:  # first: a port in use then fails before anything else runs
            from cellserve.server.grpc_frontend import start_grpc

            self._grpc, port = await start_grpc(self.core, s.host, s.grpc_port, s.max_request_bytes,
                                                s.max_connections, s.idle_timeout_s, s.read_timeout_s,
                                                s.grpc_max_pending)
            self._ports["grpc"] = f"{_url_host(s.host)}:{port}"
        tasks = []
        apps = {"http": build_app(self.core, s.max_request_bytes), "metrics": build_metrics_app(self.core.metrics)}
        # the metrics port is guarded as the inference port is (its own count of connections):
        # unguarded, clients that sent half a request held their sockets until the process ran
        # out of file descriptors, and inference with them
        metrics_limits = ConnectionLimits(s.max_connections, s.idle_timeout_s, s.read_timeout_s)
        protocols = {"http": guarded_protocol(self.core, self.limits),
                     "metrics": guarded_protocol(self.core, metrics_limits)}
        for name, sock in self.sockets.items():
            config = uvicorn.Config(apps[name], log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=s.grace_s + 5, http=protocols[name],
                                    limit_concurrency=None, backlog=2048, timeout_keep_alive=s.idle_timeout_s,
                                    # nothing per request that no one asked for: no proxy-header
                                    # rewriting middleware, no Server header
                                    proxy_headers=False, server_header=False)
            server = uvicorn.Server(config)
            self._uvicorn.append(server)
            tasks.append(asyncio.create_task(server.serve(sockets=[sock])))
            host, port = sock.getsockname()[:2]
            self._ports[name] = f"{_url_host(host)}:{port}"
        while not all(server.started for server in self._uvicorn):
            failed = [t for t in tasks if t.done()]
            if failed:
                raise StartupError(f"the HTTP frontend failed to start: {failed[0].exception()!r}")
            await asyncio.sleep(0.01)
        return tasks

    async def _poll_repository(self) -> None:
        """Mode POLL: the repository looked at every --repository-poll-secs (Core.poll_repository)."""
        while True:
            await asyncio.sleep(self.core.poll_s)
            try:
                await self.core.poll_repository()
            except Exception:  # noqa: BLE001 - a failed poll must not end the polling
                log.exception("polling the model repository failed")

    async def _sweep_sequences(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.core.sequences.expire():
                for name in self.core.model_names():
                    self.core.count_sequences(name, self.core.model(name).version)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop where it is installed: it halves the event loop's share of each request
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
