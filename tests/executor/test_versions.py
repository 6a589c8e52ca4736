"""Kernel versions chosen by interference (executor/versions.py, plan/versions.py,
executor/interference.py): the profile's data and predictions, the meter's arithmetic, the
chooser's hysteresis, and an engine that switches versions answering bit for bit as one that
does not."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request, Status
from cellserve.executor.interference import CpuTimes, InterferenceMeter, others_load
from cellserve.executor.kernel import KernelExecutor
from cellserve.executor.versions import SWITCH_GAIN, VersionChooser, profiled_as
from cellserve.graph import zoo
from cellserve.plan.versions import VersionProfile, VersionProfileError

TWO_CORES = len(os.sched_getaffinity(0)) >= 2


ONE, TWO, ELASTIC = "openmp-1", "openmp-2", "elastic-2"


def profile(model="m", cell_types=("m/a",), one=(100e-6, 100e-6), two=(50e-6, 200e-6), pause_factor=1.0,
            elastic=None):
    """Steps of batch 1 and 64 at levels 0 and 1 core: OpenMP's two threads take `two` (level 0,
    level 1) per lane-step, one thread `one`, the elastic team `elastic` (none: no such
    version); after a pause `pause_factor` times that."""
    levels = len(one)

    def table(per):
        steady = tuple((per[i] * 1, per[i] * 64) for i in range(levels))
        return {"steady": steady, "pause": tuple(tuple(x * pause_factor for x in r) for r in steady)}

    versions = {ONE: one, TWO: two, **({ELASTIC: elastic} if elastic else {})}
    return VersionProfile(model=model, backend="fused", cores=2, versions=tuple(versions), batches=(1, 64),
                          duties=tuple(x / (levels - 1) for x in range(levels)),
                          levels=tuple(x / (levels - 1) for x in range(levels)),
                          step_s={ct: {v: table(per) for v, per in versions.items()} for ct in cell_types})


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FixedMeter:
    def __init__(self, level=0.0):
        self.level = level

    def read(self):
        return self.level


# ---- the profile ----

def test_a_profile_round_trips_through_json(tmp_path):
    p = profile(cell_types=("m/a", "m/b"))
    p.to_json(tmp_path / "v.json")
    again = VersionProfile.from_json(tmp_path / "v.json")
    assert again == p
    assert json.loads((tmp_path / "v.json").read_text())["kind"] == "kernel-versions"


def test_predictions_interpolate_levels_and_batches():
    p = profile()
    assert p.predict("m/a", TWO, 1, 0.0) == pytest.approx(50e-6)
    assert p.predict("m/a", TWO, 1, 1.0) == pytest.approx(200e-6)
    assert p.predict("m/a", TWO, 1, 0.5) == pytest.approx(125e-6)  # halfway between the levels
    assert p.predict("m/a", TWO, 1, 3.0) == pytest.approx(200e-6)  # past the last level: its value
    # between batch 1 (50 us) and batch 64 (3,200 us) at level 0
    assert p.predict("m/a", TWO, 32, 0.0) == pytest.approx(50e-6 + (31 / 63) * (3200e-6 - 50e-6))
    assert p.predict("m/a", TWO, 128, 0.0) == pytest.approx(2 * 3200e-6)  # past the largest batch: scaled
    assert profile(pause_factor=3.0).predict("m/a", ONE, 1, 0.0, paused=True) == pytest.approx(300e-6)


@pytest.mark.parametrize("edit, says", [
    (lambda d: d.update(kind="profile"), "kind must be 'kernel-versions'"),
    (lambda d: d.update(schema_version=9), "schema_version is 9"),
    (lambda d: d.pop("levels"), "lacks levels"),
    (lambda d: d.update(levels=[0.5, 0.1]), "levels must be ascending"),
    (lambda d: d.update(versions=["openmp-1", "openmp-3"]), "runs more threads than the 2 cores"),
    (lambda d: d.update(versions=["openmp-1", "elastic-1"]), "is not openmp-N (N >= 1) or elastic-N (N >= 2)"),
    (lambda d: d.update(versions=["openmp-1", "threads-2"]), "'threads-2' is not openmp-N"),
    (lambda d: d["cell_types"]["m/a"].pop(ONE), "has versions ['openmp-2']"),
    (lambda d: d["cell_types"]["m/a"][ONE].pop("pause"), "steady and pause"),
    (lambda d: d["cell_types"]["m/a"][ONE]["steady"][0].append(1.0), "must hold 2 levels of 2 batch sizes"),
    (lambda d: d["cell_types"]["m/a"][TWO]["steady"][0].__setitem__(0, -1.0), "finite number >= 0"),
    (lambda d: d["cell_types"]["m/a"][TWO]["steady"][0].__setitem__(0, 0.0), "step time <= 0"),
    (lambda d: d.update(cell_types={}), "nothing was profiled"),
])
def test_a_broken_profile_is_refused_naming_the_field(edit, says):
    d = profile().to_dict()
    edit(d)
    with pytest.raises(VersionProfileError, match=None) as err:
        VersionProfile.from_dict(d)
    assert says in str(err.value)


def test_a_profile_names_the_cell_types_of_its_model_however_the_server_names_it():
    p = profile(model="lstm-512", cell_types=("lstm-512/s0",))
    assert profiled_as("lstm-512/s0", [p]) == (p, "lstm-512/s0")
    assert profiled_as("lstm-512:1/s0", [p]) == (p, "lstm-512/s0")
    assert profiled_as("lstm-512:1#2/s0", [p]) == (p, "lstm-512/s0")
    assert profiled_as("lstm-5120/s0", [p]) is None
    assert profiled_as("lstm-512/s1", [p]) is None


# ---- the meter ----

def test_others_load_is_the_cores_busy_time_not_this_process():
    before, after = CpuTimes(busy=100, total=1000, own=40), CpuTimes(busy=300, total=1200, own=90)
    # 200 ticks over 2 cores = 100 ticks per core; 200 busy, 50 of them ours: 1.5 cores of others
    assert others_load(before, after, 2) == pytest.approx(1.5)
    assert others_load(before, before, 2) == 0.0  # no tick passed
    assert others_load(before, CpuTimes(busy=150, total=1200, own=140), 2) == 0.0  # never below 0


def test_the_meter_samples_once_a_period_and_smooths():
    clock = Clock()
    readings = iter([CpuTimes(0, 0, 0), CpuTimes(100, 200, 0), CpuTimes(100, 400, 0)])
    meter = InterferenceMeter((0, 1), period_s=0.25, smoothing=0.5, read=lambda cores: next(readings), now=clock)
    assert meter.read() == 0.0  # no period passed: no sample taken
    clock.t = 0.3
    assert meter.read() == pytest.approx(1.0)  # 100 busy ticks of others over 100 per core
    clock.t = 0.4
    assert meter.read() == pytest.approx(1.0)  # within the period: the same reading
    clock.t = 0.6
    assert meter.read() == pytest.approx(0.5)  # idle sample (0) smoothed in at half weight


def test_a_meter_that_cannot_read_proc_reads_no_interference():
    clock = Clock()
    meter = InterferenceMeter((0,), read=lambda cores: None, now=clock)
    clock.t = 10.0
    assert meter.read() == 0.0


# ---- the chooser ----

def test_the_chooser_moves_to_fewer_threads_only_when_the_level_makes_them_cheaper():
    clock, level = Clock(), [0.0]
    chooser = VersionChooser([profile()], lambda: level[0], all_threads=2, now=clock, period_s=0.25)
    assert chooser.knows("m/a") and not chooser.knows("m/zzz")
    assert chooser.step("m/a", 1, False) == TWO
    level[0] = 1.0  # one thread (100 us) is now far cheaper than two (200 us)
    assert chooser.step("m/a", 1, False) == TWO  # within the period: no new choice
    clock.t = 0.3
    assert chooser.step("m/a", 1, False) == ONE
    level[0] = 0.0
    clock.t = 0.6
    assert chooser.step("m/a", 1, False) == TWO  # back once the neighbour left


def test_a_version_barely_cheaper_does_not_replace_the_one_in_force():
    clock = Clock()
    nearly = 1 - SWITCH_GAIN / 2  # one thread predicted only half the gain needed cheaper
    p = profile(one=(100e-6 * nearly, 100e-6 * nearly), two=(100e-6, 100e-6))
    chooser = VersionChooser([p], lambda: 1.0, all_threads=2, now=clock, period_s=0.25)
    for t in (0.3, 0.6, 0.9):
        clock.t = t
        assert chooser.step("m/a", 1, False) == TWO


def test_the_chooser_prices_the_mix_of_recent_steps():
    """With a whole core taken, one thread wins a step of one lane (100 against 200 us) and
    two threads a step of 64 (4.0 against 6.4 ms): the choice follows the batches run lately."""
    p = VersionProfile(model="m", backend="fused", cores=2, versions=(ONE, TWO), batches=(1, 64), duties=(0.0, 1.0),
                       levels=(0.0, 1.0),
                       step_s={"m/a": {ONE: {"steady": ((100e-6, 6400e-6),) * 2, "pause": ((100e-6, 6400e-6),) * 2},
                                       TWO: {"steady": ((50e-6, 3200e-6), (200e-6, 4000e-6)),
                                             "pause": ((50e-6, 3200e-6), (200e-6, 4000e-6))}}})
    clock = Clock()
    small = VersionChooser([p], lambda: 1.0, all_threads=2, now=clock, period_s=0.25)
    large = VersionChooser([p], lambda: 1.0, all_threads=2, now=clock, period_s=0.25)
    for _ in range(10):
        small.step("m/a", 1, False)
        large.step("m/a", 64, False)
    clock.t = 0.3
    assert small.step("m/a", 1, False) == ONE  # 100 against 200 us a step
    assert large.step("m/a", 64, False) == TWO  # 4.0 against 6.4 ms a step


# ---- an engine that switches versions ----

def _tokens(rng, n, vocab):
    return [rng.integers(0, vocab, size=int(rng.integers(3, 30))).reshape(1, -1) for _ in range(n)]


def _answers(engine, model, inputs):
    answers = {}
    for i, x in enumerate(inputs):
        engine.submit(Request(model, {"tokens": x}, on_done=lambda r, i=i: answers.__setitem__(i, r)))
    engine.run_until_idle(timeout_s=60)
    assert all(r.status is Status.OK for r in answers.values())
    return [answers[i].outputs for i in range(len(inputs))]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Cycling:
    """A meter whose level goes 0, 0.5, 1, 0, ... a core at each reading."""

    def __init__(self):
        self.level, self.reads = 0.0, 0

    def read(self):
        self.reads += 1
        self.level = (self.reads % 3) / 2
        return self.level


@pytest.mark.skipif(not TWO_CORES, reason="versions need two cores to switch between")
@pytest.mark.parametrize("name", ["gru-256", "lstm-512", "bilstm-tagger"])
def test_switching_versions_between_steps_changes_no_answer_by_a_bit(name, two_threads):
    model = zoo.load(name)
    rng = np.random.default_rng(0)
    inputs = _tokens(rng, 40, 1000)
    plain = Engine([model], EngineConfig(profile=False, backend="fused"))
    want = _answers(plain, name, inputs)
    executor = KernelExecutor("cpu", "fused")
    engine = Engine([zoo.load(name)], EngineConfig(profile=False, backend="fused"), executors={"default": executor})
    cell_types = list(executor.kernels)
    # OpenMP's two threads cheapest at level 0, the elastic team at 0.5, one thread at 1: the
    # cycling meter makes it switch at every choice, through all three
    p = profile(model=name, cell_types=cell_types, one=(100e-6, 100e-6, 100e-6), two=(50e-6, 400e-6, 400e-6),
                elastic=(60e-6, 60e-6, 400e-6))
    executor.use_versions([p], meter=Cycling(), period_s=0.0)
    got = _answers(engine, name, inputs)
    versions = executor.versions
    assert versions.switches > 10, versions.switches
    assert {v for _, v in versions.steps} == {ONE, TWO, ELASTIC}
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k


@pytest.mark.skipif(not TWO_CORES, reason="versions need two cores to switch between")
def test_the_metrics_say_which_versions_ran(two_threads):
    from cellserve.server.metrics import Metrics

    executor = KernelExecutor("cpu", "fused")
    engine = Engine([zoo.load("gru-256")], EngineConfig(profile=False, backend="fused"),
                    executors={"default": executor})
    executor.use_versions([profile(model="gru-256", cell_types=list(executor.kernels))], meter=FixedMeter(1.0),
                          period_s=0.0)
    _answers(engine, "gru-256", _tokens(np.random.default_rng(1), 5, 1000))
    text = Metrics(engine).exposition().decode()
    assert 'cellserve_interference_cores{executor="default"} 1.0' in text
    assert 'version="openmp-1"' in text and "cellserve_kernel_version_switches_total" in text


def test_an_engine_refuses_versions_it_cannot_use(tmp_path):
    model = zoo.load("gru-256")
    path = tmp_path / "v.json"
    profile(model="lstm-512", cell_types=("lstm-512/x",)).to_json(path)
    with pytest.raises(ValueError, match=r"profile of model\(s\) \['lstm-512'\], which this engine does not serve"):
        Engine([model], EngineConfig(profile=False, backend="fused", kernel_versions=[str(path)]))
    profile(model="gru-256", cell_types=("gru-256/x",)).to_json(path)
    with pytest.raises(ValueError, match="runs the onednn step"):
        Engine([model], EngineConfig(profile=False, backend="onednn", kernel_versions=[str(path)]))
    path.write_text("{}")
    with pytest.raises(ValueError, match="--kernel-versions: kind must be 'kernel-versions'"):
        Engine([model], EngineConfig(profile=False, backend="fused", kernel_versions=[str(path)]))


def test_a_level_under_the_noise_floor_counts_as_none():
    from cellserve.executor.versions import NOISE_FLOOR

    clock = Clock()
    # just under the floor one thread would be priced far cheaper (92 against 405 us): it is not chosen
    chooser = VersionChooser([profile(one=(100e-6, 10e-6), two=(50e-6, 4000e-6))], lambda: NOISE_FLOOR * 0.9,
                             all_threads=2, now=clock, period_s=0.25)
    chooser.step("m/a", 1, False)
    clock.t = 0.3
    assert chooser.step("m/a", 1, False) == TWO


@pytest.mark.skipif(not TWO_CORES, reason="a two-thread profile needs two cores")
def test_a_profile_without_the_engines_own_version_is_refused(tmp_path, two_threads):
    no_default = profile(model="gru-256", cell_types=("gru-256/x",)).to_dict()
    no_default["versions"] = [ONE]
    del no_default["cell_types"]["gru-256/x"][TWO]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(no_default))
    with pytest.raises(ValueError, match="does not time openmp-2, the engine's own version"):
        Engine([zoo.load("gru-256")], EngineConfig(profile=False, backend="fused", kernel_versions=[str(path)]))
