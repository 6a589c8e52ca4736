"""One simulation in several processes, with the outcomes of one process.

The engines of a simulation touch each other only through the router: an engine's steps
depend on its own state and on the requests it is given, and a request goes to one engine
of its shortlist (router.py), drawn ahead of its arrival from the model alone. So the
engines are split among worker processes (engine i to worker i mod N), each running the
event loop of loop.py over its own engines and over the arrivals whose shortlist names one
of them. An arrival whose shortlist lies in one worker is routed there as in one process.
One whose shortlist spans workers is decided by the router's score (`ScoredRouter.score`: the
lowest wins, the first of equals): each worker in the span scores its own candidates at the
arrival (when everything of its own before it has run, as in one process), sends its best
(score, position in the shortlist) to the others, and each applies the lowest of all; the
worker that owns the chosen engine submits the request. A worker waits for its peers only
when it must: before it steps an engine whose decision is open, scores that engine again,
or ends. Everything else of its own runs on, so the workers overlap (a conservative parallel
discrete-event simulation whose only messages are the routers' scores).

Why the result is the one-process result, outcome for outcome: each engine sees the same
requests at the same virtual times, is stepped at the same times with the same random
stream (its stream is its index's, loop.py), and is scored at the same point of its own
history; only the interleaving of different engines' events changes, and nothing of one
engine reads another's. tests/sim/test_parallel.py holds it to that.

Why it cannot deadlock: a worker announces its scores in arrival order, and waits only for
a decision on an arrival it has already scored, so the earliest arrival whose decision is
open has been scored, or can be, by every worker of its span. Writes never block on a full
pipe: a worker whose peer's pipe is full reads its own while it waits.

Memory: each worker is forked from the process that built the trace and reads it in place
(its columns, trace.py, and the shortlists as one array: reading a Python object would copy
its page into the worker); it returns its outcomes as arrays.
"""

from __future__ import annotations

import fcntl
import heapq
import math
import multiprocessing
import multiprocessing.connection
import os
import select
import struct
import time
from array import array
from dataclasses import dataclass, field

import numpy as np

from cellserve import heap
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import EngineStats
from cellserve.engine.request import Request
from cellserve.graph.model import Model
from cellserve.plan.profile import ModelProfile
from cellserve.sim.loop import STEP_SAMPLES, SimEngine, SimStats, Simulation
from cellserve.sim.outcomes import OutcomeLog, SimOutcome
from cellserve.sim.router import RoundRobin, Router, ScoredRouter
from cellserve.sim.trace import SimArrival, SimTrace

_RECORD = struct.Struct("<qdi")  # arrival index, best score, its position in the shortlist
_DONE = -1  # the arrival index of a worker's last record: it ended its loop (not died)
_PIPE_BYTES = 1 << 20
_POLL_EVERY = 32  # loop iterations between looks at the peers' pipes
_LOOKAHEAD = 16  # heap entries a waiting worker looks through for an engine that may run ahead


@dataclass(eq=False)
class _Decision:
    """An arrival whose shortlist spans workers, scored here, waiting for its peers."""

    index: int  # in the whole trace
    position: int  # in this worker's arrivals
    request: Request
    local: list[tuple[int, SimEngine]]  # (position in the shortlist, engine) of ours
    best: tuple[float, int]
    waiting: int  # peers yet to send their best


@dataclass
class _EngineSpec:
    models: list[Model]
    profiles: dict[str, ModelProfile]
    config: EngineConfig
    name: str


@dataclass
class _Shortlists:
    """Every arrival's shortlist, as engine indices, in the trace's order: end to end in one
    array (a forked worker reads it in place, as the trace)."""

    engines: np.ndarray  # int32
    offsets: np.ndarray  # int64: arrival i's shortlist is engines[offsets[i]:offsets[i + 1]]
    owner: list[int]  # per engine: its worker

    def of(self, i: int) -> list[int]:
        return self.engines[self.offsets[i]:self.offsets[i + 1]].tolist()

    def workers_of(self, i: int) -> set[int]:
        return {self.owner[g] for g in self.of(i)}

    def arrivals_of(self, worker: int) -> np.ndarray:
        """The arrivals whose shortlist names an engine of `worker`, ascending."""
        if len(self.offsets) < 2:
            return np.empty(0, np.int64)
        ours = np.asarray(self.owner)[self.engines] == worker
        return np.flatnonzero(np.logical_or.reduceat(ours, self.offsets[:-1]))  # no shortlist is empty


