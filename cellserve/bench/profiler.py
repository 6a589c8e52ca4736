"""`cellserve profile`: measure what each piece of a model's work costs on this machine.

Costs are measured where they occur: in the real engine serving the benchmarks' trace, open
loop, at a light, a busy, a near-saturated and an overloaded rate (SERVING_SHARES of its
closed-loop capacity), with the kernel threads pinned as a server pins them.
There each executor call is timed as the engine makes it, with the caches and threads as
serving leaves them, which is slower than the same call repeated in a tight loop (a lane's
weights are not in cache after another request's plain ops ran). From those runs come: each
batch size's step and a lone lane's step, a lane's start and finish per token, each plain op,
a decoder's steps per lane, an idle engine's wake-up, and the engine's own time around the
device's (HostProfile, fitted to every step's time off the device against its batch size,
the lanes it started and finished, the requests it took in and the runs its drop check priced).

Serving does not reach every batch size, so every cell type is also timed alone on dummy
lanes at each size from 1 to the cap; a size serving did not show (at least
`_MIN_SAMPLES` times) takes that figure scaled by the median ratio, serving over alone, of the
sizes it did. No batch size is priced much above a larger one (see _monotone).
"""

from __future__ import annotations

import math
import platform
import threading
import time
from dataclasses import replace

import numpy as np
import torch

from cellserve import heap
from cellserve.bench.engine_runner import replay
from cellserve.bench.host import cpu_name
from cellserve.bench.traces import MIN_REQUESTS, SequenceInput, TraceRequest, sequence_input, trace_at_rate
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.executor.base import LaneStarted, StepResult
from cellserve.executor.batch import StepBatch
from cellserve.executor.kernel import KernelExecutor
from cellserve.graph.model import DenseNode, Model
from cellserve.plan.profile import CellTypeProfile, HostProfile, IdleBucket, Machine, ModelProfile, Timing, step_flops

_DECODER_MEMORY = 16  # source length of a decoder's dummy lanes
_MIN_SAMPLES = 5  # serving's samples of a batch size before they replace the timing alone
# A step that follows its executor's previous step by more than this came after an idle
# spell: it is left out of the warm costs and priced by CellTypeProfile.idle_extra_s, in
# buckets of that spell's length up to these bounds (seconds; the last one takes the rest)
_IDLE_AFTER_S = 0.00025
_IDLE_BOUNDS_S = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, math.inf)
_STEP_SLACK = 1.1  # a batch size's step may cost this much more than a larger one's (see _monotone)
_IDLE_DRAWS = 20  # an idle bucket's draws (IdleBucket.draws_s): each stands for 5% of the steps
# of the closed-loop capacity: light, busy, near saturation and past it (where refusals and
# backlogs show what arrivals and drop checks cost the engine: HostProfile.request_s, check_s_per_run)
SERVING_SHARES = (0.2, 0.6, 0.9, 1.3)
DEFAULT_DEADLINE_S = 0.2  # the serving runs' deadline (see _serve_and_fit): the benchmarks' SLO
DEADLINE_LATENCIES = 10  # ... or this many times a lightly loaded request's latency, if longer


