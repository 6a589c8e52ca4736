"""`cellserve bench load`: offered load against any Open Inference Protocol server, one rate
at a time, with the statistics users judge a server by.

Each rate replays its own trace (WMT-like sentence lengths, Poisson or bursty arrivals), drawn
from (seed, rate) alone, so every server loaded with the same settings sees the same requests.
A sweep either runs the rates it is given or ramps geometrically from a light load until p99
has passed the loosest SLO (or under 70% of requests met it) twice in a row. The generator's own ceiling is measured against a
trivial endpoint, so a reader can see that the load was the server's limit, not ours.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellserve.bench.loadgen import LoadRun, RequestFormat, open_loop
from cellserve.bench.peers.base import free_ports, spawn
from cellserve.bench.results import RunStats, json_safe, span_s, summarize
from cellserve.bench.traces import SequenceInput, make_trace

TRIVIAL_SERVER = Path(__file__).parent / "peers" / "servers" / "trivial_server.py"
_LAG_LIMIT_MS = 10.0  # a generator whose p99 send lag passes this is behind its schedule
_REASONS_KEPT = 5  # of each of rejected and dropped, per rate


@dataclass(frozen=True)
class Target:
    """A server to load: its address (host:port), the model and how requests are made."""

    address: str
    model: str
    protocol: str = "http"
    fmt: RequestFormat = RequestFormat()


@dataclass(frozen=True)
class Sweep:
    """Which rates to offer and how long. `rates` fixed, else a ramp from `start_rps` by
    `factor` until the server is saturated at max(slos_ms) twice running, or `max_rps`."""

    slos_ms: tuple[float, ...] = (200.0,)
    rates: tuple[float, ...] | None = None
    start_rps: float = 20.0
    factor: float = 1.5
    max_rps: float = 5000.0
    seconds_per_rate: float = 5.0
    min_requests: int = 50
    bursty: bool = False
    vocab: int = 10000
    features: tuple[int, ...] = ()  # feature rows of this shape (float32) instead of token ids
    longest: int | None = None  # sequences cut to this many steps (the model's longest)
    seed: int = 0
    client_timeout_s: float = 30.0
    # a readiness check this often during each rate (None: none), its latency reported beside
    # the load's: an overloaded server must still answer its health checks
    health_every_s: float | None = 0.1


def trace_for(sweep: Sweep, rate: float) -> list:
    """The trace offered at `rate`: the same for every server given the same sweep."""
    seed = np.random.SeedSequence([sweep.seed, int(round(rate * 1000))])
    n = max(sweep.min_requests, int(rate * sweep.seconds_per_rate))
    rows = (SequenceInput("", False, None, sweep.features, "float32", sweep.longest) if sweep.features
            else SequenceInput("", False, sweep.vocab, longest=sweep.longest))
    return make_trace(np.random.default_rng(seed), rate, n, 0, bursty=sweep.bursty, inputs=rows.sampler())


def summarize_load(run: LoadRun, offered_rps: float, slos_ms: tuple[float, ...]) -> dict:
    """One rate's figures: throughput, goodput at each SLO, p50/p90/p99 (answered requests),
    counts by outcome (ok, rejected, dropped, error), the generator's send lag, the
    readiness checks' latency during the load (`health`, when checks ran), the first error
    and the first few reasons given for refusals and drops (`rejected_reasons`,
    `dropped_reasons`, when there were any)."""
    stats = RunStats(policy="load", rate_rps=offered_rps, duration_s=span_s(run.outcomes), outcomes=run.outcomes)
    at_slo = {f"{slo:g}": summarize(stats, slo / 1e3) for slo in slos_ms}
    any_slo = next(iter(at_slo.values()))  # all but goodput is the same at every SLO
    row = {key: any_slo[key] for key in ("requests", "throughput_rps", "p50_ms", "p90_ms", "p99_ms", "counts")}
    row["offered_rps"] = offered_rps
    arrivals = [o.arrival_s for o in run.outcomes]
    # what this trace really offered: a Poisson draw's rate is off its nominal by ~1/sqrt(n)
    row["realized_rps"] = (len(arrivals) - 1) / (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else 0.0
    row["goodput_rps"] = {key: s["goodput_rps"] for key, s in at_slo.items()}
    row["within_slo"] = {key: s["requests"] - s["slo_misses"] for key, s in at_slo.items()}  # answered in time
    row["send_lag_p99_ms"] = float(np.percentile(run.send_lag_s, 99) * 1e3) if run.send_lag_s else 0.0
    if run.health_latencies_s:
        health_ms = np.asarray(run.health_latencies_s) * 1e3
        row["health"] = {"checks": int(health_ms.size), "p50_ms": float(np.percentile(health_ms, 50)),
                         "p99_ms": float(np.percentile(health_ms, 99)), "max_ms": float(health_ms.max())}
    errors = [o.reason for o in run.outcomes if o.status == "error"]
    if errors:
        row["first_error"] = errors[0]
    # why requests were turned away, in the server's words (the first few of each kind): a
    # refusal or a drop at light load is otherwise a bare count in the report
    for status in ("rejected", "dropped"):
        reasons = [o.reason for o in run.outcomes if o.status == status][:_REASONS_KEPT]
        if reasons:
            row[f"{status}_reasons"] = reasons
    return row


def run_rate(target: Target, sweep: Sweep, rate: float) -> dict:
    run = open_loop(target.address, target.model, trace_for(sweep, rate), fmt=target.fmt,
                    protocol=target.protocol, client_timeout_s=sweep.client_timeout_s,
                    health_every_s=sweep.health_every_s)
    return summarize_load(run, rate, sweep.slos_ms)


def warm_up(target: Target, sweep: Sweep) -> None:
    """A short run whose results are dropped: connections, caches and lazy start-up."""
    run_rate(target, replace(sweep, seconds_per_rate=1.0, min_requests=30, seed=sweep.seed + 1), sweep.start_rps)


def sweep_rates(target: Target, sweep: Sweep, progress: tqdm | None = None, label: str = "") -> list[dict]:
    """Offer each rate in turn; return one summary per rate."""
    rows: list[dict] = []
    over = 0
    rate = sweep.rates[0] if sweep.rates else sweep.start_rps
    while True:
        if progress is not None:
            progress.set_postfix_str(f"{label} {rate:.0f} req/s".strip())
        row = run_rate(target, sweep, rate)
        rows.append(row)
        if progress is not None:
            progress.update()
        if sweep.rates:
            if len(rows) == len(sweep.rates):
                return rows
            rate = sweep.rates[len(rows)]
            continue
        over = over + 1 if saturated(row, max(sweep.slos_ms)) else 0
        rate = round(rate * sweep.factor, 1)
        if over >= 2 or rate > sweep.max_rps:
            return rows


def saturated(row: dict, slo_ms: float) -> bool:
    """Past what the server can take at this SLO: p99 over it (NaN, nothing answered, is over),
    or under 70% of requests answered within it (a server that refuses early keeps its p99)."""
    good_fraction = row["within_slo"][f"{slo_ms:g}"] / row["requests"] if row["requests"] else 0.0
    return not row["p99_ms"] <= slo_ms or good_fraction < 0.7


def max_goodput(rows: list[dict], slo_ms: float) -> float:
    """The most answers within the SLO per second at any rate whose p99 met the SLO."""
    key = f"{slo_ms:g}"
    return max((r["goodput_rps"][key] for r in rows if r["p99_ms"] <= slo_ms), default=0.0)


def generator_ceiling(protocol: str = "http", workdir: Path | None = None, seconds: float = 2.0,
                      start_rps: float = 200.0, factor: float = 1.3, max_rps: float = 100_000) -> dict:
    """The highest rate this generator offers on time and sees answered, against an endpoint
    that does no work: ramp until throughput falls under 95% of the offer or the send lag's
    p99 passes 10 ms (on both of two tries), or the rate reaches `max_rps` (then the ceiling
    is a lower bound: the last rate kept up)."""
    import tempfile

    workdir = Path(workdir or tempfile.mkdtemp(prefix="cellserve-ceiling-"))
    http_port, grpc_port = free_ports(2)
    server = spawn("trivial", [sys.executable, str(TRIVIAL_SERVER), "--http-port", str(http_port),
                               "--grpc-port", str(grpc_port)], f"127.0.0.1:{http_port}", workdir / "trivial.log")
    address = f"127.0.0.1:{http_port if protocol == 'http' else grpc_port}"
    try:
        server.wait_ready(30)
        target = Target(address, "trivial", protocol, RequestFormat(binary=False))
        sweep = Sweep(seconds_per_rate=seconds, min_requests=200, health_every_s=None)
        run_rate(target, sweep, start_rps)  # warm-up
        best, rows, rate = 0.0, [], start_rps
        while rate < max_rps:
            kept = False
            for _ in range(2):  # a rate passes on either of two tries: one stall is not a ceiling
                row = run_rate(target, sweep, rate)
                rows.append({k: row[k] for k in ("offered_rps", "realized_rps", "throughput_rps",
                                                 "send_lag_p99_ms", "p99_ms")})
                kept = row["throughput_rps"] >= 0.95 * row["realized_rps"] and row["send_lag_p99_ms"] <= _LAG_LIMIT_MS
                if kept:
                    break
            if not kept:
                break
            best, rate = rate, round(rate * factor)
        return {"protocol": protocol, "ceiling_rps": best, "runs": rows}
    finally:
        server.stop()


@dataclass
class LoadReport:
    target: Target
    sweep: Sweep
    rows: list[dict]
    ceiling: dict | None = None

    def to_dict(self) -> dict:
        return {"address": self.target.address, "model": self.target.model, "protocol": self.target.protocol,
                "request_format": asdict(self.target.fmt), "sweep": {**vars(self.sweep)},
                "max_goodput_rps": {f"{s:g}": max_goodput(self.rows, s) for s in self.sweep.slos_ms},
                "rates": self.rows, "generator_ceiling": self.ceiling}


def write_report(report: LoadReport, json_path: Path, plot_path: Path | None = None) -> None:
    from cellserve.bench.plots import plot_load_sweep

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(json_safe(report.to_dict()), indent=2))
    slo = max(report.sweep.slos_ms)
    plot_load_sweep({report.target.address: report.rows}, slo, plot_path or json_path.with_suffix(".png"),
                    f"{report.target.model} at {report.target.address} ({report.target.protocol})")


def table(report: LoadReport) -> str:
    slos = report.sweep.slos_ms
    head = (f"{'offered':>8} {'thru':>7} " + " ".join(f"{'good@' + format(s, 'g'):>9}" for s in slos)
            + f" {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'rejected':>8} {'dropped':>8} {'errors':>7}"
            + f" {'health max ms':>13}")
    lines = [head]
    for r in report.rows:
        c = r["counts"]
        lines.append(f"{r['offered_rps']:>8.1f} {r['throughput_rps']:>7.1f} "
                     + " ".join(f"{r['goodput_rps'][f'{s:g}']:>9.1f}" for s in slos)
                     + f" {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f}"
                     f" {c['rejected']:>8} {c['dropped']:>8} {c['error']:>7}"
                     f" {r['health']['max_ms'] if 'health' in r else float('nan'):>13.1f}")
    errors = [r for r in report.rows if r.get("first_error")]
    if errors:  # what the errors were, not only how many: the first of the first rate that had some
        lines.append(f"first error (at {errors[0]['offered_rps']:.1f} req/s): {errors[0]['first_error']}")
    if report.ceiling:
        lines.append(f"generator ceiling ({report.ceiling['protocol']}, trivial endpoint): "
                     f"{report.ceiling['ceiling_rps']:.0f} req/s")
    return "\n".join(lines)
