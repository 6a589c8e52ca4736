"""Reference greedy and beam search over any encoder / decoder-step pair that follows the
decoder-step contract (docs/zoo_dates.md, "Reference decoding"), one request at a time.

This is the oracle that the engine's batched beam search is held to, token for token, so every
rule is spelled out:

- Log-probabilities are log_softmax of the step's float32 logits computed in float64; a
  hypothesis's log_prob is the float64 sum of its tokens' log-probabilities (EOS's included).
- Beam width k. Each step expands every live hypothesis by every token id in [0, V) (none is
  masked: PAD and BOS are ordinary tokens to the search) and keeps the best k - f candidates by
  cumulative log_prob, where f hypotheses have already ended (the shrinking beam: an ended
  hypothesis gives up its lane). Ties: candidates are ranked by a stable sort of the row-major
  [live beam, token] table, so equal scores go to the lower beam index (live beams are held in
  rank order, best first), then to the lower token id.
- A kept candidate whose token is EOS ends (its tokens exclude the EOS); the others stay live,
  in rank order. The request finishes once k hypotheses have ended, or after max_length steps,
  when the live ones end unended (`ended=False`).
- Final ranking: score = log_prob / ((5 + steps) / 6) ** alpha (GNMT's length penalty; steps
  counts the EOS step of an ended hypothesis), highest first; ties keep the order in which the
  hypotheses ended (earlier step first, then rank within the step). `best` is the first.
- Greedy is beam width 1: each step takes the argmax (lowest id among equal maxima) until EOS.
- max_length counts decoder steps, the EOS step included (as the engine's GraphDecoder does);
  `decode` takes it from the spec's MaxLength for the request's memory length.

The live beams of one request run through the step module as one batch, in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cellserve.graph.decode_spec import DecodeSpec


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated ids, without BOS and without the final EOS
    log_prob: float          # float64 sum of log-probabilities, EOS's included when ended
    score: float             # log_prob / length_penalty(steps, alpha)
    ended: bool              # True: ended at EOS; False: cut at max_length

    @property
    def steps(self) -> int:
        return len(self.tokens) + int(self.ended)


@dataclass(frozen=True)
class DecodeResult:
    best: Hypothesis
    beams: tuple[Hypothesis, ...]  # the k best, best first (beams[0] is best)


def length_penalty(steps: int, alpha: float) -> float:
    """GNMT's ((5 + steps) / 6) ** alpha."""
    return ((5.0 + steps) / 6.0) ** alpha


@torch.no_grad()
def beam_search(step: torch.nn.Module, memory: torch.Tensor, states: Sequence[torch.Tensor], *,
                bos: int, eos: int, max_length: int, beam_width: int = 1,
                alpha: float = 0.0) -> DecodeResult:
    """Decode one request. step(token [L], memory [L,S,M], memory_mask [L,S], *states [L,D_i])
    -> (logits [L,V], *next states); memory is the request's [S, M] or [1, S, M]; states its
    initial decoder states, [D_i] or [1, D_i] each, in the step's order."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    memory = memory if memory.dim() == 3 else memory.unsqueeze(0)
    if memory.dim() != 3 or memory.shape[0] != 1:
        raise ValueError(f"memory must be [S, M] or [1, S, M] for one request, got {list(memory.shape)}")
    states = [s.reshape(1, -1) for s in states]
    live = [((), 0.0)]  # (tokens, log_prob), rank order
    finished: list[Hypothesis] = []
    for t in range(1, max_length + 1):
        lanes = len(live)
        tokens = torch.tensor([toks[-1] if toks else bos for toks, _ in live], dtype=torch.long)
        out = step(tokens, memory.expand(lanes, -1, -1), torch.ones(lanes, memory.shape[1]), *states)
        logits, next_states = out[0], list(out[1:])
        if len(next_states) != len(states):
            raise ValueError(f"the step returned {len(next_states)} states for {len(states)} state inputs")
        vocab = logits.shape[-1]
        if not (0 <= eos < vocab and 0 <= bos < vocab):
            raise ValueError(f"bos {bos} / eos {eos} outside the step's vocabulary [0, {vocab})")
        logp = torch.log_softmax(logits.double(), dim=-1).numpy()
        cand = np.array([lp for _, lp in live])[:, None] + logp             # [lanes, V]
        order = np.argsort(-cand.reshape(-1), kind="stable")[:beam_width - len(finished)]
        keep_rows, new_live = [], []
        for flat in order:
            b, w = divmod(int(flat), vocab)
            toks, total = live[b][0], float(cand[b, w])
            if w == eos:
                finished.append(Hypothesis(toks, total, total / length_penalty(t, alpha), True))
            else:
                new_live.append((toks + (w,), total))
                keep_rows.append(b)
        if not new_live:
            break
        live = new_live
        rows = torch.tensor(keep_rows, dtype=torch.long)
        states = [s.index_select(0, rows) for s in next_states]
    else:  # max_length steps taken: the live hypotheses end where they are
        finished.extend(Hypothesis(toks, lp, lp / length_penalty(len(toks), alpha), False)
                        for toks, lp in live)
    beams = tuple(sorted(finished, key=lambda h: -h.score))  # stable: ties keep ending order
    return DecodeResult(beams[0], beams)


def greedy(step: torch.nn.Module, memory: torch.Tensor, states: Sequence[torch.Tensor], *,
           bos: int, eos: int, max_length: int) -> DecodeResult:
    """Beam width 1 (argmax each step, lowest id among equal maxima)."""
    return beam_search(step, memory, states, bos=bos, eos=eos, max_length=max_length, beam_width=1)


@torch.no_grad()
def decode(encoder: torch.nn.Module, step: torch.nn.Module, source: torch.Tensor, spec: DecodeSpec,
           encoder_outputs: Sequence[str], beam_width: int | None = None) -> DecodeResult:
    """Encode one request (source: the encoder's single input, batch of 1) and beam-search it
    under spec (graph/decode_spec.py): its memory, init, states, bos, eos, max_length (steps,
    the EOS step included: MaxLength.limit of the memory's length), beam_width (unless given
    here) and length_penalty. encoder_outputs names the encoder module's outputs in order, so
    that the spec's names find them; the step module takes (token, memory, memory_mask,
    *states in spec.states order). Raises ValueError naming a spec name the encoder's outputs
    lack, or a state the spec does not initialise (the reference does not guess state sizes).
    """
    outputs = encoder(source)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if len(outputs) != len(encoder_outputs):
        raise ValueError(f"encoder returned {len(outputs)} outputs, encoder_outputs names {len(encoder_outputs)}")
    named = dict(zip(encoder_outputs, outputs))
    for state in spec.state_inputs:
        if not spec.init_of(state):
            raise ValueError(f"decode spec does not initialise state {state!r}; the reference needs every state's init")
    wanted = [spec.memory] + [spec.init_of(state) for state in spec.state_inputs]
    for name in wanted:
        if name not in named:
            raise ValueError(f"decode spec names encoder output {name!r}; the encoder's outputs are {list(named)}")
    memory = named[spec.memory]
    states = [named[spec.init_of(state)] for state in spec.state_inputs]
    return beam_search(step, memory, states, bos=spec.bos, eos=spec.eos,
                       max_length=spec.max_length.limit(memory.shape[-2]),
                       beam_width=spec.beam_width if beam_width is None else beam_width,
                       alpha=spec.length_penalty)
