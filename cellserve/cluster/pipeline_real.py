"""A pipeline plan served for real on this machine: one worker process per device of each
stage, each pinned to its cores and serving its stage's part of the model (graph/cut.py) on
a cellserve engine, and a driver running PPipe's reservation plane
(plan/pipeline_sim.ReservationPlane, the simulator's own code) on the wall clock.

Flow: the driver queues each arrival in the plane; a dispatch goes to the device the plane
reserved for the pipeline's first stage, as one message holding its requests; each stage
runs its part on every request of the batch at once (the engine batches them step by step),
then hands on, per request, what later parts read (ModelCut.carry) to the device the plane
reserved for the next stage; the last stage returns the model's outputs to the driver. A
request's latency is from its arrival (its scheduled time on the driver's clock) to the
driver receiving its answer. The plane reserves devices by the profile's latencies; it
learns, as each batch comes back, when it really ended on each stage, and moves the
reservations made after it to follow (`ReservationPlane(track=True)`): a stage running late
takes no batch it cannot finish by the head's deadline (the head is dropped rather than served
late). Requests answered late are counted, never hidden.

Workers are started with the spawn method (a fresh interpreter: no torch state forked) and
pin themselves before loading anything. Each batch's message carries its marks (`Finished`:
when each stage took it and handed it on), from which the benchmark prices the blocks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from cellserve.plan.pipeline import Link, ModelBlocks, ModelPlan
from cellserve.plan.pipeline_sim import SHRINK, Dispatch, ReservationPlane, poisson_ms

_START_TIMEOUT_S = 180.0  # a worker imports torch and builds its engine
_ANSWER_TIMEOUT_S = 60.0  # no answer for this long with batches in flight: a worker is stuck


# A batch's tensors past this size travel through a file in shared memory, not the queue's pipe:
# a pipe holds 64 KiB, so a larger message is written in chunks, each waiting for the reader
# and for the writer's feeder thread to get the CPU from its own process's busy stage
# (measured: hand-overs of 1 MB took up to 40 ms while the stage computed its next batch).
INLINE_BYTES = 32 << 10


def pack(rows: list, folder: str, tag: str) -> tuple:
    """A batch's rows (dicts of arrays, or strings) made ready to send: as they are when
    small, else their arrays written to one file in `folder` and described."""
    arrays = [(i, k, np.ascontiguousarray(v)) for i, row in enumerate(rows) if isinstance(row, dict)
              for k, v in row.items()]
    if sum(a.nbytes for _, _, a in arrays) < INLINE_BYTES:
        return ("inline", rows)
    path = os.path.join(folder, tag)
    layout = []
    with open(path, "wb") as f:
        for i, k, a in arrays:
            layout.append((i, k, a.dtype.str, a.shape, a.nbytes))
            f.write(memoryview(a).cast("B"))
    return ("file", path, layout, [row if not isinstance(row, dict) else None for row in rows])


def unpack(payload: tuple) -> list:
    """The rows `pack` made ready (the file read once and removed)."""
    if payload[0] == "inline":
        return payload[1]
    _, path, layout, rows = payload
    data = np.fromfile(path, dtype=np.uint8)
    os.unlink(path)
    rows = [{} if row is None else row for row in rows]
    at = 0
    for i, k, dtype, shape, nbytes in layout:
        rows[i][k] = data[at:at + nbytes].view(np.dtype(dtype)).reshape(shape)
        at += nbytes
    return rows


class PipelineRunError(RuntimeError):
    """A worker failed to start or answer; the message says which and why."""


@dataclass(frozen=True)
class StageWorker:
    """One worker: the model (a zoo name), where it is cut, which part it serves (its
    stage), and the cores it may run on."""

    model: str
    cuts: tuple[int, ...]
    part: int
    cores: tuple[int, ...]


def _stage_main(spec: StageWorker, inbox, nexts, results, ready, folder: str) -> None:
    """A worker's loop: each message a batch (id, route, rows, marks); rows are per request
    what the parts so far hold, or the reason it failed; marks, each stage's (took the batch,
    handed it on) on the machine's monotonic clock (time.perf_counter, one clock for every
    process here)."""
    os.sched_setaffinity(0, set(spec.cores))
    from cellserve.engine.config import EngineConfig
    from cellserve.engine.engine import Engine
    from cellserve.engine.request import Request, Status
    from cellserve.graph import zoo
    from cellserve.graph.cut import cut_model

    try:
        cut = cut_model(zoo.load(spec.model), spec.cuts)
        part = cut.parts[spec.part]
        engine = Engine([part], EngineConfig(admission=False, drop_late=False, profile=False))
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which names the worker
        ready.put((spec.part, f"{type(exc).__name__}: {exc}"))
        return
    from cellserve import heap

    heap.settle()  # start-up's objects out of the collector's full passes, as a server's (heap.py)
    ready.put((spec.part, None))
    last = spec.part == len(cut.parts) - 1
    with engine.kernel_threads_pinned():
        while True:
            message = inbox.get()
            if message is None:
                return
            batch_id, route, payload, marks = message
            rows = unpack(payload)
            took = time.perf_counter()
            answers: dict[int, object] = {}
            for i, held in enumerate(rows):
                if isinstance(held, dict):
                    engine.submit(Request(part.name, cut.part_inputs(spec.part, held),
                                          on_done=lambda r, i=i: answers.__setitem__(i, r)))
            try:
                engine.run_until_idle(timeout_s=_ANSWER_TIMEOUT_S)
            except TimeoutError as exc:  # each request still in it answered with why, not lost
                engine.abort_all(f"stage {spec.part}: {exc}")
            out = []
            for i, held in enumerate(rows):
                if not isinstance(held, dict):
                    out.append(held)  # failed upstream: its reason travels on
                    continue
                answer = answers.get(i)
                if answer is None or answer.status is not Status.OK:
                    out.append(f"stage {spec.part}: {answer.reason if answer else 'no answer'}")
                    continue
                now_held = {**held, **answer.outputs}
                out.append(cut.answer(now_held) if last else cut.carry(spec.part, now_held))
            message = (batch_id, route, pack(out, folder, f"b{batch_id}-s{spec.part}"),
                       (*marks, took, time.perf_counter()))
            if last:
                results.put(message)
            else:
                nexts[route[spec.part + 1]].put(message)


@dataclass(frozen=True)
class Finished:
    """A batch back from the last stage: its rows (the model's outputs, or why a request
    failed) and its marks on the machine's monotonic clock (seconds): sent, each stage's
    (took it, handed it on), received. A stage's time runs from taking the batch to handing
    it on; a hop's from one stage (or the driver) handing it on to the next taking it:
    queueing in an inbox, pickling and the wake-up included."""

    batch_id: int
    rows: list
    marks: tuple[float, ...]

    @property
    def intervals(self) -> list[tuple[float, float]]:
        """Each stage's (took, handed on)."""
        return [(self.marks[i], self.marks[i + 1]) for i in range(1, len(self.marks) - 1, 2)]

    @property
    def stage_ms(self) -> tuple[float, ...]:
        return tuple((b - a) * 1000.0 for a, b in self.intervals)

    @property
    def hop_ms(self) -> tuple[float, ...]:
        return tuple((self.marks[i + 1] - self.marks[i]) * 1000.0 for i in range(0, len(self.marks) - 1, 2))

    @property
    def end_to_end_ms(self) -> float:
        return (self.marks[-1] - self.marks[0]) * 1000.0


