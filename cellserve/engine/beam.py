"""One request row's beam search, on the host: which hypotheses live, which ended, and what
the decoder lanes must do between steps (the engine and the kernel do the rest).

The rules are those of the oracle, graph/zoo/reference_decode.py, to the token and the tie:
- each live hypothesis, in rank order (best first), is expanded by its step's log-probabilities
  (log_softmax of the float32 logits in float64); a candidate's log_prob is its parent's plus
  the token's, a float64 sum;
- the best k - f candidates are kept (f hypotheses have ended: the shrinking beam), ranked by
  log_prob, ties to the lower live rank, then to the lower token id;
- a kept EOS candidate ends (its tokens exclude EOS); the others live on, in rank order; the
  row finishes once no candidate lives (k ended) or after max_length steps, when the live
  hypotheses end unended;
- the final ranking is by score = log_prob / ((5 + steps) / 6) ** alpha (GNMT), ties in the
  order the hypotheses ended.

The kernel sends, per lane, its best K tokens and their log-probabilities (K >= k - f, sorted
by log-prob, ties to the lower id, exactly: see GraphDecoderKernel.step_batch); the best k - f
candidates of the row are always among those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cellserve.errors import InvalidInput
from cellserve.graph.decode_spec import beam_output_names
from cellserve.graph.model import GraphDecoder


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated ids, without BOS and the final EOS
    log_prob: float
    score: float  # log_prob / length penalty
    ended: bool  # True: at EOS; False: cut at the maximum length


@dataclass(frozen=True)
class Expansion:
    """What one step of a row decided: new live hypotheses (parent live rank, token) in rank
    order; `done` when the row has finished (then `live` is empty)."""

    live: tuple[tuple[int, int], ...]
    done: bool


def length_penalty(steps: int, alpha: float) -> float:
    """GNMT's ((5 + steps) / 6) ** alpha."""
    return ((5.0 + steps) / 6.0) ** alpha


@dataclass(eq=False)
class BeamRow:
    """The search state of one sequence of a request decoded with beam width `width`."""

    width: int
    eos: int
    max_steps: int
    alpha: float = 0.0
    step: int = 0
    live: list[tuple[tuple[int, ...], float]] = field(default_factory=lambda: [((), 0.0)])  # rank order
    ended: list[Hypothesis] = field(default_factory=list)  # in the order they ended

    def expand(self, tokens: list[np.ndarray], logp: list[np.ndarray]) -> Expansion:
        """One step: tokens[b], logp[b] are live hypothesis b's best candidates (sorted by
        log-prob descending, ties by id ascending; at least width - ended of them, or the
        whole vocabulary)."""
        if len(tokens) != len(self.live):
            raise ValueError(f"{len(tokens)} candidate lists for {len(self.live)} live hypotheses")
        self.step += 1
        keep = self.width - len(self.ended)
        cands = []
        for b, ((_, total), toks, lps) in enumerate(zip(self.live, tokens, logp)):
            for w, lp in zip(toks[:keep].tolist(), lps[:keep].tolist()):
                cands.append((-(total + lp), b, w))
        cands.sort()  # by log_prob descending, then live rank, then token id: the oracle's order
        new_live, parents = [], []
        for neg, b, w in cands[:keep]:
            toks, total = self.live[b][0], -neg
            if w == self.eos:
                self.ended.append(Hypothesis(toks, total, total / length_penalty(self.step, self.alpha), True))
            else:
                new_live.append((toks + (w,), total))
                parents.append((b, w))
        if not new_live or self.step >= self.max_steps:
            self.ended.extend(Hypothesis(t, lp, lp / length_penalty(len(t), self.alpha), False) for t, lp in new_live)
            self.live = []
            return Expansion((), True)
        self.live = new_live
        return Expansion(tuple(parents), False)

    def best(self) -> list[Hypothesis]:
        """The ended hypotheses, best first (stable: ties in the order they ended)."""
        return sorted(self.ended, key=lambda h: -h.score)


