"""`bench engine` end to end on a small zoo model and a short sweep: the JSON holds every
policy with the documented fields, and the plot is written."""

import json
import math

from cellserve.bench import engine_bench


def test_engine_bench_writes_every_policy_with_the_documented_fields(tmp_path):
    cfg = engine_bench.BenchConfig(model="gru-256", slo_ms=200, quick=True, json_path=tmp_path / "out.json",
                                   load_fractions=(0.1, 0.5), seconds_per_run=0.4)
    report = engine_bench.run(cfg, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.png").stat().st_size > 1000
    assert on_disk["roofline_gflops"] > 0 and on_disk["capacity_estimate_rps"] > 0
    assert set(on_disk["policies"]) == {"cellular", "padded", "none", "ort", "ort-padded"}
    for policy, d in on_disk["policies"].items():
        for key in ("max_goodput_rps", "light_load_p50_ms", "saturation_gflops", "overhead_us_per_step"):
            assert isinstance(d[key], float) and not math.isnan(d[key]), (policy, key)
        assert d["max_goodput_rps"] > 0
        assert len(d["runs"]) == 2
        assert all(sum(r["counts"].values()) == r["requests"] for r in d["runs"])
    assert "cellular" in engine_bench.table(report)