@dataclass
class RunResult:
    """One run's counts and latencies (measured, wall clock): offered requests arriving after
    the warm-up, served within the SLO, late (answered past it), dropped by the plane, failed
    in a stage; mean batch dispatched; each batch's stage times."""

    rate_rps: float
    offered: int = 0
    served: int = 0
    late: int = 0
    dropped: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # per batch whose head is counted
    stage_ms: list[tuple[float, ...]] = field(default_factory=list)  # per such batch: each stage's compute
    hop_ms: list[tuple[float, ...]] = field(default_factory=list)  # per batch: driver -> stage 0 -> ... -> driver
    overrun_ms: list[float] = field(default_factory=list)  # per batch: its answer less the plane's prediction
    wall_s: float = 0.0  # the run, from its first arrival to its last answer
    driver_cpu_s: float = 0.0  # the driver's CPU time (this process's, its queue threads included)
    answers: dict[int, object] = field(default_factory=dict, repr=False)

    @property
    def attainment(self) -> float:
        return self.served / self.offered if self.offered else 1.0

    @property
    def batches(self) -> int:
        return len(self.batch_sizes)

    @property
    def rows(self) -> int:
        return sum(self.batch_sizes)

    def to_dict(self, seconds: float) -> dict:
        lat = np.array(self.latencies_ms)
        return {"rate_rps": self.rate_rps, "offered": self.offered, "served": self.served, "late": self.late,
                "dropped": self.dropped, "failed": self.failed, "attainment": self.attainment,
                "goodput_rps": self.served / seconds if seconds > 0 else 0.0,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                "mean_batch": self.rows / self.batches if self.batches else 0.0,
                "driver_core_share": self.driver_cpu_s / self.wall_s if self.wall_s > 0 else None,
                "overrun_ms": _quantiles(self.overrun_ms),
                "stage_ms": [_quantiles(list(s)) for s in zip(*self.stage_ms)],
                "hop_ms": [_quantiles(list(s)) for s in zip(*self.hop_ms)]}


