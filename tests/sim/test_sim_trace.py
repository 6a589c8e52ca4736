"""A trace in columns (sim/trace.py) holds what the arrivals held, in time order, and a
simulation of it gives what the simulation of the arrivals gives."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.loop import Simulation
from cellserve.sim.parallel import ParallelSimulation
from cellserve.sim.router import TwoChoices
from cellserve.sim.trace import SimArrival, SimTrace

MS = 1e-3
CONFIG = EngineConfig(policy="cellular", pin_threads=False, profile=True)


def tokens(n: int, start: int = 1) -> np.ndarray:
    return (np.arange(start, start + n) % 40 + 1).astype(np.int64).reshape(1, -1)


def mixed_arrivals() -> list[SimArrival]:
    """Two models, one with inputs of two layouts (a rank and a dtype apart), the other's
    inputs differing in two axes, out of time order, with ties, deadlines and none,
    priorities and tags."""
    return [
        SimArrival(0.25, "gru", {"tokens": tokens(10).reshape(2, 5)}, 0.02, 0, 8),
        SimArrival(0.3, "gru", {"tokens": tokens(5)}, 0.02, 0, 7),
        SimArrival(0.1, "lstm", {"tokens": tokens(3, 9), "mask": np.ones((1, 3), np.float32)}, None, 2, 3),
        SimArrival(0.1, "gru", {"tokens": tokens(1)}, 0.5, 1, 4),  # ties the one before: after it
        SimArrival(0.2, "lstm", {"tokens": np.arange(6, dtype=np.int32).reshape(2, 3)}, None, 0, 5),
        SimArrival(0.0, "gru", {"tokens": tokens(12)}, 0.01, 0, 9),
    ]


def same(a: SimArrival, b: SimArrival) -> bool:
    return ((a.time_s, a.model, a.timeout_s, a.priority, a.tag) == (b.time_s, b.model, b.timeout_s, b.priority, b.tag)
            and list(a.inputs) == list(b.inputs)
            and all(a.inputs[k].dtype == b.inputs[k].dtype and a.inputs[k].shape == b.inputs[k].shape
                    and np.array_equal(a.inputs[k], b.inputs[k]) for k in a.inputs))


def test_a_trace_holds_each_arrival_in_time_order_ties_as_given():
    given = mixed_arrivals()
    trace = SimTrace(given)
    expected = sorted(given, key=lambda a: a.time_s)
    assert len(trace) == 6 and [a.tag for a in trace] == [9, 3, 4, 5, 8, 7]
    assert all(same(a, b) for a, b in zip(trace, expected))
    assert trace[-1].tag == 7 and [a.tag for a in trace[1:3]] == [3, 4]
    assert trace[1].timeout_s is None and trace[2].timeout_s == 0.5
    with pytest.raises(IndexError, match="arrival 6 of a trace of 6"):
        trace[6]


def test_a_traces_inputs_are_read_only_views_so_no_request_changes_the_trace():
    trace = SimTrace(mixed_arrivals())
    x = trace.inputs(0)["tokens"]
    with pytest.raises(ValueError, match="read-only"):
        x[0, 0] = 99
    assert not trace.time_s.flags.writeable


def test_traces_joined_equal_the_trace_of_their_arrivals_joined():
    a, b = mixed_arrivals(), [SimArrival(0.1, "gru", {"tokens": tokens(2)}, 0.2, 0, 11),
                              SimArrival(0.05, "dates", {"text": np.array([[3, 4]], np.int64)}, None, 0, 12)]
    joined = SimTrace.concat([SimTrace(a), SimTrace(b)])
    whole = SimTrace(a + b)
    assert joined.models == whole.models
    assert all(same(x, y) for x, y in zip(joined, whole)) and len(joined) == len(whole) == 8
    assert len(SimTrace.concat([])) == 0 and len(SimTrace.concat([SimTrace(), SimTrace(b)])) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_simulation_of_a_trace_gives_the_outcomes_of_its_arrivals(models, workers):
    profile = synthetic_profile(models.models["gru"], lambda b: 0.2 * MS + 0.02 * MS * b)
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.exponential(0.3 * MS, 400))
    given = [SimArrival(float(t), "gru", {"tokens": tokens(int(n), i)}, 0.02, 0, i)
             for i, (t, n) in enumerate(zip(times, rng.integers(1, 30, len(times))))]

    def outcomes(arrivals):
        sim = (Simulation(TwoChoices(seed=1), seed=2) if workers == 1
               else ParallelSimulation(TwoChoices(seed=1), seed=2, workers=workers))
        for i in range(3):
            sim.add_engine([models.models["gru"]], {"gru": profile}, CONFIG, name=f"e{i}")
        return sorted((o.tag, o.engine, o.status, o.finish_s) for o in sim.run(arrivals))

    assert outcomes(SimTrace(given)) == outcomes(given)
    assert len(outcomes(given)) == 400


def test_an_outcome_log_gives_back_each_answer_with_its_names_and_reason():
    from cellserve.engine.request import Response, Status
    from cellserve.sim.outcomes import OutcomeLog, SimOutcome

    a, b = OutcomeLog(), OutcomeLog()
    a.add(7, 1, 0, Response(1, Status.OK, arrival=0.5, finish=0.9))
    a.add(7, 0, 2, Response(2, Status.REJECTED, reason="predicted finish misses the deadline", arrival=0.1, finish=0.1))
    b.add(3, 1, 1, Response(3, Status.DROPPED, reason="late", arrival=0.2, finish=0.9))
    models, engines = ["gru", "lstm"], ["e0", "e1", "e2"]
    assert a.outcomes(models, engines) == [
        SimOutcome(7, "lstm", "e0", Status.OK, 0.5, 0.9),
        SimOutcome(7, "gru", "e2", Status.REJECTED, 0.1, 0.1, "predicted finish misses the deadline")]
    joined = OutcomeLog.join([a.arrays(), b.arrays(), OutcomeLog().arrays()])
    # by finish, then tag; a reason stays with its answer though two answers share a tag
    assert [(o.tag, o.engine, o.reason) for o in joined.outcomes(models, engines, by_finish=True)] == [
        (7, "e2", "predicted finish misses the deadline"), (3, "e1", "late"), (7, "e0", "")]
    assert OutcomeLog().outcomes(models, engines, by_finish=True) == []
