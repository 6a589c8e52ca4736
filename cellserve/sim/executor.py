"""`SimExecutor`: an executor that computes nothing and charges virtual time from profiles.

It stands where a real executor stands, so the engine above it (admission, scheduling, each
request's walk) runs unchanged. Each call advances the engine's virtual clock by the device
time the profile gives (sampled around the mean with the measured spread, from a seeded
generator) plus the engine's own time around it (the profile's HostProfile, which the real
engine spends in Python and the simulation would otherwise get for free; what the engine does
beside any executor call, taking arrivals in and checking for late runs, it reports through
`engine_work`, charged the same way); a step after a spell
with no step costs more, as measured (CellTypeProfile.idle_extra_s: each such step draws one
of its bucket's measured extras, so that a rare stall stays rare). Outputs have the
right shapes and are zeros; plain ops run for real once per input shapes (the model's heads
need their inputs' shapes) and are reused after, priced from the profile. Decoder lanes end after as many steps as
a lane of the same source length took when the model was profiled.

Nothing is made up: a cell type, batch size or plain op the profile lacks is a ProfileError.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Callable

import numpy as np

from cellserve.executor.base import BeamStarted, CellTypeSpec, Executor, LaneFinished, LaneStarted, StepResult
from cellserve.executor.batch import StepBatch
from cellserve.graph import dense_ops
from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, Model, layers_of
from cellserve.kernels.cell import LaneStorage
from cellserve.kernels.decoder import BeamCandidates
from cellserve.plan.profile import (CellTypeProfile, IdleBucket, ModelProfile, ProfileError, Timing, check_step,
                                    idle_bucket)
from cellserve.sim.clock import VirtualClock

_KIND = {"decoder": GraphDecoder, "stack": LayerStack}
_BLOCK = 1024  # samples drawn at once per timing (see SimExecutor.sample)


def _never() -> float:
    return math.inf


def _shape_key(a) -> tuple | None:
    """What a plain op's output depends on, of one input, in the simulation: shape and dtype."""
    if a is None:
        return None
    if type(a) is np.ndarray:
        return a.shape, a.dtype
    a = np.asarray(a)
    return a.shape, a.dtype


