"""What one benchmark run records, and the summary numbers derived from it.

The dataclasses hold only JSON types, so a run can be saved and re-summarised later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellserve.engine.request import Status

STATUSES = ("ok", "rejected", "dropped", "error")


@dataclass(slots=True)  # one per request of a run: millions in a long simulation
class RequestOutcome:
    request_id: int
    arrival_s: float
    finish_s: float | None  # None when the request never finished
    status: str  # "ok" | "rejected" | "dropped" | "error"
    reason: str = ""

    @staticmethod
    def status_of(status: "Status") -> str:
        """A bench record's status for an engine response's (a cancelled request, whose
        client went away, counts as an error: a benchmark's client never goes away)."""
        return "error" if status in (Status.INVALID, Status.ERROR, Status.CANCELLED) else status.value


@dataclass
class RunStats:
    policy: str
    rate_rps: float
    duration_s: float  # first arrival to last finish (or last arrival if later), see span_s
    outcomes: list[RequestOutcome]
    executed_flops: float = 0.0
    busy_s: float = 0.0
    cell_steps: int = 0
    batch_size_sum: int = 0  # lanes summed over executed batches: mean batch = sum / steps
    overhead_us_per_step: list[float] = field(default_factory=list)  # scheduler overhead samples

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunStats:
        outcomes = [RequestOutcome(**o) for o in data["outcomes"]]
        return cls(**{**data, "outcomes": outcomes})


def span_s(outcomes: list[RequestOutcome]) -> float:
    """Seconds from the first arrival to the last finish, or to the last arrival if later."""
    if not outcomes:
        return 0.0
    arrivals = [o.arrival_s for o in outcomes]
    finishes = [o.finish_s for o in outcomes if o.finish_s is not None]
    return max(arrivals + finishes) - min(arrivals)


def _per_second(amount: float, duration_s: float) -> float:
    return amount / duration_s if duration_s > 0 else 0.0


def summarize(stats: RunStats, slo_s: float) -> dict:
    """Throughput, goodput, latency percentiles and engine counters of one run.

    Latency percentiles are over "ok" requests only (NaN when there are none); requests
    that were rejected, dropped or errored count as SLO misses and appear in `counts`.
    """
    latencies = np.array([o.finish_s - o.arrival_s for o in stats.outcomes
                          if o.status == "ok" and o.finish_s is not None])
    good = int(np.sum(latencies <= slo_s))
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e3 if latencies.size else (np.nan,) * 3
    counts = {status: sum(o.status == status for o in stats.outcomes) for status in STATUSES}
    return {
        "policy": stats.policy,
        "rate_rps": stats.rate_rps,
        "requests": len(stats.outcomes),
        "throughput_rps": _per_second(latencies.size, stats.duration_s),
        "goodput_rps": _per_second(good, stats.duration_s),
        "slo_misses": len(stats.outcomes) - good,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_batch": stats.batch_size_sum / stats.cell_steps if stats.cell_steps else 0.0,
        "gflops": _per_second(stats.executed_flops, stats.duration_s) / 1e9,
        "busy_fraction": _per_second(stats.busy_s, stats.duration_s),
        "overhead_us_per_step": (float(np.median(stats.overhead_us_per_step))
                                 if stats.overhead_us_per_step else float("nan")),
        "counts": counts,
    }


def json_safe(value):
    """`value` with NaN and infinities as None, numpy scalars as Python numbers: strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


MIN_GOOD_FRACTION = 0.9


def meets_slo(summary: dict, slo_ms: float, min_good_fraction: float = MIN_GOOD_FRACTION) -> bool:
    """Whether a `summarize` result kept up at its rate: p99 within the SLO (NaN, nothing
    answered, is not) and at least `min_good_fraction` of requests answered within it (a
    server that refuses what it cannot serve keeps its p99 down however far it is overloaded)."""
    requests = summary["requests"]
    good = requests - summary["slo_misses"]
    return requests > 0 and summary["p99_ms"] <= slo_ms and good >= min_good_fraction * requests
