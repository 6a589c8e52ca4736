"""An engine worker: one Ray actor holding one Engine over the models it serves (`serve --ray`).

The driver (cluster/ray_core.py) sends each request as one `Call` and gets back one `Reply`,
by default over the direct data plane (data_plane.py: a socket this worker opens on its
event loop when the driver asks `data_address()`; Ray stays out of the request path), or,
with `--ray-data-plane ray`, as one actor call `infer(call)` (Ray pickles the arrays). Both
go through `_begin`, the one submit path. The engine's step loop runs in a thread of its own;
the actor's asyncio loop only hands requests in and answers out, as the frontends' loop does
in a plain `cellserve serve`.

Contracts:
- Every call (`infer`, or a call frame on the socket) gets exactly one Reply (the engine
  answers every request once).
- Sequences keep their states here, between chunks, under keys the driver names
  ("ENGINE_MODEL/SEQUENCE/CHUNK"): a chunk starts from the state under its `state_key` (None:
  the model's initial state) and, answered OK, keeps the state it ends in under its
  `save_key`; neither is ever changed in place. So a chunk the driver does not count (its
  answer came too late) leaves the state the sequence had, and the driver picks which to
  keep: it names the keys it no longer needs in a later call's `drop`, or in
  `release(keys)`. A key dropped before its chunk's state arrived is remembered, and that
  state is not kept. A chunk whose state is not here is answered `status="sequence"`, never
  run from a fresh state.
- `snapshot()` is cheap (plain numbers): the cost tables the driver routes by and the
  counters the driver's metrics export, labelled with this worker and its node.
- `load(models)` adds models to the running engine (`--replan-every`: a new plan placed them
  here) and returns the new WorkerInfo; `unload(models)` removes those with nothing queued or
  in flight in the engine and no sequence state held here, and says why for the others (the
  driver stops routing to them first and asks again later: a drain drops nothing). Both run
  on the engine's own thread between two steps (the step loop pauses for them: the engine
  is not safe to change while it steps), so requests in flight carry on where they were.

This module imports Ray only for the node id, and only inside the actor; the class is made a
Ray actor by the driver (ray.remote(EngineWorker)), so that it is importable without Ray.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from cellserve.cluster.ray_router import WorkerInfo, cost_snapshot
from cellserve.engine.config import EngineConfig
from cellserve.errors import ModelLoadError
from cellserve.server.warmup import warm_up_before_serving, warm_up_while_serving

_REMEMBER_DROPPED = 10_000  # keys dropped before their chunk's state arrived


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker serves and how (plain data: the driver builds it from flags or a plan)."""

    worker_id: str
    models: tuple[str, ...]  # client-facing names; every version of each (repository) or zoo name
    engine: EngineConfig
    threads: int  # torch threads for its kernels: its device group's cores
    model_repository: str | None = None  # the same path on every node; None: the zoo
    default_slo_ms: float | None = None


@dataclass
class Call:
    """One request as it crosses to a worker."""

    engine_model: str  # "name:version"
    inputs: dict  # name -> numpy array
    timeout_s: float | None  # time left to the deadline when sent, less the hop's margin
    priority: int
    _: KW_ONLY  # the rest by name: several share a type, and a positional slip would pass unseen
    state_key: str | None = None  # a sequence chunk: the state it starts from (None: the initial state)
    save_key: str | None = None  # a sequence chunk: where to keep the state it ends in (None: not kept)
    drop: list[str] = field(default_factory=list)  # states the driver no longer needs, dropped first
    beam_width: int | None = None  # an encoder-decoder's beam width (None: its spec's)
    return_beams: bool = False


@dataclass
class Reply:
    status: str  # an engine Status value ("ok", "invalid", "rejected", "dropped", "error"), or "sequence"
    reason: str = ""
    outputs: dict = field(default_factory=dict)
    queue_s: float | None = None  # arrival to admission (None: answered at admission)
    compute_s: float | None = None  # admission to answer
    engine_s: float = 0.0  # arrival at this worker to answer: the driver learns the hop from it