def _quantiles(xs: list[float]) -> dict | None:
    """p50 / p90 / p99 / max of a list, or None when empty."""
    if not xs:
        return None
    a = np.array(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


class RealPipeline:
    """Worker processes for one pipeline of stages (each stage's devices: one worker per core
    group given), started on entry and stopped on exit."""

    def __init__(self, model: str, cuts: tuple[int, ...], stage_cores: list[list[tuple[int, ...]]]):
        if len(stage_cores) != len(cuts) + 1:
            raise ValueError(f"{len(cuts) + 1} stages need core groups for each, got {len(stage_cores)}")
        self.model, self.cuts = model, tuple(cuts)
        self.workers = [[StageWorker(model, self.cuts, k, tuple(c)) for c in groups]
                        for k, groups in enumerate(stage_cores)]
        self._ctx = mp.get_context("spawn")
        self._procs: list = []

    def __enter__(self) -> RealPipeline:
        ctx = self._ctx
        shm = "/dev/shm"
        self.folder = tempfile.mkdtemp(prefix="cellserve-pipeline-", dir=shm if os.path.isdir(shm) else None)
        self.results, ready = ctx.Queue(), ctx.Queue()
        self.inboxes = [[ctx.Queue() for _ in stage] for stage in self.workers]
        for k, stage in enumerate(self.workers):
            nexts = self.inboxes[k + 1] if k + 1 < len(self.workers) else []
            for d, spec in enumerate(stage):
                proc = ctx.Process(target=_stage_main, args=(spec, self.inboxes[k][d], nexts, self.results, ready,
                                                                   self.folder),
                                   name=f"pipeline-stage{k}-dev{d}", daemon=True)
                proc.start()
                self._procs.append(proc)
        problems = []
        for _ in self._procs:
            try:
                part, why = ready.get(timeout=_START_TIMEOUT_S)
            except queue_mod.Empty:
                problems.append(f"a worker did not start within {_START_TIMEOUT_S:g} s")
                break
            if why:
                problems.append(f"stage {part}: {why}")
        if problems:
            self.__exit__(None, None, None)
            raise PipelineRunError(f"pipeline of {self.model!r} did not start: {'; '.join(sorted(problems))}")
        return self

    def __exit__(self, *exc) -> None:
        for stage in getattr(self, "inboxes", []):
            for box in stage:
                box.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._procs = []
        if getattr(self, "folder", None):
            shutil.rmtree(self.folder, ignore_errors=True)

    def send(self, batch_id: int, route: tuple[int, ...], rows: list) -> None:
        payload = pack(rows, self.folder, f"b{batch_id}-in")
        self.inboxes[0][route[0]].put((batch_id, route, payload, (time.perf_counter(),)))

    def receive(self, timeout_s: float) -> Finished | None:
        """A finished batch, or None when none came in time."""
        try:
            batch_id, _route, payload, marks = self.results.get(timeout=max(0.0, timeout_s))
        except queue_mod.Empty:
            return None
        rows = unpack(payload)
        return Finished(batch_id, rows, (*marks, time.perf_counter()))

    def check_alive(self) -> None:
        dead = [p.name for p in self._procs if not p.is_alive()]
        if dead:
            raise PipelineRunError(f"pipeline worker(s) {dead} exited")


def run_burst(pipe: RealPipeline, batches: list[list[dict]]) -> list[Finished]:
    """Batches sent at once (to each stage's first device), answered in order: alone when
    there is one; with several, the stages work at once as they do under load."""
    route = tuple(0 for _ in pipe.workers)
    for i, rows in enumerate(batches):
        pipe.send(i, route, rows)
    got: dict[int, Finished] = {}
    while len(got) < len(batches):
        finished = pipe.receive(_ANSWER_TIMEOUT_S)
        if finished is None:
            pipe.check_alive()
            raise PipelineRunError(f"{len(batches) - len(got)} of {len(batches)} batches got no answer within "
                                   f"{_ANSWER_TIMEOUT_S:g} s")
        got[finished.batch_id] = finished
    return [got[i] for i in range(len(batches))]


def serve_load(pipe: RealPipeline, model: ModelBlocks, plan: ModelPlan, link: Link, make_request,
               rate_rps: float, seconds: float, warmup_s: float = 0.0, seed: int = 0,
               shrink: float = SHRINK, keep_answers: bool = False, slo_ms: float | None = None) -> RunResult:
    """Poisson arrivals at `rate_rps` for `seconds` through the plan's pipelines on the real
    workers (the plan must have one pipeline whose stages match the workers), the plane
    driven by the wall clock. `make_request(i)` gives request i's inputs. Requests arriving
    before `warmup_s` run but are not counted. A request is served when answered within
    `slo_ms` (default: the model's, which the plane plans to; a plane given a margin plans to
    less). Returns when every request is answered."""
    if len(plan.pipelines) != 1 or len(plan.pipelines[0].stages) != len(pipe.workers):
        raise ValueError("a real run serves one pipeline whose stages are the workers' stages")
    for stage, workers in zip(plan.pipelines[0].stages, pipe.workers):
        if stage.devices != len(workers):
            raise ValueError(f"stage {stage.first}..{stage.last} plans {stage.devices} devices; "
                             f"{len(workers)} workers serve it")
    plane = ReservationPlane(model, plan, link, shrink, track=True)
    slo = model.slo_ms if slo_ms is None else slo_ms
    arrivals = poisson_ms(rate_rps, seconds * 1000.0, seed)
    inputs = [make_request(i) for i in range(len(arrivals))]
    result = RunResult(rate_rps)
    warm_ms = warmup_s * 1000.0
    in_flight: dict[int, Dispatch] = {}
    counted = [a >= warm_ms for a in arrivals]
    result.offered = sum(counted)
    next_id = 0

    def drop(_arrival: float, i: int) -> None:
        result.dropped += counted[i]

    def send(d: Dispatch) -> None:
        nonlocal next_id
        in_flight[next_id] = d
        pipe.send(next_id, d.devices, [inputs[i] for i in d.items])
        next_id += 1

    t0, cpu0 = time.perf_counter(), time.process_time()

    def now_ms() -> float:
        return (time.perf_counter() - t0) * 1000.0

    nxt, timer, last_answer = 0, None, time.perf_counter()
    while nxt < len(arrivals) or plane.queue or in_flight:
        now = now_ms()
        looked = False
        while nxt < len(arrivals) and arrivals[nxt] <= now:
            plane.arrive(arrivals[nxt], nxt)
            nxt += 1
            looked = True
        if looked or (timer is not None and timer <= now):
            timer = plane.look(now, send, drop)
        wake = min(arrivals[nxt] if nxt < len(arrivals) else float("inf"),
                   timer if timer is not None else float("inf"))
        if plane.queue and timer is None and nxt >= len(arrivals):
            raise AssertionError("the data plane stopped with requests queued and no timer")  # a bug there
        got = pipe.receive(min(wake - now_ms(), 50.0) / 1000.0 if wake < float("inf") else 0.05)
        if got is None:
            if in_flight and time.perf_counter() - last_answer > _ANSWER_TIMEOUT_S:
                pipe.check_alive()
                raise PipelineRunError(f"no batch answered for {_ANSWER_TIMEOUT_S:g} s with {len(in_flight)} "
                                       "in flight")
            continue
        last_answer = time.perf_counter()
        done = now_ms()
        d = in_flight.pop(got.batch_id)
        plane.observe(d, tuple((end - t0) * 1000.0 for _, end in got.intervals))
        timer = plane.look(done, send, drop)  # its reservations moved: the head's moment may have too
        rows = got.rows
        if counted[d.items[0]]:
            result.stage_ms.append(got.stage_ms)
            result.batch_sizes.append(len(d.items))
            result.hop_ms.append(got.hop_ms)
            result.overrun_ms.append(done - d.completion_ms)
        for i, arrival, row in zip(d.items, d.arrivals, rows):
            if keep_answers:
                result.answers[i] = row
            if not counted[i]:
                continue
            if not isinstance(row, dict):
                result.failed += 1
            elif done - arrival <= slo:
                result.served += 1
                result.latencies_ms.append(done - arrival)
            else:
                result.late += 1
                result.latencies_ms.append(done - arrival)
    result.wall_s, result.driver_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return result