class RecordingExecutor(KernelExecutor):
    """A KernelExecutor that also keeps what the profile needs from real serving: each plain
    op's times, and each decoder lane's source length and steps."""

    def __init__(self, device: str = "cpu", backend: str | None = None):
        super().__init__(device, backend)
        self.recording = False
        self.plain: dict[str, list[tuple[float, float]]] = {}  # plain op -> (spell since its last run, seconds)
        self._plain_end: dict[str, float] = {}  # plain op -> perf_counter when its last run returned
        self.decode_steps: dict[str, dict[int, dict[int, int]]] = {}  # decoder -> memory -> steps -> lanes
        # cell type -> batch -> seconds of batched steps that followed a step of the same type
        self.steps: dict[str, dict[int, list[float]]] = {}
        self.cold_steps: dict[str, dict[int, list[float]]] = {}  # ... that followed other work
        self.lone: dict[str, list[tuple[int, float, bool]]] = {}  # cell type -> (lane-steps, seconds, cold)
        # cell type -> steps that came after an idle spell (see _IDLE_AFTER_S):
        # (spell seconds, lone run?, batch size, lane-steps, cold, seconds)
        self.after_idle: dict[str, list[tuple[float, bool, int, int, bool, float]]] = {}
        self._previous: str | None = None  # cell type of the last call, when it was a step
        self._last_step_end = -math.inf  # perf_counter when the last step (of any cell type) returned
        self.starts: dict[str, list[float]] = {}  # cell type -> seconds per token of a lane's start
        self.finishes: dict[str, list[float]] = {}
        self._decoding: dict[tuple[str, int], list[int]] = {}  # (cell type, slot) -> [memory, steps]

    def run_plain(self, model: str, nodes: tuple[DenseNode, ...], env: dict) -> float:
        """The group's ops one by one, each timed: a profile prices each op (plain_ops_s)."""
        self._previous = None
        total = 0.0
        for node in nodes:
            t0 = time.perf_counter()
            seconds = super().run_plain(model, (node,), env)
            if self.recording:  # with the spell since this op's last run ended (ModelProfile.plain_idle_extra_s)
                spell = t0 - self._plain_end.get(node.name, -math.inf)
                self.plain.setdefault(node.name, []).append((spell, seconds))
            self._plain_end[node.name] = time.perf_counter()
            total += seconds
        return total

    def start_lane(self, cell_type, x, states) -> LaneStarted:
        self._previous = None
        started = super().start_lane(cell_type, x, states)
        if self.recording:
            self.starts.setdefault(cell_type, []).append(started.busy_s / max(started.storage.length, 1))
        if self._specs[cell_type].is_decoder:
            self._decoding[(cell_type, started.storage.slot)] = [started.storage.length, 0]
        return started

    def execute(self, batch: StepBatch, slots, rows, lone_steps, stop) -> StepResult:
        t0 = time.perf_counter()
        result = super().execute(batch, slots, rows, lone_steps, stop)
        spell, self._last_step_end = t0 - self._last_step_end, time.perf_counter()
        cold = self._previous != batch.cell_type
        self._previous = batch.cell_type
        if self.recording:
            if spell > _IDLE_AFTER_S:
                self.after_idle.setdefault(batch.cell_type, []).append(
                    (spell, bool(lone_steps), batch.size, result.steps * batch.size, cold, result.busy_s))
            elif lone_steps:
                self.lone.setdefault(batch.cell_type, []).append((result.steps * batch.size, result.busy_s, cold))
            else:
                table = self.cold_steps if cold else self.steps
                table.setdefault(batch.cell_type, {}).setdefault(batch.size, []).append(result.busy_s)
        if self._specs[batch.cell_type].is_decoder:
            for slot in batch.slots:
                entry = self._decoding.get((batch.cell_type, slot))
                if entry is not None:
                    entry[1] += result.steps
        return result

    def finish_lane(self, cell_type, storage):
        self._previous = None
        entry = self._decoding.pop((cell_type, storage.slot), None)
        if entry is not None and self.recording:
            hist = self.decode_steps.setdefault(cell_type, {}).setdefault(entry[0], {})
            hist[entry[1]] = hist.get(entry[1], 0) + 1
        finished = super().finish_lane(cell_type, storage)
        if self.recording:
            self.finishes.setdefault(cell_type, []).append(finished.busy_s / max(storage.length, 1))
        return finished

    def release_lane(self, cell_type, storage) -> None:
        self._previous = None
        self._decoding.pop((cell_type, storage.slot), None)
        super().release_lane(cell_type, storage)


