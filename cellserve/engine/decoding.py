"""The decoders' part of a request's walk (a mixin of Engine): starting a decoder's lanes,
greedy (one lane per row, tokens streamed through Request.on_tokens) or beam-searched (a row
of lanes over one memory block, pruned and reordered between steps: engine/beam.py); taking
each step's tokens back; and storing a finished decoder's answer."""

from __future__ import annotations

import logging

import numpy as np

from cellserve.engine.beam import BeamLanes, BeamRow, beam_output_names, beam_outputs, request_beam_width
from cellserve.engine.request import Request
from cellserve.engine.runs import _LaneRef, _Run
from cellserve.errors import InvalidInput
from cellserve.executor.batch import StepBatch
from cellserve.graph.model import GraphDecoder
from cellserve.kernels.decoder import BeamCandidates

log = logging.getLogger(__name__)


class Decoding:
    """Engine's decoder lanes and beam rows (see the module docstring)."""

    def _check_beam_executors(self, model, request: Request, width: int) -> None:
        """At admission: a request whose decoder will beam-search (a width above 1, the k best
        asked for, or a spec with a scores output; see _start_decoder) needs an executor that
        runs beam search there. InvalidInput (a 400) naming the executor otherwise."""
        for cell_type in self._model_types[model.name]:
            dec = self._decoders.get(cell_type)
            if dec is None or not (width > 1 or request.return_beams or dec.spec.scores_output):
                continue
            executor = self._placed[cell_type]
            if not executor.beam_search:
                raise InvalidInput(f"model {model.name!r} decodes with beam search here, and executor "
                                   f"{executor.name!r} (which runs {cell_type!r}) does not run beam search")

    def _start_decoder(self, run: _Run, dec: GraphDecoder) -> None:
        """One decoder lane per sequence. The memory is batch-first [B, S, M] (each row's S
        from the spec's memory_length, else S), the states one [B, D] tensor each (zeros
        where the spec names no init)."""
        cell_type = f"{run.model.name}/{dec.name}"
        run.outputs = {}
        spec = dec.spec
        memory = np.asarray(run.env[spec.memory])
        batch, width = memory.shape[0], memory.shape[1]
        lengths = np.full(batch, width, np.int64)
        if spec.memory_length:
            lengths = np.asarray(run.env[spec.memory_length]).astype(np.int64).reshape(-1)
            if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > width:
                raise InvalidInput(f"{spec.memory_length!r} {lengths.tolist()} must be {batch} source lengths "
                                   f"in [1, {width}]")
        inits = [run.env[spec.init_of(s)] if spec.init_of(s) else None for s in spec.state_inputs]
        width = request_beam_width(spec, run.request.beam_width, run.model.name)
        searched = width > 1 or run.request.return_beams or bool(spec.scores_output)
        for b in range(batch):
            n = int(lengths[b])
            states = [(None if v is None else v[b],) for v in inits]
            if searched:  # a beam row (width 1 too, when scores are asked for)
                self._start_beam_row(run, cell_type, memory[b, :n], states, b, BeamRow(width, spec.eos, dec.max_tokens(n),
                                                                                       spec.length_penalty))
            else:  # greedy: one lane, argmax tokens, streamed
                self._start_decoder_lane(run, cell_type, memory[b, :n], states, b, dec.max_tokens(n))

    def _start_beam_row(self, run: _Run, cell_type: str, memory: np.ndarray, states: list[tuple], b: int,
                        row: BeamRow) -> None:
        """A beam row: `row.width` slots over one memory block, one live lane (BOS) to start;
        the row's lanes come and go as its hypotheses do (see _prune_beams)."""
        executor = self._placed[cell_type]
        if self._busy and executor in self._busy:
            self._defer_start(run, executor, self._start_beam_row, cell_type, memory, states, b, row)
            return
        if self._multi:
            dec = run.model.program[run.pc]
            self._note_reads(run, executor, [r for r in [dec.memory, dec.spec.memory_length] +
                                             [e for _, e in dec.spec.init] if r])
        started = executor.start_beam(cell_type, memory, states, row.width)
        self._device_s += started.busy_s
        first, *spare = started.storages
        beam = BeamLanes(row, cell_type, [], spare)
        self._add_lane(run, cell_type, None, first, first.base, 0,
                       _LaneRef(cell_type, executor, first, 0, b, tokens=[], beam=beam))
        beam.lanes.append(next(reversed(run.lanes)))

    def _start_decoder_lane(self, run: _Run, cell_type: str, memory: np.ndarray, states: list[tuple], b: int,
                            max_tokens: int) -> None:
        executor = self._placed[cell_type]
        if self._busy and executor in self._busy:
            self._defer_start(run, executor, self._start_decoder_lane, cell_type, memory, states, b, max_tokens)
            return
        if self._multi:
            dec = run.model.program[run.pc]
            self._note_reads(run, executor, dec.reads())
        started = executor.start_lane(cell_type, memory, states)
        self._device_s += started.busy_s
        storage = started.storage
        self._add_lane(run, cell_type, None, storage, storage.base, 0,
                       _LaneRef(cell_type, executor, storage, 0, b, tokens=[], max_tokens=max_tokens,
                                source_length=len(memory)))

    def _record_tokens(self, batch: StepBatch, tokens: np.ndarray,
                       candidates: BeamCandidates | None = None) -> frozenset[int]:
        """Append each decoder lane's token; return the lanes that ended (EOS or max length).
        A beam lane's candidates wait for the rest of its row, whose step then prunes and
        reorders the row (_prune_beams); beam lanes stream nothing. `tokens` holds one per
        lane, or a lone greedy lane's run's tokens, one per step (its run stops at EOS and
        at its most tokens, so only its last token can end it)."""
        eos = self._decoders[batch.cell_type].eos
        lengths = self._output_lengths[batch.cell_type]
        ended = []
        self._beam_lanes_moved = False
        rows: dict[int, tuple[_Run, BeamLanes]] = {}
        lane_of, runs = self.policy.lane, self._runs  # once, not per lane: this loop runs every step
        emitted = tokens.tolist()
        lane_ids = batch.lane_ids if len(emitted) == batch.size else batch.lane_ids * len(emitted)
        for i, (lane_id, token) in enumerate(zip(lane_ids, emitted)):
            lane = lane_of(lane_id)
            if lane is None:
                continue  # padding
            run = runs[lane.request_id]
            ref = run.lanes[lane_id]
            if ref.beam is not None:
                ref.beam.pending[lane_id] = (candidates.tokens[i], candidates.logp[i])
                rows[id(ref.beam)] = (run, ref.beam)
                continue
            if token == eos:
                ended.append(lane_id)
                lengths.observe(ref.source_length, len(ref.tokens) + 1)
                continue
            ref.tokens.append(token)
            if run.request.on_tokens is not None:
                self._emit_token(run.request, ref.batch_index, token)
            if len(ref.tokens) >= ref.max_tokens:
                ended.append(lane_id)
                lengths.observe(ref.source_length, len(ref.tokens))
        for run, beam in rows.values():
            if beam.ready:
                ended.extend(self._prune_beams(run, beam))
            else:  # others of the row have not stepped yet: these wait out of the scheduler
                for lane_id in beam.pending:
                    if lane_id not in beam.held:
                        beam.held[lane_id] = self.policy.lane(lane_id)
                        self.policy.remove(lane_id)
                self._beam_lanes_moved = True
        return frozenset(ended)

    def _prune_beams(self, run: _Run, beam: BeamLanes) -> list[int]:
        """A beam row's step is complete: choose the surviving hypotheses (BeamRow.expand),
        give each a lane (its parent's, when free: no state moves), gather the others' state
        rows from their parents' slots (one kernel call), start lanes on spare slots and end
        the lanes no hypothesis kept. Returns the lanes of this batch that end."""
        refs = [run.lanes[i] for i in beam.lanes]
        expansion = beam.row.expand([beam.pending[i][0] for i in beam.lanes], [beam.pending[i][1] for i in beam.lanes])
        beam.pending.clear()
        keep: dict[int, int] = {}  # new rank -> old rank whose lane it takes
        for j, (parent, _) in enumerate(expansion.live):
            if parent not in keep.values():
                keep[j] = parent
        unclaimed = [r for r in range(len(refs)) if r not in keep.values()]
        for j in range(len(expansion.live)):
            if j not in keep and unclaimed:
                keep[j] = unclaimed.pop(0)
        ending = [beam.lanes[r] for r in unclaimed] if not expansion.done else list(beam.lanes)
        new_lanes: list[int] = []
        dst, src, toks = [], [], []
        for j, (parent, token) in enumerate(expansion.live):
            if j in keep:
                lane_id = beam.lanes[keep[j]]
                storage = refs[keep[j]].storage
            else:
                storage = beam.free.pop()
                self._add_lane(run, beam.cell_type, None, storage, storage.base, 0,
                               _LaneRef(beam.cell_type, refs[0].executor, storage, 0, refs[0].batch_index,
                                        tokens=[], beam=beam))
                lane_id = next(reversed(run.lanes))
            new_lanes.append(lane_id)
            dst.append(storage.slot)
            src.append(refs[parent].storage.slot)
            toks.append(token)
        if dst:
            self._device_s += refs[0].executor.reorder_beams(beam.cell_type, np.array(dst, np.int64),
                                                             np.array(src, np.int64), np.array(toks, np.int64))
        beam.free.extend(run.lanes[i].storage for i in ending)
        beam.lanes = new_lanes
        held, beam.held = beam.held, {}
        for lane_id, lane in held.items():
            if lane_id in new_lanes:
                self.policy.add(lane)
        self._beam_lanes_moved = True
        in_batch = []
        for lane_id in ending:
            if lane_id in held:
                self._lane_finished(held[lane_id])
            else:
                in_batch.append(lane_id)
        return in_batch

    @staticmethod
    def _emit_token(request: Request, batch_index: int, token: int) -> None:
        try:
            request.on_tokens(batch_index, token)
        except Exception:  # a client's callback must not stop the engine
            log.exception("on_tokens callback of request %s failed", request.request_id)

    def _store_beams(self, run: _Run, step: GraphDecoder) -> None:
        """A beam-searched decoder's answer: the best hypothesis of each row in the spec's
        output; the best scores in its scores_output if it names one; the k best and their
        scores (`<output>_beams`, `<output>_beam_scores`) if the request asks."""
        rows = [run.outputs[b] for b in sorted(run.outputs)]
        best, beams, scores = beam_outputs(rows, rows[0].width, step.pad)
        run.env[step.output] = best
        if step.spec.scores_output:
            run.extra_outputs[step.spec.scores_output] = scores[:, 0].copy()
        if run.request.return_beams:
            names = beam_output_names(step.output)
            run.extra_outputs.update({names[0]: beams, names[1]: scores})
        if self._multi:
            run.producers[step.output] = self._step_executors(run)
