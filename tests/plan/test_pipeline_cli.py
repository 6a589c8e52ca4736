"""`cellserve plan pipeline` end to end: a plan written, read back and checked; bad files and
flags exit 2 naming what was wrong."""

from __future__ import annotations

import json

from test_pipeline_files import BLOCKS, POOLS

from cellserve import cli
from cellserve.plan.pipeline_check import check_plan
from cellserve.plan.pipeline_io import load_blocks, load_plan, load_pools


def _files(tmp_path, blocks=BLOCKS, pools=POOLS):
    b, p = tmp_path / "blocks.json", tmp_path / "pools.json"
    b.write_text(json.dumps(blocks))
    p.write_text(json.dumps(pools))
    return b, p


def test_plan_pipeline_writes_a_plan_that_reads_back_and_checks(tmp_path, capsys):
    b, p = _files(tmp_path)
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "pipeline", "--blocks", str(b), "--pools", str(p), "--json", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: objective ") and "HiGHS" in line and "Running HiGHS" not in line
    result = load_plan(out)
    assert check_plan(result, load_blocks(b), load_pools(p)) == []
    assert result.objective >= result.baseline_objective > 0
    assert set(json.loads(out.read_text())) >= {"models", "objective", "baseline_objective", "solver", "gap"}


def test_a_bad_file_exits_2_naming_the_field(tmp_path, capsys):
    bad = json.loads(json.dumps(BLOCKS))
    bad["models"]["gru"]["weight"] = -1
    b, p = _files(tmp_path, blocks=bad)
    code = None
    try:
        cli.main(["plan", "pipeline", "--blocks", str(b), "--pools", str(p), "--json", str(tmp_path / "x.json")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and f"blocks file '{b}'" in err and "models['gru'].weight must be > 0, got -1" in err
    assert not (tmp_path / "x.json").exists()


def test_a_bad_flag_exits_2(tmp_path, capsys):
    b, p = _files(tmp_path)
    for flag, value in (("--max-stages", "0"), ("--time-limit", "-1"), ("--mip-gap", "2")):
        code = None
        try:
            cli.main(["plan", "pipeline", "--blocks", str(b), "--pools", str(p), "--json", str(tmp_path / "x.json"),
                      flag, value])
        except SystemExit as exc:
            code = exc.code
        assert code == 2 and flag in capsys.readouterr().err
