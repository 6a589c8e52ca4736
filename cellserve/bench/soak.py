"""`cellserve bench soak`: a long run at a steady share of capacity, with a mix of models,
stateful sequences and bad requests, watching the server for what only time shows.

It starts `cellserve serve` on the chosen zoo models, finds the capacity as the arrivals per
second of its own mix the server sustains with --capacity-concurrency of them kept in flight
for --capacity-seconds (after a burst to warm up; unless --rps is given), then offers Poisson
arrivals at --load of it (70% by default) for --minutes. Each arrival is, by --mix, a plain
request to one of the models, a whole sequence (start, middle chunks, end, each sent when the
last is answered; after a failed chunk, an end, tried again while refused for load) or a bad
request (an unknown input, a wrong datatype, unparseable JSON) that must be answered 400.
Every --sample-s it reads the server's RSS and open file descriptors (/proc), its active
sequences (metrics) and a health check's latency. Once the soak is over it measures the
capacity again, as at the start (reported, not judged: on a machine whose speed moves, the
offered load was another share of what the server then sustained).

Verdict (exit status 0 when all hold): no failure beyond the bad requests (which must all be
400s; a 429 or 504 at this load counts as a failure), every request answered exactly once, RSS
growth after warm-up (the first fifth) under --max-rss-growth, file descriptors back where they
were after warm-up (within --fd-slack), no sequence left active, health checks under
--max-health-ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cellserve.cli_types import positive

MODELS = ("gru-256", "lstm-512")
_BAD = ("unknown input", "wrong datatype", "unparseable JSON")
END_RETRY_PAUSES_S = (0.1, 0.2, 0.4, 0.8, 1.6)  # between tries of a failed sequence's end (_Soak._end_sequence)


@dataclass(frozen=True)
class SoakConfig:
    models: tuple[str, ...] = MODELS
    minutes: float = 10.0
    load: float = 0.7  # share of the measured capacity offered
    rps: float | None = None  # offered rate; None: load x the measured capacity
    mix: tuple[float, float, float] = (0.85, 0.10, 0.05)  # plain, sequence, bad
    sequence_chunks: int = 4
    deadline_ms: float | None = 1000.0  # sent as each plain request's timeout; None: none
    sample_s: float = 5.0
    max_rss_growth: float = 0.05
    fd_slack: int = 8
    max_health_ms: float = 100.0  # the slowest readiness check allowed
    seed: int = 0
    server_args: tuple[str, ...] = ()
    capacity_concurrency: int = 64  # arrivals in flight while the capacity is measured (see measure_capacity)
    capacity_seconds: float = 15.0  # and for how long


@dataclass
class SoakReport:
    config: dict
    offered_rps: float
    capacity_rps: float | None
    burst_rps: float | None = None  # the warm-up burst's arrivals/s (see measure_capacity)
    # the capacity measured again once the soak is over (None with --rps): a machine whose speed
    # moved during the run offered its load at another share of what it then sustained
    capacity_end_rps: float | None = None
    counts: dict = field(default_factory=dict)  # outcome -> requests
    first_failures: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)  # the first requests with no answer, and why
    # t_s, rss_bytes, fds, the _GAUGES, health_ms, and `window`: since the sample before, the
    # failures and the plain requests' p50_ms / p99_ms / max_ms (answered 200)
    samples: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # name -> {"ok": bool, "detail": str}

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks.values())


def _tokens_body(rng, length: int, params: dict) -> bytes:
    tokens = rng.integers(0, 10000, length).tolist()
    doc = {"inputs": [{"name": "tokens", "shape": [1, length], "datatype": "INT64", "data": tokens}]}
    if params:
        doc["parameters"] = params
    return json.dumps(doc, separators=(",", ":")).encode()


def _bad_body(kind: str) -> bytes:
    if kind == "unknown input":
        return json.dumps({"inputs": [{"name": "no-such-input", "shape": [1, 2], "datatype": "INT64",
                                       "data": [1, 2]}]}).encode()
    if kind == "wrong datatype":
        return json.dumps({"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "BYTES",
                                       "data": ["a", "b"]}]}).encode()
    return b'{"inputs": [{"name": "tokens", '


class _Soak:
    def __init__(self, cfg: SoakConfig, address: str, rate: float):
        import numpy as np

        from cellserve.bench.http_pool import HttpPool

        self.cfg, self.rate = cfg, rate
        self.pool = HttpPool(address)
        self.rng = np.random.default_rng(cfg.seed)
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.sequence_ids = iter(range(1, 1 << 62))
        self.sent = self.answered = 0
        self.unanswered: list[str] = []
        # Since the last sample: plain requests' latencies (answered 200) and failures, so
        # that an episode of refusals can be set beside what answered requests took then.
        self.window_ms: list[float] = []
        self.window_failed = 0

    def _count(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if outcome.startswith("failed") and len(self.failures) < 10:
            self.failures.append(detail)
        if outcome.startswith("failed"):
            self.window_failed += 1

    async def _post(self, model: str, body: bytes) -> tuple[int, bytes]:
        self.sent += 1
        try:
            status, answer = await asyncio.wait_for(self.pool.request(self.pool.post(f"/v2/models/{model}/infer",
                                                                                     body)), 60)
        except (asyncio.TimeoutError, OSError, ConnectionError) as exc:
            if len(self.unanswered) < 10:
                self.unanswered.append(f"{model}: {type(exc).__name__}: {exc}")
            return -1, f"{type(exc).__name__}: {exc}".encode()
        self.answered += 1
        return status, answer

    async def plain(self) -> None:
        model = self.cfg.models[int(self.rng.integers(len(self.cfg.models)))]
        params = {} if self.cfg.deadline_ms is None else {"timeout": int(self.cfg.deadline_ms * 1e3)}
        body = _tokens_body(self.rng, int(self.rng.integers(5, 60)), params)
        t0 = time.perf_counter()
        status, answer = await self._post(model, body)
        if status == 200:
            self.window_ms.append((time.perf_counter() - t0) * 1e3)
        self._count("ok" if status == 200 else "failed", f"{model}: {status} {answer[:200]!r}")

    async def sequence(self) -> None:
        model = self.cfg.models[int(self.rng.integers(len(self.cfg.models)))]
        sid = next(self.sequence_ids)
        n = self.cfg.sequence_chunks
        for i in range(n):
            params = {"sequence_id": sid, "sequence_start": i == 0, "sequence_end": i == n - 1}
            status, answer = await self._post(model, _tokens_body(self.rng, int(self.rng.integers(3, 20)), params))
            if status != 200:
                self._count("failed sequence", f"{model} sequence {sid} chunk {i}: {status} {answer[:200]!r}")
                if i < n - 1:  # end it, so that a failure is not also a leak
                    await self._end_sequence(model, sid)
                return
        self._count("ok sequence")

    async def _end_sequence(self, model: str, sid: int) -> None:
        """End sequence `sid` after one of its chunks failed, as a client that holds server
        state would: a refusal for load (429, 503) is retried after a pause that doubles
        (END_RETRY_PAUSES_S), so that a refused chunk does not leave its sequence to the
        server's idle timeout because the end was refused in the same congested spell."""
        body = _tokens_body(self.rng, 3, {"sequence_id": sid, "sequence_end": True})
        for pause in (*END_RETRY_PAUSES_S, None):
            status, _ = await self._post(model, body)
            if status not in (429, 503) or pause is None:
                return
            await asyncio.sleep(pause)

    async def bad(self) -> None:
        kind = _BAD[int(self.rng.integers(len(_BAD)))]
        status, answer = await self._post(self.cfg.models[0], _bad_body(kind))
        self._count("bad, answered 400" if status == 400 else "failed bad request",
                    f"{kind}: {status} {answer[:200]!r}")

    def take_window(self) -> dict:
        """The plain requests' latency (p50, p99, max ms) and the failures since the last call."""
        import numpy as np

        ms, self.window_ms = self.window_ms, []
        failed, self.window_failed = self.window_failed, 0
        if not ms:
            return {"failed": failed}
        p50, p99 = np.percentile(ms, [50, 99])
        return {"failed": failed, "p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2),
                "max_ms": round(max(ms), 2)}

    def arrival(self):
        """One arrival of the mix: a plain request, a whole sequence or a bad request."""
        plain_p, seq_p, _ = self.cfg.mix
        u = self.rng.random()
        return self.plain() if u < plain_p else self.sequence() if u < plain_p + seq_p else self.bad()

    async def run(self, seconds: float, sample) -> None:
        tasks, start, next_sample = set(), time.perf_counter(), 0.0
        t = 0.0
        while t < seconds:
            t += float(self.rng.exponential(1.0 / self.rate))
            now = time.perf_counter() - start
            if t > now:
                await asyncio.sleep(t - now)
            if now >= next_sample:
                tasks.add(asyncio.create_task(sample(now)))
                next_sample += self.cfg.sample_s
            task = asyncio.create_task(self.arrival())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        self.pool.close()