class _Shard(Simulation):
    """The event loop of one worker: its engines, the arrivals that may reach them."""

    def __init__(self, router: Router, seed: int, step_samples: int, worker: int, inbound: dict[int, int],
                 outbound: dict[int, int]):
        super().__init__(router, seed, step_samples)
        self.worker = worker
        self._inbound = inbound  # peer -> fd we read its records from
        self._outbound = outbound  # peer -> fd we write ours to
        self._partial = {peer: b"" for peer in inbound}
        self._finished: set[int] = set()  # peers that sent their last record
        self._local: dict[int, SimEngine] = {}  # engine index -> engine
        self._decisions: dict[int, _Decision] = {}
        self._early: dict[int, list[tuple[float, int]]] = {}  # peers' bests for arrivals not reached yet
        self._blocked: dict[int, _Decision] = {}  # id(engine) -> its open decision
        self._outcomes = OutcomeLog()
        self.waits = 0  # times this worker waited for a peer, and the wall seconds it waited
        self.waited_s = 0.0

    def add_indexed(self, spec: _EngineSpec, index: int) -> None:
        self._local[index] = self.add_engine(spec.models, spec.profiles, spec.config, spec.name, index=index)

    # ---- the shortlists: given, not drawn ----

    def start(self, trace: SimTrace, indices: np.ndarray, shortlists: _Shortlists, end: float) -> None:
        """Serve the arrivals of `trace` at `indices` (those that may reach an engine of ours)."""
        self._serve(trace, indices)
        self._all = shortlists
        self._end = end

    def _list_next(self) -> None:
        i = self._listed
        shortlist = self._all.of(self._indices[i])
        local = [(pos, self._local[g]) for pos, g in enumerate(shortlist) if g in self._local]
        self._shortlists.append((shortlist, local))
        for _, sim_engine in local:
            sim_engine.upcoming.append(i)
        self._listed += 1

    # ---- the loop ----

    def run_shard(self) -> OutcomeLog:
        with heap.long_lived():
            self._loop()
        return self._outcomes

    def _loop(self) -> None:
        end = self._end
        polls = 0
        while True:
            polls += 1
            if polls == _POLL_EVERY:
                polls = 0
                self._receive(block=False)
            t_arrival = self._next_arrival_time()
            t_step = self._heap[0][0] if self._heap else math.inf
            if min(t_arrival, t_step) > end:
                if self._decisions:  # a peer's answer may yet give an engine of ours work
                    self._receive(block=True)
                    continue
                break
            if t_arrival <= t_step:
                if self._listed == self._next_arrival:
                    self._list_next()
                if any(id(e) in self._blocked for _, e in self._shortlists[0][1]):
                    self._wait()  # score an engine only once its last decision is in
                    continue
                self.stats.events += 1
                self._arrive(self._next_arrival, self._outcomes)
                self._next_arrival += 1
            else:
                sim_engine = self._heap[0][2]
                if id(sim_engine) in self._blocked:
                    self._wait()  # it may yet take the open request: step it after
                    continue
                self.stats.events += 1
                t, _, sim_engine = heapq.heappop(self._heap)
                self._step(sim_engine, t)
        for sim_engine in self.engines:
            sim_engine.engine.abort_all("simulation ended before this request finished")
        for peer in self._outbound:
            try:
                self._send(peer, _RECORD.pack(_DONE, 0.0, 0))
            except BrokenPipeError:
                pass  # it ended first: it needed nothing more from us

    def _wait(self) -> None:
        """The next event must wait for a peer. Meanwhile step an engine that may run ahead,
        if one of the next few in the heap can: not waiting for a decision itself, and due
        before the next arrival that may reach it (so nothing it has not seen yet comes
        before its step, as in one process); else wait."""
        skipped, ran = [], False
        while self._heap and len(skipped) < _LOOKAHEAD:
            entry = heapq.heappop(self._heap)
            t, _, sim_engine = entry
            if t <= self._end and id(sim_engine) not in self._blocked and t < self._next_arrival_for(sim_engine):
                self.stats.events += 1
                self._step(sim_engine, t)
                ran = True
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if not ran:
            self._receive(block=True)

    def _arrive(self, i: int, log: OutcomeLog) -> None:
        shortlist, local = self._shortlists.popleft()
        for _, sim_engine in local:
            sim_engine.upcoming.popleft()
        request = self._request(i)
        if len(local) == len(shortlist):  # ours alone: as in one process
            engines = [e for _, e in local]
            chosen = engines[0] if len(engines) == 1 else self.router.choose(request, engines, request.arrival)
            self._submit(chosen, request, i, log)
            return
        index = int(self._indices[i])
        best = min((self.router.score(request, e, request.arrival), pos) for pos, e in local)
        peers = self._all.workers_of(index) - {self.worker}
        decision = _Decision(index, i, request, local, best, len(peers))
        self._decisions[index] = decision
        for _, sim_engine in local:
            self._blocked[id(sim_engine)] = decision
        for peer in sorted(peers):
            self._send(peer, _RECORD.pack(index, *best))
        for score, pos in self._early.pop(index, ()):
            self._record(index, score, pos)

    def _record(self, index: int, score: float, pos: int) -> None:
        """A peer's best for arrival `index`."""
        decision = self._decisions.get(index)
        if decision is None:
            self._early.setdefault(index, []).append((score, pos))
            return
        decision.best = min(decision.best, (score, pos))
        decision.waiting -= 1
        if decision.waiting == 0:
            del self._decisions[index]
            for _, sim_engine in decision.local:
                del self._blocked[id(sim_engine)]
            pos = decision.best[1]
            for p, sim_engine in decision.local:
                if p == pos:
                    self._submit(sim_engine, decision.request, decision.position, self._outcomes)

    # ---- the pipes ----

    def _send(self, peer: int, data: bytes) -> None:
        fd = self._outbound[peer]
        while True:
            try:
                os.write(fd, data)  # under PIPE_BUF: all or nothing
                return
            except BlockingIOError:  # the peer's pipe is full: read ours while it drains
                self._receive(block=False)
                select.select([], [fd], [], 0.01)

    def _receive(self, block: bool) -> None:
        """Apply the records the peers have sent; with `block`, wait for at least one."""
        if block:
            self.waits += 1
            if not self._inbound:
                raise RuntimeError(f"simulation worker {self.worker} waits for peers that have all ended")
        t0 = time.perf_counter()
        ready, _, _ = select.select(list(self._inbound.values()), [], [], None if block else 0.0)
        if block:
            self.waited_s += time.perf_counter() - t0
        for peer, fd in list(self._inbound.items()):
            if fd not in ready:
                continue
            data = self._partial[peer] + os.read(fd, 1 << 16)
            if not data:
                if peer not in self._finished:
                    raise RuntimeError(f"simulation worker {peer} died")
                del self._inbound[peer]  # it ended its loop: it owes us nothing more (see the docstring)
                os.close(fd)
                continue
            whole = len(data) - len(data) % _RECORD.size
            self._partial[peer] = data[whole:]
            for index, score, pos in _RECORD.iter_unpack(data[:whole]):
                if index == _DONE:
                    self._finished.add(peer)
                else:
                    self._record(index, score, pos)


