"""`cellserve bench soak`, short: a mix of models, sequences and bad requests at a steady
rate; its verdict holds on a healthy server."""

from __future__ import annotations

import pytest

from cellserve.bench.soak import SoakConfig, run_soak


@pytest.mark.slow
def test_a_short_soak_passes_every_check():
    # a fixed, light rate and no deadlines: capacity and latency on a shared CI machine are
    # not what this test is about (the RSS bound is looser: half a minute has a short warm-up;
    # so is the health bound: a suite's machine stalled one check for 190 ms; a hung check is
    # still caught)
    report = run_soak(SoakConfig(models=("gru-256", "lstm-512"), minutes=0.5, rps=40, sample_s=3, deadline_ms=None,
                                 max_rss_growth=0.25, max_health_ms=2000.0), progress=lambda line: None)
    counts = report.counts
    assert counts["sent"] == counts["answered"] > 0
    assert counts.get("ok", 0) > 0 and counts.get("ok sequence", 0) > 0 and counts.get("bad, answered 400", 0) > 0
    failed = {name: check["detail"] for name, check in report.checks.items() if not check["ok"]}
    assert not failed, (failed, report.first_failures)
    # each sample's window: the failures since the last, and the answered requests' latency
    windows = [s["window"] for s in report.samples if "window" in s]
    assert windows and sum(w["failed"] for w in windows) == 0
    timed = [w for w in windows if "p99_ms" in w]
    assert timed and all(0 < w["p50_ms"] <= w["p99_ms"] <= w["max_ms"] for w in timed), timed