def _proc(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


# Gauges sampled beside RSS and fds, by metric name (summed over labels): what the server's
# admission saw when an episode began.
_GAUGES = {"sequences": "cellserve_sequences_active", "step_overhead_us": "cellserve_engine_step_overhead_seconds",
           "admitting_share": "cellserve_engine_admitting_share",
           "admission_limit": "cellserve_admission_limit", "in_flight": "cellserve_admission_in_flight",
           "price_ratio_p50": 'cellserve_admission_price_ratio{quantile="0.5"}',
           "price_ratio_p90": 'cellserve_admission_price_ratio{quantile="0.9"}'}


def _gauges(metrics_address: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    values = dict.fromkeys(_GAUGES, 0.0)
    for key, metric in _GAUGES.items():
        for line in lines:
            if line.startswith(metric) and line[len(metric)] in "{ ":
                values[key] += float(line.split()[-1])
    values["step_overhead_us"] = round(values["step_overhead_us"] * 1e6, 1)
    return values


def _health_ms(http_address: str) -> float:
    import urllib.request

    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://{http_address}/v2/health/ready", timeout=10) as response:
        response.read()
    return (time.perf_counter() - t0) * 1e3


def measure_capacity(address: str, cfg: SoakConfig, warmup: int = 300) -> tuple[float, float]:
    """Arrivals per second of the soak's own mix (plain requests, whole sequences and bad
    requests, by --mix; no deadlines) that the server sustains: `cfg.capacity_concurrency`
    arrivals kept in flight, each replaced as it completes (a closed loop), counted over
    `cfg.capacity_seconds` after a second of settling. The capacity the soak's --load is a
    share of. Returns it with the rate of the warm-up burst before it (`warmup` arrivals
    at once: it grows the engine's arenas and opens the connections, and is kept for
    comparison with older reports, whose capacity was the best of three such bursts).

    Why not the bursts: a burst of 300 ends in well under a second, most of its requests
    parsed before most of its steps run; it read well above what the same server sustained
    in a closed loop, and far apart across runs of the same code (docs/performance.md, "Soak")."""
    soak = _Soak(replace(cfg, deadline_ms=None), address, rate=1.0)

    async def measure() -> tuple[float, float]:
        start = time.perf_counter()
        await asyncio.gather(*(soak.arrival() for _ in range(warmup)))
        burst = warmup / (time.perf_counter() - start)
        settled = time.perf_counter() + 1.0
        end = settled + cfg.capacity_seconds
        done = 0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await soak.arrival()
                if settled <= time.perf_counter() <= end:
                    done += 1

        await asyncio.gather(*(client() for _ in range(cfg.capacity_concurrency)))
        soak.pool.close()
        return done / cfg.capacity_seconds, burst

    return asyncio.run(measure())


def run_soak(cfg: SoakConfig, progress=print) -> SoakReport:
    from cellserve.server.launch import ServerProcess

    args = [a for m in cfg.models for a in ("--model", m)]
    server = ServerProcess(*args, "--grpc-port", "-1", *cfg.server_args)
    pid = server.proc.pid
    try:
        capacity = burst = None
        if cfg.rps is None:
            capacity, burst = measure_capacity(server.http, cfg)
            rate = cfg.load * capacity
        else:
            rate = cfg.rps
        progress(f"soak: {rate:.0f} req/s for {cfg.minutes:g} min"
                 + (f" ({cfg.load:.0%} of a measured {capacity:.0f} req/s sustained; a warm-up burst "
                    f"ran at {burst:.0f})" if capacity else ""))
        report = SoakReport(asdict(cfg), rate, capacity, burst)
        soak = _Soak(cfg, server.http, rate)
        loop_health: list[float] = []

        async def sample(t: float) -> None:
            rss, fds = _proc(pid)
            health = await asyncio.to_thread(_health_ms, server.http)
            loop_health.append(health)
            gauges = await asyncio.to_thread(_gauges, server.metrics)
            report.samples.append({"t_s": round(t, 1), "rss_bytes": rss, "fds": fds, **gauges,
                                   "health_ms": round(health, 2), "window": soak.take_window()})

        asyncio.run(soak.run(cfg.minutes * 60, sample))
        time.sleep(1.0)  # let the last answers' connections and sequences settle
        rss, fds = _proc(pid)
        report.samples.append({"t_s": cfg.minutes * 60, "rss_bytes": rss, "fds": fds, **_gauges(server.metrics),
                               "health_ms": _health_ms(server.http)})
        report.counts, report.first_failures = dict(soak.counts), soak.failures
        report.counts["sent"], report.counts["answered"] = soak.sent, soak.answered
        report.counts["sent again on a new connection"] = soak.pool.resent
        report.unanswered = soak.unanswered
        _judge(report, cfg)
        if capacity is not None:  # after the checks' last sample: the closed loop must not move them
            end = report.capacity_end_rps = measure_capacity(server.http, cfg, warmup=0)[0]
            progress(f"soak: the capacity measured again at the end: {end:.0f} req/s sustained (the {rate:.0f} "
                     f"req/s offered were " + (f"{rate / end:.0%}" if end > 0 else "more than all") +
                     f" of it, {cfg.load:.0%} of the {capacity:.0f} at the start)")
        return report
    finally:
        server.stop()


def _judge(report: SoakReport, cfg: SoakConfig) -> None:
    c, samples = report.counts, report.samples
    failed = sum(v for k, v in c.items() if k.startswith("failed"))
    warm = [s for s in samples if s["t_s"] >= cfg.minutes * 60 / 5] or samples[-1:]
    rss0, rss1 = warm[0]["rss_bytes"], samples[-1]["rss_bytes"]
    fd0, fd1 = warm[0]["fds"], samples[-1]["fds"]
    health = max(s["health_ms"] for s in samples)
    report.checks = {
        "no failures beyond the bad requests": {"ok": failed == 0, "detail": f"{failed} failed"},
        "every request answered once": {"ok": c["sent"] == c["answered"],
                                        "detail": f"{c['answered']} of {c['sent']} answered"
                                                  + (f" (first: {report.unanswered[0]})" if report.unanswered else "")},
        "RSS growth after warm-up": {"ok": rss1 <= rss0 * (1 + cfg.max_rss_growth),
                                     "detail": f"{rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB "
                                               f"({(rss1 / rss0 - 1) * 100:+.1f}%)"},
        "no leaked file descriptors": {"ok": fd1 <= fd0 + cfg.fd_slack, "detail": f"{fd0} -> {fd1}"},
        "no leaked sequences": {"ok": samples[-1]["sequences"] == 0,
                                "detail": f"{samples[-1]['sequences']:g} active at the end"},
        f"health under {cfg.max_health_ms:g} ms": {"ok": health < cfg.max_health_ms,
                                                     "detail": f"slowest {health:.1f} ms"},
    }


def add_parser(bench_sub) -> None:
    """`cellserve bench soak`'s flags (imports nothing heavy: --help stays fast)."""
    sk = bench_sub.add_parser("soak", help="a long run at 70%% of capacity with a mix of models, sequences and "
                                           "bad requests; checks errors, RSS, file descriptors, sequences",
                              description=__doc__.split("\n\n", 1)[1])
    sk.add_argument("--model", action="append", default=None, help=f"zoo model, repeatable (default: {MODELS})")
    sk.add_argument("--minutes", type=float, default=10.0, help="length of the run (default: 10)")
    sk.add_argument("--load", type=float, default=0.7, help="share of the measured capacity offered (default 0.7)")
    sk.add_argument("--rps", type=float, default=None, help="offer this rate instead of measuring capacity")
    sk.add_argument("--capacity-concurrency", type=positive(int), default=64, metavar="N",
                    help="arrivals kept in flight while the capacity is measured (a closed loop; default: 64)")
    sk.add_argument("--capacity-seconds", type=positive(float), default=15.0, metavar="S",
                    help="how long the capacity is measured (default: 15)")
    sk.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default: 5)")
    sk.add_argument("--max-rss-growth", type=positive(float), default=0.05,
                    help="RSS growth allowed after warm-up, as a share (default: 0.05)")
    sk.add_argument("--fd-slack", type=int, default=8, help="file descriptors allowed above warm-up's (default: 8)")
    sk.add_argument("--max-health-ms", type=positive(float), default=100.0,
                    help="the slowest readiness check allowed (default: 100)")
    sk.add_argument("--mix", type=_mix, default=(0.85, 0.10, 0.05), metavar="PLAIN,SEQUENCE,BAD",
                    help="shares of plain requests, whole sequences and bad requests among the arrivals "
                         "(default: 0.85,0.10,0.05)")
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--json", type=Path, default=Path("bench-results/soak.json"), help="where to write the report")
    sk.set_defaults(run=bench_soak)


def _mix(text: str) -> tuple[float, float, float]:
    """--mix: three shares, each >= 0, not all 0; scaled to sum to 1."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3 or not all(math.isfinite(x) and x >= 0 for x in shares) or not sum(shares) > 0:
        raise argparse.ArgumentTypeError(f"must be three shares PLAIN,SEQUENCE,BAD, each >= 0 and not all 0, "
                                         f"got {text!r}")
    total = sum(shares)
    return tuple(x / total for x in shares)


def bench_soak(args, parser) -> int:
    for flag, value in (("--minutes", args.minutes), ("--load", args.load), ("--sample-s", args.sample_s)):
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.rps is not None and not args.rps > 0:
        parser.error(f"--rps must be positive, got {args.rps}")
    cfg = SoakConfig(models=tuple(args.model or MODELS), minutes=args.minutes, load=args.load, rps=args.rps,
                     sample_s=args.sample_s, max_rss_growth=args.max_rss_growth, fd_slack=args.fd_slack,
                     max_health_ms=args.max_health_ms, seed=args.seed, mix=args.mix,
                     capacity_concurrency=args.capacity_concurrency, capacity_seconds=args.capacity_seconds)
    report = run_soak(cfg)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    for name, check in report.checks.items():
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {name}: {check['detail']}")
    print(f"counts: {report.counts}")
    print(f"wrote {args.json}")
    return 0 if report.passed else 1