class SimExecutor(Executor):
    """`profiles`: one per model the engine serves (keyed by model name, as the engine names
    it). `next_arrival` returns the virtual time of the next arrival that may go to this
    engine, `next_event` that or the end of the run if sooner (see sim/loop.py): a lone
    lane's run stops at the first step after the next arrival, and after any call that ends
    past `next_event` the executor raises the engine's stop flag so that the engine returns
    to the loop."""

    def __init__(self, profiles: dict[str, ModelProfile], clock: VirtualClock, rng: np.random.Generator,
                 name: str = "sim", next_event: Callable[[], float] = _never,
                 next_arrival: Callable[[], float] = _never):
        if not profiles:
            raise ValueError("a SimExecutor needs at least one profile")
        self.profiles, self.clock, self.rng, self.name = profiles, clock, rng, name
        self.next_event, self.next_arrival = next_event, next_arrival
        self._cells: dict[str, CellTypeProfile] = {}
        self._specs: dict[str, CellTypeSpec] = {}
        self._host = {}
        # the engine's own time for arrivals and drop checks (engine_work): with several models
        # served, the dearest profile's (the engine's code is the same for all)
        self._engine_host = max((p.host for p in profiles.values()), key=lambda h: (h.request_s, h.check_s_per_run))
        self._slots = iter(range(1, 1 << 62))
        self._decoding: dict[int, list[int]] = {}  # slot -> [steps to run, steps run, memory length]
        # a beam row's slots: slot -> (its row's width, the row's slots, the row's live slots),
        # live as GraphDecoderKernel keeps them (start_beam's first, reorder's destinations)
        self._beams: dict[int, tuple[int, list[int], set[int]]] = {}
        # decoder -> (memory lengths profiled, ascending; per length: steps seen and their
        # cumulative lane counts), to draw a lane's steps from the profile's histogram
        self._decode_table: dict[str, tuple[list[int], dict[int, tuple[list[int], list[int]]]]] = {}
        self._zeros = np.zeros((0, 0), np.float32)
        self._plain_outputs: dict[tuple, list] = {}  # (model, first op, ops, input shapes) -> outputs
        # (model, first op, ops) of a group run by one call -> (the names it reads from outside
        # itself, each op's (model, op) key, timing and idle-extra buckets)
        self._plain_groups: dict[tuple[str, str, int], tuple[list[str], list[tuple]]] = {}
        self._plain_last: dict[tuple[str, str], float] = {}  # (model, op) -> virtual time its last run ended
        self._previous: str | None = None  # cell type of the last call, when it was a step
        self._last_step_end = -math.inf  # virtual time the last step (of any cell type) ended
        self._blocks: dict[int, list] = {}  # id of a Timing -> [it (kept alive), next index, samples]
        self._uniforms: list[float] = []  # uniform draws in [0, 1), taken from the end (see draw_idle_extra)
        self._flops: dict = {}  # cell type -> flops of one lane's step; (decoder, memory length) -> ...

    # ---- cell types ----

    def _profile(self, model: str) -> ModelProfile:
        profile = self.profiles.get(model)
        if profile is None:
            raise ProfileError(f"no profile for model {model!r} on executor {self.name!r} "
                               f"(profiles: {sorted(self.profiles)})")
        return profile

    def add_cell_type(self, spec: CellTypeSpec) -> None:
        model = spec.cell_type.split("/", 1)[0]
        profile = self._profile(model)
        cell = check_step(profile, spec.cell_type, spec.step)
        expected = _KIND.get(cell.kind)
        if (expected is None and isinstance(spec.step, (GraphDecoder, LayerStack))) or (
                expected is not None and not isinstance(spec.step, expected)):
            raise ProfileError(f"profile.cell_types[{spec.cell_type!r}].kind is {cell.kind!r}, but the model's "
                               f"cell type is a {type(spec.step).__name__}")
        self._cells[spec.cell_type] = cell
        self._specs[spec.cell_type] = spec
        self._host[spec.cell_type] = profile.host
        if cell.kind != "decoder":
            self._flops[spec.cell_type] = spec.step.flops_per_step()
        if cell.kind == "decoder":
            table = {memory: (list(hist), list(itertools.accumulate(hist.values())))
                     for memory, hist in profile.decode_steps[spec.cell_type].items()}
            self._decode_table[spec.cell_type] = (sorted(table), table)

    def check_plain_ops(self, model: Model) -> None:
        """Refuse `model` (as the engine serves it) when its profile lacks a plain op the
        model runs: found at start, not at the first request, so that a profile of another
        version of the model stops a run instead of failing every request."""
        profile = self._profile(model.name)
        missing = [s.name for s in model.program if isinstance(s, DenseNode) and s.name not in profile.plain_ops_s]
        if missing:
            raise ProfileError(f"profile of model {model.name!r} has no plain_ops_s[{missing[0]!r}] "
                               f"({len(missing)} of the model's plain ops missing; the profile has "
                               f"{sorted(profile.plain_ops_s)}): was it made from another version of the "
                               f"model? Profile it again (cellserve profile)")

    def lone_lanes(self, cell_type: str) -> int:
        return self._cells[cell_type].lone_lanes

    def memory_bytes(self) -> int:
        models = {t.split("/", 1)[0] for t in self._cells}
        return sum(max(self.profiles[m].weight_bytes.values(), default=0) for m in models)

    # ---- pricing ----

    def sample(self, t: Timing, n: int = 1) -> float:
        """n samples' sum, each drawn from a gamma with the timing's mean and spread
        (positive, right-skewed like step times), from the seeded generator. Single samples
        (a batched step's) are drawn _BLOCK at a time per timing: a draw per call cost about
        as much as the rest of the executor's work for a step. A sum is one draw of a gamma
        with n times the shape."""
        if t.std <= 0 or t.mean <= 0:
            return n * t.mean
        if n > 1:
            return float(self.rng.gamma(n * (t.mean / t.std) ** 2, t.std ** 2 / t.mean))
        entry = self._blocks.get(id(t))
        if entry is None or entry[1] == _BLOCK:
            shape, scale = (t.mean / t.std) ** 2, t.std ** 2 / t.mean
            entry = self._blocks[id(t)] = [t, 0, (self.rng.standard_gamma(shape, _BLOCK) * scale).tolist()]
        i = entry[1]
        entry[1] = i + 1
        return entry[2][i]

    def draw_idle_extra(self, buckets: tuple[IdleBucket, ...], gap_s: float) -> float:
        """What a call costs on top after a spell of `gap_s` seconds (see IdleBucket): one of
        its bucket's draws, equally likely, from the seeded generator (drawn _BLOCK at a time);
        the bucket's mean where it has none."""
        bucket = idle_bucket(buckets, gap_s)
        if bucket is None:
            return 0.0
        draws = bucket.draws_s
        if not draws:
            return bucket.extra_s
        if not self._uniforms:
            self._uniforms = self.rng.random(_BLOCK).tolist()
        return draws[int(self._uniforms.pop() * len(draws))]

    def _charge(self, busy: float, host: float) -> None:
        self.clock.advance(busy + host)

    # ---- lanes ----

    def start_lane(self, cell_type: str, x: np.ndarray, states: list[tuple] | None) -> LaneStarted:
        cell, spec = self._cells[cell_type], self._specs[cell_type]
        self._previous = None
        length = int(x.shape[0])
        slot = next(self._slots)
        if cell.kind == "decoder":
            self._decoding[slot] = [self._decode_steps(cell_type, length), 0, length]
        busy = cell.start_s_per_token * length
        self._charge(busy, self._host[cell_type].lane_start_s)
        flops = 0.0 if cell.kind == "decoder" else length * spec.step.flops_per_token_projection()
        return LaneStarted(LaneStorage(slot, 0, length), busy, flops)

    # Beam search, priced: the steps of a row's hypotheses are the decoder's batched steps
    # (their lanes fill batches as greedy lanes do, so a width-k row costs about k lanes);
    # a row's length is drawn from the profile as a greedy lane's is, and every hypothesis
    # ends with it (the profile measures greedy decodes: the lengths beams would pick are not
    # in it). Reordering state rows between steps is priced at nothing: the profile does not
    # measure it (the real kernel's gather is one index_copy per state per row).
    beam_search = True

    def start_beam(self, cell_type: str, x: np.ndarray, states: list[tuple] | None,
                   width: int) -> BeamStarted:
        first = self.start_lane(cell_type, x, states)
        slots = [first.storage.slot] + [next(self._slots) for _ in range(width - 1)]
        steps = self._decoding[first.storage.slot]
        row = (width, slots, {first.storage.slot})
        for slot in slots:
            self._decoding[slot] = list(steps)
            self._beams[slot] = row
        length = first.storage.length
        return BeamStarted([LaneStorage(slot, 0, length) for slot in slots], first.busy_s)

    def reorder_beams(self, cell_type: str, dst: np.ndarray, src: np.ndarray, tokens: np.ndarray) -> float:
        moved = [(d, list(self._decoding[s])) for d, s in zip(dst.tolist(), src.tolist())]
        for d, state in moved:  # gathered before scattered, as the kernel does
            self._decoding[d] = state
            self._beams[d][2].add(d)
        return 0.0

    def _candidates(self, dec: GraphDecoder, slots: tuple[int, ...]) -> BeamCandidates | None:
        """Each beam lane's best k next tokens: EOS first once its row's drawn length is
        reached, else k other tokens (the first far likelier than the rest, so that the
        search keeps one line and its hypotheses end together); padding and greedy lanes
        get filler rows the engine does not read."""
        k = max((self._beams[s][0] for s in slots if s in self._beams), default=0)
        if not k:
            return None
        k = min(k, dec.vocab)
        # the greedy lane's filler first (see _decode): a row's best hypothesis is what greedy gives
        others = [(dec.eos + 1 + j) % dec.vocab for j in range(min(k, dec.vocab - 1))]  # none is EOS
        going = np.array(others + [dec.eos] * (k - len(others)), np.int64)
        ending = np.array([dec.eos] + others[:k - 1], np.int64)
        tokens = np.empty((len(slots), k), np.int64)
        logp = np.empty((len(slots), k), np.float64)
        logp[:] = -np.arange(k, dtype=np.float64) * 4.0 - 0.01
        for i, slot in enumerate(slots):
            state = self._decoding.get(slot)
            tokens[i] = ending if state is not None and state[1] >= state[0] else going
        return BeamCandidates(tokens, logp)

    def _release_slot(self, slot: int) -> None:
        row = self._beams.get(slot)
        if row is None:
            self._decoding.pop(slot, None)
            return
        row[2].discard(slot)
        if not row[2]:  # the row's last live lane: its slots go (as the kernel frees them)
            for s in row[1]:
                self._beams.pop(s, None)
                self._decoding.pop(s, None)

    def _decode_steps(self, cell_type: str, memory: int) -> int:
        """A lane's steps, drawn from those profiled at its memory length; at a length not
        profiled, from the nearest one, scaled by the ratio of lengths."""
        keys, table = self._decode_table[cell_type]
        if memory in table:
            return self._draw(*table[memory])
        i = bisect.bisect_left(keys, memory)
        near = min(keys[max(i - 1, 0): i + 1], key=lambda k: abs(k - memory))
        return max(1, round(self._draw(*table[near]) * memory / near))

    def _draw(self, steps: list[int], cumulative: list[int]) -> int:
        if len(steps) == 1:
            return steps[0]
        return steps[bisect.bisect_right(cumulative, int(self.rng.integers(cumulative[-1])))]

    def execute(self, batch: StepBatch, slots: np.ndarray, rows: np.ndarray, lone_steps: int,
                stop: np.ndarray) -> StepResult:
        cell, spec = self._cells[batch.cell_type], self._specs[batch.cell_type]
        host = self._host[batch.cell_type]
        size = batch.size
        tokens = candidates = None
        cold = self._previous != batch.cell_type
        self._previous = batch.cell_type
        # after a spell with no step the executor wakes slower (CellTypeProfile.idle_extra_s)
        idle = (self.draw_idle_extra(cell.idle_extra_s, self.clock.now() - self._last_step_end)
                if cell.idle_extra_s else 0.0)
        if lone_steps:
            per_step = cell.lone_step_s
            if stop[0]:
                steps = 1
            else:
                wait = self.next_arrival() - self.clock.now()
                steps = lone_steps if wait == math.inf else min(lone_steps, max(1, math.floor(wait / per_step.mean) + 1))
            if cell.kind == "decoder":  # one greedy lane, which stops at its end (EOS)
                tokens = self._decode_lone(spec.step, batch.slots[0], steps)
                steps = len(tokens)
            busy = max(size * cell.lone_call_s + self.sample(per_step, steps * size)
                       + (cell.lone_cold_s if cold else 0.0) + idle, 0.0)  # a draw may be below zero
        else:
            steps = 1
            timing = cell.step_s.get(size)
            if timing is None:
                raise ProfileError(f"profile of {batch.cell_type!r} has no step_s[{size}] "
                                   f"(max_batch {max(cell.step_s)})")
            busy = max(self.sample(timing) + (cell.cold_s if cold else 0.0) + idle, 0.0)
            if cell.kind == "decoder":
                tokens = self._decode(spec.step, batch.slots)
                if self._beams:
                    candidates = self._candidates(spec.step, batch.slots)
        host_s = host.step_s + host.step_s_per_lane * size
        self._charge(busy, host_s)
        self._last_step_end = self.clock.now() - host_s  # as the real executor's call returns
        if self.clock.now() >= self.next_event():
            stop[0] = 1  # let the event loop catch up before the engine goes on
        if cell.kind == "decoder":
            flops = steps * sum(self._decoder_flops(batch.cell_type, spec.step, self._decoding[s][2])
                                for s in batch.slots if s in self._decoding)
        else:
            flops = size * steps * self._flops[batch.cell_type]
        return StepResult(steps, busy, flops, tokens, candidates)

    def _decoder_flops(self, cell_type: str, dec: GraphDecoder, memory: int) -> float:
        key = (cell_type, memory)
        flops = self._flops.get(key)
        if flops is None:
            flops = self._flops[key] = dec.flops_per_step(memory)
        return flops

    def _decode(self, dec: GraphDecoder, slots: tuple[int, ...]) -> np.ndarray:
        filler = (dec.eos + 1) % dec.vocab
        tokens = np.full(len(slots), filler, np.int64)
        for i, slot in enumerate(slots):
            state = self._decoding.get(slot)
            if state is None:
                continue  # padding
            state[1] += 1
            if state[1] >= state[0]:
                tokens[i] = dec.eos
        return tokens

    def _decode_lone(self, dec: GraphDecoder, slot: int, steps: int) -> np.ndarray:
        """A lone greedy lane's run of up to `steps` steps: the tokens _decode gives it step
        by step, ending with EOS at its drawn length."""
        state = self._decoding[slot]
        steps = max(1, min(steps, state[0] - state[1]))
        state[1] += steps
        tokens = np.full(steps, (dec.eos + 1) % dec.vocab, np.int64)
        if state[1] >= state[0]:
            tokens[-1] = dec.eos
        return tokens

    def finish_lane(self, cell_type: str, storage: LaneStorage) -> LaneFinished:
        cell, spec = self._cells[cell_type], self._specs[cell_type]
        self._previous = None
        self._release_slot(storage.slot)
        busy = cell.finish_s_per_token * storage.length
        self._charge(busy, self._host[cell_type].lane_finish_s)
        if cell.kind == "decoder":
            return LaneFinished([], busy)
        layers = layers_of(spec.step)
        results = []
        for layer in layers:
            y = self._zero_rows(storage.length, layer.hidden)
            results.append((y, y[0] if len(y) else np.zeros(layer.hidden, np.float32),
                            (y[0] if len(y) else np.zeros(layer.hidden, np.float32)) if layer.kind == "lstm" else None))
        return LaneFinished(results, busy)

    def _zero_rows(self, rows: int, width: int) -> np.ndarray:
        if self._zeros.shape[0] < max(rows, 1) or self._zeros.shape[1] < width:
            self._zeros = np.zeros((max(rows, 1, self._zeros.shape[0]) * 2, max(width, self._zeros.shape[1])),
                                   np.float32)
            self._zeros.flags.writeable = False
        return self._zeros[:rows, :width]

    def release_lane(self, cell_type: str, storage: LaneStorage) -> None:
        self._release_slot(storage.slot)

    def engine_work(self, requests_taken: int = 0, runs_checked: int = 0) -> None:
        """The engine's own time for arrivals and drop checks, as its profile prices them."""
        host = self._engine_host
        self._charge(0.0, requests_taken * host.request_s + runs_checked * host.check_s_per_run)

    def run_plain(self, model: str, nodes: tuple[DenseNode, ...], env: dict) -> float:
        """The ops' outputs, each op priced from the profile. Computed once per model, group
        and input shapes, then reused: what the simulation needs of them is their shapes, and
        the values that feed a later op's shape (Shape's, a Reshape's target) follow from input
        shapes."""
        group_key = (model, nodes[0].name, len(nodes))
        group = self._plain_groups.get(group_key)
        if group is None:
            group = self._plain_groups[group_key] = self._plain_group(model, nodes)
        reads, priced = group
        self._previous = None
        key = (*group_key, *[_shape_key(env.get(name)) for name in reads])
        outputs = self._plain_outputs.get(key)
        if outputs is None:
            for node in nodes:
                dense_ops.run(node, env)
            outputs = self._plain_outputs[key] = [(name, env.get(name)) for node in nodes
                                                  for name in node.outputs if name]
        else:
            for name, value in outputs:
                env[name] = value
        total = 0.0
        clock, last = self.clock, self._plain_last
        for op, timing, buckets in priced:
            # an op that last ran a while ago costs more (ModelProfile.plain_idle_extra_s)
            seconds = timing.mean
            if buckets:
                seconds = max(seconds + self.draw_idle_extra(buckets, clock.now() - last.get(op, -math.inf)), 0.0)
            clock.advance(seconds)
            last[op] = clock.now()
            total += seconds
        return total

    def _plain_group(self, model: str, nodes: tuple[DenseNode, ...]) -> tuple[list[str], list[tuple]]:
        """What run_plain needs of a group: the names its ops read that none of them wrote
        before, and each op's key, timing and idle buckets (ProfileError naming a missing op)."""
        profile = self._profile(model)
        reads, written, priced = [], set(), []
        for node in nodes:
            timing = profile.plain_ops_s.get(node.name)
            if timing is None:
                raise ProfileError(f"profile of model {model!r} has no plain_ops_s[{node.name!r}]")
            priced.append(((model, node.name), timing, profile.plain_idle_extra_s.get(node.name)))
            reads += [name for name in node.inputs if name and name not in written and name not in reads]
            written.update(node.outputs)
        return reads, priced

    def startup_costs(self, cell_type: str, sizes: list[int]) -> dict[int, float]:
        cell = self._cells[cell_type]
        too_big = [b for b in sizes if b not in cell.step_s]
        if too_big:
            raise ProfileError(f"the engine batches {cell_type!r} up to {max(sizes)} lanes, but its profile's "
                               f"step_s stops at {max(cell.step_s)} (profile.max_batch): simulate with a batch cap of at "
                               f"most {max(cell.step_s)} (--max-batch), or profile up to {max(sizes)}")
        return {b: cell.step_s[b].mean for b in sizes}
