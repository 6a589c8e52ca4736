"""Routers: which engine takes a request. The interface the cluster and planner policies plug
into; the simulator's event loop calls it at each arrival, in virtual time.

A router decides in two parts. `shortlist` names the engines a request may go to, from the
request's model alone and never from an engine's state, so the loop can ask it ahead of the
arrival: an engine on no shortlist of an arrival cannot receive it, and runs on past it
without stopping (see loop.py). `choose` then picks one of the shortlist at the arrival, and
may look at those engines' state."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Protocol

from cellserve.engine.request import Request


class RoutedEngine(Protocol):
    """What a router may look at: an engine, its name and the clock it has reached."""

    name: str

    @property
    def engine(self): ...

    @property
    def busy_until(self) -> float: ...


class Router(ABC):
    name = "router"

    def shortlist(self, model: str, candidates: list[RoutedEngine]) -> list[RoutedEngine]:
        """The engines among `candidates` (those serving `model`, never empty) that the next
        request of `model` may go to. Called once per request, in arrival order, possibly
        before it arrives; it must not read the engines' state. Default: all of them."""
        return candidates

    @abstractmethod
    def choose(self, request: Request, candidates: list[RoutedEngine], now: float) -> RoutedEngine:
        """One of `candidates`, the request's shortlist (never empty), at its arrival."""


class ScoredRouter(Router):
    """A router that chooses the engine of lowest `score` in the shortlist (the first of
    equals). Such a router can route across processes (sim/parallel.py: each process scores
    its own engines); one that looks at the shortlist as a whole cannot."""

    @abstractmethod
    def score(self, request: Request, engine: RoutedEngine, now: float) -> float:
        """One engine's score for `request` at `now`."""

    def choose(self, request: Request, candidates: list[RoutedEngine], now: float) -> RoutedEngine:
        return min(candidates, key=lambda e: self.score(request, e, now))


class RoundRobin(ScoredRouter):
    """Each model's requests go to its engines in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def shortlist(self, model: str, candidates: list[RoutedEngine]) -> list[RoutedEngine]:
        i = self._next.get(model, 0)
        self._next[model] = i + 1
        return [candidates[i % len(candidates)]]

    def score(self, request: Request, engine: RoutedEngine, now: float) -> float:
        return 0.0  # the shortlist holds the one whose turn it is: nothing to compare


class LeastPredictedFinish(ScoredRouter):
    """The engine predicted to finish the request first: the work it has committed plus the
    request's own, as its admission would price it, after whatever step it is in."""

    name = "least-finish"

    def score(self, request: Request, engine: RoutedEngine, now: float) -> float:
        return max(engine.busy_until - now, 0.0) + engine.engine.predicted_latency(request)


class TwoChoices(LeastPredictedFinish):
    """Least predicted finish between two engines drawn at random (the power of two
    choices): nearly as balanced as asking every engine, at a constant cost per request
    however many engines there are."""

    name = "two-choices"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def shortlist(self, model: str, candidates: list[RoutedEngine]) -> list[RoutedEngine]:
        return self._rng.sample(candidates, 2) if len(candidates) > 2 else candidates


ROUTERS = {r.name: r for r in (RoundRobin, LeastPredictedFinish, TwoChoices)}


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None