def model_trace(model: Model, seed: int, rate_rps: float, seconds: float, bursty: bool = False,
                min_requests: int = MIN_REQUESTS) -> list[TraceRequest]:
    """The benchmarks' trace (bench/traces.py) for any model of one sequence input: WMT-like
    lengths cut at the model's longest sequence, token ids in its vocabulary or feature rows."""
    seq = sequence_input(model)
    return trace_at_rate(seed, rate_rps, seconds, seq.vocab or 0, bursty=bursty, min_requests=min_requests,
                         inputs=seq.sampler())


def profile_model(model: Model, config: EngineConfig, threads: int | None = None, quick: bool = False,
                  seed: int = 0, log=print, deadline_s: float | None = None) -> ModelProfile:
    """Measure `model` served by an engine with `config` (its backend, cap and stacking).
    `deadline_s`: the deadline the serving runs' requests carry, past the light one (see
    _serve_and_fit; None: DEFAULT_DEADLINE_S, or more for a slow model)."""
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"the profiling runs' deadline must be > 0 seconds, got {deadline_s}")
    sequence_input(model)  # the serving runs drive it with traces: refuse now, not after the kernels' timing
    if threads:
        torch.set_num_threads(threads)
    executor = RecordingExecutor(config.device, config.backend)
    engine = Engine([model], replace(config, profile=True), executors={"cpu": executor})
    heap.settle()  # as the server does once started (see heap.py): no collector pass over start-up's objects
    with executor.pinned(config.pin_threads):  # as serving runs the kernels (Engine.serve_forever)
        return _measure(model, config, engine, executor, quick, seed, log, deadline_s)


def _measure(model: Model, config: EngineConfig, engine: Engine, executor: RecordingExecutor, quick: bool,
             seed: int, log, deadline_s: float | None) -> ModelProfile:
    served = engine.models[model.name]
    reps = 10 if quick else 30
    alone = {}
    for cell_type in engine.cell_types:
        log(f"timing {cell_type} alone at batch 1..{engine.policy.max_batch}")
        alone[cell_type] = _profile_cell(executor, cell_type, engine.policy.max_batch, reps)
    log("serving the benchmark trace, light and heavy, to time every call in place")
    host, wake, capacity = _serve_and_fit(engine, executor, served, seed, quick, deadline_s, log)
    log(f"  closed-loop capacity {capacity:.0f} req/s; host cost per step {host.step_s * 1e6:.1f} us "
        f"+ {host.step_s_per_lane * 1e6:.2f} us/lane, per lane started {host.lane_start_s * 1e6:.1f} us, "
        f"finished {host.lane_finish_s * 1e6:.1f} us, per request taken in {host.request_s * 1e6:.1f} us, "
        f"per run a drop check prices {host.check_s_per_run * 1e6:.2f} us; wake-up {wake.mean * 1e6:.0f} us")
    cells = {t: _in_place(alone[t], executor, t, log) for t in engine.cell_types}
    plain = {name: _plain_op(calls) for name, calls in executor.plain.items()}  # name -> (warm timing, buckets)
    profile = ModelProfile(
        model=model.name, machine=_machine(executor), max_batch=engine.policy.max_batch,
        stack_layers=config.stack_layers, cell_types=cells,
        plain_ops_s={name: timing for name, (timing, _) in plain.items()},
        plain_idle_extra_s={name: buckets for name, (_, buckets) in plain.items() if buckets},
        host=host, hand_back_s=_hand_back(200 if quick else 1000), wake_s=wake,
        weight_bytes={str(executor.device): executor.memory_bytes()},
        decode_steps={t: {m: dict(sorted(h.items())) for m, h in sorted(by_memory.items())}
                      for t, by_memory in executor.decode_steps.items()})
    suspect = profile.suspect()
    if suspect:
        log(f"warning: {len(suspect)} figure(s) look like the machine's noise, not the model's cost (profile it "
            "again on a quiet machine): " + "; ".join(suspect[:6]) + (" ..." if len(suspect) > 6 else ""))
    return profile


