"""Stateful sequences (Triton's sequence extension with implicit state).

A sequence holds no engine slot between its requests: only its recurrent layers' final
(h, c), on the host. Each chunk joins the cellular batch like any request, starting from that
state, so any number of sequences share the batch. Chunks of one sequence run one at a time,
in the order they arrived. A sequence idle for longer than its timeout is released, and a
later request on it is told so; it is never silently restarted.

Time enters through a clock (anything with `now()`, see cellserve.engine.clock): the store
stamps each use with it and `expire` compares against it, so tests drive idle expiry with a
fake clock instead of sleeping against the server's sweeper.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from cellserve.engine.clock import Clock, MonotonicClock
from cellserve.server.errors import Overloaded, SequenceError

SequenceKey = tuple[str, str, object]  # (model, version, sequence id)
_REMEMBER_ENDED = 10_000  # released sequences remembered, to explain a late request on one


@dataclass(eq=False)
class Sequence:
    key: SequenceKey
    idle_timeout_s: float
    state: dict | None = None  # layer -> (h, c) after the last chunk answered
    started: bool = False  # a chunk with sequence_start was answered (until then, no chunk may continue it)
    last_used: float = 0.0  # the store's clock at the last use (set by the store)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # chunks holding or waiting for the lock

    def describe(self) -> str:
        return _describe(self.key)


class SequenceStore:
    """Active sequences of every model. Used from the server's event loop only."""

    def __init__(self, max_sequences: int = 100_000, clock: Clock | None = None):
        self.max_sequences = max_sequences
        self.clock = clock if clock is not None else MonotonicClock()
        self._active: dict[SequenceKey, Sequence] = {}
        self._ended: OrderedDict[SequenceKey, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._active)

    def count(self, model: str) -> int:
        return sum(1 for key in self._active if key[0] == model)

    def get(self, key: SequenceKey, start: bool, idle_timeout_s: float) -> Sequence:
        """The sequence a chunk belongs to: a new one when `start`, else the active one."""
        sequence = self._active.get(key)
        if sequence is None:
            if not start:
                why = self._ended.get(key)
                name = _describe(key)
                if why is not None:
                    raise SequenceError(f"{name} was {why}; start a new one with sequence_start")
                elsewhere = sorted(k[1] for k in self._active if (k[0], k[2]) == (key[0], key[2]))
                if elsewhere:  # a sequence belongs to the version its first request ran on
                    raise SequenceError(f"{name} is not active on version {key[1]}: it runs on version "
                                        f"{elsewhere[0]}; send its requests to that version")
                raise SequenceError(f"{name} is not active: its first request must set sequence_start")
            if len(self._active) >= self.max_sequences:
                raise Overloaded(f"too many active sequences ({self.max_sequences}); end or let some expire",
                                 congestion=False)
            sequence = self._active[key] = Sequence(key, idle_timeout_s)
        self.touch(sequence)
        return sequence

    def started(self, sequence: Sequence) -> None:
        """Its start was answered: it may be continued, and how its id's last one ended is
        forgotten (kept until now, so that a failed restart leaves that explanation)."""
        sequence.started = True
        self._ended.pop(sequence.key, None)

    def holds(self, sequence: Sequence) -> bool:
        """Whether `sequence` is still the active one of its key (not ended meanwhile)."""
        return self._active.get(sequence.key) is sequence

    def forget(self, sequence: Sequence) -> None:
        """Remove a sequence whose start was never answered, as if it had not been asked for."""
        if self.holds(sequence):
            del self._active[sequence.key]

    def touch(self, sequence: Sequence) -> None:
        """Mark `sequence` used now: its idle time starts again."""
        sequence.last_used = self.clock.now()

    def end(self, sequence: Sequence, why: str) -> None:
        if self._active.get(sequence.key) is sequence:
            del self._active[sequence.key]
            self._ended[sequence.key] = why
            while len(self._ended) > _REMEMBER_ENDED:
                self._ended.popitem(last=False)

    def end_model(self, model: str, why: str) -> int:
        """End every sequence of `model` (it was unloaded): a later request on one is told
        `why`. How many."""
        ended = [s for key, s in self._active.items() if key[0] == model]
        for sequence in ended:
            self.end(sequence, why)
        return len(ended)

    def expire(self, now: float | None = None) -> int:
        """Release sequences idle past their timeout (none with a chunk in flight); how many."""
        now = self.clock.now() if now is None else now
        idle = [s for s in self._active.values() if s.users == 0 and now - s.last_used > s.idle_timeout_s]
        for sequence in idle:
            self.end(sequence, f"released after {sequence.idle_timeout_s:g} s idle")
        return len(idle)


def _describe(key: SequenceKey) -> str:
    return f"sequence {key[2]!r} of model {key[0]!r}"
