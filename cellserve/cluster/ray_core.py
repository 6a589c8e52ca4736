"""The frontends' Core, backed by engine workers on Ray instead of an engine in the process.

The HTTP and gRPC frontends call a RayCore exactly as they call a Core (server/core.py):
health, metadata, parameters, deadlines, admission, sequences and metrics are Core's; only
the hand-off to an engine differs. A request goes to the live worker serving its model with
the least predicted finish (ray_router.Router), as one call: over the direct data plane (a
socket to the worker, data_plane.py) by default, or one Ray actor call (`--ray-data-plane
ray`); the `call` given (ray_cluster.py's) hides which. A sequence's chunks go to the worker
that holds its state (sticky), chosen at its first chunk. Each chunk keeps the state it ends
in under a key of its own on that worker (ray_worker.py), so the sequence's state changes
only when Core counts the chunk (its answer was sent in time); the keys it no longer needs
are dropped with its next call, or released when it ends.

Contracts (each request still gets exactly one answer):
- Shedding before anything queues: with a plan, a model's arrivals beyond the rate the plan
  serves for it are refused 429 at the driver (ray_router.RateGate); a request with a deadline
  that every worker serving its model, all busy, predicts to miss is refused 429 here too
  (an idle worker gets it: its engine decides, as a lone engine does).
- A worker that dies: a request that holds no sequence state on it is sent once more, to the
  best other live worker serving the model; if that one dies too, or there is none, it is
  answered 503 naming both. A sequence whose state was on it is ended, and its chunk (and any
  later one) answered with a SequenceError naming the sequence and the worker.
- While shutting down, a worker's death answers 503 (nothing is retried).
- With `--replan-every`, every request (and sequence chunk) is counted for its model in
  `meter` as it enters, before any shedding; the planner loop (ray_replan_loop.py) replaces
  `gates`, `unplanned` and the router's routes when it applies a plan (all on this loop).
"""

from __future__ import annotations

import asyncio
import itertools

from cellserve.cluster.ray_router import RateGate, Router, WorkerState, time_length
from cellserve.cluster.ray_worker import Call, Reply
from cellserve.engine.clock import MonotonicClock
from cellserve.engine.request import Status
from cellserve.server.core import _ERRORS, Core  # _ERRORS: the one mapping of engine statuses to errors
from cellserve.server.errors import DeadlineExceeded, Overloaded, SequenceError, Unavailable
from cellserve.server.metrics import Metrics, executions_by_model
from cellserve.server.repository import ServedModel
from cellserve.server.sequences import Sequence, SequenceStore

_EXPIRED = object()
_VERDICT_GRACE_S = 0.005  # as Core's: a worker's refusal that lands just after the deadline is still a 429


class WorkerDied(Exception):
    """The worker is gone (its process or its node died): Ray's account, or how its data-plane
    connection broke (EOF, reset; or closed by the driver once Ray found the worker dead)."""


class _Held:
    """Where a sequence's state lives: the worker, its key there ("ENGINE/SEQUENCE/CHUNK"), and
    the keys of states on that worker it no longer needs (sent as the next call's `drop`)."""

    __slots__ = ("worker", "key", "stale")

    def __init__(self, worker: WorkerState, key: str, stale: list[str] | None = None):
        self.worker, self.key, self.stale = worker, key, stale or []

    @property
    def sequence(self) -> str:
        return self.key.rsplit("/", 1)[0]


def _let_go(held, release) -> None:
    """Tell the live worker holding a sequence's state (if any) to drop it, and what it left."""
    if isinstance(held, _Held) and held.worker.alive:
        release(held.worker, [held.key, *held.stale])


class _ReleasingStore(SequenceStore):
    """A SequenceStore that tells the worker holding an ended sequence's state to drop it."""

    def __init__(self, max_sequences, clock, release):
        super().__init__(max_sequences, clock)
        self._release = release

    def end(self, sequence: Sequence, why: str) -> None:
        held, sequence.state = sequence.state, None
        super().end(sequence, why)
        if isinstance(held, _Held):
            held.worker.sequences -= 1
        _let_go(held, self._release)


