"""`cellserve bench cluster` end to end on a tiny configuration: the JSON's keys and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cellserve import cli, cli_cluster
from cellserve.bench import cluster_bench
from cellserve.cluster import systems

from conftest import TINY_SESSIONS


@pytest.mark.slow  # a simulated cluster bench end to end: seconds
def test_bench_cluster_quick_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cluster_bench, "DEFAULT_SESSIONS", TINY_SESSIONS)
    out = tmp_path / "cluster.json"
    rc = cli.main(["bench", "cluster", "--devices", "3", "--quick", "--json", str(out),
                   "--seconds", "0.3", "--warmup", "0.1", "--bisections", "0"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["simulated"] is True
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


def test_bad_arguments_exit_2(capsys):
    for args in (["--devices", "0"], ["--devices", "x"], ["--systems", "tfserving"]):
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


def test_parser_imports_no_torch_and_names_the_systems():
    code = ("import sys; from cellserve.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    assert cli_cluster.SYSTEM_NAMES == systems.SYSTEMS and cli_cluster.ABLATION_NAMES == systems.ABLATIONS
