"""Ramp and bracket: offer rising rates until a system stops meeting its SLO, then say how
well its capacity is pinned down.

A max goodput means something only next to a rate that failed above it: without one, the
system might have taken more (the figure is a lower bound); and if the lowest rate offered
already failed, the capacity lies below the ramp's start (the figure is no maximum at all).

`ramp(measure, passes, plan)` is the whole search for one system. `RampSearch` is the same
search one step at a time, for callers that interleave several systems (each rate of each
in turn, so a drifting machine slows all of them alike). `bracket(points)` judges any list
of measured rates, however they were chosen.

The search, for `RampPlan(start_rps, factor, refine_steps, max_rps, tries)`:

1. coarse: offer `start_rps`, then each rate `factor` times the last, until one fails or
   `max_rps` (the last coarse rate, clamped to it) has passed;
2. refine: `refine_steps` times, offer the geometric midpoint of the highest passing and the
   lowest failing rate, and move whichever end it proves. The capacity is then bracketed
   within a ratio of factor ** (1 / 2 ** refine_steps).

A failing rate is offered again, up to `tries` runs in all, and passes if any run does (one
stall of a shared machine is not a capacity). Rates are rounded to `decimals`, so a caller
that draws its trace from the rate gives the same rate the same trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RampPlan:
    """Which rates a search offers (see the module docstring). `rates`: offer exactly these,
    in this order, and only bracket the result."""

    start_rps: float = 20.0
    factor: float = 1.5
    refine_steps: int = 2
    max_rps: float = math.inf
    tries: int = 2
    rates: tuple[float, ...] | None = None
    decimals: int = 1

    def __post_init__(self):
        if self.rates is None and not (self.start_rps > 0 and self.factor > 1):
            raise ValueError(f"a ramp needs start_rps > 0 and factor > 1, got {self.start_rps}, {self.factor}")
        if self.tries < 1 or self.refine_steps < 0:
            raise ValueError(f"tries must be >= 1 and refine_steps >= 0, got {self.tries}, {self.refine_steps}")

    def to_dict(self) -> dict:
        return {"start_rps": self.start_rps, "factor": self.factor, "refine_steps": self.refine_steps,
                "max_rps": self.max_rps if math.isfinite(self.max_rps) else None, "tries": self.tries,
                "rates": list(self.rates) if self.rates is not None else None}


@dataclass
class Point:
    """One offered rate: the run kept (the passing one, else the most goodput) and its verdict."""

    rate_rps: float
    goodput_rps: float
    passed: bool
    summary: Mapping = field(default_factory=dict)
    goodput_of_each_try: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Bracket:
    """Where a system's capacity lies, from the rates it was offered.

    max_goodput_rps: the most goodput of any point (at_rate_rps: that point's rate).
    highest_pass_rps: the highest rate that met the SLO; lowest_fail_rps: the lowest failing
    rate above it (when nothing passed: the lowest rate). The capacity lies between them.
    below_start: the lowest rate offered failed: the capacity is under every rate offered.
    bracketed: something passed, a rate above it failed and the lowest rate passed: the
    max goodput is a measured maximum, not a bound.
    """

    max_goodput_rps: float
    at_rate_rps: float | None
    highest_pass_rps: float | None
    lowest_fail_rps: float | None
    below_start: bool
    bracketed: bool

    @property
    def marker(self) -> str:
        """'' bracketed, '>=' a lower bound (nothing above it failed), '*' below the start."""
        return "*" if self.below_start else "" if self.bracketed else ">="

    def to_dict(self) -> dict:
        """The fields benchmark JSON carries next to a max goodput."""
        return {"bracketed": self.bracketed, "capacity_below_start": self.below_start,
                "capacity_bracket_rps": [self.highest_pass_rps, self.lowest_fail_rps],
                "max_goodput_at_rps": self.at_rate_rps}

    def figure(self, unit: str = "r/s") -> str:
        """The max goodput with its marker: '892 r/s', '>= 1400 r/s', '* 19 r/s'."""
        return f"{self.marker} {self.max_goodput_rps:.0f} {unit}".lstrip()

    @classmethod
    def from_dict(cls, figures: Mapping) -> Bracket:
        """The Bracket of a report's figures: `max_goodput_rps` and the fields of to_dict."""
        low, high = figures["capacity_bracket_rps"]
        return cls(figures["max_goodput_rps"], figures.get("max_goodput_at_rps"), low, high,
                   figures["capacity_below_start"], figures["bracketed"])

    def describe(self) -> str:
        """Where the capacity lies, in a few characters: '812-893', '>1400', '<89'."""
        if self.below_start:
            return f"<{self.lowest_fail_rps:.0f}" if self.lowest_fail_rps is not None else "?"
        if not self.bracketed:
            return f">{self.highest_pass_rps:.0f}" if self.highest_pass_rps is not None else "?"
        return f"{self.highest_pass_rps:.0f}-{self.lowest_fail_rps:.0f}"


def bracket(points: Iterable[Point]) -> Bracket:
    """Judge measured points, in any order (see Bracket)."""
    points = sorted(points, key=lambda p: p.rate_rps)
    if not points:
        return Bracket(0.0, None, None, None, False, False)
    best = max(points, key=lambda p: p.goodput_rps)
    highest_pass = max((p.rate_rps for p in points if p.passed), default=None)
    lowest_fail = min((p.rate_rps for p in points
                       if not p.passed and (highest_pass is None or p.rate_rps > highest_pass)), default=None)
    below_start = not points[0].passed
    return Bracket(max_goodput_rps=best.goodput_rps, at_rate_rps=best.rate_rps, highest_pass_rps=highest_pass,
                   lowest_fail_rps=lowest_fail, below_start=below_start,
                   bracketed=not below_start and highest_pass is not None and lowest_fail is not None)


def footnotes(brackets: Iterable[Bracket], markdown: bool = False) -> list[str]:
    """The lines a table adds under figures marked with Bracket.marker: one per marker used
    (in markdown, the marker in backticks: a line may not start with '>')."""
    markers = {b.marker for b in brackets}
    notes = [(">=", "no rate above it failed (the ramp ended first): a lower bound, the capacity is higher"),
             ("*", "the lowest rate offered already failed: the capacity is below the ramp's start, "
                   "and the figure is no maximum")]
    return [f"`{m}` {text}" if markdown else f"{m:<2} {text}" for m, text in notes if m in markers]


@dataclass
class RampResult:
    points: list[Point]  # in the order they were run
    bracket: Bracket

    @property
    def rates_rps(self) -> list[float]:
        """The rates offered, in the order run."""
        return [p.rate_rps for p in self.points]

    def by_rate(self) -> list[Point]:
        return sorted(self.points, key=lambda p: p.rate_rps)


def _goodput(summary: Mapping) -> float:
    return float(summary["goodput_rps"])


class RampSearch:
    """The search of `ramp`, one run at a time: `next_rate()` (None when done), then
    `record(summary)` with that run's summary; `result()` at any time."""

    def __init__(self, plan: RampPlan, passes: Callable[[Mapping], bool],
                 goodput: Callable[[Mapping], float] = _goodput):
        self.plan, self._passes, self._goodput = plan, passes, goodput
        self._points: list[Point] = []
        self._tries: list[tuple[Mapping, bool]] = []
        self._low: float | None = None  # highest passing rate
        self._high: float | None = None  # lowest failing rate above it
        self._refined = 0
        first = plan.start_rps if plan.rates is None else (plan.rates[0] if plan.rates else None)
        self._rate: float | None = None if first is None else self._round(first)

    def next_rate(self) -> float | None:
        return self._rate

    def record(self, summary: Mapping) -> None:
        rate = self._rate
        if rate is None:
            raise RuntimeError("this search is done; nothing was asked for")
        ok = bool(self._passes(summary))
        self._tries.append((summary, ok))
        if not ok and len(self._tries) < self.plan.tries:
            return  # the same rate again
        kept = summary if ok else max((s for s, _ in self._tries), key=self._goodput)
        self._points.append(Point(rate, self._goodput(kept), ok, kept,
                                  [self._goodput(s) for s, _ in self._tries]))
        self._tries = []
        self._rate = self._after(rate, ok)

    def result(self) -> RampResult:
        return RampResult(list(self._points), bracket(self._points))

    def _round(self, rate: float) -> float:
        return round(float(rate), self.plan.decimals)

    def _after(self, rate: float, ok: bool) -> float | None:
        plan, done = self.plan, {p.rate_rps for p in self._points}
        if plan.rates is not None:
            rest = [r for r in map(self._round, plan.rates) if r not in done]
            return rest[0] if rest else None
        if ok:
            self._low = rate
        else:
            self._high = rate if self._high is None else min(self._high, rate)
        if self._high is None:  # coarse: still passing
            following = self._round(min(rate * plan.factor, plan.max_rps))
            return None if following in done or following <= rate else following
        if self._low is None or self._refined >= plan.refine_steps:
            return None  # the start failed, or refined enough
        middle = self._round(math.sqrt(self._low * self._high))
        if not self._low < middle < self._high:
            return None  # the bracket is as narrow as the rounding allows
        self._refined += 1
        return middle


def ramp(measure: Callable[[float], Mapping], passes: Callable[[Mapping], bool], plan: RampPlan,
         goodput: Callable[[Mapping], float] = _goodput) -> RampResult:
    """Search one system's capacity.

    measure(rate) runs the system once at `rate` requests/s and returns its summary (any
    mapping; `goodput(summary)`, by default summary["goodput_rps"], reads its goodput);
    passes(summary) says whether that run met the SLO. Returns every point run, in order,
    and their Bracket: the max goodput and whether a failing rate above bounds it.
    """
    search = RampSearch(plan, passes, goodput)
    while (rate := search.next_rate()) is not None:
        search.record(measure(rate))
    return search.result()
