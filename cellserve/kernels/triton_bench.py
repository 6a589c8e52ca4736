"""`cellserve bench kernels`: what can be said of the Triton kernels on this machine and, where a
GPU is visible, how fast they are.

Three parts, each labelled in the report:
- "interpreter_check" (always): every cell type through TritonCellKernel under
  TRITON_INTERPRET=1 on the CPU, against PyTorch's layers, with the max abs error (in a child
  process, so that the check's cost and memory stay out of the timings).
- "modelled" (always): the tiling model's chosen configuration and predicted step time for
  lstm-512 and gru-256 at batch 1..64 on each modelled GPU class, beside the torch backend's
  step as plan/gpu_model.py models it. Predictions, not measurements.
- "compiled" (unless --no-compile): each tile the model chose for the A100 (sm_80) and H100
  (sm_90) compiled here by Triton's ptxas, no GPU needed: registers per thread as allocated
  against the model's, spills, and the barrier's release/acquire (kernels/triton_compile.py).
- "gpu" (only with a CUDA device visible): per-step times of the Triton
  kernel (launches of STEPS_PER_LAUNCH steps), the torch backend's step, and cuDNN
  (torch.nn.LSTM / GRU over the same steps), with CUDA events. Without one it says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cellserve.kernels.triton_tiling import CHIPS, STEPS_PER_LAUNCH, CellShape, choose, rank

SHAPES = (CellShape("lstm", 512), CellShape("gru", 256))
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CHECK_KINDS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
CHECK_TOLERANCE = 2e-5
_TORCH_LAUNCHES = 10  # plan/gpu_model.py's launches per layer step of the torch backend


def modelled(batches=BATCHES) -> dict:
    """{chip: {shape: [{batch, chosen tile, predicted step, runner-up, torch backend's modelled step}]}}."""
    out = {}
    for name, chip in CHIPS.items():
        per_shape = {}
        for cell in SHAPES:
            rows = []
            for b in batches:
                ranked = rank(chip, cell, b)
                best = ranked[0]
                g, h = cell.gates, cell.hidden
                torch_s = _TORCH_LAUNCHES * chip.gpu.launch_s + max(
                    2 * g * h * h * b / chip.gpu.peak_flops,
                    (4 * g * h * h + b * 4 * (g * h + 3 * h)) / chip.gpu.memory_bandwidth)
                rows.append({
                    "batch": b, "units": best.config.units, "warps": best.config.warps,
                    "lane_block": best.config.lane_block, "resident": best.config.resident,
                    "tiles": best.config.tiles(h), "programs": best.programs,
                    "regs_per_thread": best.regs_per_thread,
                    "step_us": round(best.step_s * 1e6, 3),
                    "terms_us": {k: round(v * 1e6, 3) for k, v in best.terms.items()},
                    "runner_up": None if len(ranked) < 2 else {
                        "units": ranked[1].config.units, "warps": ranked[1].config.warps,
                        "lane_block": ranked[1].config.lane_block, "resident": ranked[1].config.resident,
                        "step_us": round(ranked[1].step_s * 1e6, 3)},
                    "candidates_feasible": len(ranked),
                    "torch_backend_step_us": round(torch_s * 1e6, 3),
                })
            per_shape[f"{cell.kind}-{cell.hidden}"] = rows
        out[chip.name] = per_shape
    return out


def interpreter_check() -> dict:
    """Run `check_in_this_process` in a child with TRITON_INTERPRET=1; its JSON, or the error."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cellserve.kernels.triton_bench", "--interpreter-check"],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip()[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def check_in_this_process(hidden: int = 17, lengths=(5, 3, 4)) -> dict:
    """Each cell type: lanes of different lengths in one launch (resident tile and streaming
    tiles of 4 units, a partial last tile), against PyTorch's layer."""
    import numpy as np
    import torch

    from cellserve.graph.model import DirectionWeights
    from cellserve.graph.zoo.modules import make_rnn
    from cellserve.kernels.triton_rnn import TritonCellKernel
    from cellserve.kernels.triton_tiling import TileConfig

    torch.set_num_threads(1)
    cpu, rng, results = torch.device("cpu"), np.random.default_rng(0), {}
    for i, kind in enumerate(CHECK_KINDS):
        torch.manual_seed(i)
        layer = make_rnn(kind, 4, hidden, 1, False).eval()
        get = lambda n: getattr(layer, n + "_l0").detach().numpy()  # noqa: E731
        weights = DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))
        worst = 0.0
        for tile in (None, TileConfig(units=4, warps=1, lane_block=2, resident=False)):
            kernel = TritonCellKernel(kind, hidden, weights, cpu, tile=tile)
            xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in lengths]
            h0s = [rng.standard_normal(hidden).astype(np.float32) * 0.5 for _ in lengths]
            lanes = [kernel.start(x, h0, h0 if kind == "lstm" else None) for x, h0 in zip(xs, h0s)]
            kernel.run_lanes(np.array([ln.slot for ln in lanes]), np.array([ln.base for ln in lanes]),
                             np.ones(len(lanes), np.int64), np.array(lengths))
            for lane, x, h0 in zip(lanes, xs, h0s):
                state = torch.as_tensor(h0)[None, None]
                state = (state, state) if kind == "lstm" else state
                with torch.no_grad():
                    y_ref, s = layer(torch.as_tensor(x)[None], state)
                y, h, _ = kernel.read(lane)
                h_ref = (s[0] if kind == "lstm" else s)[0, 0].numpy()
                worst = max(worst, float(np.abs(y - y_ref[0].numpy()).max()), float(np.abs(h - h_ref).max()))
        results[kind] = {"max_abs_error": worst, "ok": worst <= CHECK_TOLERANCE}
    return {"ok": all(r["ok"] for r in results.values()), "hidden": hidden, "lane_lengths": list(lengths),
            "tolerance": CHECK_TOLERANCE, "kinds": results,
            "note": "TRITON_INTERPRET=1 on the CPU: one program per launch, so the multi-program grid "
                    "barrier is not exercised"}


def compiled_check(batches=BATCHES) -> dict:
    """The chosen tiles of the A100 and H100 classes, compiled for their architectures."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    from cellserve.kernels.triton_compile import compile_tile
    from cellserve.kernels.triton_tiling import regs_per_thread

    rows = []
    for key, arch in (("a100", 80), ("h100", 90)):
        chip = CHIPS[key]
        for cell in SHAPES:
            chosen: dict = {}
            for b in batches:
                chosen.setdefault(choose(chip, cell, b).config, []).append(b)
            for config, at in chosen.items():
                c = compile_tile(cell, config, arch)
                rows.append({"chip": chip.name, "arch": f"sm_{arch}", "shape": f"{cell.kind}-{cell.hidden}",
                             "batches": at, "units": config.units, "warps": config.warps,
                             "lane_block": config.lane_block, "resident": config.resident,
                             "registers_modelled": regs_per_thread(cell, config), "registers_ptxas": c.registers,
                             "spill_bytes": c.spill_bytes,
                             "barrier_release_acquire": c.barrier_release and c.barrier_acquire})
    ok = all(r["barrier_release_acquire"] for r in rows)
    return {"ok": ok, "rows": rows}


def gpu_timings(batches=BATCHES, repeats: int = 20) -> dict:
    """Per-step microseconds on the visible CUDA device: Triton (launches of STEPS_PER_LAUNCH
    steps), the torch backend (one step_batch per step), cuDNN (torch.nn.LSTM/GRU over the
    same steps). Median of `repeats` runs, after a warm-up."""
    import numpy as np
    import torch

    from cellserve.graph.model import DirectionWeights
    from cellserve.graph.zoo.modules import make_rnn
    from cellserve.kernels.cell import CellKernel
    from cellserve.kernels.triton_rnn import TritonCellKernel

    dev, steps, out = torch.device("cuda"), STEPS_PER_LAUNCH, {}

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / steps)  # ms -> us, per step
        return float(np.median(samples))

    for cell in SHAPES:
        layer = make_rnn(cell.kind, cell.hidden, cell.hidden, 1, False).eval()
        get = lambda n: getattr(layer, n + "_l0").detach().numpy()  # noqa: E731
        weights = DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))
        tri = TritonCellKernel(cell.kind, cell.hidden, weights, dev)
        ref = CellKernel(cell.kind, cell.hidden, weights, dev, backend="torch")
        cudnn = layer.to(dev)
        rows = []
        for b in batches:
            x = np.zeros((steps, cell.hidden), np.float32)
            lanes_t = [tri.start(x) for _ in range(b)]
            lanes_r = [ref.start(x) for _ in range(b)]
            slots_t = np.array([ln.slot for ln in lanes_t])
            base_t = np.array([ln.base for ln in lanes_t])
            slots_r = np.array([ln.slot for ln in lanes_r])
            base_r = np.array([ln.base for ln in lanes_r])
            seq = torch.zeros((b, steps, cell.hidden), device=dev)

            def run_torch():
                for t in range(steps):
                    ref.step(slots_r, base_r + t, base_r + t)

            def run_cudnn():
                with torch.no_grad():
                    cudnn(seq)

            rows.append({
                "batch": b,
                "triton_us": timed(lambda: tri.run_lanes(slots_t, base_t, np.ones(b, np.int64),
                                                         np.full(b, steps, np.int64))),
                "triton_tile": vars(tri.config_for(b)),
                "torch_backend_us": timed(run_torch),
                "cudnn_us": timed(run_cudnn),
            })
            for ln in lanes_t:
                tri.release(ln)
            for ln in lanes_r:
                ref.release(ln)
        out[f"{cell.kind}-{cell.hidden}"] = rows
    return {"device": torch.cuda.get_device_name(dev), "steps_per_launch": steps, "per_step_us": out}


def gpu_status() -> str | None:
    """Why no GPU timing runs here; None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible: no GPU timing exists from this run"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def run(json_path: Path, plot_path: Path | None, command: str, compile_tiles: bool = True) -> dict:
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": command,
              "interpreter_check": interpreter_check(),
              "modelled": {"note": "predictions of kernels/triton_tiling.py from datasheet figures, not "
                                   "measurements; torch_backend_step_us is plan/gpu_model.py's roofline",
                           "steps_per_launch": STEPS_PER_LAUNCH, "chips": modelled()}}
    if compile_tiles:
        report["compiled"] = compiled_check()
    reason = gpu_status()
    report["gpu"] = {"available": False, "reason": reason} if reason else {"available": True, **gpu_timings()}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    if plot_path is not None:
        _plot(report, plot_path)
    return report


