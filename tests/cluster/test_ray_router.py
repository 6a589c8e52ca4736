"""The driver's routing for `serve --ray`, without Ray: least predicted finish by the workers'
own cost tables, outstanding load, dead workers, plans to workers and rate gates, settings."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from cellserve.cluster.ray_plan import PlanMismatch, from_flags, from_plan
from cellserve.cluster.ray_router import (RateGate, Router, WorkerInfo, WorkerState, cost_model_from,
                                          cost_snapshot, time_length)
from cellserve.config_args import add_flags, resolve
from cellserve.engine.cost_model import MAX_ADMITTING_SHARE, PREDICTION_BOUND, CostModel
from cellserve.plan.nexus_io import parse_plan
from cellserve.server.settings import ServerSettings

CELL = "m:1/rnn"


def worker(wid: str, step_s: float, models=("m",)) -> WorkerState:
    info = WorkerInfo(wid, f"node-{wid}", tuple(models), {m: [CELL] for m in models}, {m: [0] for m in models}, 64)
    costs = CostModel(64)
    for b in (1, 2, 4, 8, 16, 32, 64):
        costs.observe(CELL, b, step_s * (1 + 0.1 * b))
    w = WorkerState(info)
    w.costs = cost_model_from(cost_snapshot(costs), 64)
    return w


def test_a_busy_worker_is_priced_by_the_engines_rule_with_its_overhead_and_admitting_share():
    w = worker("w0", 1e-3)
    for _ in range(200):  # a slow spell: the moving averages go far past the fastest steps
        for b in (1, 2):
            w.costs.observe(CELL, b, 1.0)
    router = Router([w])
    router.update_costs(w, cost_snapshot(w.costs), step_overhead_s=2e-4, admitting_share=0.2)
    assert router.predict(w, "m", 10, 1) == pytest.approx(10 * 1.1e-3)  # idle: the fastest step of 1 lane
    router.started(w, "m", 1)
    # busy, 2 lanes: the bound, plus the overhead of one batch, stretched by the admitting share
    assert router.predict(w, "m", 10, 1) == pytest.approx(10 * (PREDICTION_BOUND * 1.2e-3 + 2e-4) / 0.8)
    router.update_costs(w, cost_snapshot(w.costs), step_overhead_s=2e-4, admitting_share=0.9)
    assert router.predict(w, "m", 10, 1) == pytest.approx(
        10 * (PREDICTION_BOUND * 1.2e-3 + 2e-4) / (1 - MAX_ADMITTING_SHARE))


def test_a_snapshot_prices_exactly_as_the_cost_model_it_came_from():
    costs = CostModel(64)
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = int(rng.integers(1, 65))
        costs.observe(CELL, b, 1e-4 * b ** 0.5 * float(rng.uniform(0.8, 1.5)))
    copy = cost_model_from(cost_snapshot(costs), 64)
    for lanes in (1, 3, 17, 64, 100):
        for best in (False, True):
            assert copy.round_time({CELL: lanes}, best) == costs.round_time({CELL: lanes}, best)


def test_the_least_predicted_finish_wins_and_outstanding_load_counts():
    fast, slow = worker("w0", 1e-3), worker("w1", 2e-3)
    router = Router([slow, fast])
    chosen, predicted = router.pick("m", rounds=10, lanes=1)
    assert chosen is fast and predicted == pytest.approx(10 * 1e-3 * 1.1)
    for _ in range(40):  # the fast worker fills up: its rounds at 41 lanes cost more than the slow one's at 1
        router.started(fast, "m", 1)
    assert router.predict(fast, "m", 10, 1) > router.predict(slow, "m", 10, 1)
    assert router.pick("m", 10, 1)[0] is slow
    for _ in range(40):
        router.finished(fast, "m", 1)
    assert fast.outstanding == 0 and fast.load == {CELL: 0} and router.pick("m", 10, 1)[0] is fast


def test_a_dead_worker_is_never_picked_and_excluded_ones_are_skipped():
    a, b = worker("w0", 1e-3), worker("w1", 1e-3)
    router = Router([a, b])
    assert router.pick("m", 5, 1, exclude=("w0",))[0] is b
    assert router.mark_dead(a, "node gone") and not router.mark_dead(a, "again")
    assert router.pick("m", 5, 1)[0] is b and router.pick("m", 5, 1, exclude=("w1",)) is None
    assert router.serving("m") == [b] and router.serving("m", live_only=False) == [a, b]
    assert router.pick("other", 5, 1) is None


def test_rounds_count_the_longest_time_axis_and_a_decoders_end_step():
    from cellserve.graph import zoo

    model = zoo.load("lstm-512")
    assert time_length(model, {"tokens": np.zeros((1, 23), np.int64)}) == 23
    w = worker("w0", 1e-3)
    w.info.extra_rounds["m"] = [0, 1]  # an encoder, then a decoder's end step
    assert Router([w]).rounds(w, "m", 23) == 23 + 24


def test_a_rate_gate_admits_the_planned_rate_and_a_burst_no_more():
    gate = RateGate(10.0, burst_s=0.5)  # 5 requests of burst
    assert [gate.admit(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert gate.admit(0.05) is False and gate.admit(0.1) is True  # one token per 100 ms
    with pytest.raises(ValueError):
        RateGate(0.0, 1.0)


PLAN = {"device_type": "cpu", "devices_used": 2, "devices": [
    {"id": 0, "device_type": "cpu", "duty_cycle_ms": 40, "occupancy": 0.9,
     "sessions": [{"id": "a", "model": "lstm-512", "slo_ms": 100, "batch": 4, "rate_rps": 100}]},
    {"id": 1, "device_type": "cpu", "duty_cycle_ms": 40, "occupancy": 0.8,
     "sessions": [{"id": "b", "model": "lstm-512", "slo_ms": 200, "batch": 2, "rate_rps": 50},
                  {"id": "c", "model": "gru-256", "slo_ms": 50, "batch": 2, "rate_rps": 20}]}],
    "unserved": [{"id": "d", "model": "bilstm-tagger", "slo_ms": 10, "rate_rps": 5, "reason": "SLO below 2 l(1)"}]}


def test_a_plan_makes_one_worker_per_device_and_gates_each_model_at_its_planned_rate():
    layout = from_plan(parse_plan(PLAN), ["lstm-512", "gru-256", "bilstm-tagger", "seq2seq-reverse"])
    assert layout.workers == (("lstm-512",), ("lstm-512", "gru-256"))
    assert layout.gates["lstm-512"].rate == 150 and layout.gates["lstm-512"].capacity == pytest.approx(30)
    assert layout.gates["gru-256"].rate == 20 and layout.gates["gru-256"].capacity == 1.0
    assert layout.unplanned == {"bilstm-tagger": "unserved: SLO below 2 l(1)",
                                "seq2seq-reverse": "the plan places it on no device"}
    with pytest.raises(PlanMismatch, match=r"plan file 'P.json': devices\[1\].sessions\[1\].model is 'gru-256'"):
        from_plan(parse_plan(PLAN), ["lstm-512"], "P.json")
    assert from_flags(["a", "b"], 3).workers == (("a", "b"),) * 3


def parse(*argv: str) -> ServerSettings:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, ServerSettings)
    return resolve(ServerSettings, parser.parse_args(list(argv)))


def test_the_ray_flags():
    assert parse("--ray").ray_address == "local" and parse().ray_address is None
    s = parse("--ray", "auto", "--ray-workers", "3", "--ray-cpus-per-worker", "2")
    assert (s.ray_address, s.ray_workers, s.ray_cpus_per_worker) == ("auto", 3, 2)
    with pytest.raises(ValueError, match=r"^--plan is for the Ray workers: it needs --ray \(ray_address\)$"):
        parse("--plan", "p.json")
    with pytest.raises(ValueError, match="--ray-workers cannot be combined with --plan"):
        parse("--ray", "--plan", "p.json", "--ray-workers", "2")
    with pytest.raises(ValueError, match="--ray-cpus-per-worker must be >= 1, got 0"):
        parse("--ray", "--ray-cpus-per-worker", "0")


def test_a_ray_address_where_nothing_answers_is_one_line_at_once():
    """Ray would retry its GCS for minutes, printing only its own warnings: the server says
    what is wrong and exits 1 instead."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", "--ray", f"127.0.0.1:{port}", "--model",
                           "gru-256", "--http-port", "0", "--grpc-port", "-1", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot join Ray: nothing answers at 127.0.0.1:{port}" in done.stderr, done.stderr


def test_a_sequences_first_chunk_goes_where_the_fewest_sequences_are_kept():
    fast, slow = worker("w0", 1e-3), worker("w1", 2e-3)
    router = Router([fast, slow])
    assert router.pick("m", 10, 1)[0] is fast
    fast.sequences = 3  # idle sequences: no load, so the prediction does not see them
    assert router.pick("m", 10, 1)[0] is fast
    chosen, predicted = router.pick("m", 10, 1, by_sequences=True)
    assert chosen is slow and predicted == pytest.approx(router.predict(slow, "m", 10, 1))
    slow.sequences = 3  # equal counts: the predicted finish decides
    assert router.pick("m", 10, 1, by_sequences=True)[0] is fast
