"""Benchmark figures, drawn off-screen (Agg) so they render on headless machines."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cellserve.plan.json_io import OutputError


def _save(figure: Figure, path: str | Path) -> None:
    """Write the PNG, creating its folder; OutputError naming the path when it cannot (the
    CLIs print one line, as for a --json path)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=120)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


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
    _save(figure, path)


def plot_load_sweep(series: dict[str, list[dict]], slo_ms: float, path: str | Path, title: str,
                    slo_key: str | None = None) -> None:
    """Two panels against offered load, one line per server: p99 latency (log scale, with the
    SLO) and goodput at the SLO. Each row is a `cellserve bench load` summary."""
    key = slo_key or f"{slo_ms:g}"
    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    p99_axes, good_axes = figure.subplots(1, 2)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["offered_rps"])
        offered = [r["offered_rps"] for r in rows]
        p99_axes.plot(offered, [r["p99_ms"] for r in rows], marker="o", label=name)
        good_axes.plot(offered, [r["goodput_rps"][key] for r in rows], marker="o", label=name)
    p99_axes.axhline(slo_ms, color="black", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    p99_axes.set_yscale("log")
    p99_axes.set_ylabel("p99 latency (ms)")
    good_axes.set_ylabel(f"goodput within {slo_ms:g} ms (requests/s)")
    for axes in (p99_axes, good_axes):
        axes.set_xlabel("offered load (requests/s)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)