def beam_outputs(rows: list[BeamRow], width: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best tokens [B, L], beams [B, width, L'], scores [B, width] float64) of finished rows;
    missing beams (a vocabulary smaller than the width) are empty rows scored -inf."""
    ranked = [row.best() for row in rows]
    best_len = max([1] + [len(r[0].tokens) for r in ranked])
    all_len = max([1] + [len(h.tokens) for r in ranked for h in r])
    best = np.full((len(rows), best_len), pad, np.int64)
    beams = np.full((len(rows), width, all_len), pad, np.int64)
    scores = np.full((len(rows), width), -np.inf, np.float64)
    for b, hyps in enumerate(ranked):
        best[b, :len(hyps[0].tokens)] = hyps[0].tokens
        for j, h in enumerate(hyps[:width]):
            beams[b, j, :len(h.tokens)] = h.tokens
            scores[b, j] = h.score
    return best, beams, scores


def beams_outputs(model) -> set[str]:
    """The tensors return_beams adds to an answer of `model` (none but for a graph decoder)."""
    from cellserve.graph.model import GraphDecoder

    return {name for step in model.program if isinstance(step, GraphDecoder)
            for name in beam_output_names(step.spec.output)}


def optional_outputs(model) -> set[str]:
    """Outputs a request of `model` may ask for by name beyond the model's own: a graph
    decoder's k best (with return_beams) and its spec's scores output."""
    from cellserve.graph.model import GraphDecoder

    names: set[str] = set()
    for step in model.program:
        if isinstance(step, GraphDecoder):
            names.update(beam_output_names(step.spec.output))
            if step.spec.scores_output:
                names.add(step.spec.scores_output)
    return names


def request_beam_width(spec, beam_width: int | None, model: str) -> int:
    """The width a request decodes with: its own (1 to the spec's max_beam_width) or the
    spec's default. Raises InvalidInput naming both numbers."""
    if beam_width is None:
        return spec.beam_width
    if isinstance(beam_width, bool) or not isinstance(beam_width, (int, np.integer)) or beam_width < 1:
        raise InvalidInput(f"parameter 'beam_width' must be an integer >= 1, got {beam_width!r}")
    if beam_width > spec.max_beam_width:
        raise InvalidInput(f"parameter 'beam_width' {beam_width} exceeds model {model!r}'s max_beam_width "
                           f"{spec.max_beam_width}")
    return int(beam_width)


@dataclass(eq=False)
class BeamLanes:
    """The engine's side of one beam row: its search, its live lanes (lane ids, in the
    search's rank order), the reserved slots no lane holds, and the lanes that stepped while
    others of the row had not yet (their candidates wait in `pending`; the lanes themselves
    are out of the scheduler, in `held`, until the row's step is complete)."""

    row: BeamRow
    cell_type: str
    lanes: list[int]
    free: list  # LaneStorage of the row's spare slots
    pending: dict = field(default_factory=dict)  # lane id -> (tokens [K], logp [K])
    held: dict = field(default_factory=dict)  # lane id -> scheduler Lane

    @property
    def ready(self) -> bool:
        return len(self.pending) == len(self.lanes)


def decode_width(model, request) -> int:
    """At admission: the lanes per row the request's decoder will run (its beam width; 1 for
    greedy and for models without a graph decoder). Its beam_width / return_beams need a graph
    decoder, and the width must fit the spec: InvalidInput (a 400) naming both numbers."""
    decoder = next((step for step in model.program if isinstance(step, GraphDecoder)), None)
    if decoder is None:
        if request.beam_width is None and not request.return_beams:
            return 1
        raise InvalidInput(f"parameters 'beam_width'/'return_beams' need an encoder-decoder; model {model.name!r} "
                           "has no decoder-step graph")
    return request_beam_width(decoder.spec, request.beam_width, model.name)
