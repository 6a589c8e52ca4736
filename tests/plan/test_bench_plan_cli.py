"""`cellserve bench plan`: the three planners' benchmarks assembled into one JSON, table and plot."""

from __future__ import annotations

import json

import pytest

from cellserve.cli import main


def test_an_unknown_part_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "plan", "--only", "batching,nexus"])
    assert exc.value.code == 2
    assert "unknown part(s) ['nexus']" in capsys.readouterr().err


@pytest.mark.slow
def test_one_part_writes_its_json_table_and_plot(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--quick", "--only", "batching", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["batching"] and results["batching"]["simulated"] is True
    assert results["batching"]["points"] == len(results["batching"]["rows"]) > 0
    assert "## batching" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_the_measured_batching_part_runs_the_engines_padded_policy_and_predicts_it(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--quick", "--only", "batching-measured", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["batching-measured"]
    assert r["measured"] is True and r["points"] == len(r["rows"]) == 1
    (row,) = r["rows"]
    assert row["answered"] == row["requests"] > 0  # the padded policy here has no deadlines: all answered
    assert row["measured_mean_batch"] >= 1.0 and row["measured_p95_ms"] > 0
    for m in ("single-server", "at-once", "idle-table"):  # each predicts, or says why it cannot
        assert f"{m}_p95_ms" in row or f"{m}_refused" in row
    # every cohort is one batch of at most B, and the two halves of the run are both there
    assert row["calibration_cohorts"] + row["test_cohorts"] == row["cohorts"] and row["calibration_cohorts"] > 0
    assert row["cohorts"] * 8 >= row["answered"]
    assert sorted(r["service_ms"], key=int) == ["1", "2", "4", "8", "16"]
    assert out.with_suffix(".png").stat().st_size > 0