def _in_place(alone: CellTypeProfile, executor: RecordingExecutor, cell_type: str, log) -> CellTypeProfile:
    """The cell type's costs as serving showed them (see the module docstring): a step that
    followed a step of its own type (warm), and what one that followed other work costs more."""
    seen = {b: xs for b, xs in executor.steps.get(cell_type, {}).items() if len(xs) >= _MIN_SAMPLES}
    ratios = [float(np.mean(xs)) / alone.step_s[b].mean for b, xs in seen.items() if b in alone.step_s]
    scale = float(np.median(ratios)) if ratios else 1.0
    steps, capped = _monotone({b: Timing.of(seen[b], trim=True) if b in seen else _scaled(t, scale)
                               for b, t in alone.step_s.items()})
    extra = [x - steps[b].mean for b, xs in executor.cold_steps.get(cell_type, {}).items() if b in steps for x in xs]
    cold = max(float(np.median(extra)), 0.0) if len(extra) >= _MIN_SAMPLES else 0.0
    lone, call, lone_cold = alone.lone_step_s, 0.0, 0.0
    after_idle = executor.after_idle.get(cell_type, [])
    if lone is not None:
        runs = executor.lone.get(cell_type, [])
        if len(runs) < _MIN_SAMPLES:  # too few runs but after idle spells: fit them all (no idle extra then)
            runs = runs + [(lanes, busy, c) for _, is_lone, _, lanes, c, busy in after_idle if is_lone]
            after_idle = [a for a in after_idle if not a[1]]
        if len(runs) >= _MIN_SAMPLES:
            lone, call, lone_cold = _fit_lone(runs)
        else:
            lone = _scaled(lone, scale)
    fitted = replace(alone, step_s=steps, lone_step_s=lone, lone_call_s=call, cold_s=cold, lone_cold_s=lone_cold)
    idle = _idle_buckets(fitted, after_idle)
    starts, finishes = executor.starts.get(cell_type), executor.finishes.get(cell_type)
    capped_text = f"; {capped[:8]}{' ...' if len(capped) > 8 else ''} at a larger batch's cost" if capped else ""
    log(f"  {cell_type}: serving showed batch sizes {sorted(seen)[:12]}{' ...' if len(seen) > 12 else ''} "
        f"(others: {scale:.2f}x the timing alone{capped_text}); "
        f"a step after other work costs {cold * 1e6:.0f} us more, "
        f"a lone run {lone_cold * 1e6:.0f} us; after an idle spell " + (", ".join(
            f"<= {b.up_to_s * 1e3:.2g} ms: +{b.extra_s * 1e6:.0f} us" for b in idle[1:]) if idle else "(none seen)"))
    # the means (but for the top 1%, stalls of the machine), not the medians: a lane's start
    # and finish are right-skewed (slower after idle spells), and the simulator charges each one
    return replace(fitted, idle_extra_s=idle,
                   start_s_per_token=Timing.of(starts, trim=True).mean if starts else alone.start_s_per_token,
                   finish_s_per_token=Timing.of(finishes, trim=True).mean if finishes else alone.finish_s_per_token)


def _plain_op(calls: list[tuple[float, float]]) -> tuple[Timing, tuple[IdleBucket, ...]]:
    """A plain op's warm timing (the runs that followed its previous run within _IDLE_AFTER_S)
    and, over it, what runs after longer spells cost more (ModelProfile.plain_idle_extra_s);
    with too few warm runs, all of them and no buckets."""
    warm = [x for spell, x in calls if spell <= _IDLE_AFTER_S]
    if len(warm) < _MIN_SAMPLES:
        return Timing.of([x for _, x in calls], trim=True), ()
    timing = Timing.of(warm, trim=True)
    return timing, _buckets([(spell, x - timing.mean) for spell, x in calls
                             if _IDLE_AFTER_S < spell < math.inf])  # inf: its first run


