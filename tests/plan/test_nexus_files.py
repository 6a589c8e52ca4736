"""The planner's files and command: broken profiles, sessions and plans refused with an error
naming the field; `cellserve plan nexus` end to end (a plan, a re-plan, exit 2 on a bad file);
`cellserve bench planner` on a small workload; the parsers import no torch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from cellserve import cli
from cellserve.plan.nexus import NexusError
from cellserve.plan.nexus_check import check_plan
from cellserve.plan.nexus_io import load_plan, load_profiles, load_workload, parse_plan, parse_profiles, parse_workload

PROFILES = {"device_types": {"gpu": {
    "models": {"lstm": {"latency_ms": {"1": 15, "16": 90}},
               "gru": {"latency_ms": {"1": 8, "4": 12, "32": 60}},
               "cls-a": {"latency_ms": {"1": 22.1, "64": 91.4}, "prefix": "enc"},
               "cls-b": {"latency_ms": {"1": 22.1, "64": 91.4}, "prefix": "enc"}},
    "prefixes": {"enc": {"latency_ms": {"1": 21, "64": 84}}}}}}
SESSIONS = {"device_type": "gpu", "max_devices": 20,
            "sessions": [{"model": "lstm", "slo_ms": 100, "rate_rps": 300},
                         {"model": "gru", "slo_ms": 50, "rate_rps": 40},
                         {"model": "cls-a", "slo_ms": 100, "rate_rps": 200},
                         {"model": "cls-b", "slo_ms": 100, "rate_rps": 200}],
            "queries": [{"slo_ms": 300, "root": {"model": "gru", "rate_rps": 50,
                                                 "children": [{"model": "lstm", "rate_rps": 20}]}}]}


def _broken(doc: dict, path: list, value) -> dict:
    if not path:  # another document altogether
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize("path, value, message", [
    (["device_types"], KeyError, "profiles.device_types is missing"),
    (["device_types"], {}, "profiles.device_types is empty"),
    (["device_types", "gpu", "models", "lstm", "latency_ms"], {"0": 3}, "models['lstm'].latency_ms has key '0'"),
    # one batch size written two ways, and digits int() does not read
    (["device_types", "gpu", "models", "lstm", "latency_ms"], {"1": 3, "01": 1}, "latency_ms has key '01'"),
    (["device_types", "gpu", "models", "lstm", "latency_ms"], {"1": 3, "²": 1}, "latency_ms has key '²'"),
    (["device_types", "gpu", "models", "lstm", "latency_ms"], {"١": 3}, "latency_ms has key '١'"),
    (["device_types", "gpu", "models", "lstm", "latency_ms"], {"1": -3},
     "models['lstm'].latency_ms['1'] must be > 0"),
    (["device_types", "gpu", "models", "lstm", "latency_ms"], {}, "models['lstm'].latency_ms is empty"),
    (["device_types", "gpu", "models", "gru"], [], "models['gru'] must be an object"),
    (["device_types", "gpu", "models", "cls-a", "prefix"], "dec", "models['cls-a'].prefix is 'dec'"),
    (["device_types", "gpu", "models", "cls-a", "latency_ms"], {"1": 5, "64": 90},
     "models['cls-a'].latency_ms is below its prefix 'enc'"),
    (["schema_version"], 7, "profiles.schema_version is 7"),
    (["schema_version"], "1", "profiles.schema_version must be an integer, got '1'"),
    # `cellserve profile`'s file given here: its version (3) is not what is wrong
    ([], {"schema_version": 3, "model": "gru-256", "machine": {}, "cell_types": {}},
     "this file is a model profile (written by `cellserve profile`), not a profiles file"),
])
def test_bad_profiles_are_refused_naming_the_field(path, value, message):
    with pytest.raises(NexusError) as err:
        parse_profiles(_broken(PROFILES, path, value))
    assert message in str(err.value)


@pytest.mark.parametrize("path, value, message", [
    (["device_type"], "tpu", "device_type is 'tpu', which the profiles lack"),
    (["max_devices"], -1, "max_devices must be an integer >= 0"),
    (["max_devices"], KeyError, "sessions file.max_devices is missing"),
    (["sessions", 1, "slo_ms"], 0, "sessions[1].slo_ms must be > 0, got 0"),
    (["sessions", 1, "rate_rps"], "fast", "sessions[1].rate_rps must be a finite number"),
    (["sessions", 2, "model"], "bert", "sessions[2].model is 'bert', which has no profile on 'gpu'"),
    (["sessions", 0, "model"], KeyError, "sessions[0].model is missing"),
    (["sessions"], {}, "sessions must be a list"),
    (["queries", 0, "root", "children", 0, "rate_rps"], -2, "queries[0].root.children[0].rate_rps must be > 0"),
    (["queries", 0, "root", "children", 0, "model"], "gru", "queries[0] names model 'gru' twice"),
    (["queries", 0, "root", "children", 0, "model"], "rnn", "queries[0] node model 'rnn' has no profile"),
    (["queries", 0, "slo_ms"], KeyError, "queries[0].slo_ms is missing"),
])
def test_bad_sessions_are_refused_naming_the_field(path, value, message):
    with pytest.raises(NexusError) as err:
        parse_workload(_broken(SESSIONS, path, value), parse_profiles(PROFILES))
    assert message in str(err.value)


def test_repeated_ids_are_refused():
    doc = copy.deepcopy(SESSIONS)
    doc["sessions"][0]["id"] = doc["sessions"][1]["id"] = "chat"
    with pytest.raises(NexusError, match=r"sessions\[1\].id is 'chat', already the id of sessions\[0\].id"):
        parse_workload(doc)


def test_bad_plans_are_refused_naming_the_field(tmp_path):
    profiles = parse_profiles(PROFILES)
    good = _run(tmp_path)[1]
    for path, value, message in [
        (["devices", 0, "duty_cycle_ms"], 0, "devices[0].duty_cycle_ms must be > 0"),
        (["devices", 0, "sessions", 0, "batch"], 0, "devices[0].sessions[0].batch must be an integer >= 1"),
        (["devices", 0, "sessions"], [], "devices[0].sessions is empty"),
        (["devices_used"], 99, "devices_used is 99"),
        (["unserved"], [{"id": "x"}], "unserved[0].model is missing"),
    ]:
        with pytest.raises(NexusError) as err:
            parse_plan(_broken(good, path, value))
        assert message in str(err.value)
    assert check_plan(parse_plan(good), profiles, parse_workload(SESSIONS, profiles)) == []


def test_files_that_are_not_json_or_missing(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{nope")
    with pytest.raises(NexusError, match="profiles '.*p.json' is not JSON"):
        load_profiles(bad)
    with pytest.raises(NexusError, match="cannot read sessions file"):
        load_workload(tmp_path / "absent.json")
    bad.write_text(json.dumps({"devices": []}))
    with pytest.raises(NexusError, match=r"plan file '.*p.json': plan.devices_used is missing"):
        load_plan(bad)


def _main(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:
        return exc.code


def _run(tmp_path, sessions: dict = SESSIONS, *extra: str) -> tuple[int, dict]:
    (tmp_path / "profiles.json").write_text(json.dumps(PROFILES))
    (tmp_path / "sessions.json").write_text(json.dumps(sessions))
    out = tmp_path / "plan.json"
    code = _main("plan", "nexus", "--profiles", str(tmp_path / "profiles.json"),
                 "--sessions", str(tmp_path / "sessions.json"), "--json", str(out), *extra)
    return code, json.loads(out.read_text()) if code == 0 else {}


def test_plan_nexus_end_to_end(tmp_path, capsys):
    code, doc = _run(tmp_path)
    assert code == 0
    assert "devices" in capsys.readouterr().out
    # the format: every field it names, under the names it gives
    assert set(doc) >= {"devices", "queries", "devices_used", "unserved"}
    assert doc["devices_used"] == len(doc["devices"]) > 0
    for dev in doc["devices"]:
        assert set(dev) >= {"device_type", "duty_cycle_ms", "occupancy", "sessions"} and dev["device_type"] == "gpu"
        for s in dev["sessions"]:
            assert set(s) >= {"model", "slo_ms", "batch", "rate_rps"}
    (q,) = doc["queries"]
    assert q["slo_ms"] == 300 and set(q["split_ms"]) == {"gru", "lstm"}
    assert q["split_ms"]["gru"] + q["split_ms"]["lstm"] <= 300
    prefixed = [s for d in doc["devices"] for s in d["sessions"] if s.get("prefix") == "enc"]
    assert {s["model"] for s in prefixed} == {"cls-a", "cls-b"}


def test_plan_nexus_replans_from_a_previous_plan(tmp_path, capsys):
    code, first = _run(tmp_path)
    assert code == 0
    (tmp_path / "previous.json").write_text(json.dumps(first))
    busier = copy.deepcopy(SESSIONS)
    busier["sessions"][1]["rate_rps"] = 44  # gru x1.1
    code, second = _run(tmp_path, busier, "--previous", str(tmp_path / "previous.json"))
    assert code == 0
    assert "sessions moved" in capsys.readouterr().out
    before = {(d["id"], s["id"]) for d in first["devices"] for s in d["sessions"]}
    after = {(d["id"], s["id"]) for d in second["devices"] for s in d["sessions"]}
    assert {p for p in before if p[1] != "s1"} <= after  # nothing but the changed session may move


def test_plan_nexus_lists_what_the_budget_cannot_serve(tmp_path):
    tight = dict(SESSIONS, max_devices=1)
    code, doc = _run(tmp_path, tight)
    assert code == 0 and doc["devices_used"] == 1
    assert doc["unserved"] and all("max_devices (1)" in u["reason"] for u in doc["unserved"])


def test_plan_nexus_refuses_a_bad_file_with_exit_2(tmp_path, capsys):
    code, _ = _run(tmp_path, _broken(SESSIONS, ["sessions", 1, "slo_ms"], -5))
    assert code == 2
    assert "sessions[1].slo_ms must be > 0, got -5" in capsys.readouterr().err


def test_bench_planner_writes_its_timing(tmp_path, capsys):
    out = tmp_path / "planner.json"
    assert _main("bench", "planner", "--devices", "60", "--sessions", "30", "--json", str(out)) == 0
    doc = json.loads(out.read_text())
    assert doc["feasible"] and doc["check_problems"] == []
    assert doc["sessions"] == 30 and doc["max_devices"] == 60 and 0 < doc["devices_used"] <= 60
    assert doc["plan_s"] > 0 and doc["replan_s"] > 0
    assert "planned 30 sessions" in capsys.readouterr().out


def test_plan_parsers_import_no_torch():
    code = ("import sys\nfrom cellserve.cli import main\n"
            "for argv in (['plan', 'nexus', '--help'], ['bench', 'planner', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0\n"
            "import cellserve.plan.nexus_pack, cellserve.plan.nexus_io, cellserve.plan.nexus_check\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("grid", ["1", "9", "10001", "x"])
def test_a_grid_outside_10_to_10000_is_refused(tmp_path, capsys, grid):
    code, _ = _run(tmp_path, SESSIONS, "--grid", grid)
    assert code == 2 and "argument --grid: must be" in capsys.readouterr().err
