"""`cellserve bench cluster` end to end on a tiny configuration: the JSON's keys and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cellserve import cli, cli_cluster
from cellserve.bench import cluster_bench
from cellserve.cluster import systems
from cellserve.cluster.workload import PROFILE_DIR, PROFILE_FILE

from conftest import TINY_SESSIONS


@pytest.mark.slow  # a simulated cluster bench end to end: seconds
def test_bench_cluster_quick_writes_the_report(tmp_path, capsys):
    sessions = tmp_path / "sessions.json"
    sessions.write_text(json.dumps({"sessions": [{"id": s.name, "model": s.base, "slo_ms": s.slo_ms,
                                                  "weight": s.weight} for s in TINY_SESSIONS]}))
    out = tmp_path / "cluster.json"
    rc = cli.main(["bench", "cluster", "--devices", "3", "--quick", "--json", str(out), "--sessions", str(sessions),
                   "--seconds", "0.3", "--warmup", "0.1", "--bisections", "0"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["simulated"] is True
    assert [s["name"] for s in report["workload"]["sessions"]] == [s.name for s in TINY_SESSIONS]
    assert set(report["devices"]) == {"3"}
    row = report["devices"]["3"]
    assert set(row) == set(systems.SYSTEMS)
    for entry in row.values():
        assert {"max_rate_rps", "slo_attainment", "devices_used", "bracket"} <= set(entry)
        assert 0 < entry["devices_used"] <= 3
        if entry["max_rate_rps"] > 0:  # the reported rate is the bracket's passing end
            assert entry["max_rate_rps"] == entry["bracket"]["pass_rps"]
            assert entry["slo_attainment"] >= 0.99
    assert out.with_suffix(".png").stat().st_size > 0
    assert "simulated" in capsys.readouterr().out


@pytest.mark.slow  # a simulated cluster bench at two given rates: seconds
def test_bench_cluster_at_given_rates_runs_only_those(tmp_path, tiny):
    sessions = tmp_path / "sessions.json"
    sessions.write_text(json.dumps({"sessions": [{"id": s.name, "model": s.base, "slo_ms": s.slo_ms,
                                                  "weight": s.weight} for s in TINY_SESSIONS]}))
    planned = systems.planned_capacity(tiny, 3)
    rates = [round(3 * planned, 1), round(0.2 * planned, 1)]  # far above the plan's capacity, far below
    out = tmp_path / "cluster.json"
    rc = cli.main(["bench", "cluster", "--devices", "3", "--quick", "--json", str(out), "--sessions", str(sessions),
                   "--seconds", "0.3", "--warmup", "0.1", "--systems", "nexus,static",
                   "--rates", ",".join(map(str, rates))])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["rates"] == rates
    for entry in report["devices"]["3"].values():
        assert [p["rate_rps"] for p in entry["points"]] == rates
        assert [p["slo_attainment"] >= 0.99 for p in entry["points"]] == [False, True]
        assert entry["max_rate_rps"] == entry["bracket"]["pass_rps"] == rates[1]
        assert entry["bracket"]["fail_rps"] == rates[0]


def test_bad_arguments_exit_2(capsys):
    for args in (["--devices", "0"], ["--devices", "x"], ["--systems", "tfserving"], ["--jobs", "0"],
                 ["--seeds", "0"], ["--rates", "0"], ["--rates", "x"], ["--rates", "100,inf"],
                 ["--rates", "100", "--bisections", "1"]):
        try:
            cli.main(["bench", "cluster", *args])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{args} accepted")


def test_a_missing_profiles_dir_exits_2_naming_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "cluster", "--devices", "3", "--profiles-dir", str(tmp_path), "--json", str(tmp_path / "c.json")])
    assert exc.value.code == 2
    assert f"cannot read profile '{tmp_path}/" in capsys.readouterr().err and not (tmp_path / "c.json").exists()


def test_a_bad_sessions_file_or_model_exits_2_naming_it(tmp_path, capsys):
    sessions = tmp_path / "s.json"
    for body, message in (({"sessions": [{"model": "gru-256", "slo_ms": 0, "weight": 1}]},
                           "sessions[0].slo_ms must be a number > 0, got 0"),
                          ({"sessions": [{"model": "nope", "slo_ms": 50, "weight": 1}]},
                           "model 'nope' is not a zoo model")):
        sessions.write_text(json.dumps(body))
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "cluster", "--devices", "3", "--sessions", str(sessions),
                      "--json", str(tmp_path / "c.json")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err and not (tmp_path / "c.json").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "cluster", "--devices", "3", "--model-repository", str(tmp_path / "none"),
                  "--json", str(tmp_path / "c.json")])
    assert exc.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_parser_imports_no_torch_and_names_the_systems():
    code = ("import sys; from cellserve.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    assert cli_cluster.SYSTEM_NAMES == systems.SYSTEMS and cli_cluster.ABLATION_NAMES == systems.ABLATIONS


@pytest.mark.slow  # profiles a model of a repository, then simulates it beside a zoo model: about a minute
def test_bench_cluster_serves_a_repository_model_beside_a_zoo_one(tmp_path):
    import shutil

    import torch

    from cellserve.graph.torch_import import export_onnx_bytes
    from cellserve.graph.zoo.modules import RNNClassifier, seeded

    # a batch-first 2-layer LSTM classifier of the user's, exported as a repository holds it
    module = seeded(RNNClassifier("lstm", 50, 8, 8, 2, classes=3), 0)
    onnx = export_onnx_bytes(module, (torch.zeros((1, 3), dtype=torch.long),), ["tokens"], ["probabilities", "label"],
                             {"tokens": {0: "batch", 1: "time"}, "probabilities": {0: "batch"}, "label": {0: "batch"}})
    repository, profiles = tmp_path / "models", tmp_path / "profiles"
    (repository / "tagger" / "1").mkdir(parents=True)
    (repository / "tagger" / "1" / "model.onnx").write_bytes(onnx)
    profiles.mkdir()
    shutil.copy(PROFILE_DIR / PROFILE_FILE.format(model="gru-256"), profiles)
    rc = cli.main(["profile", "--model", "tagger", "--model-repository", str(repository), "--quick",
                   "--max-batch", "8", "--json", str(profiles / PROFILE_FILE.format(model="tagger"))])
    assert rc == 0
    sessions = tmp_path / "sessions.json"
    sessions.write_text(json.dumps({"sessions": [{"model": "tagger", "slo_ms": 100, "weight": 2},
                                                 {"model": "gru-256", "slo_ms": 50, "weight": 1}]}))
    out = tmp_path / "cluster.json"
    rc = cli.main(["bench", "cluster", "--devices", "2", "--quick", "--json", str(out), "--sessions", str(sessions),
                   "--model-repository", str(repository), "--profiles-dir", str(profiles), "--seconds", "0.3",
                   "--warmup", "0.1", "--bisections", "0", "--systems", "nexus,static"])
    assert rc == 0
    row = json.loads(out.read_text())["devices"]["2"]
    assert set(row) == {"nexus", "static"}
    for entry in row.values():
        passed = [p for p in entry["points"] if p["slo_attainment"] >= 0.99]
        assert passed, entry  # both systems serve the light end of their search
        assert all(p["requests"] > 0 and p["realised_rps"] > 0 for p in entry["points"])
        # each point says which session missed: the overall figure is their requests' mean
        assert all(set(p["per_session"]) == {"tagger", "gru-256"} for p in entry["points"])
        assert all(min(p["per_session"].values()) <= p["slo_attainment"] <= max(p["per_session"].values())
                   for p in entry["points"])


@pytest.mark.slow  # two processes spawned, each importing cellserve: seconds
def test_searches_in_processes_find_what_one_process_finds(tiny, tmp_path):
    def rows(jobs):
        cfg = cluster_bench.ClusterConfig(devices=[3], json_path=tmp_path / f"j{jobs}.json", quick=True,
                                          systems=("nexus", "static"), seconds=0.3, warmup_s=0.1, bisections=0,
                                          jobs=jobs)
        report = cluster_bench.run(cfg, tiny, log=lambda line: None)
        for entry in report["devices"]["3"].values():
            for p in entry["points"]:
                p.pop("wall_s")
        return report["devices"]["3"]

    one, two = rows(1), rows(2)
    assert list(two) == ["nexus", "static"] and two == one
