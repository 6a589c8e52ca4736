"""Clipper's batch sizing (Crankshaw et al., NSDI 2017): per replica, additive increase of the
batch cap while requests meet the latency objective, a 10% multiplicative cut on a miss.

`Aimd` is the rule alone (no clock, no engine). What it observes here is each answered
request's latency (arrival to answer) against its SLO, one observation per request; Clipper
compares a batch's processing time with the objective. A replica's controller sees answers,
not batches, so the rule counts a batch's worth of answers as one batch:
- the cap grows by `step` once `cap` answers in a row met the SLO (one batch under the SLO);
- a miss cuts the cap to max(1, floor(cap * (1 - backoff))), then misses are ignored until
  `cap` more answers came (the requests already batched under the old cap answer first;
  cutting again for each of them would collapse the cap on one slow batch).

`attach_aimd(engine, aimd, slo_s)` applies it to a simulated engine: it wraps the engine's
`submit` so that each request's answer is observed, and sets `engine.policy.max_batch` (the
policy's documented cap, read at every batch it forms) to the controller's cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Aimd:
    cap: int = 1
    step: int = 1
    backoff: float = 0.10
    max_cap: int = 64
    _good: int = 0  # answers in a row within the SLO since the cap last changed
    _since_cut: int = 0  # answers since the last cut
    increases: int = 0
    cuts: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.cap <= self.max_cap:
            raise ValueError(f"cap must be in [1, max_cap={self.max_cap}], got {self.cap}")
        self._since_cut = self.cap  # the first miss may cut at once

    def observe(self, met_slo: bool) -> int:
        """Record one answer; return the cap for the next batch."""
        self._since_cut += 1
        if met_slo:
            self._good += 1
            if self._good >= self.cap and self.cap < self.max_cap:
                self.cap = min(self.max_cap, self.cap + self.step)
                self._good = 0
                self.increases += 1
        else:
            self._good = 0
            if self._since_cut >= self.cap:
                self.cap = max(1, math.floor(self.cap * (1.0 - self.backoff)))
                self._since_cut = 0
                self.cuts += 1
        return self.cap


def attach_aimd(engine, aimd: Aimd, slo_s: float) -> None:
    """Drive `engine.policy.max_batch` by `aimd` from the latencies of the requests `engine`
    answers (see the module's docstring). The answer still reaches whoever submitted it."""
    from cellserve.engine.request import Status

    engine.policy.max_batch = aimd.cap
    submit = engine.submit

    def observed_submit(request) -> None:
        downstream = request.on_done

        def on_done(response) -> None:
            met = response.status is Status.OK and response.finish - response.arrival <= slo_s
            engine.policy.max_batch = aimd.observe(met)
            if downstream is not None:
                downstream(response)

        request.on_done = on_done
        submit(request)

    engine.submit = observed_submit
