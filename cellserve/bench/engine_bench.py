"""`cellserve bench engine`: every policy on the same open-loop trace, side by side.

Policies: the engine's `cellular`, `padded` and `none`, and ONNX Runtime on the same model
exported to ONNX, one request at a time (`ort`) and in padded batches (`ort-padded`). For each
offered rate: throughput, goodput within the SLO, p50/p99 latency, mean batch, achieved
GFLOP/s and per-step overhead; plus the machine's SGEMM roofline, measured in the same run.

Each policy ramps on its own (`ramp.py`) from the same light load, a tenth of cellular's
closed-loop capacity, until a rate fails the SLO, then refines between its last passing and
first failing rate; the policies take turns, one run each, so a drifting machine slows all
alike, and a rate any two policies reach gets the same trace. Every max goodput carries its
bracket: a failing rate above it, else it is marked as a lower bound (or, when the light load
already failed, as below the ramp's start).

Encoder-decoders (a model with a decoder-step graph): requests are drawn from the model's own
task inputs (bench/decoder_inputs.py), so output lengths vary as in use, and every request
asks `beam_width` (1: greedy). The policies are cellular, padded and none; ONNX Runtime is
skipped (the bench has no single ONNX export of an encoder-decoder), and the JSON's
`skipped_policies` says so, as it does for any model the ONNX Runtime runners cannot take.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellserve import heap
from cellserve.bench.decoder_workload import decoder_of, lengths, workload
from cellserve.bench.engine_runner import replay
from cellserve.bench.ort_runners import OrtRunner, export_classifier_onnx
from cellserve.bench.plots import plot_p99_vs_load
from cellserve.bench.ramp import Bracket, RampPlan, RampResult, RampSearch, footnotes
from cellserve.bench.results import meets_slo, summarize
from cellserve.bench.roofline import engine_shape_gflops, measure_roofline
from cellserve.bench.traces import (InputSampler, make_trace, request_builder, sequence_input, sequence_name,
                                    trace_at_rate)
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Response, Status
from cellserve.errors import InvalidInput
from cellserve.graph import zoo
from cellserve.graph.zoo.modules import RNNClassifier
from cellserve.server.repository import load_model

ALTERNATIVES = ("cellular-edf",)  # other cellular policies, measured in full runs
LIGHT_FRACTION = 0.1  # of cellular's capacity estimate: every ramp's first rate, the light load
MAX_RATE_FRACTION = 3.0  # of the estimate: the ramps end here, failing or not
# Coarse ramp factors; three refinements then bracket each capacity within 1.5 ** (1/8), about
# 5%, quick, and 1.25 ** (1/8), about 3%, full: so quick and full runs agree within noise.
QUICK_FACTOR, FULL_FACTOR, REFINE_STEPS = 1.5, 1.25, 3
# Pause between runs: thread pools (OpenMP's, ONNX Runtime's) spin for tens of milliseconds
# after their last task and would slow whichever policy runs next.
_SETTLE_S = 0.3


@dataclass
class BenchConfig:
    model: str = "lstm-512"
    model_repository: Path | None = None  # None: a zoo model
    slo_ms: float = 200.0
    quick: bool = False
    bursty: bool = False
    seed: int = 0
    max_batch: int = 64  # cellular's cap per cell type
    padded_batch: int = 8  # padded and ort-padded: batch size and wait
    padded_timeout_ms: float = 5.0
    json_path: Path = Path("bench-results/engine.json")
    plot_path: Path | None = None
    repeats: int | None = None  # runs at a failing rate before it counts as failed (2); any pass passes
    load_fractions: tuple[float, ...] | None = None  # fixed rates (of the estimate) instead of ramps
    seconds_per_run: float | None = None  # None: by quick
    ramp_factor: float | None = None  # None: by quick
    refine_steps: int = REFINE_STEPS
    beam_width: int = 1  # every request's (an encoder-decoder's); other models take only 1
    capacity_requests: int = 300  # the closed-loop bursts' size (the capacity estimate)
    min_requests: int = 40  # of each run, however low its rate

    @property
    def run_seconds(self) -> float:
        return self.seconds_per_run or (2.0 if self.quick else 5.0)

    @property
    def runs_per_point(self) -> int:
        return self.repeats or 2

    def plan(self, capacity_rps: float) -> RampPlan:
        """Every policy's ramp, from the capacity estimate."""
        if self.load_fractions:
            return RampPlan(rates=tuple(round(capacity_rps * f, 1) for f in self.load_fractions),
                            tries=self.runs_per_point)
        return RampPlan(start_rps=round(capacity_rps * LIGHT_FRACTION, 1),
                        factor=self.ramp_factor or (QUICK_FACTOR if self.quick else FULL_FACTOR),
                        refine_steps=self.refine_steps, max_rps=round(capacity_rps * MAX_RATE_FRACTION, 1),
                        tries=self.runs_per_point)


