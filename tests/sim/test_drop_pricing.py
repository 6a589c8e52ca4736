"""The drop check prices all runs in flight at once (admission._late_in_urgency_order): each
run (and the time it still needs) at a round of the lanes at least as urgent as its own, as _round_time prices that
load. Checked against that definition written out run by run, on a backlog of several cell
types (three of two models), priorities and deadlines, at many instants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.request import Request
from cellserve.plan.profile import synthetic_profile
from cellserve.sim.loop import Simulation

MS = 1e-3


def _one_run_at_a_time(engine, now: float) -> tuple[list, float]:
    """The drop check's rule, pricing each run's load from scratch: the late runs with the
    time each needs, and the least spare time of the others."""
    lanes = {t: engine.policy.lanes_of(t) for t in engine._placed}
    cap = engine.policy.max_batch
    ahead = dict.fromkeys(lanes, 0)
    late, spare = [], math.inf
    runs = [r for r in engine._runs.values() if r.deadline < math.inf and not r.probe]
    for run in sorted(runs, key=lambda r: (r.request.priority, r.deadline, r.request.arrival)):
        for ref in run.lanes.values():
            ahead[ref.cell_type] += 1
        round_s = engine._round_time({t: max(ahead[t], min(n, cap)) for t, n in lanes.items()}, shared=True)
        needed = engine._rounds_left(run) * round_s
        if now + needed > run.deadline:
            late.append((run, needed))
        else:
            spare = min(spare, run.deadline - needed - now)
    return late, spare


@pytest.mark.parametrize("executors_at_once", [False, True])
def test_the_drop_checks_pricing_equals_pricing_each_run_apart(models, executors_at_once):
    gru, s2s = models.models["gru"], models.models["seq2seq-reverse"]
    profiles = {"gru": synthetic_profile(gru, lambda b: 0.1 * MS + 0.02 * MS * b),
                "seq2seq-reverse": synthetic_profile(s2s, lambda b: 0.2 * MS + 0.01 * MS * b)}
    sim = Simulation()
    engine = sim.add_engine([gru, s2s], profiles, EngineConfig(policy="cellular", max_batch=4, admission=False,
                                                                drop_late=False, pin_threads=False)).engine
    engine.step_overhead_s, engine.admitting_share = 30e-6, 0.2
    if executors_at_once:  # a round takes its busiest executor's time: gru's type on one, the rest on another
        engine.costs.group_of = {t: int(not t.startswith("gru/")) for t in engine.cell_types}
    rng = np.random.default_rng(0)
    for i in range(40):
        model = (gru, s2s)[i % 2]
        spec = model.inputs[0]
        tokens = rng.integers(1, model.semantics[spec.name].vocab, size=(1, int(rng.integers(2, 9))), dtype=np.int64)
        engine.submit(Request(model.name, {spec.name: tokens}, timeout_s=float(rng.uniform(5, 60)) * MS,
                              priority=int(rng.integers(0, 2))))
    for _ in range(30):
        engine.step()
    lanes = {t: engine.policy.lanes_of(t) for t in engine._placed}
    assert sum(n > engine.policy.max_batch for n in lanes.values()) >= 2  # a backlog in several types
    runs = [r for r in engine._runs.values() if r.deadline < math.inf]
    seen = set()
    for now in engine.clock.now() + np.linspace(0, 60 * MS, 61):
        got, got_spare = engine._late_in_urgency_order(runs, lanes, float(now))
        want, want_spare = _one_run_at_a_time(engine, float(now))
        assert got_spare == pytest.approx(want_spare, rel=1e-9, abs=1e-12)
        assert [r.request.request_id for r, _ in got] == [r.request.request_id for r, _ in want]
        assert [needed for _, needed in got] == pytest.approx([needed for _, needed in want], rel=1e-12)
        seen.add(len(got))
    assert min(seen) < len(runs) // 2 and max(seen) == len(runs)  # instants with few late and with all
