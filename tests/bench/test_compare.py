"""`cellserve bench compare` end to end on a short ramp: cellserve and the unbatched peer
really served and measured, a peer that is not installed listed with its reason."""

from __future__ import annotations

import json
import subprocess
import sys

from cellserve import cli
from cellserve.bench import compare
from cellserve.bench.peers import PEERS


def test_cli_knows_every_peer():
    assert cli.PEER_NAMES == tuple(PEERS)


def test_compare_writes_the_table_json_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSERVE_PEERS_DIR", str(tmp_path / "no-peers-here"))
    cfg = compare.CompareConfig(peers=("unbatched", "triton"), install=False, quick=True, threads=1,
                                light_requests=20, seconds_per_rate=0.5, max_rps=45,
                                json_path=tmp_path / "out" / "compare.json")
    compare.run(cfg, log=lambda *a: None)

    report = json.loads(cfg.json_path.read_text())
    assert set(report["servers"]) == {"cellserve", "unbatched"}
    for name, per_slo in report["servers"].items():
        assert set(per_slo) == {"50", "200"}
        for slo, figures in per_slo.items():
            # 20-45 req/s is light for both: every SLO is met and something is answered in time
            assert figures["max_goodput_rps"] > 0, (name, slo, report["sweeps"][name])
            assert 0 < figures["light_load_p50_ms"] <= figures["light_load_p99_ms"]
    assert "not installed" in report["skipped"]["triton"] or "no " in report["skipped"]["triton"]
    ceiling = report["generator_ceiling"]
    assert ceiling["runs"] and ceiling["ceiling_rps"] in [0] + [r["offered_rps"] for r in ceiling["runs"]]
    table = cfg.json_path.with_suffix(".md").read_text()
    for name in ("cellserve", "unbatched", "triton"):
        assert f"| {name} |" in table
    for slo in (50, 200):
        assert compare.plot_path(cfg, slo).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_peer_is_refused_with_the_known_names():
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "bench", "compare", "--peers", "tritonx"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown peer(s) tritonx" in done.stderr and "mlserver" in done.stderr