def _idle_buckets(cell: CellTypeProfile, after_idle: list[tuple[float, bool, int, int, bool, float]]
                  ) -> tuple[IdleBucket, ...]:
    """CellTypeProfile.idle_extra_s from the steps serving ran after idle spells: per bucket
    of spell length (_IDLE_BOUNDS_S; one with fewer than _MIN_SAMPLES steps joins the next
    longer one, the last one the one before), what each step took over what the warm costs
    price it at, as draws (_idle_bucket). The first bucket, up to _IDLE_AFTER_S, is the warm
    steps' own: nothing extra."""
    extras = []
    for spell, is_lone, size, lanes, cold, busy in after_idle:
        if is_lone:
            priced = size * cell.lone_call_s + lanes * cell.lone_step_s.mean + (cell.lone_cold_s if cold else 0.0)
        else:
            priced = cell.step_s[size].mean + (cell.cold_s if cold else 0.0)
        extras.append((spell, busy - priced))
    return _buckets(extras)


def _buckets(extras: list[tuple[float, float]]) -> tuple[IdleBucket, ...]:
    """IdleBuckets of (spell, seconds over the warm price) pairs, as _idle_buckets describes,
    led by one up to _IDLE_AFTER_S with nothing extra; () when there are too few."""
    groups: list[list[float]] = [[] for _ in _IDLE_BOUNDS_S]
    spells: list[float] = [0.0 for _ in _IDLE_BOUNDS_S]
    for spell, extra in extras:
        i = next(i for i, bound in enumerate(_IDLE_BOUNDS_S) if spell <= bound)
        groups[i].append(extra)
        spells[i] = max(spells[i], spell)
    buckets: list[tuple[float, list[float]]] = []
    pending: list[float] = []
    for bound, spell, xs in zip(_IDLE_BOUNDS_S, spells, groups):
        pending += xs
        if len(pending) >= _MIN_SAMPLES:
            buckets.append((bound if math.isfinite(bound) else spell, pending))
            pending = []
    if pending and buckets:
        bound, xs = buckets.pop()
        buckets.append((max(bound, max(spells)), xs + pending))
    if not buckets:
        return ()
    return (IdleBucket(_IDLE_AFTER_S, 0.0),) + tuple(_idle_bucket(bound, xs) for bound, xs in buckets)


def _idle_bucket(up_to_s: float, extras: list[float]) -> IdleBucket:
    """One bucket of _buckets: the extras but for their top 1% (stalls while measuring), as
    _IDLE_DRAWS equally likely draws, the i-th the mean of the extras between the i-th and
    the next quantile of _IDLE_DRAWS (a value straddling two shares counts in both, for its
    part), so that the draws' mean is the extras'; a mean at or below zero is no extra at all."""
    xs = np.sort(np.asarray(extras, dtype=np.float64))[:max(1, math.ceil(0.99 * len(extras)))]
    n, k = len(xs), _IDLE_DRAWS
    area = np.concatenate([[0.0], np.cumsum(xs)])  # area[j]: the sum of the j smallest
    at = np.arange(k + 1) * n / k  # each share's edges, in values
    whole = np.minimum(np.floor(at).astype(int), n - 1)
    upto = area[whole] + (at - whole) * xs[whole]  # the sum of the values below each edge
    draws = np.diff(upto) * k / n
    mean = float(area[n] / n)
    return IdleBucket(up_to_s, mean, tuple(draws.tolist())) if mean > 0 else IdleBucket(up_to_s, 0.0)


def _fit_lone(runs: list[tuple[int, float, bool]]) -> tuple[Timing, float, float]:
    """A lone run's cost as one per step, one per call and one more when it follows other work
    (see CellTypeProfile.cold_s), fitted to serving's runs with no negative term; the
    per-step spread from what the fit leaves, but for its top 1% (stalls of the machine)."""
    steps, busy, cold = np.array(runs, dtype=np.float64).T
    x = np.column_stack([steps, np.ones(len(steps)), cold])
    per_step, call, cold_extra = _nonnegative_lstsq(x, busy)
    if per_step <= 0:  # no usable trend: all of it per step
        per_step, call, cold_extra = float(np.sum(busy) / np.sum(steps)), 0.0, 0.0
    residual = np.abs(busy - x @ np.array([per_step, call, cold_extra])) / steps
    p99 = float(np.percentile(residual, 99))
    return (Timing(float(per_step), float(np.std(residual[residual <= p99])), float(per_step + p99), len(runs)),
            float(call), float(cold_extra))


