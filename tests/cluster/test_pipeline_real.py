"""cluster/pipeline_real.py: a pipeline plan served by real worker processes, one per stage,
driven by the simulator's reservation plane on the wall clock; and `cellserve bench
pipeline`'s refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cellserve.cluster.pipeline_real import INLINE_BYTES, PipelineRunError, RealPipeline, pack, serve_load, unpack
from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.engine.request import Request
from cellserve.graph import zoo
from cellserve.plan.pipeline import Block, Link, ModelBlocks, ModelPlan, Pipeline, Stage


def test_a_small_batch_travels_as_it_is_and_a_large_one_through_a_file_that_is_then_removed(tmp_path):
    small = [{"x": np.arange(4, dtype=np.float32)}, "stage 0: refused"]
    assert pack(small, str(tmp_path), "a") == ("inline", small)
    big = [{"y": np.arange(INLINE_BYTES, dtype=np.float32).reshape(2, -1), "n": np.array([3], np.int64)},
           "stage 1: why", {"y": np.ones((1, 5), np.float64)}]
    payload = pack(big, str(tmp_path), "b")
    assert payload[0] == "file" and os.listdir(tmp_path) == ["b"]
    rows = unpack(payload)
    assert os.listdir(tmp_path) == []
    assert rows[1] == "stage 1: why"
    for got, sent in ((rows[0], big[0]), (rows[2], big[2])):
        assert set(got) == set(sent)
        for k in sent:
            assert got[k].dtype == sent[k].dtype and np.array_equal(got[k], sent[k])


def _plan(slo_ms: float = 1000.0) -> tuple[ModelBlocks, ModelPlan]:
    table = {b: 2.0 * b for b in (1, 2, 4, 8)}
    blocks = ModelBlocks(slo_ms, 1.0, (Block({"core0": table}, 0.04), Block({"core1": table}, 0.0)))
    pipeline = Pipeline(4, 500.0, (Stage(0, 0, "core0", 1), Stage(1, 1, "core1", 1)))
    return blocks, ModelPlan(500.0, (pipeline,))


@pytest.mark.slow
def test_two_workers_answer_every_request_once_as_the_whole_model_does_bit_for_bit():
    model = zoo.load("lstm-512")
    cores = sorted(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    inputs = [{"tokens": rng.integers(0, 10000, size=(1, int(rng.integers(2, 20))))} for _ in range(400)]
    blocks, plan = _plan()
    with RealPipeline("lstm-512", (0,), [[(cores[0],)], [(cores[-1],)]]) as pipe:
        folder = pipe.folder
        run = serve_load(pipe, blocks, plan, Link(0.5, 1.0), lambda i: inputs[i], 100.0, 1.5, seed=3,
                         keep_answers=True)
        assert os.listdir(folder) == []  # every hand-over read and removed
    assert not os.path.exists(folder)
    assert run.offered == len(run.answers) > 50
    assert run.served + run.late + run.dropped + run.failed == run.offered and run.failed == 0
    assert run.batches >= 1 and run.rows == run.offered - run.dropped
    engine = Engine([model], EngineConfig(admission=False, profile=False, stack_layers=False))
    whole = {}
    for i in run.answers:
        engine.submit(Request("lstm-512", inputs[i], on_done=lambda r, i=i: whole.__setitem__(i, r.outputs)))
    engine.run_until_idle(timeout_s=120)
    for i, answer in run.answers.items():
        assert list(answer) == ["probabilities", "label"]
        for k in answer:
            assert np.array_equal(answer[k], whole[i][k]), (i, k)
    assert all(len(s) == 2 for s in run.stage_ms) and all(len(h) == 3 for h in run.hop_ms)


@pytest.mark.slow
def test_a_worker_that_cannot_start_is_named():
    why = r"did not start: stage 0: CutError: .*has 2 recurrent steps.*; stage 1: CutError"
    with pytest.raises(PipelineRunError, match=why):
        with RealPipeline("lstm-512", (5,), [[(0,)], [(0,)]]):
            pass


@pytest.mark.parametrize("args, why", [
    (["--tokens", "5000"], "--tokens 5000 is over 'lstm-512''s limit"),
    (["--cut", "1"], "has 2 recurrent steps: a cut is after step 0..0"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--seed", "-1"], "--seed: must be from 0 to 4294967295, got -1"),
])
def test_bench_pipeline_refuses_what_it_cannot_run_before_starting_workers(tmp_path, args, why):
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "pipeline", "--json",
                           str(tmp_path / "r.json"), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert why in done.stdout + done.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_stage_is_timed_on_the_batches_that_ran_beside_the_other_stage():
    from cellserve.bench.pipeline_real import _overlap

    assert _overlap((0.0, 10.0), [(2.0, 4.0), (8.0, 20.0)]) == pytest.approx(0.4)
    assert _overlap((0.0, 10.0), [(10.0, 12.0)]) == 0.0
    assert _overlap((5.0, 5.0), [(0.0, 10.0)]) == 0.0  # an empty span shares nothing


def test_the_calibration_scales_each_stage_by_its_time_at_the_planned_batch():
    from cellserve.bench.pipeline_real import _scale
    from cellserve.cluster.pipeline_real import RunResult

    timings = {8: {"stage_ms": [4.0, 10.0]}, 16: {"stage_ms": [8.0, 20.0]}}
    run = RunResult(100.0, stage_ms=[(10.0, 20.0)] * 9 + [(100.0, 100.0)], batch_sizes=[16] * 9 + [8])
    assert _scale(run, 16, timings) == pytest.approx((1.25, 1.0))  # the batch of 8 is not counted
    few = RunResult(100.0, stage_ms=[(10.0, 20.0)] * 4, batch_sizes=[16] * 4)
    assert _scale(few, 16, timings) == (1.0, 1.0)  # too few to go by
    slow = RunResult(100.0, stage_ms=[(80.0, 1.0)] * 9, batch_sizes=[16] * 9)
    assert _scale(slow, 16, timings) == pytest.approx((2.0, 0.5))  # held within [0.5, 2]
