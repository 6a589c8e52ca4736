"""The accuracy planner's files and command: broken PROBLEM and PLAN files refused with an
error naming the file and field; both round-trip through JSON; `cellserve plan accuracy` end
to end (the issue's PLAN fields, exit 2 on a bad file); the parser imports no solver."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from cellserve import cli
from cellserve.plan.accuracy import AccuracyError
from cellserve.plan.accuracy_check import check_plan
from cellserve.plan.accuracy_io import (load_plan, load_problem, parse_plan, parse_problem, plan_to_dict,
                                        problem_to_dict)
from cellserve.plan.accuracy_milp import plan_accuracy

PROBLEM = {"families": {"cls": {"demand_rps": 300, "variants": {"small": {"accuracy": 0.7}, "big": {"accuracy": 0.85}}},
                        "rev": {"demand_rps": 100, "slo_ms": 100,
                                "variants": {"rev-64": {"accuracy": 0.9}, "rev-128": {"accuracy": 0.97}}}},
           "devices": [{"id": 0, "type": "cpu"}, {"id": 1, "type": "cpu"}, {"id": 2, "type": "cpu"},
                       {"id": "g0", "type": "gpu"}, {"id": "g1", "type": "gpu"}],
           "capacity_rps": {"cpu": {"small": 100, "big": 40}, "gpu": {"small": 400, "big": 200}},
           "latency_ms": {"cpu": {"rev-64": {"1": 10, "4": 30, "8": 60}, "rev-128": {"1": 20, "4": 45}},
                          "gpu": {"rev-64": {"1": 2, "8": 5}, "rev-128": {"1": 4, "8": 10}}},
           "headroom": 1.05}


def _broken(doc: dict, path: list, value) -> dict:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


@pytest.mark.parametrize("path,value,message", [
    (["families"], {}, "problem.families is empty"),
    (["families", "cls", "demand_rps"], -5, "problem.families['cls'].demand_rps must be >= 0, got -5"),
    (["families", "cls", "demand_rps"], KeyError, "problem.families['cls'].demand_rps is missing"),
    (["families", "cls", "variants"], {}, "problem.families['cls'].variants is empty"),
    (["families", "cls", "variants", "big", "accuracy"], 85.0,
     "problem.families['cls'].variants['big'].accuracy must be in [0, 1] (a fraction), got 85.0"),
    (["families", "rev", "variants", "small"], {"accuracy": 0.5}, "variant names must be unique across families"),
    (["families", "rev", "slo_ms"], KeyError, "problem.families['rev'].slo_ms is missing: problem.latency_ms"),
    (["families", "rev", "slo_ms"], 0, "problem.families['rev'].slo_ms must be > 0, got 0"),
    (["devices"], {"id": 0}, "problem.devices must be a list, got dict"),
    (["devices", 1, "id"], 0, "problem.devices[1].id 0 repeats problem.devices[0].id"),
    (["devices", 1, "id"], True, "problem.devices[1].id must be a non-empty string or an integer, got True"),
    (["devices", 2, "type"], KeyError, "problem.devices[2].type is missing"),
    (["capacity_rps", "tpu"], {"small": 1}, "problem.capacity_rps['tpu'] names a device type no device has"),
    (["capacity_rps", "cpu", "huge"], 5, "problem.capacity_rps['cpu']['huge'] names a variant no family has"),
    (["capacity_rps", "cpu", "small"], "fast", "problem.capacity_rps['cpu']['small'] must be a finite number"),
    (["capacity_rps", "cpu", "rev-64"], 50, "problem.capacity_rps['cpu']['rev-64'] gives this capacity already"),
    (["latency_ms", "cpu", "rev-64"], {"0": 5}, "problem.latency_ms['cpu']['rev-64'] has key '0'"),
    (["latency_ms", "cpu", "rev-64", "4"], -1, "problem.latency_ms['cpu']['rev-64']['4'] must be > 0, got -1"),
    (["headroom"], 0.9, "problem.headroom must be in [1.0, 10]"),
    (["devices"], [], "problem.devices is empty"),
    (["headroom"], 1e9, "problem.headroom must be in [1.0, 10]"),  # its ladder would never end
    (["schema_version"], 2, "problem.schema_version is 2"),
])
def test_a_broken_problem_is_refused_naming_the_field(path, value, message):
    with pytest.raises(AccuracyError) as err:
        parse_problem(_broken(PROBLEM, path, value))
    assert message in str(err.value)


def test_a_problem_needs_some_capacity():
    doc = {k: v for k, v in PROBLEM.items() if k not in ("capacity_rps", "latency_ms")}
    with pytest.raises(AccuracyError, match="problem needs capacity_rps"):
        parse_problem(doc)


def test_files_name_themselves_in_errors(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{nope")
    with pytest.raises(AccuracyError, match="problem file '.*p.json' is not JSON"):
        load_problem(bad)
    with pytest.raises(AccuracyError, match="cannot read problem"):
        load_problem(tmp_path / "absent.json")
    bad.write_text(json.dumps(_broken(PROBLEM, ["headroom"], 0.5)))
    with pytest.raises(AccuracyError, match=r"problem file '.*p.json': problem.headroom must be in \[1.0, 10\]"):
        load_problem(bad)
    bad.write_text(json.dumps({"placement": {}}))
    with pytest.raises(AccuracyError, match=r"plan file '.*p.json': plan.routing is missing"):
        load_plan(bad)


def test_problem_and_plan_round_trip_through_json():
    problem = parse_problem(PROBLEM)
    again = parse_problem(json.loads(json.dumps(problem_to_dict(problem))))
    assert again == problem
    assert problem.capacity("cpu", "rev-64") == pytest.approx(4000 / 30)  # batch 4: 30 ms <= 100 / 2
    plan = plan_accuracy(problem)
    assert parse_plan(json.loads(json.dumps(plan_to_dict(plan)))) == plan
    assert check_plan(plan, problem) == []


def test_a_broken_plan_is_refused_naming_the_field():
    good = plan_to_dict(plan_accuracy(parse_problem(PROBLEM)))
    for path, value, message in [
        (["placement", "0"], 5, "plan.placement['0'] must be a non-empty string, got 5"),
        (["routing", "cls"], [], "plan.routing['cls'] must be an object"),
        (["unserved_rps", "cls"], -1, "plan.unserved_rps['cls'] must be >= 0"),
        (["effective_accuracy"], KeyError, "plan.effective_accuracy is missing"),
    ]:
        with pytest.raises(AccuracyError) as err:
            parse_plan(_broken(good, path, value))
        assert message in str(err.value)


def _main(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:
        return exc.code


def test_plan_accuracy_end_to_end(tmp_path, capsys):
    (tmp_path / "problem.json").write_text(json.dumps(PROBLEM))
    out = tmp_path / "plan.json"
    assert _main("plan", "accuracy", "--problem", str(tmp_path / "problem.json"), "--json", str(out)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("wrote ") and "effective accuracy" in printed and "HiGHS" not in printed
    doc = json.loads(out.read_text())
    # the format: every field it names, under the names it gives
    assert set(doc) >= {"placement", "routing", "effective_accuracy", "headroom", "unserved_rps"}
    assert set(doc["placement"]) == {"0", "1", "2", "g0", "g1"}
    assert set(doc["routing"]) == {"cls", "rev"} and doc["unserved_rps"] == {"cls": 0.0, "rev": 0.0}
    for shares in doc["routing"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    assert check_plan(load_plan(out), load_problem(tmp_path / "problem.json")) == []


def test_plan_accuracy_reports_unserved_demand(tmp_path, capsys):
    (tmp_path / "problem.json").write_text(json.dumps(_broken(PROBLEM, ["families", "cls", "demand_rps"], 5000)))
    out = tmp_path / "plan.json"
    assert _main("plan", "accuracy", "--problem", str(tmp_path / "problem.json"), "--json", str(out)) == 0
    assert "req/s unserved" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["headroom"] == 1.0 and doc["unserved_rps"]["cls"] > 0


def test_plan_accuracy_refuses_a_bad_file_with_exit_2(tmp_path, capsys):
    (tmp_path / "problem.json").write_text(json.dumps(_broken(PROBLEM, ["families", "cls", "demand_rps"], -5)))
    out = tmp_path / "plan.json"
    assert _main("plan", "accuracy", "--problem", str(tmp_path / "problem.json"), "--json", str(out)) == 2
    err = capsys.readouterr().err
    assert "problem.json'" in err and "problem.families['cls'].demand_rps must be >= 0, got -5" in err
    assert not out.exists()


def test_the_accuracy_parser_imports_no_solver_or_torch():
    code = ("import sys\nfrom cellserve.cli import main\n"
            "try:\n    main(['plan', 'accuracy', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
            "import cellserve.plan.accuracy_io, cellserve.plan.accuracy_check\n"
            "print(sorted(m for m in ('torch', 'numpy', 'highspy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
