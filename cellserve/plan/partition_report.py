"""`bench partition`'s report: JSON, a Markdown table and a PNG beside it."""

from __future__ import annotations

import json
from pathlib import Path


def _f(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict) -> str:
    """The zoo rows (modelled) and the planner's speed and quality, as Markdown."""
    lines = [f"Modelled CPU+GPU ({report['models'][0]['gpu'] if report['models'] else '-'}): " + report["modelled"], "",
             "| model | CPU-only ms | GPU-only ms | latency mode ms (vs GPU-only, vs CPU-only) | SLO ms | "
             "memory mode GPU MB (GPU-only MB, saved) | throughput mode req/s (x GPU-only, x CPU-only) |",
             "|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        lat, mem, thr = r["latency"], r["memory"], r["throughput"]
        lat_s = "infeasible" if "infeasible" in lat else (
            f"{_f(lat['makespan_ms'])} ({_f(lat['vs_gpu_only_pct'], '+.1f')}%, {_f(lat['vs_cpu_only_pct'], '+.1f')}%)")
        mem_s = "infeasible" if "infeasible" in mem else (
            f"{_f(mem['gpu_memory_mb'])} ({_f(r['gpu_only']['gpu_memory_mb'])}, {_f(mem['gpu_memory_saved_pct'], '.1f')}%)")
        thr_s = "infeasible" if "infeasible" in thr else (
            f"{_f(thr['throughput_rps'], '.4g')} ({_f(thr['vs_gpu_only_x'], '.2f')}x, {_f(thr['vs_cpu_only_x'], '.2f')}x)")
        lines.append(f"| {r['model']} | {_f(r['cpu_only']['makespan_ms'])} | {_f(r['gpu_only']['makespan_ms'])} | "
                     f"{lat_s} | {_f(r['slo_ms'])} | {mem_s} | {thr_s} |")
    sp = report["speed"]
    lines += ["", f"Planner speed, {sp['nodes']} nodes / {sp['edges']} edges (goal < {sp['goal_s']:g} s): " +
              ", ".join(f"{m} {v['wall_s']:.3f} s wall ({v['cpu_s']:.3f} s CPU, {v['solver']}, gap <= {v['gap']:.3g})"
                        for m, v in sp["modes"].items())]
    q = report["quality"]
    lines.append("Heuristic / exact on random 8-16-node DAGs: " +
                 ", ".join(f"{m} mean {_f(v['mean'], '.4f')} max {_f(v['max'], '.4f')} ({v['graphs']} graphs)"
                           for m, v in q.items()))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.27
    xs = range(len(rows))

    def val(r, key, field):
        return r[key].get(field, 0.0) if isinstance(r.get(key), dict) else 0.0

    for k, (key, label) in enumerate((("cpu_only", "CPU only"), ("gpu_only", "GPU only"), ("latency", "partition"))):
        axes[0].bar([x + (k - 1) * width for x in xs], [val(r, key, "makespan_ms") for r in rows], width, label=label)
    axes[0].set_title("latency of one request (ms, lower is better)")
    for k, (key, label) in enumerate((("gpu_only", "GPU only"), ("memory", "memory mode"))):
        axes[1].bar([x + (k - 0.5) * width for x in xs], [val(r, key, "gpu_memory_mb") for r in rows], width, label=label)
    axes[1].set_title("GPU memory within the SLO (MB)")
    for k, (key, label) in enumerate((("cpu_only", "CPU only"), ("gpu_only", "GPU only"), ("throughput", "partition"))):
        axes[2].bar([x + (k - 1) * width for x in xs], [val(r, key, "throughput_rps") for r in rows], width, label=label)
    axes[2].set_title("requests/s the devices sustain (higher is better)")
    for ax in axes:
        ax.set_xticks(list(xs), names, rotation=15)
        ax.legend(fontsize=8)
    fig.suptitle("cellserve partition planner, CPU measured + GPU MODELLED (predictions, not runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(report["table"] + "\n")
    plot(report, path.with_suffix(".png"))
