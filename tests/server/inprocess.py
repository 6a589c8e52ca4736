"""A server's real frontends, core and engine in the test's own process, for tests that
watch the engine (what was submitted, what was cancelled) or hold its worker (PausableEngine),
or move the core's clock (SkippingClock)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cellserve.engine.clock import MonotonicClock
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request
from cellserve.server.app import Frontends, _bind
from cellserve.server.core import Core
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo
from cellserve.server.settings import ServerSettings


@dataclass
class InProcess:
    engine: Engine
    core: Core
    frontends: Frontends
    ports: dict  # "http", "grpc": host:port
    submitted: list[Request]  # every request submitted to the engine, in order

    def stop(self) -> None:
        """Stop the frontends (the engine's worker is the caller's to stop)."""
        self.core.accepting = False
        stopped = threading.Event()
        self.frontends.stop(on_stopped=stopped.set)
        stopped.wait(30)


def serve_in_process(models: list[str], config: EngineConfig, grpc: bool = True) -> InProcess:
    """Zoo `models` behind real HTTP (and gRPC) frontends on free ports, started; the engine's
    worker is not (the caller runs `engine.serve_forever` where it wants). The engine's
    submit is spied on: each request is recorded, then submitted."""
    settings = ServerSettings(zoo_models=models, http_port=0, grpc_port=0 if grpc else -1, metrics_port=-1,
                              engine=config)
    served = load_zoo(models)
    engine = Engine([s.model for s in served], config)
    submitted: list[Request] = []
    submit = engine.submit
    engine.submit = lambda request: (submitted.append(request), submit(request))
    core = Core(served, engine, Metrics(engine))
    frontends = Frontends(core, settings, _bind(settings))
    return InProcess(engine, core, frontends, frontends.start(), submitted)


class PausableEngine:
    """An engine's worker thread that a test stops between steps and starts again."""

    def __init__(self, engine: Engine):
        self.engine, self.stop, self.worker = engine, threading.Event(), None

    def start(self) -> None:
        self.stop = threading.Event()
        self.worker = threading.Thread(target=self.engine.serve_forever, args=(self.stop,), daemon=True)
        self.worker.start()

    def pause(self) -> None:
        self.stop.set()
        self.worker.join(30)
        assert not self.worker.is_alive()


class SkippingClock(MonotonicClock):
    """The monotonic clock, plus however far a test has skipped it ahead."""

    def __init__(self):
        super().__init__()
        self.skipped = 0.0

    def now(self) -> float:
        return super().now() + self.skipped
