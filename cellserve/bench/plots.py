"""Benchmark figures, drawn off-screen (Agg) so they render on headless machines."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_p99_vs_load(rows: dict[str, list[tuple[float, float]]], slo_ms: float, path: str | Path,
                     title: str) -> None:
    """One line per policy: offered load (req/s) against p99 latency (ms, log scale), with the
    SLO as a horizontal line. `rows` maps policy -> [(load_rps, p99_ms)]; NaN points are gaps."""
    # A bare Figure with its own Agg canvas leaves pyplot's global backend untouched.
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for policy, points in rows.items():
        loads, p99s = zip(*sorted(points)) if points else ((), ())
        axes.plot(loads, p99s, marker="o", label=policy)
    axes.axhline(slo_ms, color="black", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    axes.set_yscale("log")
    axes.set_xlabel("offered load (requests/s)")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
