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
