"""Each system's deployment: every request goes to a device serving its model (for Ray Serve:
an active replica of its deployment) and gets exactly one outcome."""

from __future__ import annotations

import pytest

from cellserve.cluster import systems
from cellserve.cluster.workload import rename_profile, session_arrivals

DEVICES = 5
RATE = 600.0  # req/s in all: light for five devices, so every system answers in time


@pytest.mark.parametrize("system", systems.SYSTEMS + systems.ABLATIONS)
def test_every_request_reaches_a_device_of_its_model_once(tiny, system):
    deployment = systems.build(system, tiny, DEVICES, RATE)
    sim = deployment.simulation
    routed = []
    if system == "ray-serve":
        router = deployment.router
        choose = router.choose

        def recording_choose(request, candidates, now):
            chosen = choose(request, candidates, now)
            routed.append((request.model, chosen, list(router.active[request.model])))
            return chosen
        router.choose = recording_choose
    trace = session_arrivals(tiny, RATE, 0.6, seed=3)
    outcomes = sim.run(deployment.arrivals(trace), drain_s=1.0)

    assert sorted(o.tag for o in outcomes) == [a.tag for a in trace]  # one outcome each, none lost
    models_of = {e.name: e.models for e in sim.engines}
    model_of = {a.tag: a.model for a in trace}
    for o in outcomes:
        assert o.model == model_of[o.tag]
        assert o.model in models_of[o.engine], f"{o.model} went to {o.engine}, which serves {models_of[o.engine]}"
    assert deployment.devices_used <= DEVICES
    if system == "ray-serve":
        assert routed and all(chosen in active for _, chosen, active in routed)
        assert {m for m, _, _ in routed} == {s.name for s in tiny.sessions}
    else:
        # one model per device group (static, clipper) or the plan's sessions (nexus): a
        # device serves only some of the models
        assert any(len(ms) < len(tiny.sessions) for ms in models_of.values())
    ok = sum(o.status.value == "ok" for o in outcomes)
    assert ok >= 0.95 * len(trace)  # light load: the systems serve it


def test_nexus_devices_follow_the_plan(tiny):
    plan = systems.nexus_plan(tiny, DEVICES, systems.planned_capacity(tiny, DEVICES))
    deployment = systems.build("nexus", tiny, DEVICES, RATE)
    served = {e.name: set(e.models) for e in deployment.simulation.engines}
    assert served == {f"device-{d.id}": {a.model for a in d.sessions} for d in plan.devices}
    assert deployment.devices_used == plan.devices_used <= DEVICES


def test_static_split_gives_every_session_a_device_and_uses_all(tiny):
    config = systems._padded(tiny, systems.STATIC_MAX_BATCH, systems.STATIC_BATCH_WAIT_S)
    split = systems.split_by_load(tiny, 9, config)
    assert sum(split.values()) == 9 and min(split.values()) >= 1
    assert split["gru-256"] > split["gru-256-slo200"]  # 4x the rate of the same model
    with pytest.raises(ValueError, match="cannot give each"):
        systems.split_by_load(tiny, 2, config)


def test_a_variant_is_the_model_under_another_name(tiny):
    assert tiny.models["gru-256-slo200"].name == "gru-256-slo200"
    assert set(tiny.profiles["gru-256-slo200"].cell_types) == {
        "gru-256-slo200" + k[len("gru-256"):] for k in tiny.profiles["gru-256"].cell_types}
    assert rename_profile(tiny.profiles["gru-256"], "gru-256") is tiny.profiles["gru-256"]
