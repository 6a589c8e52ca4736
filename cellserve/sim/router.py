"""Routers: which engine takes a request. The interface the cluster and planner policies plug
into; the simulator's event loop calls `choose` at each arrival, in virtual time."""

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

    @abstractmethod
    def choose(self, request: Request, candidates: list[RoutedEngine], now: float) -> RoutedEngine:
        """One of `candidates` (the engines that serve the request's model, never empty)."""


class RoundRobin(Router):
    """Each model's requests go to its engines in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, request: Request, candidates: list[RoutedEngine], now: float) -> RoutedEngine:
        i = self._next.get(request.model, 0)
        self._next[request.model] = i + 1
        return candidates[i % len(candidates)]


class LeastPredictedFinish(Router):
    """The engine predicted to finish the request first: the work it has committed plus the
    request's own, as its admission would price it, after whatever step it is in."""

    name = "least-finish"

    def choose(self, request: Request, candidates: list[RoutedEngine], now: float) -> RoutedEngine:
        return min(candidates, key=lambda e: max(e.busy_until - now, 0.0) + e.engine.predicted_latency(request))


class TwoChoices(LeastPredictedFinish):
    """Least predicted finish between two engines drawn at random (the power of two
    choices): nearly as balanced as asking every engine, at a constant cost per request
    however many engines there are."""

    name = "two-choices"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: Request, candidates: list[RoutedEngine], now: float) -> RoutedEngine:
        if len(candidates) > 2:
            candidates = self._rng.sample(candidates, 2)
        return super().choose(request, candidates, now)


ROUTERS = {r.name: r for r in (RoundRobin, LeastPredictedFinish, TwoChoices)}


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None
