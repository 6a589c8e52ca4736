"""The engine's typed messages: what comes in, what goes out."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

_ids = itertools.count(1)


class Status(enum.Enum):
    OK = "ok"
    INVALID = "invalid"  # bad inputs: the client's fault
    REJECTED = "rejected"  # refused at admission (deadline cannot be met, queue full)
    DROPPED = "dropped"  # admitted, then could no longer meet its deadline
    ERROR = "error"  # the engine failed on it
    CANCELLED = "cancelled"  # its client went away (Engine.cancel): its lanes were released


class TraceStamps(Protocol):
    """Where a traced request's timestamps go (cellserve/server/tracing.py's Trace): the engine
    stamps its own points (docs/tracing.md) on its thread."""

    def stamp(self, name: str) -> None: ...

    def stamp_first(self, name: str) -> None: ...


@dataclass
class Request:
    """One inference request. `timeout_s` (from now) or the model's default sets the deadline:
    admission refuses a request that cannot meet it and the drop check drops one that no
    longer can; one that finishes late anyway is still answered OK, with its finish time in
    the Response (the server answers it 504). `priority`: an integer >= 0, lower runs first
    (the server maps the protocol's 0, "the model's default", below every explicit level).
    `inputs` are read when the engine admits the request (at its next step), not copied at
    submit: leave the arrays alone until then."""

    model: str
    inputs: dict[str, np.ndarray]
    on_done: Callable[["Response"], None] | None = None
    timeout_s: float | None = None
    priority: int = 0
    arrival: float | None = None  # clock time; the engine stamps it at submit if None
    request_id: int = field(default_factory=lambda: next(_ids))
    # Implicit state of a stream (see `Response.state`): each recurrent layer named here
    # starts from these (h, c) arrays, shaped [directions, batch, hidden] (c is None but for
    # LSTMs), instead of its initial-state inputs.
    initial_state: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None
    return_state: bool = False  # put every recurrent layer's final (h, c) in the response
    # Called on the engine thread with (batch index, token) for each token a decoder lane
    # emits (end-of-sequence excluded), in order, before the request's one Response; it must
    # be quick and must not raise (an exception is logged and ignored).
    on_tokens: Callable[[int, int], None] | None = None
    cancelled: bool = False  # set by Engine.cancel (any thread); read by the engine thread
    # Triton-style tracing: None (the rule) costs the engine one test per stamp site, never
    # work per step; a trace gets ENGINE_ADMIT ... COMPUTE_END (docs/tracing.md)
    trace: TraceStamps | None = None
    # A graph decoder's search (docs/decoders.md, "Beam search"): the beam width, 1 to the
    # spec's max_beam_width (None: the spec's beam_width); return_beams adds the k best
    # hypotheses and their scores (`<output>_beams`, `<output>_beam_scores`) to the response.
    # Beam lanes stream nothing through on_tokens: their answer comes whole, at the end.
    beam_width: int | None = None
    return_beams: bool = False


@dataclass(frozen=True)
class Response:
    request_id: int
    status: Status
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    reason: str = ""
    arrival: float = 0.0
    finish: float = 0.0
    admitted: float | None = None  # when the engine took it in (None: answered at admission)
    state: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    # A refusal that other requests' work caused (the request alone would have met its
    # deadline, or the bound on requests in flight was reached), as against one whose deadline
    # is too short for it even on an idle engine. A server's admission bound learns from the
    # first kind only; drops (DROPPED) are always of the first kind.
    congestion: bool = False

    @property
    def latency_s(self) -> float:
        return self.finish - self.arrival

    @property
    def queue_s(self) -> float | None:
        """Arrival to admission (None: answered at admission)."""
        return None if self.admitted is None else max(self.admitted - self.arrival, 0.0)

    @property
    def compute_s(self) -> float | None:
        """Admission to answer (None: answered at admission)."""
        return None if self.admitted is None else max(self.finish - self.admitted, 0.0)
