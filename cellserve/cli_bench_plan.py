"""`cellserve bench plan`: the three planners of docs/pipelines.md, docs/accuracy-scaling.md and
docs/batching.md, each checked in simulation (plan/pipeline_bench.py, accuracy_bench.py,
batching_bench.py), written as one JSON file, a Markdown table and a plot beside it.
Parsing and assembly only; building the parser imports nothing heavy."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# name -> the module whose run(quick) -> dict and table(results) -> str make its part
PARTS = {"pipeline": "cellserve.plan.pipeline_bench", "accuracy": "cellserve.plan.accuracy_bench",
         "batching": "cellserve.plan.batching_bench", "batching-measured": "cellserve.bench.batching_measured"}


def add_bench_plan(bench_sub) -> None:
    b = bench_sub.add_parser(
        "plan", help="the pipeline (PPipe), accuracy-scaling (Proteus) and analytic-batching (BATCH) planners, "
                     "checked in simulation",
        description="Run each planner's benchmark: pipelining against no pipelining over two device pools, "
                    "accuracy scaling against highest-only, lowest-only and greedy switching on a bursty trace, "
                    "and BATCH's predicted batch sizes and p95 latencies against simulated batchers and against "
                    "the engine's padded policy measured on this machine (batching-measured); with each planner's "
                    "speed on a large instance. Every figure but batching-measured's is simulated or modelled. Writes "
                    "--json, a Markdown table (.md) and a plot (.png) beside it.")
    b.add_argument("--json", type=Path, default=Path("bench-results/plan.json"), metavar="PATH",
                   help="where to write results (default: bench-results/plan.json)")
    b.add_argument("--quick", action="store_true", help="fewer points and shorter traces")
    b.add_argument("--only", default=",".join(PARTS), metavar="PARTS",
                   help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    b.set_defaults(run=_bench_plan)


def _bench_plan(args, parser) -> int:
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.exit(2, f"error: --only: unknown part(s) {unknown or parts}; choose from {', '.join(PARTS)}\n")
    results, tables = {}, []
    for name in parts:
        module = importlib.import_module(PARTS[name])
        results[name] = module.run(quick=args.quick)
        tables.append(f"## {name}\n\n```\n{module.table(results[name])}\n```\n")
        print(tables[-1])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    md = args.json.with_suffix(".md")
    md.write_text("# cellserve bench plan (simulated and modelled figures; batching-measured: measured)\n\n"
                  + "\n".join(tables))
    png = args.json.with_suffix(".png")
    _plot(results, png)
    print(f"wrote {args.json}, {md} and {png}")
    return 0


def _plot(results: dict, path: Path) -> None:
    """One panel per part that was run: what each planner's goal compares."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in PARTS if name in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        {"pipeline": _plot_pipeline, "accuracy": _plot_accuracy, "batching": _plot_batching,
         "batching-measured": _plot_batching_measured}[name](ax, results[name])
    measured = "; batching-measured: measured" if "batching-measured" in results else ""
    fig.suptitle(f"cellserve bench plan (simulated / modelled{measured})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(ax, r: dict) -> None:
    block = r["runs"][-1]
    names = list(block["systems"])
    ax.bar(names, [block["systems"][n]["violation_ratio"] for n in names], color="tab:red", alpha=0.7,
           label="SLO violation ratio")
    ax2 = ax.twinx()
    ax2.plot(names, [block["systems"][n]["effective_accuracy"] for n in names], "o-", color="tab:blue",
             label="effective accuracy")
    ax.set_title(f"accuracy scaling, headroom {block['headroom']:g} (simulated)")
    ax.set_ylabel("SLO violation ratio")
    ax2.set_ylabel("effective accuracy")
    ax.tick_params(axis="x", rotation=20)


def _plot_batching(ax, r: dict) -> None:
    rows = r["rows"]
    for mode, marker in (("at-once", "o"), ("queue", "x")):
        ax.scatter([row[f"{mode}_p95_ms"] for row in rows], [row["predicted_p95_ms"] for row in rows],
                   marker=marker, label=f"at-once model vs simulated batcher ({mode})")
    one = [row for row in rows if "single-server_p95_ms" in row]
    ax.scatter([row["queue_p95_ms"] for row in one], [row["single-server_p95_ms"] for row in one], marker="+",
               label="single-server model vs simulated (queue)")
    top = max(max(row["predicted_p95_ms"], row["at-once_p95_ms"], row["queue_p95_ms"]) for row in rows)
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlabel("simulated p95 (ms)")
    ax.set_ylabel("predicted p95 (ms)")
    ax.set_title("analytic batching: predicted vs simulated")
    ax.legend(fontsize=8)


def _plot_batching_measured(ax, r: dict) -> None:
    rows = r["rows"]
    for name, marker in (("single-server", "+"), ("at-once", "o"), ("idle-table", "x")):
        mine = [row for row in rows if f"{name}_p95_ms" in row]
        ax.scatter([row["measured_p95_ms"] for row in mine], [row[f"{name}_p95_ms"] for row in mine], marker=marker,
                   label=f"{name} model")
    top = max(max(row["measured_p95_ms"], row.get("single-server_p95_ms", 0.0)) for row in rows)
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlabel("measured p95 (ms), the engine's padded policy")
    ax.set_ylabel("predicted p95 (ms)")
    ax.set_title(f"analytic batching vs the engine ({r['model']}, measured)")
    ax.legend(fontsize=8)


def _plot_pipeline(ax, r: dict) -> None:
    gains = r["gain"]
    labels = list(gains)
    ax.bar(labels, [g["ratio"] or 0.0 for g in gains.values()], color="tab:green")
    ax.axhline(1.3, color="k", ls="--", lw=0.8, label="goal 1.3x where pools differ")
    ax.set_ylabel("objective / no-pipelining baseline")
    ax.set_title("pipelines over pools (modelled)")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
