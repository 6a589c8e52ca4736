"""`serve --ray`'s readiness follows its workers: the server is ready while some worker lives,
a model (or an accuracy-scaled family) while a live worker takes its requests, so that a
load balancer stops sending what would only be answered 503. Without Ray: the driver's
cores over a Router of WorkerStates. The repository index says the same, with why."""

from __future__ import annotations

import pytest

from cellserve.cluster.ray_accuracy_core import AccuracyCore
from cellserve.cluster.ray_core import RayCore
from cellserve.cluster.ray_router import Router, WorkerInfo, WorkerState
from cellserve.server.errors import NotFound
from cellserve.server.metrics import Metrics
from cellserve.server.repository import load_zoo


def workers(models_by_worker: dict[str, list[str]]) -> list[WorkerState]:
    return [WorkerState(WorkerInfo(w, f"node-{w}", tuple(ms), {m: [] for m in ms}, {m: [0] for m in ms}, 64))
            for w, ms in models_by_worker.items()]


async def never(worker, call):
    raise AssertionError("readiness sends no request")


def test_ready_while_a_worker_lives_and_a_model_while_a_live_worker_serves_it():
    states = workers({"w0": ["gru-256"], "w1": ["gru-256", "lstm-512"]})
    core = RayCore(load_zoo(["gru-256", "lstm-512"]), Router(states), never, Metrics(None))
    assert core.ready() and core.model_ready("gru-256") and core.model_ready("lstm-512")
    core.mark_dead(states[1], "killed")
    assert core.ready() and core.model_ready("gru-256", "1")
    assert not core.model_ready("lstm-512")  # its only worker is gone
    assert core.repository_index() == [
        {"name": "gru-256", "version": "1", "state": "READY", "reason": ""},
        {"name": "lstm-512", "version": "1", "state": "UNAVAILABLE", "reason": "no live worker serves model 'lstm-512'"}]
    assert [m["name"] for m in core.repository_index(ready_only=True)] == ["gru-256"]
    core.mark_dead(states[0], "killed")
    assert not core.ready() and not core.model_ready("gru-256")
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        core.model_ready("nope")


def test_an_accuracy_family_is_ready_while_a_live_worker_hosts_any_of_its_variants():
    states = workers({"w0": ["reverse-h16"], "w1": ["reverse-h128"]})
    core = AccuracyCore.__new__(AccuracyCore)  # readiness needs only these (no frontends, no Ray)
    core.router, core.accepting = Router(states), True
    core.family_of = {"reverse-h16": "reverse", "reverse-h128": "reverse"}
    core._models = {"reverse": {"1": object()}}
    assert core.model_ready("reverse")
    core.router.mark_dead(states[0], "killed")
    assert core.model_ready("reverse")
    core.router.mark_dead(states[1], "killed")
    assert not core.model_ready("reverse") and not core.ready()
