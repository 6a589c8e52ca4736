"""Cores shared by models, for real (cluster/core_allocation.py, executor/interference.CoreLoadMeter):
the per-core load meter and the allocator's decisions on hand-made readings, with workers
that only record their moves; the processes themselves are tested in test_core_workers.py."""

from __future__ import annotations

import pytest

from cellserve.cluster.core_allocation import CoreAllocator, decide
from cellserve.executor.interference import CoreLoadMeter
from cellserve.plan.tenancy import Block, Tenant


class Readings:
    """/proc as a script: per sample, the cores' (busy, total) ticks and each pid's ticks."""

    def __init__(self, samples):
        self.samples, self.at = samples, -1

    def cores(self, _cores):
        self.at += 1
        return self.samples[self.at][0]

    def process(self, pid):
        return self.samples[self.at][1].get(pid)


def test_others_load_per_core_is_busy_time_less_ours():
    readings = Readings([
        ({0: (100, 1000), 1: (100, 1000)}, {10: 50, 11: 50, 12: 0}),
        # core 0: 500 busy, ours 400 (pid 10) + 0; core 1: 800 busy, ours 200 (pid 11)
        ({0: (600, 2000), 1: (900, 2000)}, {10: 450, 11: 250, 12: 0}),
        # pid 12 pinned to both cores: its 400 ticks count 200 on each
        ({0: (1100, 3000), 1: (1400, 3000)}, {10: 650, 11: 350, 12: 400}),
    ])
    meter = CoreLoadMeter((0, 1), smoothing=1.0, read_cores=readings.cores, read_process=readings.process)
    ours = {10: (0,), 11: (1,), 12: (0, 1)}
    assert meter.sample(ours) == {0: 0.0, 1: 0.0}  # the first reading: nothing to difference yet
    assert meter.sample(ours) == pytest.approx({0: 0.1, 1: 0.6})
    # core 0: 500 busy, ours 200 + 200 -> 0.1; core 1: 500 busy, ours 100 + 200 -> 0.2
    assert meter.sample(ours) == pytest.approx({0: 0.1, 1: 0.2})
    # each process's own use, in cores (1000 ticks per core passed): pid 12 used 400 -> 0.4
    assert meter.used == pytest.approx({10: 0.2, 11: 0.1, 12: 0.4})


def test_the_meter_smooths_and_survives_a_process_that_went_away():
    readings = Readings([
        ({0: (0, 1000)}, {10: 0}),
        ({0: (1000, 2000)}, {}),  # pid 10 gone: its time cannot be told from others'
        ({0: (1000, 3000)}, {}),
    ])
    meter = CoreLoadMeter((0,), smoothing=0.5, read_cores=readings.cores, read_process=readings.process)
    meter.sample({10: (0,)})
    assert meter.sample({10: (0,)}) == {0: 1.0}  # the first difference is taken as it is
    assert meter.sample({}) == {0: 0.5}  # then smoothed: 1.0 + 0.5 (0.0 - 1.0)


def _tenant(name, slo_s, step_s):
    return Tenant(name, (Block(name, (1, 64), (step_s, step_s * 64), (step_s * 0.6, step_s * 38)),), slo_s, 10)


TIGHT, LOOSE = _tenant("tight", 0.01, 1e-3), _tenant("loose", 0.1, 1e-3)


def test_decide_gives_the_neighbours_core_to_the_loose_model():
    assert decide([TIGHT, LOOSE], [100.0, 100.0], {0: 0.0, 1: 0.5}) == [(0,), (1,)]
    assert decide([LOOSE, TIGHT], [100.0, 100.0], {0: 0.0, 1: 0.5}) == [(1,), (0,)]
    # a neighbour under the noise floor is none: ties go to the lower core
    assert decide([LOOSE, TIGHT], [100.0, 100.0], {0: 0.05, 1: 0.0}) == [(1,), (0,)]
    # one model: every core
    assert decide([TIGHT], [100.0], {0: 0.0, 1: 0.5}) == [(0, 1)]


class FakeWorker:
    def __init__(self, pid, cores):
        self.pid, self.cores, self.moves = pid, cores, []

    def repin(self, cores):
        self.moves.append(cores)
        self.cores = cores


class Levels:
    """A meter whose readings are set by the test."""

    def __init__(self, pids=(1, 2)):
        self.now = {0: 0.0, 1: 0.0}
        self.used = {}  # no process's CPU use measured: each counts as a core
        self.pids = set(pids)

    def sample(self, ours):
        assert set(ours) == self.pids  # asked about the workers' own processes
        return self.now


def test_the_allocator_moves_workers_as_the_neighbour_moves():
    tight, loose = FakeWorker(1, (1,)), FakeWorker(2, (0,))
    levels = Levels()
    allocator = CoreAllocator([tight, loose], [TIGHT, LOOSE], (0, 1), lambda now, period: [100.0, 100.0],
                              meter=levels, clock=lambda: 0.0)
    levels.now = {0: 0.0, 1: 0.6}
    first = allocator.tick()
    assert first.cores == [(0,), (1,)] and first.moved == [0, 1]
    assert tight.moves == [(0,)] and loose.moves == [(1,)]
    assert allocator.tick().moved == []  # nothing changed: nobody moves
    levels.now = {0: 0.6, 1: 0.0}  # the neighbour went to core 0
    assert allocator.tick().moved == [0, 1]
    assert tight.cores == (1,) and loose.cores == (0,)
    levels.now = {0: 0.08, 1: 0.0}  # it left: a trace of load under the floor moves nothing back
    assert allocator.tick().moved == []
    assert len(allocator.decisions) == 4 and allocator.moves == 4


def test_rates_are_smoothed_between_periods():
    measured = iter([[100.0, 0.0], [0.0, 100.0]])
    allocator = CoreAllocator([FakeWorker(1, (0,)), FakeWorker(2, (1,))], [TIGHT, LOOSE], (0, 1),
                              lambda now, period: next(measured), meter=Levels(), clock=lambda: 0.0)
    assert allocator.tick().rates_rps == [100.0, 0.0]  # the first period's, as measured
    assert allocator.tick().rates_rps == [50.0, 50.0]


def test_a_third_model_joins_the_core_whose_model_uses_less():
    third = _tenant("third", 0.2, 1e-3)
    workers = [FakeWorker(1, (0,)), FakeWorker(2, (1,)), FakeWorker(3, (0,))]
    levels = Levels(pids=(1, 2, 3))
    allocator = CoreAllocator(workers, [TIGHT, LOOSE, third], (0, 1), lambda now, period: [100.0] * 3,
                              meter=levels, clock=lambda: 0.0)
    levels.used = {1: 0.8, 2: 0.2, 3: 0.3}  # the tight model busy on core 0, the loose one light on core 1
    assert allocator.tick().cores == [(0,), (1,), (1,)]
    levels.used = {1: 0.2, 2: 0.25, 3: 0.3}  # now about alike: within the margin, nobody moves
    assert allocator.tick().moved == []


def test_one_worker_per_tenant():
    with pytest.raises(ValueError, match="2 workers for 1 tenants"):
        CoreAllocator([FakeWorker(1, (0,)), FakeWorker(2, (1,))], [TIGHT], (0, 1), lambda now, period: [0.0])
