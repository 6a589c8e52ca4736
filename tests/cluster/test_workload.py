"""The cluster workload's traces: the same requests at every rate, only sooner."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cellserve.cluster import systems
from cellserve.cluster.workload import ClusterSession, load_catalogue, load_sessions, session_arrivals


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


def test_a_sessions_file_gives_each_session_its_share_and_name(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"sessions": [
        {"model": "gru-256", "slo_ms": 50, "weight": 4},
        {"id": "gru-256-slo200", "model": "gru-256", "slo_ms": 200, "weight": 1},
        {"id": "tagger", "model": "lstm-512", "slo_ms": 100, "rate_rps": 3.0}]}))
    sessions = load_sessions(path)
    assert sessions == (ClusterSession("gru-256", "gru-256", 50.0, 4.0),
                        ClusterSession("gru-256-slo200", "gru-256", 200.0, 1.0),
                        ClusterSession("tagger", "lstm-512", 100.0, 3.0))
    catalogue = load_catalogue(sessions)
    assert catalogue.models["tagger"].name == "tagger"
    assert all(k.startswith("tagger/") for k in catalogue.profiles["tagger"].cell_types)
    trace = session_arrivals(catalogue, 800.0, 1.0, seed=0)
    assert {a.model for a in trace} == {"gru-256", "gru-256-slo200", "tagger"}


@pytest.mark.parametrize("sessions, message", [
    ([], "sessions is empty"),
    ([{"model": "gru-256", "slo_ms": 50}], r"sessions\[0\] has no weight \(or rate_rps\)"),
    ([{"model": "gru-256", "slo_ms": -5, "weight": 1}], r"sessions\[0\].slo_ms must be a number > 0, got -5"),
    ([{"model": "gru-256", "slo_ms": 50, "rate_rps": "fast"}], r"sessions\[0\].rate_rps must be a number > 0"),
    ([{"model": "gru-256", "slo_ms": 50, "weight": 1}, {"model": "gru-256", "slo_ms": 200, "weight": 1}],
     r"sessions\[1\].id 'gru-256' is taken by an earlier session"),
    ([{"slo_ms": 50, "weight": 1}], r"sessions\[0\].model must be a model's name"),
    ([{"id": "a/b", "model": "gru-256", "slo_ms": 50, "weight": 1}], r"sessions\[0\].id must be a name without '/'"),
])
def test_a_bad_sessions_file_is_refused_naming_the_field(tmp_path, sessions, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"sessions": sessions}))
    with pytest.raises(ValueError, match=message):
        load_sessions(path)


def test_sessions_refuses_queries_other_versions_and_non_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"sessions": [{"model": "gru-256", "slo_ms": 50, "weight": 1}],
                                "queries": [{"id": "q", "slo_ms": 100, "rate_rps": 5, "nodes": []}]}))
    with pytest.raises(ValueError, match="queries are not simulated here"):
        load_sessions(path)
    path.write_text(json.dumps({"schema_version": 2, "sessions": []}))
    with pytest.raises(ValueError, match="schema_version is 2"):
        load_sessions(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        load_sessions(path)


def test_a_model_without_a_profile_or_token_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no such file; measure it with `cellserve profile --model dates --json"):
        load_catalogue((ClusterSession("d", "dates", 100.0, 1.0),), tmp_path)
    with pytest.raises(ValueError, match="'nope' is not a zoo model"):
        load_catalogue((ClusterSession("n", "nope", 100.0, 1.0),), tmp_path)


def test_a_profile_file_holding_another_models_profile_is_refused(tmp_path):
    from cellserve.cluster.workload import PROFILE_DIR, PROFILE_FILE

    (tmp_path / PROFILE_FILE.format(model="gru-256")).write_text(
        (PROFILE_DIR / PROFILE_FILE.format(model="lstm-512")).read_text())
    with pytest.raises(ValueError, match=r"-poisson-profile.json' is of model 'lstm-512', not 'gru-256' \(the file "
                                         r"session 'g' reads\)"):
        load_catalogue((ClusterSession("g", "gru-256", 100.0, 1.0),), tmp_path)