def _monotone(steps: dict[int, Timing]) -> tuple[dict[int, Timing], list[int]]:
    """The step table with no batch size more than _STEP_SLACK dearer than a larger one: such
    a size takes the cheapest larger size's timing (a batch of more lanes does not run faster:
    its samples caught the machine's stalls, which a quick profile's few samples do not average
    out; smaller differences are left alone, as the cap's minimum of noisy means would price
    low), and the batch sizes so capped."""
    out, capped, cheapest = {}, [], None
    for b in sorted(steps, reverse=True):
        t = steps[b]
        if cheapest is not None and t.mean > _STEP_SLACK * cheapest.mean:
            out[b] = cheapest
            capped.append(b)
        else:
            out[b] = t
            if cheapest is None or t.mean < cheapest.mean:
                cheapest = t
    return dict(sorted(out.items())), sorted(capped)


def _scaled(t: Timing, factor: float) -> Timing:
    return Timing(t.mean * factor, t.std * factor, t.p99 * factor, t.n)


def _profile_cell(executor: KernelExecutor, cell_type: str, max_batch: int, reps: int) -> CellTypeProfile:
    kernel, spec = executor.kernels[cell_type], executor._specs[cell_type]
    length = _DECODER_MEMORY if spec.is_decoder else 32
    steps = {}
    for b in range(1, max_batch + 1):
        lanes = [executor.dummy_lane(cell_type, length) for _ in range(b)]
        slots = np.array([s.slot for s in lanes], np.int64)
        rows = np.array([s.base for s in lanes], np.int64)
        samples = []
        for i in range(reps + 2):  # two warm-up steps
            t0 = time.perf_counter()
            kernel.step_batch(slots, rows)
            if i >= 2:
                samples.append(executor._since(t0))
        steps[b] = Timing.of(samples)
        for lane in lanes:
            kernel.release(lane)
    lone = None
    if kernel.lone_lanes:
        samples = []
        # a decoder's dummy lane may emit EOS at once: timed for its steps regardless
        until = {"stop_at_eos": False} if spec.is_decoder else {}
        for _ in range(reps):
            lane = executor.dummy_lane(cell_type, length if spec.is_decoder else 64)
            t0 = time.perf_counter()
            ran = kernel.run_lane(lane.slot, lane.base, 1, 32, **until)
            samples.append(executor._since(t0) / ran)
            kernel.release(lane)
        lone = Timing.of(samples)
    start, finish = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        lane = executor.dummy_lane(cell_type, length)
        start.append(executor._since(t0) / length)
        t0 = time.perf_counter()
        kernel.finish_lane(lane)
        finish.append(executor._since(t0) / length)
    kind = "decoder" if spec.is_decoder else "stack" if hasattr(spec.step, "layers") else "layer"
    return CellTypeProfile(kind, kernel.lone_lanes, steps, lone, float(np.median(start)), float(np.median(finish)),
                           flops_per_step=step_flops(spec.step))