def run(cfg: BenchConfig, log=print) -> dict:
    model = load_model(cfg.model, cfg.model_repository)
    input_name = sequence_name(model)
    vocab = model.semantics[input_name].vocab or 2
    slo_s = cfg.slo_ms / 1e3
    work = workload(model, cfg.beam_width)
    if work.inputs is None:  # one sequence per request: refuse a model it cannot drive, naming why
        work = replace(work, inputs=sequence_input(model).sampler())
    if work.decoder is not None:
        log(f"encoder-decoder, beam width {cfg.beam_width}; inputs: {work.decoder['inputs']}")
        if work.decoder["max_beam_width_configured"] < cfg.beam_width:
            log(f"the model's decode spec allows beam width up to {work.decoder['max_beam_width_configured']}; "
                f"served here with max_beam_width {cfg.beam_width}")
    log(f"measuring this machine's SGEMM roofline ({'quick' if cfg.quick else 'full'})...")
    roofline = measure_roofline(cfg.quick)  # before any engine limits numpy's BLAS threads
    roofline["engine_shapes"] = engine_shape_gflops([1, 8, 32, 64, 128], 512, 2048)
    engines = _engines(model, cfg)
    # the first burst warms caches and thread pools up; the best of two more is the estimate
    answers: list[Response] = []
    capacity = max(closed_loop_capacity(engines["cellular"], model.name, input_name, vocab, cfg.seed + i,
                                        n=cfg.capacity_requests, inputs=work.inputs, beam_width=work.beam_width,
                                        responses=answers)
                   for i in range(3))
    log(f"cellular capacity estimate (closed loop, all requests at once): {capacity:.0f} req/s")
    plan = cfg.plan(capacity)
    runners = {name: _policy_runner(name, engines, model.name, input_name, slo_s, work.beam_width)
               for name in engines}
    ort, skipped = _ort_runners(cfg, model)
    runners.update(ort)
    for policy, why in skipped.items():
        log(f"{policy}: skipped ({why})")
    heap.settle()  # as the server does once started (see heap.py)
    traces: dict[float, list] = {}

    def trace(rate: float) -> list:
        if rate not in traces:
            traces[rate] = trace_at_rate(cfg.seed, rate, cfg.run_seconds, vocab, bursty=cfg.bursty,
                                         min_requests=cfg.min_requests, inputs=work.inputs)
        return traces[rate]

    searches = {policy: RampSearch(plan, lambda s: meets_slo(s, cfg.slo_ms)) for policy in runners}
    with tqdm(desc="bench engine", unit="run") as bar:
        while pending := [(p, s) for p, s in searches.items() if s.next_rate() is not None]:
            for policy, search in pending:  # one run each in turn
                rate = search.next_rate()
                bar.set_postfix_str(f"{policy} @ {rate:.0f} req/s")
                time.sleep(_SETTLE_S)
                search.record(summarize(runners[policy](trace(rate), rate), slo_s))
                bar.update()
    report = _report(cfg, roofline, capacity, plan, {p: s.result() for p, s in searches.items()})
    report["skipped_policies"] = skipped
    if work.decoder is not None:
        light = trace(plan.rates[0] if plan.rates else plan.start_rps)
        report["decoder"] = {**work.decoder, **lengths(model, answers, light)}
    _write(cfg, report)
    return report


