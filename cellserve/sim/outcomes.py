"""What a simulation's requests came to: one row per answer, kept in columns while it runs.

A run of millions of requests answers each with a few numbers (its tag, model, engine,
status, arrival and finish). Kept as an object per answer for the whole run, they filled
memory between the engines' short-lived objects; `OutcomeLog` appends the numbers to arrays
(names by index, reasons only where there is one) and builds the `SimOutcome`s once, at the
end, or hands the arrays to another process as they are (parallel.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cellserve.engine.request import Response, Status

_STATUSES = list(Status)
_STATUS_INDEX = {s: k for k, s in enumerate(_STATUSES)}
_COLUMNS = {"tag": "q", "model": "i", "engine": "i", "status": "b", "arrival": "d", "finish": "d"}


@dataclass(frozen=True, slots=True)
class SimOutcome:
    tag: int
    model: str
    engine: str
    status: Status
    arrival_s: float
    finish_s: float
    reason: str = ""


class OutcomeLog:
    """Answers in the order given: the request's tag, its model's and engine's indices (into
    the names given to `outcomes`), its status, arrival and finish, and its reason if any."""

    def __init__(self) -> None:
        self.columns = {name: array(code) for name, code in _COLUMNS.items()}
        self.reasons: dict[int, str] = {}  # row -> reason (most answers have none)

    def __len__(self) -> int:
        return len(self.columns["tag"])

    def add(self, tag: int, model: int, engine: int, response: Response) -> None:
        c = self.columns
        if response.reason:
            self.reasons[len(c["tag"])] = response.reason
        c["tag"].append(tag)
        c["model"].append(model)
        c["engine"].append(engine)
        c["status"].append(_STATUS_INDEX[response.status])
        c["arrival"].append(response.arrival)
        c["finish"].append(response.finish)

    def arrays(self) -> dict:
        """The log as plain arrays (to send to another process; `from_arrays` takes them back)."""
        return {"columns": {name: np.frombuffer(col, col.typecode) for name, col in self.columns.items()},
                "reasons": self.reasons}

    @classmethod
    def join(cls, parts: Sequence[dict]) -> OutcomeLog:
        """One log of several logs' `arrays()`, rows in the order of the parts."""
        log = cls()
        for part in parts:
            base = len(log)
            for name, values in part["columns"].items():
                log.columns[name].frombytes(values.tobytes())
            log.reasons.update((base + row, reason) for row, reason in part["reasons"].items())
        return log

    def outcomes(self, models: Sequence[str], engines: Sequence[str], by_finish: bool = False) -> list[SimOutcome]:
        """The answers as `SimOutcome`s, in the order given or, with `by_finish`, by finish
        time (then tag)."""
        c = self.columns
        rows = range(len(self))
        if by_finish:
            rows = np.lexsort((np.frombuffer(c["tag"], np.int64), np.frombuffer(c["finish"], np.float64))).tolist()
        tag, model, engine, status, arrival, finish = (c[name] for name in _COLUMNS)
        reasons = self.reasons
        return [SimOutcome(tag[r], models[model[r]], engines[engine[r]], _STATUSES[status[r]], arrival[r], finish[r],
                           reasons.get(r, "")) for r in rows]
