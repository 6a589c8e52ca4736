"""Engines in processes of their own, each pinned to a set of cores: the units of a core
allocation (plan/tenancy.py; Veltair's cores shared by models), for real on one machine.

Each worker is a fresh interpreter (spawn) that pins itself to its cores before torch loads,
then serves its models on one Engine whose kernel threads are one per core of its set. Two
workers share no GIL, no engine thread and no OpenMP team: one model's steps never wait for
another's. The driver may move a worker to other cores at any time (`repin`): the engine's
thread re-pins itself and its OpenMP team (a team of one thread per core) between two steps
(Engine.between_steps); the process's other threads follow to the same cores.

A worker replays its share of a benchmark's trace (bench/engine_runner.replay_mix) from a
start time all workers agree on (time.perf_counter is one clock for every process on Linux),
so that several workers serve one mixed trace at once, each answering its own requests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from dataclasses import dataclass

START_TIMEOUT_S = 180.0  # a worker imports torch, loads its models and measures their steps
REPLY_TIMEOUT_S = 300.0  # a call (a capacity burst, a replay and its drain) answered within this


class CoreWorkerError(RuntimeError):
    """A worker failed to start, failed a call (its error, named), or went away."""


@dataclass(frozen=True)
class WorkerSpec:
    """One unit: a name for messages, the zoo or repository models it serves, its first cores."""

    name: str
    models: tuple[str, ...]
    cores: tuple[int, ...]
    model_repository: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError(f"worker {self.name!r} serves no model")
        if not self.cores or len(set(self.cores)) != len(self.cores) or min(self.cores) < 0:
            raise ValueError(f"worker {self.name!r}: its cores must be distinct core numbers, got {self.cores}")


class CoreWorker:
    """The driver's handle on one worker process. Calls are answered in order; `repin` may
    come while a call runs (it takes effect between two of the engine's steps)."""

    def __init__(self, spec: WorkerSpec, start_timeout_s: float = START_TIMEOUT_S):
        ctx = mp.get_context("spawn")
        self.spec = spec
        self.cores = tuple(spec.cores)
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()  # one sender at a time: a repin from the allocator's thread
        self.process = ctx.Process(target=_main, args=(spec, child), name=f"cellserve-core-{spec.name}", daemon=True)
        self.process.start()
        child.close()
        self._receive(start_timeout_s, "start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _send(self, *message) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, EOFError, OSError) as exc:
                raise CoreWorkerError(f"worker {self.spec.name!r} went away ({exc})") from exc

    def _receive(self, timeout_s: float, what: str):
        if not self._conn.poll(timeout_s):
            self.close()
            raise CoreWorkerError(f"worker {self.spec.name!r} did not answer {what} within {timeout_s:g} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise CoreWorkerError(f"worker {self.spec.name!r} exited during {what} "
                                  f"(exit code {self.process.exitcode})") from exc
        if status == "error":
            raise CoreWorkerError(f"worker {self.spec.name!r}: {what} failed: {value}")
        return value

    def capacity(self, model: str, seed: int, n: int = 300) -> float:
        """Requests per second of a closed-loop burst of `n` on this worker's cores
        (bench/engine_bench.closed_loop_capacity): its warm-up, and what it carries alone."""
        self._send("capacity", model, seed, n)
        return self._receive(REPLY_TIMEOUT_S, f"a capacity burst of {model!r}")

    def start_replay(self, streams: list, start_at: float, drain_s: float = 30.0) -> None:
        """Begin serving `streams` (bench/engine_runner.Stream) with the traces' zero at
        `start_at` on the perf_counter clock; `replay_result` waits for the outcomes."""
        self._send("replay", streams, start_at, drain_s)

    def replay_result(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict:
        """{"outcomes": per stream, its RequestOutcomes; "repins": repins applied meanwhile}."""
        return self._receive(timeout_s, "a replay")

    def repin(self, cores: tuple[int, ...]) -> None:
        """Move the worker to `cores` (its kernel threads one per core) between two steps."""
        cores = tuple(sorted(cores))
        if not cores:
            raise ValueError(f"worker {self.spec.name!r}: repin needs at least one core")
        self._send("repin", cores)
        self.cores = cores

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._send("stop")
            except CoreWorkerError:
                pass
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._conn.close()


def pin_here(cores: tuple[int, ...]) -> None:
    """Pin this process's threads to `cores`, then the calling thread and its OpenMP team to
    one core each (a team of len(cores)). Call it on the thread that runs the kernels."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except OSError:  # a thread that just ended
            pass
    from cellserve.kernels.affinity import pin_core_group

    pin_core_group(list(cores))


def _main(spec: WorkerSpec, conn) -> None:
    """The worker: pinned before anything heavy loads, then calls from the pipe. A listener
    thread takes the messages: repins go to the engine's thread between steps, calls to this
    (main) thread, which runs the engine (Engine.serve_forever wants the main thread)."""
    import queue

    os.sched_setaffinity(0, set(spec.cores))
    os.environ["OMP_NUM_THREADS"] = str(len(spec.cores))
    try:
        from cellserve.bench.engine_bench import closed_loop_capacity
        from cellserve.bench.engine_runner import replay_mix
        from cellserve.bench.traces import sequence_input
        from cellserve.engine.config import EngineConfig
        from cellserve.engine.engine import Engine
        from cellserve.server.repository import load_model

        models = [load_model(name, spec.model_repository) for name in spec.models]
        inputs = {m.name: sequence_input(m) for m in models}
        pin_here(spec.cores)
        engine = Engine(models, EngineConfig(pin_threads=False))  # pinned here, and again on each repin
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which names the worker
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    calls: queue.Queue = queue.Queue()
    repins = [0]

    def listen() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                calls.put(("stop",))
                return
            if message[0] == "repin":
                def repin(cores=message[1]) -> None:
                    pin_here(cores)
                    repins[0] += 1
                engine.between_steps(repin)
            else:
                calls.put(message)
                if message[0] == "stop":
                    return

    threading.Thread(target=listen, name="cellserve-core-listener", daemon=True).start()
    while True:
        message = calls.get()
        op, args = message[0], message[1:]
        if op == "stop":
            return
        try:
            if op == "capacity":
                model, seed, n = args
                seq = inputs[model]
                answer = closed_loop_capacity(engine, model, seq.name, 0, seed, n=n, inputs=seq.sampler())
            elif op == "replay":
                streams, start_at, drain_s = args
                before = repins[0]
                outcomes = replay_mix(engine, streams, drain_s=drain_s, start_at=start_at)
                answer = {"outcomes": outcomes, "repins": repins[0] - before}
            else:
                raise ValueError(f"unknown call {op!r}")
        except Exception as exc:  # noqa: BLE001 - the call fails, the worker serves on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", answer))
