"""From a partition plan to the engine's executors and placement map: the device names,
core groups, the nodes a plan may name, and what is refused (each error naming it)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellserve.engine.config import EngineConfig
from cellserve.engine.placement import PlacementError, build_executors, engine_placement, placement_for, read_plan
from cellserve.engine.placement_auto import auto_plan
from cellserve.engine.placement_devices import device_specs, parse_core_groups
from cellserve.graph import zoo
from cellserve.plan.partition_io import parse_plan

CORES = sorted(os.sched_getaffinity(0))
TAGGER = ["bilstm-tagger/rnn.LSTM/0", "bilstm-tagger/rnn.LSTM/1", "bilstm-tagger/rnn.LSTM_1/0",
          "bilstm-tagger/rnn.LSTM_1/1", "bilstm-tagger/ops/0", "bilstm-tagger/ops/1", "bilstm-tagger/ops/2"]


@pytest.fixture(scope="module")
def tagger():
    return zoo.load("bilstm-tagger")


def plan_of(assignment: dict[str, str]):
    devices = sorted(set(assignment.values()))
    return parse_plan({"assignment": assignment, "order": {d: [n for n, v in assignment.items() if v == d]
                                                           for d in devices},
                       "makespan_ms": 1.0, "memory_mb": {d: 0.0 for d in devices}, "solver": "milp", "gap": 0.0})


def split_plan(extra: dict[str, str] | None = None) -> dict[str, str]:
    a = {n: ("cpu1" if n.endswith("/1") else "cpu0") for n in TAGGER}
    a.update({"bilstm-tagger/input": "cpu", "bilstm-tagger/output": "cpu"})  # the host: not placed
    a.update(extra or {})
    return a


def test_a_plan_becomes_executors_on_core_groups_and_a_map(tagger):
    chosen = placement_for(plan_of(split_plan()), [tagger], EngineConfig(), "p.json")
    assert list(chosen.specs) == ["cpu0", "cpu1"]  # CPU first: the first is the default executor
    assert chosen.placement == {n: ("cpu1" if n.endswith("/1") else "cpu0") for n in TAGGER}
    groups = [chosen.specs["cpu0"].cores, chosen.specs["cpu1"].cores]
    if len(CORES) >= 2:  # the cores split evenly, in order
        assert sorted(groups[0] + groups[1]) == CORES and not set(groups[0]) & set(groups[1])
    executors = build_executors(chosen, EngineConfig())
    assert [ex.cores for ex in executors.values()] == groups and all(ex.concurrent for ex in executors.values())


def test_given_core_groups_are_used(tagger):
    config = EngineConfig(placement_cores=[f"cpu0={CORES[0]}", f"cpu1={CORES[-1]}"])
    chosen = placement_for(plan_of(split_plan()), [tagger], config, "p.json")
    assert chosen.specs["cpu0"].cores == (CORES[0],) and chosen.specs["cpu1"].cores == (CORES[-1],)


def test_an_unknown_node_is_refused_naming_it(tagger):
    with pytest.raises(PlacementError, match=r"p\.json: plan\.assignment names node 'bilstm-tagger/rnn\.LSTM/7'.*"
                                             r"not a cell type or plain-op group of model 'bilstm-tagger'"):
        placement_for(plan_of(split_plan({"bilstm-tagger/rnn.LSTM/7": "cpu0"})), [tagger], EngineConfig(), "p.json")
    with pytest.raises(PlacementError, match=r"node 'lstm-512/rnn\.LSTM/0' of model 'lstm-512', which is not served"):
        placement_for(plan_of(split_plan({"lstm-512/rnn.LSTM/0": "cpu0"})), [tagger], EngineConfig(), "p.json")


def test_an_unknown_device_is_refused_naming_it(tagger):
    with pytest.raises(PlacementError, match=r"p\.json: device 'tpu' is not one cellserve can serve on"):
        placement_for(plan_of(split_plan({"bilstm-tagger/ops/2": "tpu"})), [tagger], EngineConfig(), "p.json")


def test_a_plan_covering_part_of_a_model_is_refused_naming_what_is_missing(tagger):
    a = split_plan()
    del a["bilstm-tagger/ops/1"]
    with pytest.raises(PlacementError, match=r"only part of model 'bilstm-tagger': not bilstm-tagger/ops/1"):
        placement_for(plan_of(a), [tagger], EngineConfig(), "p.json")
    # a stacked model's node names on a server that keeps layers apart: the plan does not fit
    lstm = zoo.load("lstm-512")
    stacked = {"lstm-512/rnn.LSTM+rnn.LSTM_1": "cpu0", "lstm-512/ops/0": "cpu0", "lstm-512/ops/1": "cpu0"}
    placement_for(plan_of(stacked), [lstm], EngineConfig(), "p.json")
    with pytest.raises(PlacementError, match="lstm-512/rnn.LSTM\\+rnn.LSTM_1"):
        placement_for(plan_of(stacked), [lstm], EngineConfig(stack_layers=False), "p.json")


def test_core_groups_that_cannot_be_made_are_refused():
    with pytest.raises(ValueError, match=r"uses 3 core groups \(cpu0, cpu1, cpu2\) but this process may use only 2"):
        device_specs(["cpu0", "cpu1", "cpu2"], {}, [0, 1])
    with pytest.raises(ValueError, match="'cpu' \\(every core\\) cannot be combined with core groups \\(cpu1\\)"):
        device_specs(["cpu", "cpu1"], {}, [0, 1])
    with pytest.raises(ValueError, match=r"core group cpu1: cores \[5\] are not among the cores"):
        device_specs(["cpu0", "cpu1"], {"cpu0": (0,), "cpu1": (5,)}, [0, 1])
    with pytest.raises(ValueError, match="gives no cores for cpu1"):
        device_specs(["cpu0", "cpu1"], {"cpu0": (0,)}, [0, 1])
    with pytest.raises(ValueError, match="gives core groups cpu3, which the plan does not use"):
        device_specs(["cpu0"], {"cpu0": (0,), "cpu3": (1,)}, [0, 1])
    assert device_specs(["gpu", "cpu"], {}, [0, 1], "cuda:1")["gpu"].device == "cuda:1"
    assert device_specs(["cuda:2"], {}, [0])["cuda:2"].cores is None


@pytest.mark.parametrize("items, message", [
    (["gpu0=1"], "entry 'gpu0=1' must be cpuN=CORES"),
    (["cpu0"], "entry 'cpu0' must be cpuN=CORES"),
    (["cpu0=a"], "'a' is not a core or a range"),
    (["cpu0=3-1"], "runs backwards"),
    (["cpu0=0", "cpu1=0"], "core 0 is in cpu0 already"),
    (["cpu0=0", "cpu0=1"], "gives core group cpu0 twice"),
])
def test_core_group_flags_that_cannot_be_read_are_refused(items, message):
    with pytest.raises(ValueError, match=message):
        parse_core_groups(items)
    with pytest.raises(ValueError, match="placement_cores"):
        EngineConfig(placement_cores=items)


@given(st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=4, unique=True), min_size=1, max_size=4))
def test_core_groups_read_back_what_was_written(groups):
    flat = [c for g in groups for c in g]
    items = [f"cpu{i}=" + ",".join(map(str, g)) for i, g in enumerate(groups)]
    if len(set(flat)) < len(flat):
        with pytest.raises(ValueError, match="already|twice"):
            parse_core_groups(items)
    else:
        assert parse_core_groups(items) == {f"cpu{i}": tuple(g) for i, g in enumerate(groups)}


def test_a_cuda_device_without_cuda_is_refused_naming_it(tagger):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    chosen = placement_for(plan_of(split_plan({"bilstm-tagger/rnn.LSTM/1": "gpu"})), [tagger], EngineConfig(),
                           "p.json")
    with pytest.raises(PlacementError, match="p.json: device 'gpu' needs CUDA"):
        build_executors(chosen, EngineConfig())


def test_plan_files_are_read_with_errors_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"assignment": {"a": 3}}))
    with pytest.raises(PlacementError, match=r"plan file '.*bad\.json': plan\.assignment\['a'\]"):
        read_plan(bad)
    with pytest.raises(PlacementError, match="cannot read plan file"):
        read_plan(tmp_path / "missing.json")


def test_auto_splits_a_bidirectional_layers_directions_over_two_groups(tagger):
    config = EngineConfig(placement="auto", placement_groups=2)
    plan = auto_plan([tagger], config)
    for layer in ("rnn.LSTM", "rnn.LSTM_1"):
        assert plan.assignment[f"bilstm-tagger/{layer}/0"] != plan.assignment[f"bilstm-tagger/{layer}/1"]
    executors, placement = engine_placement([tagger], config)
    assert list(executors) == ["cpu0", "cpu1"] and set(placement) == set(TAGGER)
    # one group: everything on it, and one executor (the engine's usual loop)
    one = auto_plan([tagger], EngineConfig(placement="auto", placement_groups=1))
    assert set(one.assignment.values()) == {"cpu0"}


def test_auto_refuses_more_core_groups_than_cores(tagger):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(PlacementError, match=rf"--placement-groups {cores + 1}: more core groups than the {cores} core"):
        auto_plan([tagger], EngineConfig(placement="auto", placement_groups=cores + 1))


def test_auto_refuses_a_profile_of_a_model_not_served(tagger, tmp_path):
    from dataclasses import replace

    from cellserve.plan.profile import synthetic_profile

    profile = synthetic_profile(zoo.load("gru-256"), 1e-4)
    replace(profile, machine=replace(profile.machine, device="cpu")).to_json(tmp_path / "gru.json")
    with pytest.raises(PlacementError, match=r"a profile of model\(s\) \['gru-256'\], which this server does not serve"):
        auto_plan([tagger], EngineConfig(placement="auto", placement_profiles=[str(tmp_path / "gru.json")]))