def _engines(model, cfg: BenchConfig) -> dict[str, Engine]:
    common = dict(device="cpu")
    cellular = ("cellular",) if cfg.quick else ("cellular",) + ALTERNATIVES
    return {
        # cellular knows each request's deadline (its SLO): it refuses and drops what cannot make it
        **{p: Engine([model], EngineConfig(policy=p, max_batch=cfg.max_batch, **common)) for p in cellular},
        # the baselines serve everything in arrival order, as TF Serving and TorchServe do
        "padded": Engine([model], EngineConfig(policy="padded", max_batch=cfg.padded_batch,
                                               batch_timeout_s=cfg.padded_timeout_ms / 1e3,
                                               admission=False, drop_late=False, **common)),
        "none": Engine([model], EngineConfig(policy="none", admission=False, drop_late=False, **common)),
    }


def _policy_runner(policy: str, engines: dict, model: str, input_name: str, slo_s: float,
                   beam_width: int | None = None):
    timeout = slo_s if policy.startswith("cellular") else None
    return lambda trace, rate: replay(engines[policy], model, input_name, trace, policy, rate, timeout,
                                      beam_width=beam_width)


ORT_POLICIES = ("ort", "ort-padded")


def _ort_runners(cfg: BenchConfig, model) -> tuple[dict, dict[str, str]]:
    """ONNX Runtime's runners for `model`, and the policies skipped with the reason why: a
    repository model's own ONNX file, or a zoo classifier exported with explicit lengths."""
    model_name = model.name
    if decoder_of(model) is not None:
        why = ("an encoder-decoder: the bench has no single ONNX export of its encoder and decoder loop for "
               "ONNX Runtime to run")
        return {}, dict.fromkeys(ORT_POLICIES, why)
    if cfg.model_repository is not None:
        from cellserve.server.repository import model_source

        path, sequence = model_source(model_name, cfg.model_repository), sequence_input(model)
    else:
        module = zoo.reference_module(model_name)
        if not isinstance(module, RNNClassifier) or module.directions != 1:
            # the ONNX Runtime reference is built for unidirectional classifiers
            return {}, dict.fromkeys(ORT_POLICIES, "the ONNX Runtime runners take unidirectional classifiers only")
        path, sequence = Path(tempfile.mkdtemp(prefix="cellserve-ort-")) / f"{model_name}.onnx", None
        export_classifier_onnx(module, path)
    runners, skipped = {}, {}
    for policy, padded in (("ort", False), ("ort-padded", True)):
        try:
            runners[policy] = OrtRunner(path, padded=padded, max_batch=cfg.padded_batch,
                                        batch_timeout_s=cfg.padded_timeout_ms / 1e3, sequence=sequence)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own refusal of the model, reported
            why = (str(exc).splitlines() or [""])[0]
            skipped[policy] = (f"ONNX Runtime cannot run {path}{' in padded batches' if padded else ''}: "
                               f"{type(exc).__name__}: {why}")

    def runner(r: OrtRunner):
        def go(trace, rate):
            stats = r.run(trace)
            stats.rate_rps = rate
            return stats
        return go

    return {policy: runner(r) for policy, r in runners.items()}, skipped


def closed_loop_capacity(engine: Engine, model: str, input_name: str, vocab: int, seed: int, n: int = 300,
                         inputs: InputSampler | None = None, beam_width: int | None = None,
                         responses: list | None = None) -> float:
    """Requests per second when `n` requests arrive at once and nothing has a deadline.
    `inputs`, `beam_width`: as the runs' (make_trace, replay); `responses` gets the answers.
    A burst in which a request fails is no capacity: InvalidInput (a request the model
    refused: its reason) or RuntimeError (any other failure)."""
    rng = np.random.default_rng(seed + 1)
    trace = make_trace(rng, 1.0, n, vocab, inputs=inputs)
    saved = engine.config.admission, engine.config.drop_late
    engine.config.admission = engine.config.drop_late = False
    answers: list[Response] = []
    request_inputs = request_builder(engine.models[model], input_name)
    start = time.perf_counter()
    for item in trace:
        engine.submit(Request(model, request_inputs(item.sequence), on_done=answers.append,
                              beam_width=beam_width))
    engine.run_until_idle(timeout_s=120)
    elapsed = time.perf_counter() - start
    engine.config.admission, engine.config.drop_late = saved
    failed = [r for r in answers if r.status is not Status.OK]
    if failed or len(answers) != n:
        error = InvalidInput if failed and failed[0].status is Status.INVALID else RuntimeError
        first = f"; the first: {failed[0].status.value}: {failed[0].reason}" if failed else ""
        raise error(f"bench engine: model {model!r}: {len(failed)} of {n} requests failed and "
                    f"{n - len(answers)} went unanswered in the capacity burst{first}")
    if responses is not None:
        responses.extend(answers)
    return n / elapsed


