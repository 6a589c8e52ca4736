"""ARRIVALS and SERVICE files, and `cellserve plan batching` end to end (plan/batching_io.py,
cli_batching.py): bad files exit 2 naming the file and the field; plans round-trip as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellserve.cli import main
from cellserve.plan.batching_io import load_arrivals, load_service
from cellserve.plan.batching_map import BatchingError

SERVICE = {"latency_ms": {"1": 3.6, "8": 7.8, "32": 21.0}}


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _run(tmp_path, arrivals, service=SERVICE, *flags):
    a = _write(tmp_path, "a.json", arrivals)
    s = _write(tmp_path, "s.json", service)
    out = tmp_path / "plan.json"
    return main(["plan", "batching", "--arrivals", str(a), "--service", str(s), *flags, "--json", str(out)]), out


@pytest.mark.parametrize("arrivals,message", [
    ({}, "exactly one of 'map', 'poisson_rps' and 'trace'"),
    ({"poisson_rps": 5, "map": {}}, "exactly one of"),
    ({"poisson_rps": -5}, "arrivals.poisson_rps must be > 0"),
    ({"map": {"D0": [[-1.0]]}}, "arrivals.map.D1 is missing"),
    ({"map": {"D0": [[-1.0]], "D1": [[2.0]]}}, "arrivals.map: row 0 of D0 \\+ D1 must sum to 0"),
    ({"trace": "missing.txt"}, "cannot read trace"),
    ({"poisson_rps": 5, "schema_version": 2}, "arrivals.schema_version is 2"),
    ("[1, 2", "^error: arrivals file '[^']*a.json' is not JSON"),  # the file named once
    ({"map": {"D0": [[-2.0]], "D1": [[-3.0]]}}, r"map.D1\[0\]\[0\] must be >= 0 \(a rate\), got -3.0$"),
])
def test_bad_arrivals_files_exit_2_naming_the_field(tmp_path, capsys, arrivals, message):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, arrivals, SERVICE, "--slo-ms", "30")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "a.json" in err
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("service,message", [
    ({}, "service.latency_ms is missing"),
    ({"latency_ms": {}}, "service.latency_ms is empty"),
    ({"latency_ms": {"0": 1.0}}, "service.latency_ms has key '0'"),
    ({"latency_ms": {"two": 1.0}}, "service.latency_ms has key 'two'"),
    ({"latency_ms": {"1": 1.0, "01": 2.0}}, "service.latency_ms has key '01'"),
    ({"latency_ms": {"²": 1.0}}, "service.latency_ms has key '²'"),
    ({"latency_ms": {"1": -1.0}}, "service.latency_ms\\['1'\\] must be > 0"),
    ({"latency_ms": {"1": "fast"}}, "service.latency_ms\\['1'\\] must be a finite number"),
    ({"latency_ms": {"1": []}}, "service.latency_ms\\['1'\\] is an empty list"),
    ({"latency_ms": {"1": [1.0, 0.0]}}, "service.latency_ms\\['1'\\]\\[1\\] must be > 0"),
    ({"latency_ms": {"1": [1.0, None]}}, "service.latency_ms\\['1'\\]\\[1\\] must be a finite number"),
])
def test_bad_service_files_exit_2_naming_the_field(tmp_path, capsys, service, message):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, {"poisson_rps": 100}, service, "--max-batch", "4", "--timeout-ms", "5")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "s.json" in err and __import__("re").search(message, err), err


@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "4"], "give --slo-ms, or both"),
    (["--slo-ms", "30", "--max-batch", "4", "--timeout-ms", "5"], "not both"),
    (["--max-batch", "64", "--timeout-ms", "5"], "--max-batch 64 is beyond service.latency_ms's largest"),
    (["--max-batch", "0", "--timeout-ms", "5"], "--max-batch must be an integer >= 1"),
    (["--max-batch", "4", "--timeout-ms", "-1"], "--timeout-ms must be a finite number >= 0"),
    (["--max-batch", "4", "--timeout-ms", "5", "--percentile", "100"], "--percentile must be in \\(0, 100\\)"),
    (["--slo-ms", "0"], "--slo-ms must be a finite number > 0"),
])
def test_bad_flags_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, {"poisson_rps": 100}, SERVICE, *flags)
    assert exc.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_evaluate_a_point_round_trip(tmp_path):
    rc, out = _run(tmp_path, {"poisson_rps": 400}, SERVICE, "--max-batch", "8", "--timeout-ms", "5",
                   "--percentile", "99")
    assert rc == 0
    plan = json.loads(out.read_text())
    for key in ("max_batch", "timeout_ms", "batch_pmf", "mean_batch", "latency_percentile_ms", "percentile"):
        assert key in plan
    assert plan["max_batch"] == 8 and plan["timeout_ms"] == 5.0 and plan["percentile"] == 99.0
    assert len(plan["batch_pmf"]) == 8 and sum(plan["batch_pmf"]) == pytest.approx(1.0)
    assert plan["mean_batch"] == pytest.approx(np.arange(1, 9) @ np.array(plan["batch_pmf"]))
    assert plan["slo_ms"] is None and plan["arrivals"]["rate_rps"] == pytest.approx(400.0)


@pytest.mark.slow
def test_slo_search_round_trip_meets_the_slo(tmp_path):
    rc, out = _run(tmp_path, {"map": {"D0": [[-1220, 20], [5, -105]], "D1": [[1200, 0], [0, 100]]}}, SERVICE,
                   "--slo-ms", "25")
    assert rc == 0
    plan = json.loads(out.read_text())
    assert plan["latency_percentile_ms"] <= 25.0 and plan["percentile"] == 95.0 and plan["slo_ms"] == 25.0
    # the written point, evaluated again through the CLI, gives the same figures
    rc, again = _run(tmp_path, {"map": {"D0": [[-1220, 20], [5, -105]], "D1": [[1200, 0], [0, 100]]}}, SERVICE,
                     "--max-batch", str(plan["max_batch"]), "--timeout-ms", repr(plan["timeout_ms"]))
    second = json.loads(again.read_text())
    assert second["batch_pmf"] == pytest.approx(plan["batch_pmf"], abs=1e-12)
    assert second["latency_percentile_ms"] == pytest.approx(plan["latency_percentile_ms"], rel=1e-9)


def test_an_unreachable_slo_exits_1_and_writes_nothing(tmp_path, capsys):
    rc, out = _run(tmp_path, {"poisson_rps": 100}, SERVICE, "--slo-ms", "3")  # below any service time
    assert rc == 1 and not out.exists()
    assert "no (B, T) on the grid" in capsys.readouterr().err


def test_a_trace_file_relative_to_the_arrivals_file(tmp_path):
    times = np.cumsum(np.random.default_rng(0).exponential(1 / 300.0, 5000))
    (tmp_path / "t.txt").write_text("# arrival seconds\n" + "\n".join(f"{t:.9f}" for t in times) + "\n")
    arrivals = load_arrivals(_write(tmp_path, "a.json", {"trace": "t.txt"}))
    assert arrivals.rate_rps == pytest.approx(300.0, rel=0.05)
    (tmp_path / "t.json").write_text(json.dumps(list(times)))
    assert load_arrivals(_write(tmp_path, "b.json", {"trace": "t.json"})).rate_rps == pytest.approx(arrivals.rate_rps)
    (tmp_path / "bad.txt").write_text("0.1\nsoon\n")
    with pytest.raises(BatchingError, match="bad.txt' line 2: 'soon' is not a number"):
        load_arrivals(_write(tmp_path, "c.json", {"trace": "bad.txt"}))


def test_service_loads_sorted():
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "s.json"
        p.write_text(json.dumps({"latency_ms": {"8": 7.8, "1": 3.6}}))
        s = load_service(p)
    assert s.points == ((1, 3.6), (8, 7.8)) and s.max_batch == 8


def test_a_json_path_that_cannot_be_written_is_one_line_exit_2(tmp_path, capsys):
    a, s = _write(tmp_path, "a.json", {"poisson_rps": 50}), _write(tmp_path, "s.json", SERVICE)
    (tmp_path / "taken").mkdir()
    code = main(["plan", "batching", "--arrivals", str(a), "--service", str(s), "--slo-ms", "30",
                 "--json", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: cannot write {str(tmp_path / 'taken')!r}: Is a directory"