class RayCore(Core):
    def __init__(self, served: list[ServedModel], router: Router, call, metrics: Metrics,
                 sequence_idle_s: float = 60.0, max_sequences: int = 100_000,
                 gates: dict[str, RateGate] | None = None, unplanned: dict[str, str] | None = None,
                 admission_headroom: float = 0.8):
        """`call(worker, Call)` sends one call and returns an awaitable of its Reply, raising
        WorkerDied when the worker is gone (ray_cluster.py's, over Ray). `gates`: per model,
        the rate a plan serves; `unplanned`: models the plan gives no worker, with why."""
        super().__init__(served, None, metrics, sequence_idle_s, max_sequences, clock=MonotonicClock())
        self.router, self._call = router, call
        self.sequences = _ReleasingStore(max_sequences, self.clock, self._release)
        self.gates = gates or {}
        self.unplanned = unplanned or {}
        self.headroom = admission_headroom
        self.retries = 0  # requests sent again after their worker died
        self.deaths: list[str] = []  # each dead worker, once, with why
        self.shed: dict[tuple[str, str], int] = {}  # (model, why) -> refused at the driver
        self._keys = itertools.count(1)
        self.meter = None  # a ray_replan.RateMeter with --replan-every or --core-allocation: arrivals per model
        self.replanner = None  # a ray_replan_loop.Replanner with --replan-every (its state for the metrics)
        self.core_allocator = None  # a core_allocation.CoreAllocator with --core-allocation (for the metrics)

    def _executions(self) -> dict[str, int]:
        """Batched cell steps per engine model, summed over the workers' last reports."""
        out: dict[str, int] = {}
        for worker in self.router.workers.values():
            executions_by_model(worker.snapshot.get("steps", {}), into=out)
        return out

    # ---- readiness: a live worker to answer ----

    def ready(self) -> bool:
        """Ready while accepting and some worker is alive (with all dead, inference gets 503)."""
        return super().ready() and bool(self.router.live())

    def model_ready(self, name: str, version: str = "") -> bool:
        """Ready while accepting and a live worker takes new requests of the model."""
        return super().model_ready(name, version) and self._served_live(name)

    def _served_live(self, name: str) -> bool:
        return bool(self.router.serving(name))

    def _why_unavailable(self, name: str) -> str:
        if not self.accepting:
            return super()._why_unavailable(name)
        if name in self.unplanned:
            return f"the plan serves no rate of it ({self.unplanned[name]})"
        return f"no live worker serves model {name!r}"

    # ---- sequences: sticky to the worker holding the state ----

    async def _sequence_chunk(self, entry: ServedModel, request, options, sequence, state, timeout_s, priority,
                              received):
        held: _Held | None = state
        base = held.sequence if held is not None else f"{entry.engine_name}/{next(self._keys)}"
        save_key = None if options.sequence_end else f"{base}/{next(self._keys)}"
        sent: list[WorkerState] = []
        try:
            worker, reply = await self._dispatch(entry, request.inputs, timeout_s, priority, received, held,
                                                 save_key, sent)
        except WorkerDied as exc:  # the worker holding the state died: the sequence is gone
            lost = f"lost when {held.worker.describe()} died ({exc})"
            self.sequences.end(sequence, lost)
            raise SequenceError(f"{sequence.describe()} was {lost}; start a new one with sequence_start") from None
        except BaseException:
            if held is not None and sent:  # the call carried the stale keys to the worker
                held.stale = []
            if save_key is not None:  # the chunk may yet finish there: its state is not to be kept
                for worker in sent:
                    self._drop_state(_Held(worker, save_key), kept=held)
            raise
        if held is not None:
            held.stale = []  # the call carried them to the worker
        return reply, None if save_key is None else _Held(worker, save_key)

    def _replace_state(self, old, new) -> None:
        """Count the sequence on the worker holding its state now (new sequences go where
        fewest are), and let the old state go."""
        if isinstance(new, _Held):
            new.worker.sequences += 1
        if isinstance(old, _Held):
            old.worker.sequences -= 1
        self._drop_state(old, kept=new)

    def _drop_state(self, state, kept) -> None:
        """Let `state` go: with the next call when the sequence's kept state is on the same
        worker, else at once."""
        if not isinstance(state, _Held):
            return
        if isinstance(kept, _Held) and kept.worker is state.worker:
            kept.stale += [state.key, *state.stale]
        else:
            _let_go(state, self._release)

    def _release(self, worker: WorkerState, keys: list[str]) -> None:
        try:
            worker.handle.release.remote(keys)
        except Exception:  # noqa: BLE001 - a dead worker's states went with it
            pass

    # ---- plain requests ----

    async def _submit(self, entry: ServedModel, inputs: dict, timeout_s, priority, received,
                      initial_state=None, return_state=False, beam_width=None, return_beams=False):
        return (await self._dispatch(entry, inputs, timeout_s, priority, received, beam_width=beam_width,
                                     return_beams=return_beams))[1]

    async def _dispatch(self, entry: ServedModel, inputs: dict, timeout_s, priority, received,
                        held: _Held | None = None, save_key: str | None = None, sent: list | None = None,
                        beam_width=None, return_beams=False):
        """Send one request to a worker; (the worker, the answer as a Response-like Reply).
        `held`: the sequence's state is on that worker (sticky; no retry: WorkerDied raised);
        `save_key`: where the worker keeps the state the chunk ends in; `sent` gains each
        worker the request is sent to."""
        name = entry.name
        length = time_length(entry.model, inputs)
        if self.meter is not None:  # what is offered, before shedding: the planner's measured rate
            self.meter.arrived(name, length)
        self._gate(name)
        lanes = entry.model.batch_size(inputs)
        tried: list[WorkerState] = []
        while True:
            if held is not None:
                worker = held.worker
                if not worker.alive:
                    raise WorkerDied(worker.death)
            else:  # a sequence's first chunk goes where the fewest sequences are kept
                worker = self._choose(entry, length, lanes, timeout_s, received, tried,
                                      by_sequences=save_key is not None)
            call = Call(entry.engine_name, inputs, None, priority, state_key=held.key if held else None,
                        save_key=save_key, drop=list(held.stale) if held else [], beam_width=beam_width,
                        return_beams=return_beams)
            if sent is not None:
                sent.append(worker)
            try:
                reply = await self._send(entry, worker, call, lanes, timeout_s, received)
            except WorkerDied as exc:
                self._after_death(worker, exc, tried, sticky=held is not None)
                continue
            return worker, self._answer(entry, reply)

    def mark_dead(self, worker: WorkerState, why: str) -> None:
        """Take `worker` out of routing and record its death, once (the poll logs it)."""
        if self.router.mark_dead(worker, why):
            self.deaths.append(f"{worker.describe()}: {why}")

    def _after_death(self, worker: WorkerState, exc: WorkerDied, tried: list, sticky: bool = False) -> None:
        """`worker` died with a request on it: mark it down, then raise what the client gets
        (the server is shutting down; with `sticky`, the sequence's state died with it; a
        second death, after the one retry), or note the retry (`tried` gains the worker) and
        return, for the caller to send the request once more elsewhere."""
        self.mark_dead(worker, str(exc))
        if not self.accepting:
            raise Unavailable(f"the server is shutting down ({worker.describe()} stopped)") from None
        if sticky:
            raise exc
        tried.append(worker)
        if len(tried) > 1:
            raise Unavailable(f"{tried[0].describe()} died with this request, and so did "
                              f"{tried[1].describe()}, where it was sent again") from None
        self.retries += 1

    def _gate(self, model: str) -> None:
        why = self.unplanned.get(model)
        if why is not None:
            self._count_shed(model, "unplanned")
            raise Overloaded(f"the plan serves no rate of model {model!r} ({why})")
        gate = self.gates.get(model)
        if gate is not None and not gate.admit(self.clock.now()):
            self._count_shed(model, "plan")
            raise Overloaded(f"model {model!r} is over the rate the plan serves ({gate.rate:g} requests/s); "
                             "retry later")

    def _choose(self, entry: ServedModel, length: int, lanes: int, timeout_s, received,
                tried: list[WorkerState], by_sequences: bool = False) -> WorkerState:
        name = entry.name
        candidates = self.router.serving(name)
        picked = None
        if candidates:
            rounds = self.router.rounds(candidates[0], name, length)
            picked = self.router.pick(name, rounds, lanes, exclude=tuple(w.id for w in tried),
                                      by_sequences=by_sequences)
        if picked is None:
            if tried:
                raise Unavailable(f"{tried[0].describe()} died with this request, and no other live worker "
                                  f"serves model {name!r}")
            dead = self.router.serving(name, live_only=False)
            raise Unavailable(f"no live worker serves model {name!r}"
                              + (f" ({'; '.join(w.describe() + ' died: ' + w.death for w in dead)})" if dead else ""))
        worker, predicted = picked
        if timeout_s is not None and worker.outstanding > 0 and not tried:
            left = received + timeout_s - self.clock.now()
            if predicted > self.headroom * left:
                self._count_shed(name, "deadline")
                raise Overloaded(f"every worker serving model {name!r} is busy: the least predicted finish, "
                                 f"{predicted * 1e3:.1f} ms on {worker.describe()}, misses the deadline "
                                 f"({max(left, 0.0) * 1e3:.1f} ms left)")
        return worker

    def _count_shed(self, model: str, why: str) -> None:
        self.shed[(model, why)] = self.shed.get((model, why), 0) + 1

    async def _send(self, entry: ServedModel, worker: WorkerState, call: Call, lanes: int, timeout_s,
                    received) -> Reply:
        margin = self.handback_margin_s
        sent = self.clock.now()
        if timeout_s is not None:
            left = received + timeout_s - sent
            call.timeout_s = max(left - margin, left / 2) if left > 0 else 1e-6  # the worker refuses it
        self.router.started(worker, entry.name, lanes)
        try:
            pending = asyncio.ensure_future(self._call(worker, call))
            if timeout_s is None:
                reply = await pending
            else:
                wait = received + timeout_s + max(margin, _VERDICT_GRACE_S) - self.clock.now()
                done, _ = await asyncio.wait({pending}, timeout=max(wait, 0.0))
                if not done:
                    pending.add_done_callback(_quiet)  # its late answer (or death) is nobody's now
                    self.metrics.model(entry.name, entry.version).slo_miss.inc()
                    raise DeadlineExceeded(f"{worker.describe()} had not answered when the deadline of "
                                           f"{timeout_s * 1e3:g} ms passed (counted from the request's "
                                           "arrival at the server)")
                reply = pending.result()
        finally:
            self.router.finished(worker, entry.name, lanes)
        hop = max(self.clock.now() - sent - reply.engine_s, 0.0)
        self._handback_dev_s += 0.25 * (abs(hop - self._handback_s) - self._handback_dev_s)
        self._handback_s += 0.125 * (hop - self._handback_s)
        return reply

    def _answer(self, entry: ServedModel, reply: Reply) -> Reply:
        if reply.status == Status.OK.value:
            return reply
        if reply.status == "sequence":
            raise SequenceError(reply.reason)
        reason = reply.reason.replace(repr(entry.engine_name), repr(entry.name))
        status = Status(reply.status)
        if status is Status.ERROR and not self.accepting:
            raise Unavailable(reason)
        raise _ERRORS[status](reason)


def _quiet(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception never retrieved" warning

