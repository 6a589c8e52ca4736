"""Proteus's adaptive batching rule for one device, as a pure function of the queue.

A device running one variant decides, whenever it is free and something changed (a request
arrived, a batch finished, a timer fired), what to do with its queue. The rule (Proteus's
`accscale` batching):

1. Drop head requests that cannot finish even alone: now + l(smallest batch) > deadline.
2. If the queue fills the largest allowed batch, run it now. Otherwise let b be the batch that
   holds the whole queue (the smallest allowed size >= its length; a batch larger than the
   queue is charged at that size's latency). If running b now would meet the head's deadline
   with time to spare, wait: decide again at head deadline - l(b) (sooner if a request
   arrives, which may grow b and bring that moment forward). Once that moment has come, run
   the queue as b.
3. Whenever a batch would make the head late, run the largest allowed batch that still meets
   the head's deadline instead (one exists after step 1).

Two departures from Proteus's code: its code runs a full largest batch without the check of
step 3, and with the lazy wait that batch often finishes after the head's deadline; and at
the end of a wait it runs the largest allowed size <= the queue, leaving the rest, whose
deadlines are then often too near to run even alone. Running the whole queue as one batch
avoids both (figures: docs/accuracy-scaling.md).

The allowed batch sizes are those a latency profile gives, up to the variant's capacity batch
(the best batch under half the SLO). Requests are in queue order with non-decreasing deadlines
(one device serves one family, whose requests share one SLO), so the head is the most urgent.
Times in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchDecision:
    """`drop` head requests are answered as dropped; then the next `run` requests (0: none) run
    as one batch charged at the allowed size `batch` (>= run: a queue between allowed sizes
    runs padded to the next); with nothing run and requests left, decide
    again at `wake_at` unless an arrival comes first (None: nothing waits)."""

    drop: int
    run: int
    batch: int = 0
    wake_at: float | None = None


def decide_batch(now: float, deadlines: Sequence[float], latency_s: Mapping[int, float]) -> BatchDecision:
    """The rule of the module's docstring. `deadlines`: the queue's, head first; `latency_s`:
    allowed batch size -> seconds (non-empty, non-decreasing in the size)."""
    sizes = sorted(latency_s)
    alone = latency_s[sizes[0]]
    drop = 0
    while drop < len(deadlines) and now + alone > deadlines[drop]:
        drop += 1
    queued = len(deadlines) - drop
    if queued == 0:
        return BatchDecision(drop, 0)
    head = deadlines[drop]
    b = min((s for s in sizes if s >= queued), default=sizes[-1])  # the batch that holds the queue
    start_by = head - latency_s[b]
    if now < start_by - 1e-12 and queued < sizes[-1]:  # 1e-12: float rounding of the subtraction
        return BatchDecision(drop, 0, 0, start_by)
    if now + latency_s[b] > head:  # b would make the head late: the largest that does not
        b = max(s for s in sizes if s <= b and now + latency_s[s] <= head)
    return BatchDecision(drop, min(b, queued), b)
