"""The fixed capacity profile of `serve --ray --accuracy-scaling` (ray_accuracy_profile.py):
the family's typical request, l(b) measured on a real idle engine, l(b) from a `cellserve
profile` file and its refusals; and the bench's pieces (accuracy_client.plans, the run
summary of bench/accuracy_serve.py)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from cellserve.bench.accuracy_client import Outcome, plans
from cellserve.bench.accuracy_serve import AccuracyServeConfig, summarise
from cellserve.cluster.ray_accuracy import served_variants
from cellserve.cluster.ray_accuracy_profile import (ProfilingError, mean_points, measure_points, points_from_profile,
                                                    typical_rows)
from cellserve.graph.zoo import families
from cellserve.graph.zoo.seq2seq import DIGIT_OFFSET, MAX_INPUT_DIGITS
from cellserve.plan.profile import ProfileError, synthetic_profile


def test_the_reversers_typical_request_is_seven_digits_drawn_from_its_task():
    length, rows = typical_rows(families.load("reverse-h16"), 50)
    assert length == 7 == math.ceil((1 + MAX_INPUT_DIGITS) / 2)  # uniform 1..12 digits: mean 6.5, rounded up
    assert len(rows) == 50 and all(r.shape == (length,) and r.dtype == np.int64 for r in rows)
    tokens = np.concatenate(rows)
    assert tokens.min() >= DIGIT_OFFSET and tokens.max() <= DIGIT_OFFSET + 9
    assert len({tuple(r) for r in rows}) > 45  # drawn, not one row repeated


@pytest.fixture(scope="module")
def engine():
    from cellserve.engine.config import EngineConfig
    from cellserve.engine.engine import Engine

    served = {s.name: s for s in served_variants(["reverse-h16"], 100.0)}
    e = Engine([s.model for s in served.values()], EngineConfig(max_batch=8))
    stop = threading.Event()
    thread = threading.Thread(target=e.serve_forever, args=(stop,), daemon=True)
    thread.start()
    yield e, served["reverse-h16"]
    stop.set()
    thread.join(10)


def test_latency_is_measured_per_batch_size_up_to_the_engines_cap(engine):
    e, served = engine
    _, rows = typical_rows(served.model, 64)
    points = measure_points(e, served.engine_name, "digits", rows, batches=(1, 2, 4, 8, 16), repeats=2)
    assert [b for b, _ in points] == [1, 2, 4, 8]  # 16 is past the cap of 8
    assert all(ms > 0 for _, ms in points)
    assert e.active_requests == 0 and e.queued_requests == 0  # every profiling request answered


def test_a_profiling_request_that_fails_is_an_error_naming_the_model(engine):
    e, served = engine
    with pytest.raises(ProfilingError, match=r"profiling 'reverse-h16:1' at batch 1: a request failed \(invalid"):
        measure_points(e, served.engine_name, "no_such_input", [np.array([3, 4], np.int64)], repeats=1)


def test_points_from_a_profile_file_and_its_refusals(tmp_path):
    model = families.load("reverse-h16")
    path = tmp_path / "h16.json"
    synthetic_profile(model, lambda b: 1e-4 * (1 + b / 8), max_batch=16).to_json(path)
    points = points_from_profile(str(path), model, 7)
    assert [b for b, _ in points] == [1, 2, 4, 8, 16]
    assert all(a[1] < b[1] for a, b in zip(points, points[1:]))  # a bigger batch takes longer
    with pytest.raises(ProfileError, match=r"model is 'reverse-h16', not the variant 'reverse-h32'"):
        points_from_profile(str(path), families.load("reverse-h32"), 7)
    with pytest.raises(ProfileError, match="stack_layers is True, the server's engines run with stack_layers=False"):
        points_from_profile(str(path), model, 7, stack_layers=False)
    with pytest.raises(ProfileError, match="cannot read profile"):
        points_from_profile(str(tmp_path / "missing.json"), model, 7)


def test_profile_files_load_per_variant_and_bad_sets_are_refused_naming_the_file(tmp_path):
    from cellserve.cluster.ray_accuracy_profile import load_profiles

    paths = {}
    for v in ("reverse-h16", "reverse-h128"):
        paths[v] = tmp_path / f"{v}.json"
        synthetic_profile(families.load(v), 1e-4, max_batch=8).to_json(paths[v])
    got = load_profiles([str(paths["reverse-h16"]), str(paths["reverse-h128"])], ["reverse-h16", "reverse-h128"])
    assert set(got) == {"reverse-h16", "reverse-h128"} and [b for b, _ in got["reverse-h16"]] == [1, 2, 4, 8]
    with pytest.raises(ProfileError, match=r"h128.json': model is 'reverse-h128', which is no variant served here"):
        load_profiles([str(paths["reverse-h128"])], ["reverse-h16"])
    with pytest.raises(ProfileError, match="a second profile of 'reverse-h16'"):
        load_profiles([str(paths["reverse-h16"])] * 2, ["reverse-h16"])


def test_mean_points_over_workers_keeps_the_batches_all_have():
    assert mean_points([[(1, 2.0), (2, 4.0), (4, 8.0)], [(1, 4.0), (2, 6.0)]]) == [(1, 3.0), (2, 5.0)]


PLAN = ("cellserve: ray: accuracy plan 4 (period of 2 s, measured demand): w0: reverse-h32; w1: -; demand reverse "
        "9280.0/s; effective accuracy 0.9605; capacity per worker reverse-h16 5660/s, reverse-h32 5599/s, "
        "reverse-h128 4067/s; unserved reverse 3.0/s")


def test_plan_lines_are_parsed_and_lines_broken_by_other_output_skipped():
    broken = PLAN[:150] + "(AccuracyWorker pid=1) hello"
    (p,) = plans(["cellserve: ready", PLAN, broken])
    assert (p.epoch, p.reason, p.placement) == (4, "period of 2 s, measured demand", {"w0": "reverse-h32", "w1": None})
    assert p.demand_rps == {"reverse": 9280.0} and p.effective_accuracy == 0.9605
    assert p.capacity_rps == {"reverse-h16": 5660.0, "reverse-h32": 5599.0, "reverse-h128": 4067.0}


def test_a_runs_summary_counts_violations_and_weighs_accuracy_by_rows():
    acc = {"reverse-h16": 0.5, "reverse-h32": 0.9, "reverse-h128": 1.0}
    outcomes = [Outcome(0.0, 0.010, 200, "reverse-h128", 4), Outcome(0.1, 0.050, 200, "reverse-h16", 4),
                Outcome(0.2, 0.010, 200, "reverse-h16", 4), Outcome(0.3, 0.001, 429, None, 4, "refused"),
                Outcome(0.4, None, 0, None, 4, "no answer")]
    s = summarise(outcomes, 40.0, acc)
    assert (s["requests"], s["ok"], s["late"], s["violations"]) == (5, 3, 1, 3)  # the 50 ms 200 is late
    assert s["by_status"] == {"200": 3, "429": 1, "0": 1}
    assert s["rows_answered_by"] == {"reverse-h128": 4, "reverse-h16": 8}
    assert s["effective_accuracy"] == pytest.approx((4 * 1.0 + 8 * 0.5) / 12)
    assert s["accuracy_drop"] == pytest.approx(1.0 - s["effective_accuracy"])


def test_bench_flags_are_checked():
    assert AccuracyServeConfig().problems() == []
    assert AccuracyServeConfig(seconds=0, rows_per_request=0, replan_every_s=-1).problems() == [
        "--seconds must be > 0, got 0", "--replan-every must be > 0, got -1", "--rows-per-request must be >= 1, got 0"]
