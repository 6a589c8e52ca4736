"""The cluster workload's traces: the same requests at every rate, only sooner."""

from __future__ import annotations

import dataclasses

import numpy as np

from cellserve.cluster import systems
from cellserve.cluster.workload import session_arrivals


def _by_session(trace):
    out = {}
    for a in trace:
        out.setdefault(a.model, []).append(a)
    return out


def test_a_higher_rate_meets_the_same_requests_sooner(tiny):
    slow = _by_session(session_arrivals(tiny, 500.0, 1.0, seed=4))
    fast = _by_session(session_arrivals(tiny, 1_500.0, 1.0, seed=4))
    for name, requests in slow.items():
        assert len(fast[name]) > 2 * len(requests)
        for a, b in zip(requests, fast[name]):
            assert b.time_s < a.time_s and b.timeout_s == a.timeout_s
            assert all(np.array_equal(a.inputs[k], b.inputs[k]) for k in a.inputs)


def test_a_trace_is_the_same_for_its_seed_and_another_for_another_seed(tiny):
    def key(trace):
        return [(a.time_s, a.model, next(iter(a.inputs.values())).tobytes()) for a in trace]

    assert key(session_arrivals(tiny, 800.0, 0.5, seed=1)) == key(session_arrivals(tiny, 800.0, 0.5, seed=1))
    assert key(session_arrivals(tiny, 800.0, 0.5, seed=1)) != key(session_arrivals(tiny, 800.0, 0.5, seed=2))


def test_derived_capacities_belong_to_their_catalogue(tiny):
    dearer = dataclasses.replace(tiny, profiles={
        name: dataclasses.replace(p, host=dataclasses.replace(p.host, request_s=p.host.request_s + 1e-3))
        for name, p in tiny.profiles.items()}, memo={})
    assert systems.planned_capacity(dearer, 3) < systems.planned_capacity(tiny, 3)