@dataclass
class ParallelSimulation:
    """`Simulation`'s interface (add_engine, run, stats) over `workers` processes. The router
    must choose by a score per engine (a `ScoredRouter`; all of router.py's are)."""

    router: Router = field(default_factory=RoundRobin)
    seed: int = 0
    workers: int = 2
    step_samples: int = STEP_SAMPLES

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not isinstance(self.router, ScoredRouter):
            raise ValueError(f"router {self.router.name!r} does not choose by a score per engine, so it cannot "
                             "route across processes; simulate it with one worker")
        self._specs: list[_EngineSpec] = []
        self._checked: set[tuple] = set()
        self.stats = SimStats()
        self.engine_stats: list[EngineStats] = []
        self.worker_stats: list[dict] = []  # per worker: its events, and how often and how long it waited for a peer

    def add_engine(self, models: list[Model], profiles: dict[str, ModelProfile], config: EngineConfig,
                   name: str | None = None) -> None:
        """As `Simulation.add_engine`, with the same checks (the engine is built in its worker)."""
        key = (tuple(map(id, models)), tuple(sorted((k, id(v)) for k, v in profiles.items())), id(config))
        if key not in self._checked:  # one engine of each kind built here, for its errors
            Simulation(seed=self.seed).add_engine(models, profiles, config)
            self._checked.add(key)
        name = name or f"engine-{len(self._specs)}"
        self._specs.append(_EngineSpec(models, profiles, config, name))

    def run(self, arrivals: list[SimArrival] | SimTrace, drain_s: float = 30.0) -> list[SimOutcome]:
        """As `Simulation.run`: one outcome per arrival, here in the order of their finish."""
        if not self._specs:
            raise ValueError("a simulation needs at least one engine")
        by_model: dict[str, list[int]] = {}
        for g, spec in enumerate(self._specs):
            for m in spec.models:
                by_model.setdefault(m.name, []).append(g)
        trace = SimTrace.of(arrivals)
        unknown = sorted(set(trace.models) - set(by_model))
        if unknown:
            raise ValueError(f"the trace asks for models {unknown} that no engine serves")
        workers = min(self.workers, len(self._specs))
        shortlists = _Shortlists(*self._draw(trace, by_model), [g % workers for g in range(len(self._specs))])
        last = float(trace.time_s[-1]) if len(trace) else 0.0
        end = last + drain_s
        results = _fork(workers, self, trace, shortlists, end)
        names = [spec.name for spec in self._specs]
        stats_of: dict[int, EngineStats] = {}
        clocks = [last]
        self.stats = SimStats()
        self.worker_stats = []
        for result in results:
            stats_of.update(result["engine_stats"])
            clocks.append(result["clock"])
            self.stats.events += result["events"]
            self.stats.engine_steps += result["engine_steps"]
            self.worker_stats.append({"worker": len(self.worker_stats), "engines": len(result["engine_stats"]),
                                      "events": result["events"], "waits": result["waits"],
                                      "waited_s": result["waited_s"]})
        self.engine_stats = [stats_of[g] for g in range(len(self._specs))]
        log = OutcomeLog.join([result["outcomes"] for result in results])
        outcomes = log.outcomes(trace.models, names, by_finish=True)
        first = float(trace.time_s[0]) if len(trace) else 0.0
        self.stats.virtual_s = max(clocks) - first
        return outcomes

    def _draw(self, trace: SimTrace, by_model: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Each arrival's shortlist, drawn as one process draws it (in time order): the
        shortlists end to end, and where each starts (_Shortlists)."""

        @dataclass(frozen=True)
        class Stub:  # what a router's shortlist may look at: nothing of an engine's state
            name: str
            index: int

        stubs = {m: [Stub(self._specs[g].name, g) for g in gs] for m, gs in by_model.items()}
        engines, ends = array("i"), array("q", [0])
        for m in trace.model.tolist():
            model = trace.models[m]
            candidates = stubs[model]
            chosen = candidates if len(candidates) == 1 else self.router.shortlist(model, candidates)
            engines.extend([s.index for s in chosen])
            ends.append(len(engines))
        return np.frombuffer(engines, np.int32), np.frombuffer(ends, np.int64)


def _fork(workers: int, sim: ParallelSimulation, trace: SimTrace, shortlists: _Shortlists,
          end: float) -> list[dict]:
    """Run the shards in forked processes; their results, in worker order."""
    pipes = {}
    for a in range(workers):
        for b in range(workers):
            if a != b:
                r, w = os.pipe()
                try:
                    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
                except OSError:
                    pass  # the default size works too, with more waiting
                os.set_blocking(w, False)
                pipes[a, b] = (r, w)
    ctx = multiprocessing.get_context("fork")
    results, procs = [], []
    for w in range(workers):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(w, workers, sim, trace, shortlists, end, pipes, sender),
                           name=f"cellserve-sim-{w}", daemon=True)
        proc.start()
        sender.close()
        results.append(receiver)
        procs.append(proc)
    for r, w in pipes.values():
        os.close(r)
        os.close(w)
    out: dict[int, dict] = {}
    pending = dict(enumerate(results))
    try:
        timeout = None
        while pending:
            ready = multiprocessing.connection.wait(list(pending.values()), timeout)
            if not ready:
                break
            for conn in ready:
                w = next(k for k, c in pending.items() if c is conn)
                try:
                    out[w] = conn.recv()
                except EOFError:
                    procs[w].join()
                    out[w] = {"error": f"simulation worker {w} died (exit code {procs[w].exitcode})"}
                del pending[w]
                if "error" in out[w]:  # the others may wait for it forever: a moment for their word, then stop
                    timeout = 2.0
        errors = sorted((r["error"] for r in out.values() if "error" in r), key=lambda e: "died" in e)
        if errors:
            raise RuntimeError("; ".join(errors))  # the cause first, then who waited for it
    finally:
        for proc in procs:
            if proc.is_alive() and pending:
                proc.terminate()
            proc.join()
    return [out[w] for w in range(workers)]


def _worker(w: int, workers: int, sim: ParallelSimulation, trace: SimTrace, shortlists: _Shortlists,
            end: float, pipes: dict, sender) -> None:
    try:
        inbound = {a: pipes[a, w][0] for a in range(workers) if a != w}
        outbound = {b: pipes[w, b][1] for b in range(workers) if b != w}
        keep = set(inbound.values()) | set(outbound.values())
        for r, wr in pipes.values():
            for fd in (r, wr):
                if fd not in keep:
                    os.close(fd)
        shard = _Shard(sim.router, sim.seed, sim.step_samples, w, inbound, outbound)
        for g, spec in enumerate(sim._specs):
            if shortlists.owner[g] == w:
                shard.add_indexed(spec, g)
        shard.start(trace, shortlists.arrivals_of(w), shortlists, end)
        sender.send(_pack(shard, shard.run_shard()))
    except BaseException as e:  # the parent says which worker failed, and why
        sender.send({"error": f"simulation worker {w}: {type(e).__name__}: {e}"})
        raise
    finally:
        sender.close()


def _pack(shard: _Shard, log: OutcomeLog) -> dict:
    return {
        "outcomes": log.arrays(),
        "engine_stats": [(g, e.engine.stats) for g, e in shard._local.items()],
        "clock": max((e.clock.now() for e in shard.engines), default=0.0),
        "events": shard.stats.events,
        "engine_steps": shard.stats.engine_steps,
        "waits": shard.waits,
        "waited_s": shard.waited_s,
    }
