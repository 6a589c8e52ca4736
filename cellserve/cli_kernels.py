"""The `cellserve bench kernels` subcommand (added to the parser by cli.py); parsing only: the
work is in kernels/triton_bench.py. Building the parser imports no torch and no triton."""

from __future__ import annotations

import sys
from pathlib import Path


def add_bench_kernels(bench_sub) -> None:
    p = bench_sub.add_parser(
        "kernels", help="the Triton GPU kernels: interpreter check, modelled tiles, GPU timings where a GPU is",
        description="Checks the Triton kernels under TRITON_INTERPRET=1 against PyTorch (always), writes the "
                    "tiling model's chosen tiles for lstm-512 and gru-256 at batch 1-64 on the modelled GPU "
                    "classes (labelled modelled), compiles those tiles for sm_80/sm_90 here (registers, "
                    "barrier), and times the kernels against the torch backend and cuDNN only when a CUDA device "
                    "is visible.")
    p.add_argument("--json", type=Path, default=Path("bench-results/kernels.json"), help="where to write results")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip compiling the chosen tiles for sm_80/sm_90 (a few seconds each, no GPU needed)")
    p.set_defaults(run=_bench_kernels)


def _bench_kernels(args, parser) -> int:
    from cellserve.kernels import triton_bench

    plot = args.plot or args.json.with_suffix(".png")
    command = "cellserve bench kernels " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "kernels"] \
        else f"cellserve bench kernels --json {args.json}"
    report = triton_bench.run(args.json, plot, command.strip(), compile_tiles=not args.no_compile)
    print(triton_bench.summary(report))
    print(f"wrote {args.json} and {plot}")
    ok = report["interpreter_check"].get("ok") and report.get("compiled", {"ok": True}).get("ok")
    return 0 if ok else 1