class EngineWorker:
    def __init__(self, spec: WorkerSpec):
        import torch

        from cellserve.engine.engine import Engine

        torch.set_num_threads(spec.threads)
        self.spec = spec
        served = self._read_models(list(spec.models))
        self.engine = Engine([s.model for s in served], spec.engine)
        for s in served:  # its config's warm-up samples, before it serves (a failure fails the worker's start)
            warm_up_before_serving(self.engine, s.engine_name, s.warmup, f"model {s.name!r} version {s.version}")
        self._names = {s.engine_name: s.name for s in served}
        self.states: dict[str, dict] = {}  # the driver's key -> a sequence's state
        self._dropped: OrderedDict[str, None] = OrderedDict()  # keys dropped before their state came
        self.served = {"ok": 0, "failed": 0}
        self.changes = {"load": 0, "unload": 0}  # models added to / removed from the running engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"cellserve-engine-{spec.worker_id}", daemon=True)
        self._thread.start()
        self._node = _node_id()
        self._plane = None  # the socket of the direct data plane, once data_address started it
        self._plane_address: dict | None = None

    def _loop(self) -> None:
        self.engine.serve_forever(self._stop)
        self.engine.abort_all(f"worker {self.spec.worker_id} is stopping")

    async def _on_engine_thread(self, fn):
        """Run fn() on the engine's thread between two steps (Engine.between_steps); its result."""
        return await asyncio.wrap_future(self.engine.between_steps(fn))

    async def load(self, models: list[str]) -> WorkerInfo:
        """Add these models (every version of each) to the running engine; the new info."""
        new = sorted(set(models) - set(self._names.values()))
        if new:
            loop = asyncio.get_running_loop()
            served = await loop.run_in_executor(None, self._read_models, new)

            def add() -> None:
                for s in served:
                    self.engine.add_model(s.model)
                    self._names[s.engine_name] = s.name
            await self._on_engine_thread(add)
            try:  # served by this worker once its warm-up samples ran; a failed one leaves nothing added
                for s in served:
                    await warm_up_while_serving(self.engine, s.engine_name, s.warmup,
                                                f"model {s.name!r} version {s.version}")
            except ModelLoadError:
                def undo() -> None:
                    for s in served:
                        self.engine.remove_model(s.engine_name)
                        self._names.pop(s.engine_name, None)
                await self._on_engine_thread(undo)
                raise
            self.changes["load"] += len(new)
        return self.info()

    def _read_models(self, names: list[str]) -> list:
        """The ServedModels of these names (at start and on `load`; ray_accuracy_worker's
        subclass reads the zoo's variant families instead)."""
        from cellserve.server.repository import load_repository, load_zoo

        spec = self.spec
        if spec.model_repository is not None:
            served = [s for s in load_repository(Path(spec.model_repository)) if s.name in names]
        else:
            served = load_zoo(list(names), spec.default_slo_ms)
        missing = sorted(set(names) - {s.name for s in served})
        if missing:
            raise ValueError(f"worker {spec.worker_id}: models {missing} are not in its model repository")
        return served

    async def unload(self, models: list[str]) -> dict:
        """Remove these models where nothing of them is left here: {"unloaded": [...],
        "busy": {model: why}, "info": WorkerInfo}."""
        busy: dict[str, str] = {}
        gone: list[str] = []

        def remove() -> None:
            for name in models:
                versions = [en for en, n in self._names.items() if n == name]
                held = sum(key.split("/", 1)[0] in versions for key in self._sequences())
                if held:
                    busy[name] = f"holds the state of {held} sequences"
                    continue
                for en in versions:
                    try:
                        self.engine.remove_model(en)
                    except ValueError as exc:  # requests of it still queued or in flight
                        busy[name] = str(exc)
                        continue
                    del self._names[en]
                if name not in self._names.values() and name not in busy:
                    gone.append(name)
        await self._on_engine_thread(remove)
        self.changes["unload"] += len(gone)
        return {"unloaded": gone, "busy": busy, "info": self.info()}

    async def repin(self, cores: tuple[int, ...]) -> tuple[int, ...]:
        """Move this worker to `cores` between two of its engine's steps: the engine's thread
        and its OpenMP team one per core, every other thread of the process on those cores
        (serve --core-allocation, cluster/ray_cores.py). Returns the cores."""
        from cellserve.cluster.core_workers import pin_here

        cores = tuple(sorted(cores))
        if not cores or min(cores) < 0 or max(cores) >= (os.cpu_count() or 1):
            raise ValueError(f"worker {self.spec.worker_id}: cannot pin to cores {cores}")
        await self._on_engine_thread(lambda: pin_here(cores))
        return cores

    def info(self) -> WorkerInfo:
        e = self.engine
        models = {}
        for engine_name, name in self._names.items():
            models.setdefault(name, engine_name)  # one version's layout stands for the model's
        return WorkerInfo(self.spec.worker_id, self._node, tuple(sorted(models)),
                          {name: list(e._model_types[en]) for name, en in models.items()},
                          {name: [0 if dec is None else 1 for dec in e._step_decoders[en]]  # a decoder's end step
                           for name, en in models.items()},
                          e.policy.max_batch, os.getpid())

    async def infer(self, call: Call) -> Reply:
        """One call over Ray (`--ray-data-plane ray`): its one Reply."""
        done = asyncio.get_running_loop().create_future()
        self._begin(call, lambda reply: done.done() or done.set_result(reply))
        return await done

    def _begin(self, call: Call, deliver) -> None:
        """Submit one call to the engine; `deliver(Reply)` is called exactly once, on this
        actor's event loop (the thread that called this). The one submit path of both data
        planes: `infer` over Ray, and the socket's DataPlaneServer (data_plane.py)."""
        from cellserve.engine.request import Request

        for key in call.drop:
            self._forget(key)
        initial = None
        if call.state_key is not None:
            initial = self.states.get(call.state_key)
            if initial is None:
                deliver(Reply("sequence", f"worker {self.spec.worker_id} holds no state for this sequence"))
                return
        loop = asyncio.get_running_loop()

        def on_done(response) -> None:  # the engine thread: back to the loop, which owns the states
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._finish, call, response, deliver)

        self.engine.submit(Request(call.engine_model, call.inputs, on_done=on_done, timeout_s=call.timeout_s,
                                   priority=call.priority, initial_state=initial,
                                   return_state=call.save_key is not None, beam_width=call.beam_width,
                                   return_beams=call.return_beams))

    def _finish(self, call: Call, r, deliver) -> None:
        from cellserve.engine.request import Status

        ok = r.status is Status.OK
        self.served["ok" if ok else "failed"] += 1
        if ok and call.save_key is not None:
            if call.save_key in self._dropped:  # the driver gave up on this chunk before it finished
                del self._dropped[call.save_key]
            else:
                self.states[call.save_key] = r.state
        queue = compute = None
        if r.admitted is not None:
            queue, compute = max(r.admitted - r.arrival, 0.0), max(r.finish - r.admitted, 0.0)
        deliver(Reply(r.status.value, r.reason, r.outputs if ok else {}, queue, compute,
                      max(r.finish - r.arrival, 0.0)))

    async def data_address(self, driver_node: str | None = None) -> dict:
        """Start (once) this worker's socket for the direct data plane (data_plane.py) on this
        actor's event loop, and say where it is: a Linux abstract Unix socket when the driver
        runs on this node (`driver_node` is this worker's node id), else TCP on this node's IP,
        a free port. The address carries the token the driver's hello must show."""
        if self._plane_address is None:
            import secrets

            from cellserve.cluster.data_plane import DataPlaneServer

            token = secrets.token_hex(16)
            self._plane = DataPlaneServer(self._begin, token, f"worker {self.spec.worker_id}")
            if driver_node == self._node and sys.platform.startswith("linux"):
                self._plane_address = await self._plane.start(unix=f"\0cellserve-{os.getpid()}-{token[:12]}")
            else:
                self._plane_address = await self._plane.start(host=_node_ip())
        return self._plane_address

    def release(self, keys: list[str]) -> int:
        """Forget these states (their sequences ended or expired at the driver); how many were here."""
        return sum(self._forget(key) for key in keys)

    def _forget(self, key: str) -> bool:
        """Drop the state under `key`; one not here yet is remembered (a late chunk's) so that it
        is not kept when it comes. Whether it was here."""
        if self.states.pop(key, None) is not None:
            return True
        self._dropped[key] = None
        while len(self._dropped) > _REMEMBER_DROPPED:
            self._dropped.popitem(last=False)
        return False

    def _sequences(self) -> set[str]:
        """The sequences whose states are here (a sequence may briefly have two: its last chunk's
        and the one before, until the driver drops it)."""
        return {key.rsplit("/", 1)[0] for key in self.states}

    def snapshot(self) -> dict:
        e = self.engine
        return {"costs": cost_snapshot(e.costs), "step_overhead_s": e.step_overhead_s,
                "admitting_share": e.admitting_share,
                "steps": dict(e.stats.steps_by_type), "lanes": dict(e.stats.lanes_by_type),
                "active": e.active_requests, "queued": e.queued_requests, "sequences": len(self._sequences()),
                "served": dict(self.served), "changes": dict(self.changes)}

    def stop(self) -> None:
        if self._plane is not None:
            self._plane.close()
        self._stop.set()
        self._thread.join(10.0)


def _ray():
    """Ray, when this process is part of a Ray cluster (an actor); else None. Checked first:
    outside one, ray.get_runtime_context() would start a local Ray of its own."""
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None


def _node_ip() -> str:
    ray = _ray()
    return "127.0.0.1" if ray is None else ray.util.get_node_ip_address()


def _node_id() -> str:
    ray = _ray()  # outside Ray (tests call the class directly): no node
    return "local" if ray is None else ray.get_runtime_context().get_node_id()
