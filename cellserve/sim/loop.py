"""The discrete-event loop: many engines, one virtual time, requests routed among them.

Each engine is a real `Engine` whose executor is a `SimExecutor` and whose clock is a
`VirtualClock`. The loop keeps two kinds of events: arrivals (from the trace, in time order)
and engine steps (a heap). An arrival is routed and submitted, and wakes its engine if idle;
an engine's step moves its clock to the event's time and calls `Engine.step()`, during which
the executor advances the clock by what each call costs. An engine that ran goes again at
the time its clock reached; one that waits for a batch timeout goes again at that time; an
idle one waits for an arrival.

A step is not cut short by events that fall inside it, as in the real engine, which admits
only between steps; after each executor call that ends past the next arrival that may go to
this engine, the executor raises the engine's stop flag, so the engine returns here and the
loop handles that arrival before this engine goes on (its requests then join at the next
step, as a real arrival would). A lone lane's run stops at the first step after that
arrival, as a real run stops at the next arrival of its own. Which arrivals may go to an
engine is the router's shortlist of each (see router.py), drawn ahead of the arrival: an
engine on none runs past it (other engines' steps, and arrivals it cannot receive, touch
nothing of it), so that a router that asks two engines does not stop all the others.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cellserve import heap
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine, EngineStats
from cellserve.engine.request import Request, Response
from cellserve.graph.model import Model
from cellserve.plan.profile import ModelProfile, ProfileError, Timing
from cellserve.sim.clock import VirtualClock
from cellserve.sim.executor import SimExecutor
from cellserve.sim.outcomes import OutcomeLog, SimOutcome
from cellserve.sim.router import RoundRobin, Router
from cellserve.sim.trace import SimArrival, SimTrace

STEP_SAMPLES = 100_000  # per-step samples an engine's statistics keep, by default (Simulation)


@dataclass(eq=False)
class SimEngine:
    name: str
    engine: Engine
    clock: VirtualClock
    models: frozenset[str]
    index: int  # its random stream's, and its number in the outcomes
    wake: Timing = Timing.fixed(0.0)  # an idle engine's wake-up (see ModelProfile.wake_s)
    scheduled: bool = False
    steps: int = 0
    upcoming: deque = field(default_factory=deque)  # indices of the arrivals shortlisted for it, in order

    @property
    def busy_until(self) -> float:
        return self.clock.now()


@dataclass
class SimStats:
    events: int = 0
    engine_steps: int = 0
    virtual_s: float = 0.0


class Simulation:
    """Engines (each with its models, profiles and engine configuration) behind a router.
    Build with `add_engine`, then `run` a trace once."""

    def __init__(self, router: Router | None = None, seed: int = 0, step_samples: int = STEP_SAMPLES):
        """`step_samples`: the per-step samples each engine's statistics keep (its time off
        the device and the like, EngineStats): many engines need fewer each, and a full
        window costs an allocation and a free far apart in memory at every step."""
        self.router = router or RoundRobin()
        self.step_samples = step_samples
        self.engines: list[SimEngine] = []
        self.stats = SimStats()
        self._seed = seed
        self._heap: list[tuple[float, int, SimEngine]] = []
        self._seq = itertools.count()
        self._trace = SimTrace()
        self._indices: Sequence[int] = range(0)  # the trace's index of each arrival this loop serves
        self._times: list[float] = []  # each one's arrival time
        self._model_index: list[int] = []  # and model (its index in the trace's models)
        self._next_arrival = 0
        self._shortlists: deque[list[SimEngine]] = deque()  # of arrivals _next_arrival .. _listed - 1
        self._listed = 0
        self._end = math.inf
        self._by_model: dict[str, list[SimEngine]] = {}
        self._executors: dict[str, SimExecutor] = {}

    def add_engine(self, models: list[Model], profiles: dict[str, ModelProfile], config: EngineConfig,
                   name: str | None = None, index: int | None = None) -> SimEngine:
        """An engine serving `models`, priced by `profiles` (one per model, by model name).
        Its random stream is the `index`-th of the simulation's seed (default: the number of
        engines added before it), so that an engine built alone in another process
        (sim/parallel.py) draws what it would here."""
        missing = [m.name for m in models if m.name not in profiles]
        if missing:
            raise ProfileError(f"no profile for models {missing} (profiles: {sorted(profiles)})")
        for m in models:
            if profiles[m.name].stack_layers != config.stack_layers:
                raise ProfileError(f"profile of {m.name!r} has stack_layers={profiles[m.name].stack_layers}, "
                                   f"the engine stack_layers={config.stack_layers}")
        clock = VirtualClock()
        index = len(self.engines) if index is None else index
        rng = np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(index,)))
        executor = SimExecutor({m.name: profiles[m.name] for m in models}, clock, rng)
        engine = Engine(models, config, clock, executors={"sim": executor})
        window = self.step_samples
        engine.stats = EngineStats(overhead_s=deque(maxlen=window), step_records=deque(maxlen=window),
                                   wake_delays=deque(maxlen=window))
        for model in engine.models.values():  # as served: stacking may have folded plain ops away
            executor.check_plain_ops(model)
        limit = min(p.max_batch for p in profiles.values())
        if engine.policy.max_batch > limit:
            raise ProfileError(f"the engine batches up to {engine.policy.max_batch} lanes, but the profiles' "
                               f"max_batch is {limit}")
        wake = max((profiles[m.name].wake_s for m in models), key=lambda t: t.mean)
        sim_engine = SimEngine(name or f"engine-{len(self.engines)}", engine, clock,
                               frozenset(m.name for m in models), index, wake)
        executor.next_arrival = lambda: self._next_arrival_for(sim_engine)
        executor.next_event = lambda: min(self._next_arrival_for(sim_engine), self._end)
        self._executors[sim_engine.name] = executor
        self.engines.append(sim_engine)
        for m in models:
            self._by_model.setdefault(m.name, []).append(sim_engine)
        return sim_engine

    @property
    def engine_stats(self) -> list[EngineStats]:
        """Each engine's statistics, in the order the engines were added."""
        return [e.engine.stats for e in self.engines]

    # ---- what the executors ask ----

    def _next_arrival_time(self) -> float:
        i = self._next_arrival
        return self._times[i] if i < len(self._times) else math.inf

    def _next_arrival_for(self, sim_engine: SimEngine) -> float:
        """When the next arrival that may go to `sim_engine` comes (inf: none will)."""
        upcoming = sim_engine.upcoming
        while not upcoming and self._listed < len(self._times):
            self._list_next()
        return self._times[upcoming[0]] if upcoming else math.inf

    def _list_next(self) -> None:
        """Ask the router for the shortlist of the first arrival not yet listed."""
        i = self._listed
        model = self._trace.models[self._model_index[i]]
        candidates = self._by_model[model]
        shortlist = candidates if len(candidates) == 1 else self.router.shortlist(model, candidates)
        self._shortlists.append(shortlist)
        for sim_engine in shortlist:
            sim_engine.upcoming.append(i)
        self._listed += 1

    # ---- the loop ----

    def run(self, arrivals: list[SimArrival] | SimTrace, drain_s: float = 30.0) -> list[SimOutcome]:
        """Serve `arrivals` (in time order; arrivals at one time in the order given); return
        one outcome per arrival, in completion order. Requests still unanswered `drain_s`
        after the last arrival are aborted (status error)."""
        if not self.engines:
            raise ValueError("a simulation needs at least one engine")
        trace = SimTrace.of(arrivals)
        unknown = sorted(set(trace.models) - set(self._by_model))
        if unknown:
            raise ValueError(f"the trace asks for models {unknown} that no engine serves")
        self._serve(trace, range(len(trace)))
        # the engines live for the whole run: out of the collector's passes (a collection
        # walks every tracked object; see heap.py and docs/performance.md)
        with heap.long_lived():
            return self._run(drain_s)

    def _serve(self, trace: SimTrace, indices: Sequence[int]) -> None:
        """Serve the arrivals of `trace` at `indices` (ascending) in the next run."""
        self._trace, self._indices = trace, indices
        self._times = trace.time_s[indices].tolist()
        self._model_index = trace.model[indices].tolist()
        self._next_arrival = self._listed = 0
        self._shortlists.clear()
        for sim_engine in self.engines:
            sim_engine.upcoming.clear()

    def _request(self, i: int) -> Request:
        """The request of arrival `i`, as its engine receives it."""
        trace, k = self._trace, self._indices[i]
        return Request(trace.models[self._model_index[i]], trace.inputs(k), timeout_s=trace.timeout(k),
                       priority=int(trace.priority[k]), arrival=self._times[i])

    def _run(self, drain_s: float) -> list[SimOutcome]:
        log = OutcomeLog()
        end = self._end = (self._times[-1] if self._times else 0.0) + drain_s
        while True:
            t_arrival = self._next_arrival_time()
            t_step = self._heap[0][0] if self._heap else math.inf
            if min(t_arrival, t_step) > end:
                break
            self.stats.events += 1
            if t_arrival <= t_step:
                self._arrive(self._next_arrival, log)
                self._next_arrival += 1
            else:
                t, _, sim_engine = heapq.heappop(self._heap)
                self._step(sim_engine, t)
        for sim_engine in self.engines:  # past the drain: answer what is left
            sim_engine.engine.abort_all("simulation ended before this request finished")
        first = self._times[0] if self._times else 0.0
        last = self._times[-1] if self._times else 0.0
        self.stats.virtual_s = max([last] + [e.clock.now() for e in self.engines]) - first
        return log.outcomes(self._trace.models, {e.index: e.name for e in self.engines})

    def _arrive(self, i: int, log: OutcomeLog) -> None:
        """Arrival `i` (the next): route and submit it."""
        if self._listed == i:
            self._list_next()
        shortlist = self._shortlists.popleft()
        for sim_engine in shortlist:
            sim_engine.upcoming.popleft()
        request = self._request(i)
        chosen = shortlist[0] if len(shortlist) == 1 else self.router.choose(request, shortlist, request.arrival)
        self._submit(chosen, request, i, log)

    def _submit(self, chosen: SimEngine, request: Request, i: int, log: OutcomeLog) -> None:
        """`request` (of arrival `i`) to the engine the router chose."""
        tag, model, engine = int(self._trace.tag[self._indices[i]]), self._model_index[i], chosen.index

        def on_done(response: Response) -> None:
            log.add(tag, model, engine, response)

        request.on_done = on_done
        idle = chosen.engine.idle()
        chosen.engine.submit(request)
        if not chosen.scheduled:
            # an engine that was waiting for work takes a while to notice it (a real one
            # wakes from a wait on an event)
            wake = self._executors[chosen.name].sample(chosen.wake) if idle else 0.0
            self._schedule(chosen, max(request.arrival, chosen.clock.now()) + wake)

    def _schedule(self, sim_engine: SimEngine, t: float) -> None:
        sim_engine.scheduled = True
        heapq.heappush(self._heap, (t, next(self._seq), sim_engine))

    def _step(self, sim_engine: SimEngine, t: float) -> None:
        """Step `sim_engine` at `t`, its entry just taken off the heap."""
        sim_engine.scheduled = False
        clock, engine = sim_engine.clock, sim_engine.engine
        clock.move_to(t)
        ran = engine.step()
        sim_engine.steps += 1
        self.stats.engine_steps += 1
        if ran or engine.queued_requests:
            self._schedule(sim_engine, clock.now())
        elif not engine.idle():
            wake = engine.wake_at(clock.now())
            if wake is not None:
                self._schedule(sim_engine, max(wake, clock.now()))
