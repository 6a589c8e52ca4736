"""`cellserve bench compare` end to end on a short ramp: cellserve and the unbatched peer
really served and measured, a peer that is not installed listed with its reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cellserve import cli
from cellserve.bench import compare
from cellserve.bench.peers import PEERS


def test_cli_knows_every_peer():
    assert cli.PEER_NAMES == tuple(PEERS)


@pytest.mark.slow  # cellserve and the unbatched peer really served and ramped: a minute
def test_compare_writes_the_table_json_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSERVE_PEERS_DIR", str(tmp_path / "no-peers-here"))
    cfg = compare.CompareConfig(peers=("unbatched", "triton"), install=False, quick=True, threads=1,
                                light_requests=20, seconds_per_rate=0.5, max_rps=45,
                                min_requests=20, ceiling_seconds=0.5, ceiling_max_rps=1000,  # short: the same paths
                                json_path=tmp_path / "out" / "compare.json")
    in_memory = compare.run(cfg, log=lambda *a: None)
    verdict_keys = ("bracketed", "capacity_below_start", "capacity_bracket_rps", "max_goodput_at_rps")

    report = json.loads(cfg.json_path.read_text())
    assert set(report["servers"]) == {"cellserve", "unbatched"}
    for name, per_slo in report["servers"].items():
        assert set(per_slo) == {"50", "200"}
        for slo, figures in per_slo.items():
            # 20-45 req/s is light for both: every SLO is met and something is answered in time
            assert figures["max_goodput_rps"] > 0, (name, slo, report["sweeps"][name])
            assert 0 < figures["light_load_p50_ms"] <= figures["light_load_p99_ms"]
            # each figure carries the verdict on the rows it came from (45 req/s, the cap, is light:
            # unless the machine stalled, none failed, and the figure is marked as a bound)
            rows = compare._best_rows(in_memory, name, slo)
            assert {k: figures[k] for k in verdict_keys} == compare.sweep_bracket(rows, float(slo)).to_dict()
            high = figures["capacity_bracket_rps"][1]
            assert figures["bracketed"] == (high is not None and not figures["capacity_below_start"])
    assert "not installed" in report["skipped"]["triton"] or "no " in report["skipped"]["triton"]
    ceiling = report["generator_ceiling"]
    assert ceiling["runs"] and ceiling["ceiling_rps"] in [0] + [r["offered_rps"] for r in ceiling["runs"]]
    table = cfg.json_path.with_suffix(".md").read_text()
    for name in ("cellserve", "unbatched", "triton"):
        assert f"| {name} |" in table
    bounds = [f for per_slo in report["servers"].values() for f in per_slo.values() if not f["bracketed"]]
    assert ("`>=` no rate above it failed" in table or "`*` the lowest" in table) == bool(bounds)
    for slo in (50, 200):
        assert compare.plot_path(cfg, slo).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a `cellserve` process: seconds of imports
def test_unknown_peer_is_refused_with_the_known_names():
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "compare", "--peers", "tritonx"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown peer(s) tritonx" in done.stderr and "mlserver" in done.stderr


def _row(offered: float, goodput: float, p99_ms: float, within: int, requests: int = 100) -> dict:
    return {"offered_rps": offered, "goodput_rps": {"50": goodput}, "p99_ms": p99_ms,
            "within_slo": {"50": within}, "requests": requests}


def test_a_sweep_is_bracketed_by_its_first_saturated_rate_above_the_best():
    rows = [_row(20, 19.5, 10, 100), _row(30, 29, 12, 99), _row(45, 43, 30, 97), _row(67.5, 40, 80, 60),
            _row(101, 10, 900, 5)]
    b = compare.sweep_bracket(rows, 50.0)
    assert b.bracketed and (b.highest_pass_rps, b.lowest_fail_rps) == (45, 67.5)
    assert b.max_goodput_rps == compare.max_goodput(rows, 50.0) == 43  # 67.5's p99 missed: not counted
    assert not compare.sweep_bracket(rows[:3], 50.0).bracketed
    first_failed = compare.sweep_bracket([_row(20, 5, 70, 20)] + rows[1:], 50.0)
    assert first_failed.below_start and first_failed.marker == "*"


def test_markdown_table_marks_bounds_and_explains_them():
    def figures(rows):
        return {"max_goodput_rps": compare.max_goodput(rows, 50.0), **compare.sweep_bracket(rows, 50.0).to_dict(),
                "light_load_p50_ms": 4.0, "light_load_p99_ms": 9.0, "tuning": "t"}
    report = {"slos_ms": [50.0], "skipped": {},
              "servers": {"a": {"50": figures([_row(20, 19.5, 10, 100), _row(30, 12, 90, 40)])},
                          "b": {"50": figures([_row(20, 19.5, 10, 100), _row(30, 29, 12, 99)])},
                          "c": {"50": figures([_row(20, 8, 90, 40)])}}}
    table = compare.markdown_table(report)
    assert "| a | 20 req/s |" in table and "| b | >= 29 req/s |" in table and "| c | * 0 req/s |" in table
    assert "`>=` no rate above it failed" in table and "`*` the lowest rate offered already failed" in table
    assert not any(line.startswith(">") for line in table.splitlines())
