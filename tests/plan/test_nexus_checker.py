"""The independent checker finds what is wrong with a plan: each broken copy of a feasible plan
is reported with the device or session at fault (a checker that passes everything would make
the property tests vacuous)."""

from __future__ import annotations

import dataclasses

import pytest
from helpers_nexus import chain, linear, profiles, workload

from cellserve.plan.nexus import Plan, Unserved
from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_pack import plan

P = profiles({"l": linear(10.0, 5.0), "k": linear(4.0, 8.0)})
W = workload([("l", 100.0, 40.0), ("l", 200.0, 20.0), ("k", 100.0, 500.0)],
             queries=(chain("q", 200.0, ("l", 30.0), ("k", 30.0)),), max_devices=20)
GOOD = plan(W, P, grid=10)


def _edit(p: Plan, dev_index: int, session_index: int | None = None, **changes) -> Plan:
    devices = list(p.devices)
    dev = devices[dev_index]
    if session_index is None:
        devices[dev_index] = dataclasses.replace(dev, **changes)
    else:
        sessions = list(dev.sessions)
        sessions[session_index] = dataclasses.replace(sessions[session_index], **changes)
        devices[dev_index] = dataclasses.replace(dev, sessions=tuple(sessions))
    return dataclasses.replace(p, devices=tuple(devices))


def _shared() -> int:
    return next(i for i, d in enumerate(GOOD.devices) if len(d.sessions) > 1)


def _busiest(dev_index: int) -> int:
    """The session of the device with the most arrivals per cycle (found by rate, not by its
    place in the device's list)."""
    sessions = GOOD.devices[dev_index].sessions
    return max(range(len(sessions)), key=lambda i: sessions[i].rate_rps)


def test_the_plan_under_test_is_feasible():
    assert check_plan(GOOD, P, W) == []
    assert len(GOOD.devices) >= 3 and any(len(d.sessions) > 1 for d in GOOD.devices)


@pytest.mark.parametrize("broken, says", [
    (lambda: _edit(GOOD, _shared(), _busiest(_shared()), batch=1,
                   rate_rps=GOOD.devices[_shared()].sessions[_busiest(_shared())].rate_rps),
     "batch 1 < its arrivals per cycle"),
    (lambda: _edit(GOOD, _shared(), duty_cycle_ms=GOOD.devices[_shared()].duty_cycle_ms / 3), "over the duty cycle"),
    (lambda: _edit(GOOD, _shared(), duty_cycle_ms=GOOD.devices[_shared()].duty_cycle_ms * 3), "over its SLO"),
    (lambda: _edit(GOOD, 0, 0, slo_ms=999.0), "asked"),
    (lambda: _edit(GOOD, 0, 0, rate_rps=GOOD.devices[0].sessions[0].rate_rps / 2), "on devices and unserved"),
    (lambda: _edit(GOOD, 0, 0, batch=10_000), "beyond its profile"),
    (lambda: _edit(GOOD, 0, 0, latency_ms=0.5), "states latency"),
    (lambda: _edit(GOOD, 0, occupancy=0.01), "occupancy"),
    (lambda: dataclasses.replace(GOOD, devices=GOOD.devices[1:]), "on devices and unserved"),
    (lambda: dataclasses.replace(GOOD, unserved=(Unserved("s0", "l", 100.0, 5.0, "why"),)), "on devices and unserved"),
    (lambda: dataclasses.replace(GOOD, queries=()), "no split"),
    (lambda: dataclasses.replace(GOOD, queries=(dataclasses.replace(GOOD.queries[0],
                                                                    split_ms={"l": 150.0, "k": 100.0}),)),
     "over its SLO 200"),
])
def test_a_broken_plan_is_reported(broken, says):
    problems = check_plan(broken(), P, W)
    assert any(says in p for p in problems), problems


def test_too_many_devices_is_reported():
    tight = dataclasses.replace(W, max_devices=GOOD.devices_used - 1)
    assert any("more than max_devices" in p for p in check_plan(GOOD, P, tight))
