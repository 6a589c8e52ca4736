"""EngineConfig refuses bad settings at construction, naming each one."""

import pytest

from cellserve.engine.cost_model import CostModel, StepCost
from cellserve.engine.engine import EngineConfig


@pytest.mark.parametrize("field, value, words", [
    ("policy", "fifo", "policy 'fifo'"),
    ("max_batch", 0, "max_batch"),
    ("batch_timeout_s", -1.0, "batch_timeout_s"),
    ("backend", "cuda-graphs", "backend"),
    ("admission_headroom", 1.5, "admission_headroom"),
    ("default_timeout_s", 0.0, "default_timeout_s"),
    ("max_active", 0, "max_active"),
])
def test_a_bad_setting_is_refused_with_its_name(field, value, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(**{field: value})


def test_step_cost_interpolates_between_measured_batch_sizes_and_scales_beyond():
    cost = StepCost()
    cost.observe(1, 10e-6)
    cost.observe(16, 100e-6)
    assert cost(1) == pytest.approx(10e-6)
    assert 10e-6 < cost(8) < 100e-6  # between the measured buckets
    assert cost(64) == pytest.approx(400e-6)  # proportional past the largest measured


def test_round_time_counts_one_batch_per_max_batch_lanes_of_each_type():
    model = CostModel(max_batch=4)
    model.observe("a", 4, 1.0)
    model.observe("b", 1, 0.5)
    assert model.round_time({"a": 8, "b": 1}) == pytest.approx(2 * 1.0 + 0.5)
    assert model.round_time({"a": 0, "b": 0}) == 0.0


def test_one_stall_barely_moves_a_step_cost_but_a_lasting_slowdown_is_learnt():
    cost = StepCost()
    cost.observe(8, 100e-6)
    cost.observe(8, 50e-3)  # one 50 ms stall: counted as 4x the mean at most
    assert cost(8) < 120e-6
    for _ in range(60):  # steps really got 3x slower
        cost.observe(8, 300e-6)
    assert cost(8) == pytest.approx(300e-6, rel=0.1)


def test_a_stale_slow_bucket_is_capped_by_a_smaller_batch_scaled_up():
    cost = StepCost()
    cost.observe(4, 100e-6)
    cost.observe(32, 50e-3)  # measured once during a stall, never since
    assert cost(32) <= 8 * 100e-6
    assert cost(32, best=True) <= 8 * 100e-6


@pytest.mark.parametrize("given", [dict(placement_groups=2), dict(placement_profiles=["p.json"]),
                                   dict(placement_mode="throughput"),
                                   dict(placement="plan.json", placement_groups=2)])
def test_placement_auto_settings_without_placement_auto_are_refused(given):
    key = next(iter(k for k in given if k != "placement"))
    with pytest.raises(ValueError, match=rf"{key}.*needs --placement auto"):
        EngineConfig(**given)
    EngineConfig(**{**given, "placement": "auto"})  # with it they are fine