def _serve_and_fit(engine: Engine, executor: RecordingExecutor, model: Model, seed: int, quick: bool,
                   deadline_s: float | None, log) -> tuple[HostProfile, Timing, float]:
    """Serve the trace at SERVING_SHARES of the closed-loop capacity, recording every call; fit
    the host cost and the wake-up. The trace's seed differs from the benchmarks' (a profile
    is not fitted to the runs it is checked against).
    The first (light) run's requests carry no deadline; the others carry `deadline_s`, so
    that the engine refuses and drops past capacity as it does when serving (and the fit
    sees what those cost). None: DEFAULT_DEADLINE_S, or DEADLINE_LATENCIES times the light
    run's median latency if that is longer (a slow model's every request would be refused)."""
    seq = sequence_input(model)
    capacity = 0.0
    for i in range(2):  # the first burst warms caches and thread pools: the best of two
        burst = model_trace(model, seed + 7 + i, 1.0, 1.0, min_requests=300)
        t0 = time.perf_counter()
        for item in burst:
            engine.submit(_request(model, seq, item))
        engine.run_until_idle(timeout_s=300)
        capacity = max(capacity, len(burst) / (time.perf_counter() - t0))
    seconds = 2.0 if quick else 4.0
    records, wakes = [], []
    executor.recording = True
    deadline = None
    for share in SERVING_SHARES:
        rate = max(capacity * share, 1.0)
        run = replay(engine, model.name, seq.name, model_trace(model, seed + 1000, rate, seconds), "profile", rate,
                     deadline)
        records += engine.stats.step_records  # replay starts each run with fresh stats
        wakes += engine.stats.wake_delays
        if deadline is None:
            latencies = [o.finish_s - o.arrival_s for o in run.outcomes if o.status == "ok"]
            deadline = deadline_s or max(DEFAULT_DEADLINE_S, DEADLINE_LATENCIES * float(np.median(latencies or [0.0])))
            log(f"  serving at {SERVING_SHARES[1:]} of capacity with a deadline of {deadline * 1e3:.0f} ms")
    executor.recording = False
    return _fit_host(np.array(records, dtype=np.float64)), Timing.of(wakes or [0.0], trim=True), capacity


def _request(model: Model, seq: SequenceInput, item: TraceRequest):
    from cellserve.engine.request import Request
    return Request(model.name, seq.request_inputs(item.sequence))


def _fit_host(records: np.ndarray) -> HostProfile:
    """Least squares of time off the device against [1, batch, lanes started, lanes
    finished, requests taken in, runs the drop check priced] per step (EngineStats.step_records),
    with no coefficient below zero (see _nonnegative_lstsq). Steps whose
    time off the device is far past the rest (the feeder thread or another process held the
    CPU) are left out: the fit is of the engine's own work."""
    y = records[:, 0]
    keep = y <= np.percentile(y, 99)
    x = np.column_stack([np.ones(len(records)), records[:, 1:6]])[keep]
    return HostProfile(*map(float, _nonnegative_lstsq(x, y[keep])))


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of y against x's columns with no coefficient below zero: while one is
    negative, the most negative column is dropped (its coefficient 0) and the rest refitted.
    A cost the samples show no sign of is zero, never a negative figure that the others make
    up for."""
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))
    full = np.zeros(x.shape[1])
    full[active] = np.maximum(coef, 0.0)
    return full


def _hand_back(n: int) -> Timing:
    """A response passed to another thread: set an event, time until the waiter runs."""
    ready, done = threading.Event(), threading.Event()
    stamps: list[float] = []

    def waiter() -> None:
        for _ in range(n):
            ready.wait()
            ready.clear()
            stamps.append(time.perf_counter())
            done.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    samples = []
    for _ in range(n):
        done.clear()
        t0 = time.perf_counter()
        ready.set()
        done.wait()
        samples.append(stamps[-1] - t0)
    thread.join()
    return Timing.of(samples)


def _machine(executor: KernelExecutor) -> Machine:
    name = cpu_name()
    if executor.device.type == "cuda":
        name = torch.cuda.get_device_name(executor.device)
    backends = [getattr(k, "backend", None) for k in executor.kernels.values()]
    backend = next((b for b in backends if b), executor.backend)
    return Machine(device=str(executor.device), name=name, threads=torch.get_num_threads(),
                   backend=backend or "torch",
                   versions={"python": platform.python_version(), "torch": torch.__version__,
                             "numpy": np.__version__})