def summary(report: dict) -> str:
    """The report as the lines `cellserve bench kernels` prints."""
    check = report["interpreter_check"]
    lines = ["interpreter check (TRITON_INTERPRET=1, CPU, against PyTorch):"]
    if "kinds" in check:
        for kind, r in check["kinds"].items():
            lines.append(f"  {kind:<9} max abs error {r['max_abs_error']:.2e}  {'ok' if r['ok'] else 'FAILED'}")
    else:
        lines.append(f"  FAILED: {check.get('error', '?')}")
    lines.append("modelled (tiling model; not measured): chosen tile per batch, predicted us/step "
                 "[torch backend modelled]")
    for chip, shapes in report["modelled"]["chips"].items():
        for shape, rows in shapes.items():
            cells = [f"b{r['batch']}:{r['units']}u/{r['warps']}w/{r['lane_block']}l"
                     f"{'R' if r['resident'] else 'S'} {r['step_us']:.1f} [{r['torch_backend_step_us']:.0f}]"
                     for r in rows]
            lines.append(f"  {chip} {shape}: " + "  ".join(cells))
    compiled = report.get("compiled")
    if compiled and "rows" in compiled:
        lines.append("compiled here for the GPU (Triton's ptxas, no GPU): registers per thread, ptxas / modelled")
        for r in compiled["rows"]:
            lines.append(f"  {r['arch']} {r['shape']} {r['units']}u/{r['warps']}w/{r['lane_block']}l"
                         f"{'R' if r['resident'] else 'S'} (batch {','.join(map(str, r['batches']))}): "
                         f"{r['registers_ptxas']} / {r['registers_modelled']}, spills {r['spill_bytes']} B, "
                         f"barrier release/acquire {'yes' if r['barrier_release_acquire'] else 'NO'}")
    elif compiled:
        lines.append(f"compiled: skipped ({compiled['reason']})")
    gpu = report["gpu"]
    if gpu["available"]:
        lines.append(f"GPU ({gpu['device']}), measured us/step: triton / torch backend / cuDNN")
        for shape, rows in gpu["per_step_us"].items():
            for r in rows:
                lines.append(f"  {shape} b{r['batch']}: {r['triton_us']:.1f} / {r['torch_backend_us']:.1f} / "
                             f"{r['cudnn_us']:.1f}")
    else:
        lines.append(f"GPU: none timed ({gpu['reason']})")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [f"{c.kind}-{c.hidden}" for c in SHAPES]
    fig, axes = plt.subplots(1, len(shapes), figsize=(11, 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for chip, per in report["modelled"]["chips"].items():
            rows = per[shape]
            ax.plot([r["batch"] for r in rows], [r["step_us"] for r in rows], marker="o", label=chip)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lanes in the launch")
        ax.set_ylabel("predicted us per step")
        ax.set_title(f"{shape}: Triton kernel, MODELLED (no GPU timing)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__" and sys.argv[1:] == ["--interpreter-check"]:
    print(json.dumps(check_in_this_process()))
