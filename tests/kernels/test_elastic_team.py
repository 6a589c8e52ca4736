"""The elastic team (kernels/_pointwise.c): a fused step or a lone lane's run on it answers bit
for bit as on OpenMP's team, whatever the batch, the kind or the sizes; teams start, stop and
are replaced without hanging; bad arguments are refused by name."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from cellserve.graph.model import GATES, DirectionWeights
from cellserve.kernels import _pointwise
from cellserve.kernels.cell import CellKernel

CPU = torch.device("cpu")
CORES = sorted(os.sched_getaffinity(0))


def kernel(kind: str, hidden: int, inputs: int, seed: int) -> CellKernel:
    rng = np.random.default_rng(seed)
    g = GATES[kind] * hidden
    w = DirectionWeights(rng.standard_normal((g, inputs), np.float32) * 0.1,
                         rng.standard_normal((g, hidden), np.float32) * 0.1,
                         rng.standard_normal(g).astype(np.float32), rng.standard_normal(g).astype(np.float32))
    return CellKernel(kind, hidden, w, CPU, backend="fused")


def run(k: CellKernel, xs: list[np.ndarray], steps: int, elastic: bool) -> list:
    """Batched steps of every lane, then a lone run of the first; each lane's outputs and state."""
    _pointwise.elastic_use(elastic)
    try:
        lanes = [k.start(x) for x in xs]
        for t in range(steps):
            slots = np.array([lane.slot for lane in lanes], np.int64)
            rows = np.array([lane.base + t for lane in lanes], np.int64)
            k.step(slots, rows, rows)
        first = lanes[0]
        k.run_lane(first.slot, first.base + steps, 1, len(xs[0]) - steps)
        return [k.finish(lane) for lane in lanes]
    finally:
        _pointwise.elastic_use(False)


@pytest.fixture
def team():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    _pointwise.elastic_team([CORES[0], CORES[-1]] if len(CORES) > 1 else [-1, -1])
    yield
    _pointwise.elastic_team(None)
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind, hidden, inputs, batch", [
    ("lstm", 512, 300, 1), ("lstm", 512, 300, 7), ("lstm", 257, 64, 40), ("gru", 256, 77, 13),
    ("gru", 130, 16, 64), ("rnn_tanh", 640, 33, 5), ("rnn_relu", 200, 8, 9),
])
def test_steps_on_the_elastic_team_answer_as_on_openmp_to_the_bit(team, kind, hidden, inputs, batch):
    rng = np.random.default_rng(batch)
    xs = [rng.standard_normal((12, inputs)).astype(np.float32) for _ in range(batch)]
    want = run(kernel(kind, hidden, inputs, 0), xs, 5, elastic=False)
    got = run(kernel(kind, hidden, inputs, 0), xs, 5, elastic=True)
    for lane_got, lane_want in zip(got, want):
        for a, b in zip(lane_got, lane_want):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_elastic_use_is_off_without_a_team():
    _pointwise.elastic_team(None)
    assert _pointwise.elastic_use(True) is False


def test_teams_are_replaced_and_stopped_many_times_without_hanging():
    k = kernel("gru", 256, 16, 1)
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    want = run(k, [x] * 4, 4, elastic=False)
    for i in range(20):
        assert _pointwise.elastic_team([-1] * (2 + i % 3), float(i % 2) * 50) == 2 + i % 3
        got = run(k, [x] * 4, 4, elastic=True)
        assert all(np.array_equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w) if a is not None)
    assert _pointwise.elastic_team(None) == 1
    assert _pointwise.elastic_team([3]) == 1  # one thread: no team


def test_a_thread_that_ends_with_a_team_frees_it():
    """The team's workers are joined when the thread that leads them ends (no hang, no leak of
    running threads): the process's thread count comes back to where it was."""
    def tasks() -> int:
        return len(os.listdir("/proc/self/task"))

    before = tasks()

    def lead():
        _pointwise.elastic_team([-1, -1, -1])
        assert tasks() >= before + 3

    t = threading.Thread(target=lead)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    # Python's join returns before the OS thread's exit handlers (which join the workers) ran
    deadline = time.monotonic() + 30
    while tasks() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tasks() == before


@pytest.mark.parametrize("args, error, says", [
    ((5,), TypeError, "cores must be a list of ints or None"),
    (([0, "x"],), TypeError, ""),
    (([0, 1], -1.0), ValueError, "spin_us must be within 0..1e6"),
    (([0] * 2000,), ValueError, "at most 1024 threads"),
])
def test_bad_team_arguments_are_refused_by_name(args, error, says):
    with pytest.raises(error, match=says):
        _pointwise.elastic_team(*args)
