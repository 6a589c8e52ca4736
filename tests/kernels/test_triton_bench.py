"""`cellserve bench kernels` end to end: its parser imports neither torch nor triton; a run writes
the interpreter check (every cell type within tolerance), the modelled tiles labelled as such,
and, without a GPU, says that nothing was timed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cellserve import cli

pytest.importorskip("triton", reason="triton is not installed (pip install 'cellserve[gpu]')")


def test_building_the_bench_kernels_parser_imports_neither_torch_nor_triton():
    code = ("import sys\nfrom cellserve.cli import build_parser\n"
            "build_parser().parse_args(['bench', 'kernels', '--json', 'x.json'])\n"
            "print('torch' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow  # the interpreter check runs in a child process: about 10-15 s here
def test_bench_kernels_writes_the_check_the_modelled_tiles_and_the_gpu_status(tmp_path, capsys):
    import torch

    path = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--json", str(path), "--no-compile"]) == 0
    report = json.loads(path.read_text())
    check = report["interpreter_check"]
    assert check["ok"] and set(check["kinds"]) == {"lstm", "gru", "rnn_tanh", "rnn_relu"}
    assert all(r["max_abs_error"] <= check["tolerance"] for r in check["kinds"].values())
    assert "not measurements" in report["modelled"]["note"]
    chips = report["modelled"]["chips"]
    assert all("(modelled)" in name for name in chips)
    for shapes in chips.values():
        assert set(shapes) == {"lstm-512", "gru-256"}
        for shape, rows in shapes.items():
            hidden = int(shape.split("-")[1])
            assert [r["batch"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
            assert all(hidden <= r["tiles"] * r["units"] < hidden + r["units"] for r in rows)  # tiles cover H
            assert all(r["programs"] == r["tiles"] for r in rows if r["resident"])
            steps = [r["step_us"] for r in rows]
            assert steps == sorted(steps)  # a bigger batch never predicted faster
    assert (tmp_path / "kernels.png").stat().st_size > 0
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert report["gpu"] == {"available": False,
                                 "reason": "no CUDA device is visible: no GPU timing exists from this run"}
        assert "GPU: none timed" in printed
