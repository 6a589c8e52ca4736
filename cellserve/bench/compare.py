"""`cellserve bench compare`: cellserve and the servers users would run instead, on the same
model, machine, thread count and traces, in one run.

Every server gets the same open-loop ramp (`bench load`), JSON tensors over HTTP with
tritonclient. Each peer is tried at every entry of its tuning grid (batch size, batch wait),
restarted for each; per SLO the entry with the most goodput is kept, and the light-load
latencies are the best any entry gave. cellserve gets the SLO as each request's deadline
(its users send one) and so runs one ramp per SLO; the peers have no deadline scheduling and
one ramp serves both SLOs. Peers that cannot be installed or started are listed with the reason.

Every max goodput carries its bracket (`ramp.bracket`): the highest rate that kept up at that
SLO and the lowest above it that did not; without the latter it is marked as a lower bound,
and when the ramp's first rate already failed, as below the ramp's start.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from cellserve.bench.engine_bench import cpu_count
from cellserve.bench.host import cpu_name
from cellserve.bench.load import (Sweep, Target, generator_ceiling, max_goodput, run_rate, saturated, sweep_rates,
                                  warm_up)
from cellserve.bench.loadgen import RequestFormat
from cellserve.bench.peers import PEERS, export_model, load_peer
from cellserve.bench.peers.base import PeerUnavailable
from cellserve.bench.plots import plot_load_sweep
from cellserve.bench.ramp import Bracket, Point, bracket, footnotes
from cellserve.bench.results import json_safe

CELLSERVE = "cellserve"


@dataclass
class CompareConfig:
    model: str = "lstm-512"
    slos_ms: tuple[float, float] = (50.0, 200.0)  # tight, loose
    peers: tuple[str, ...] = tuple(PEERS)
    quick: bool = False
    install: bool = True
    threads: int = field(default_factory=cpu_count)
    light_rps: float = 10.0
    light_requests: int | None = None  # default: 100 quick, 300 full
    seconds_per_rate: float | None = None  # default: 2 quick, 5 full
    max_rps: float = 5000.0
    seed: int = 0
    json_path: Path = Path("bench-results/compare.json")
    # smaller only in tests (no flag): the same code path, run for less time; the command keeps these
    min_requests: int = 40  # of each rate of a sweep, however low the rate
    ceiling_seconds: float = 2.0  # of each rate of the generator's ceiling ramp (load.generator_ceiling)
    ceiling_max_rps: float = 100_000  # where that ramp stops if the generator still keeps up

    def sweep(self, vocab: int) -> Sweep:
        seconds = self.seconds_per_rate or (2.0 if self.quick else 5.0)
        return Sweep(slos_ms=self.slos_ms, start_rps=2 * self.light_rps, factor=1.5 if self.quick else 1.3,
                     max_rps=self.max_rps, seconds_per_rate=seconds, min_requests=self.min_requests, vocab=vocab,
                     seed=self.seed, health_every_s=None)  # peers' health endpoints differ; not what is compared

    @property
    def light_count(self) -> int:
        return self.light_requests or (100 if self.quick else 300)


def run(cfg: CompareConfig, log=print) -> dict:
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="cellserve-compare-"))
    model = export_model(cfg.model, workdir / "model")
    sweep = cfg.sweep(model.vocab)
    log("measuring the load generator's ceiling against a trivial endpoint ...")
    ceiling = generator_ceiling("http", workdir, seconds=cfg.ceiling_seconds,
                                 max_rps=cfg.ceiling_max_rps)
    log(f"generator ceiling: {ceiling['ceiling_rps']:.0f} req/s")
    servers, skipped, sweeps = {}, {}, {}
    servers[CELLSERVE], sweeps[CELLSERVE] = _cellserve(cfg, sweep, log)
    for name in cfg.peers:
        try:
            servers[name], sweeps[name] = _peer(name, cfg, model, sweep, workdir, log)
        except PeerUnavailable as exc:
            reason = str(exc).splitlines()[0]
            log(f"{name}: skipped: {reason}")
            skipped[name] = str(exc)
    report = {
        "model": cfg.model, "slos_ms": list(cfg.slos_ms), "quick": cfg.quick, "threads": cfg.threads,
        "machine": _machine(), "generator_ceiling": ceiling, "sweep": vars(sweep),
        "light_load": {"rate_rps": cfg.light_rps, "requests": cfg.light_count},
        "servers": servers, "skipped": skipped, "sweeps": sweeps,
        "seconds": round(time.time() - started, 1),
    }
    _write(cfg, report)
    return report


def _light(target: Target, cfg: CompareConfig, sweep: Sweep) -> dict:
    light = replace(sweep, seconds_per_rate=cfg.light_count / cfg.light_rps)
    return run_rate(target, light, cfg.light_rps)


def _cellserve(cfg: CompareConfig, sweep: Sweep, log) -> tuple[dict, dict]:
    from cellserve.server.launch import ServerProcess

    log("cellserve: starting")
    server = ServerProcess("--model", cfg.model, "--grpc-port", "-1", "--metrics-port", "-1",
                           "--threads", str(cfg.threads))
    results, sweeps = {}, {}
    try:
        for slo in cfg.slos_ms:
            target = Target(server.http, cfg.model, fmt=RequestFormat(binary=False, deadline_ms=slo))
            warm_up(target, sweep)
            light = _light(target, cfg, sweep)
            with tqdm(desc=f"cellserve, deadline {slo:g} ms", unit="rate", leave=False) as bar:
                rows = sweep_rates(target, replace(sweep, slos_ms=(slo,)), bar)
            results[f"{slo:g}"] = {"max_goodput_rps": max_goodput(rows, slo), **sweep_bracket(rows, slo).to_dict(),
                                   "light_load_p50_ms": light["p50_ms"], "light_load_p99_ms": light["p99_ms"],
                                   "tuning": "default (cellular)"}
            sweeps[f"deadline {slo:g} ms"] = {"light": light, "rates": rows}
            log(f"cellserve @ {slo:g} ms: {_figure(results[f'{slo:g}'])}, "
                f"light p99 {light['p99_ms']:.1f} ms")
    finally:
        server.stop()
    return results, sweeps


def _peer(name: str, cfg: CompareConfig, model, sweep: Sweep, workdir: Path, log) -> tuple[dict, dict]:
    peer = load_peer(name)
    if cfg.install:
        log(f"{name}: installing (once; into its own environment) ...")
        peer.install(log)
    reason = peer.missing()
    if reason:
        raise PeerUnavailable(reason)
    fmt = RequestFormat(binary=False, pad_to_buckets=peer.pads_on_client)
    sweeps = {}
    for tuning in peer.quick_tuning_grid if cfg.quick else peer.tuning_grid:
        log(f"{name}: {tuning.label()}")
        with peer.start(model, workdir / name, cfg.threads, tuning) as running:
            target = Target(running.address, model.name, fmt=fmt)
            warm_up(target, sweep)
            light = _light(target, cfg, sweep)
            with tqdm(desc=f"{name}, {tuning.label()}", unit="rate", leave=False) as bar:
                rows = sweep_rates(target, sweep, bar)
        sweeps[tuning.label()] = {"light": light, "rates": rows}
    best_light = min(sweeps.values(), key=lambda s: _or_inf(s["light"]["p99_ms"]))["light"]
    results = {}
    for slo in cfg.slos_ms:
        label, best = max(sweeps.items(), key=lambda item: max_goodput(item[1]["rates"], slo))
        results[f"{slo:g}"] = {"max_goodput_rps": max_goodput(best["rates"], slo),
                               **sweep_bracket(best["rates"], slo).to_dict(),
                               "light_load_p50_ms": best_light["p50_ms"], "light_load_p99_ms": best_light["p99_ms"],
                               "tuning": label}
        log(f"{name} @ {slo:g} ms: {_figure(results[f'{slo:g}'])} ({label}), "
            f"light p99 {best_light['p99_ms']:.1f} ms")
    return results, sweeps


def sweep_bracket(rows: list[dict], slo_ms: float) -> Bracket:
    """The bracket of a `bench load` sweep at one SLO: a rate passes when the server was not
    saturated there (load.saturated), and only rates whose p99 met the SLO count towards the
    max goodput (as in load.max_goodput)."""
    key = f"{slo_ms:g}"
    return bracket(Point(r["offered_rps"], r["goodput_rps"][key] if r["p99_ms"] <= slo_ms else 0.0,
                         not saturated(r, slo_ms), r) for r in rows)


def _figure(figures: dict) -> str:
    """A max goodput as logged: its marker, and the rates that bracket it."""
    b = Bracket.from_dict(figures)
    return f"{b.figure('req/s')} (capacity {b.describe()} req/s)"


def _or_inf(value: float) -> float:
    return math.inf if value is None or math.isnan(value) else value


def _machine() -> dict:
    return {"cpus": cpu_count(), "cpu": cpu_name(), "python": platform.python_version()}


def markdown_table(report: dict) -> str:
    slos = [f"{s:g}" for s in report["slos_ms"]]
    head = ("| server | " + " | ".join(f"max goodput, p99 ≤ {s} ms" for s in slos)
            + " | light-load p50 | light-load p99 | best tuning |")
    lines = [head, "|" + "---|" * (len(slos) + 4)]
    brackets = []
    for name, per_slo in report["servers"].items():
        first = per_slo[slos[0]]
        tunings = sorted({per_slo[s]["tuning"] for s in slos})
        figures = [Bracket.from_dict(per_slo[s]) for s in slos]
        brackets += figures
        lines.append(f"| {name} | " + " | ".join(b.figure("req/s") for b in figures)
                     + f" | {first['light_load_p50_ms']:.1f} ms | {first['light_load_p99_ms']:.1f} ms"
                     + f" | {'; '.join(tunings)} |")
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | " + " | ".join("—" for _ in slos) + f" | — | — | skipped: {reason.splitlines()[0]} |")
    for note in footnotes(brackets, markdown=True):
        lines += ["", note]
    return "\n".join(lines)


def _write(cfg: CompareConfig, report: dict) -> None:
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(json_safe(report), indent=2))
    cfg.json_path.with_suffix(".md").write_text(markdown_table(report) + "\n")
    for slo in report["slos_ms"]:
        key = f"{slo:g}"
        series = {name: _best_rows(report, name, key) for name in report["servers"]}
        plot_load_sweep(series, slo, plot_path(cfg, slo), f"{cfg.model}: servers side by side, SLO {key} ms "
                        f"({report['machine']['cpus']} cores, {cfg.threads} threads)", slo_key=key)


def _best_rows(report: dict, name: str, slo_key: str) -> list[dict]:
    sweeps = report["sweeps"][name]
    label = f"deadline {slo_key} ms" if name == CELLSERVE else report["servers"][name][slo_key]["tuning"]
    return sweeps[label]["rates"]


def plot_path(cfg: CompareConfig, slo_ms: float) -> Path:
    return cfg.json_path.with_name(f"{cfg.json_path.stem}-{slo_ms:g}ms.png")