def ramp_runs(result: RampResult) -> list[dict]:
    """The kept run of each rate, by rate, with its verdict and every try's goodput."""
    return [{**p.summary, "passed": p.passed, "goodput_rps_of_each_run": p.goodput_of_each_try}
            for p in result.by_rate()]


def _report(cfg: BenchConfig, roofline: dict, capacity: float, plan: RampPlan,
            results: dict[str, RampResult]) -> dict:
    policies = {}
    for policy, result in results.items():
        runs = ramp_runs(result)
        light = runs[0] if runs else {}
        policies[policy] = {
            "max_goodput_rps": result.bracket.max_goodput_rps,
            **result.bracket.to_dict(),
            "light_load_p50_ms": light.get("p50_ms", math.nan),
            "light_load_p99_ms": light.get("p99_ms", math.nan),
            "saturation_gflops": max((r["gflops"] for r in runs), default=0.0),
            "overhead_us_per_step": float(np.nanmedian([r["overhead_us_per_step"] for r in runs])) if runs else math.nan,
            "runs": runs,
        }
    return {
        "model": cfg.model,
        "slo_ms": cfg.slo_ms,
        "quick": cfg.quick,
        "runs_per_point": cfg.runs_per_point,
        "bursty": cfg.bursty,
        "beam_width": cfg.beam_width,
        "machine": {"cpus": cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "roofline_gflops": roofline["roofline_gflops"],
        "sgemm": roofline["sgemm"],
        "engine_shape_sgemm_gflops": {str(b): g for b, g in roofline["engine_shapes"].items()},
        "capacity_estimate_rps": capacity,
        "rates_rps": sorted({r for result in results.values() for r in result.rates_rps}),
        "ramp": plan.to_dict(),
        "policies": policies,
    }


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _write(cfg: BenchConfig, report: dict) -> None:
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(report, indent=2, default=float))
    plot = cfg.plot_path or cfg.json_path.with_suffix(".png")
    rows = {p: [(r["rate_rps"], r["p99_ms"]) for r in d["runs"]] for p, d in report["policies"].items()}
    plot_p99_vs_load(rows, cfg.slo_ms, plot, f"{cfg.model}: p99 latency vs offered load ({cpu_count()} cores)")


def table(report: dict) -> str:
    """The summary as a plain-text table, each max goodput with the rates that bracket it."""
    head = (f"{'policy':<12} {'max goodput':>13} {'capacity in':>12} {'light p50':>10} {'light p99':>10} "
            f"{'sat. GFLOP/s':>12} {'overhead/step':>14}")
    beam = f", beam {report['beam_width']}" if "decoder" in report else ""
    lines = [f"{report['model']}{beam}, SLO {report['slo_ms']:.0f} ms, roofline {report['roofline_gflops']:.0f} GFLOP/s",
             head]
    for policy, d in report["policies"].items():
        b = Bracket.from_dict(d)
        lines.append(f"{policy:<12} {b.figure():>13} {b.describe() + ' r/s':>12} "
                     f"{d['light_load_p50_ms']:>7.2f} ms {d['light_load_p99_ms']:>7.2f} ms "
                     f"{d['saturation_gflops']:>12.1f} {d['overhead_us_per_step']:>11.1f} us")
    skipped = [f"{policy}: skipped ({why})" for policy, why in report.get("skipped_policies", {}).items()]
    return "\n".join(lines + footnotes(Bracket.from_dict(d) for d in report["policies"].values()) + skipped)

