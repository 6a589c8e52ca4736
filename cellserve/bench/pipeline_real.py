"""`cellserve bench pipeline`: a real two-stage pipeline on this machine against its plan
(issue 18, PPipe; docs/pipelines.md, "A real pipeline").

1. A zoo model is cut after one recurrent step (graph/cut.py) into two parts; a worker
   process per part, each pinned to one core (cluster/pipeline_real.py).
2. Each part is timed where it runs: batches of 1..64 requests of `tokens` tokens, alone
   and in bursts (both stages working at once); a stage's latency at b is STAGE_PERCENTILE
   of its burst times, and what the hand-overs cost beyond the stages (driver -> stage 0 ->
   stage 1 -> driver, all charged to the one link between the stages) is fitted as
   latency_ms + mb x ms_per_mb over the batches sent alone.
3. The planner (`plan pipeline`'s MILP) plans the model over one core per stage: each block
   is priced only on its own core's type, so the plan is the two-stage pipeline.
4. Calibration: that plan served at CALIBRATION_LOAD of its throughput; each stage's times
   there against its timings scale its table, and the p99 of how much later than predicted
   batches came back (at most MAX_MARGIN of the SLO) is a margin; the plan is made again from
   the scaled tables to the SLO less the margin.
5. The plan's data plane (the simulator's ReservationPlane, told when each batch really
   ended) runs on the wall clock over Poisson arrivals, bisecting the load (x the planned
   throughput) for the highest at which 99% of requests are answered within the SLO; the
   simulator's figure for the same plan is beside it. Then a few requests' answers are
   compared bit for bit with the whole model's on one engine.

Measured figures (but the simulated column, which says so). The driver and load generator
share the two cores with the workers: what they take shows in the real figure.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import numpy as np


BATCHES = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.99
# A stage is priced at this percentile of its compute times: a plan priced at the median runs
# its bottleneck stage at the median's capacity, which a stage whose times vary (here the p99
# is 1.3-1.6x the median, the two cores shared with the driver) cannot keep at 99% attainment
STAGE_PERCENTILE = 90
CALIBRATION_LOAD = 0.7  # x the plan made without a margin
MAX_MARGIN = 0.5  # of the SLO


def _requests(model, tokens: int, seed: int):
    spec = model.inputs[0]
    vocab = model.semantics[spec.name].vocab or 2

    def make(i: int) -> dict:  # request i's inputs, the same on every call
        rng = np.random.default_rng((seed, i))
        return {spec.name: rng.integers(0, vocab, size=(1, tokens)).astype(spec.dtype)}
    return make


def _profile(pipe, make, quick: bool) -> dict[int, dict]:
    """Per batch size: each stage's compute ms (the STAGE_PERCENTILE of its batches that ran
    while the other stage worked, as under load: the two cores share their cache and memory),
    and each hop's and the end-to-end ms of batches sent alone (medians)."""
    from cellserve.cluster.pipeline_real import PipelineRunError, run_burst

    repeats = 9 if quick else 15
    for _ in range(3):  # first touches, the kernels' one-time set-up
        run_burst(pipe, [[make(i) for i in range(8)]])
    out = {}
    for b in BATCHES:
        alone = [run_burst(pipe, [[make(i) for i in range(b)]])[0] for _ in range(repeats)]
        burst = run_burst(pipe, [[make(i) for i in range(b)] for _ in range(2 * repeats)])
        for got in (*alone, *burst):
            bad = [row for row in got.rows if not isinstance(row, dict)]
            if bad:
                raise PipelineRunError(f"a timing batch failed: {bad[0]}")
        stages = []
        for k in range(len(pipe.workers)):
            busy = [f.intervals[j] for f in burst for j in range(len(pipe.workers)) if j != k]
            shared = [f.stage_ms[k] for f in burst if _overlap(f.intervals[k], busy) >= 0.5]
            stages.append(float(np.percentile(shared if len(shared) >= 3 else [f.stage_ms[k] for f in burst],
                                              STAGE_PERCENTILE)))
        out[b] = {"stage_ms": stages,
                  "stage_alone_ms": [float(np.median(s)) for s in zip(*(f.stage_ms for f in alone))],
                  "hop_ms": [float(np.median(h)) for h in zip(*(f.hop_ms for f in alone))],
                  "end_to_end_ms": float(np.median([f.end_to_end_ms for f in alone]))}
    return out


def _overlap(span: tuple[float, float], others: list[tuple[float, float]]) -> float:
    """The share of `span` during which some interval of `others` ran (they do not overlap
    one another: one stage's batches run in turn)."""
    a, b = span
    covered = sum(max(0.0, min(b, y) - max(a, x)) for x, y in others)
    return covered / (b - a) if b > a else 0.0


def _link(timings: dict[int, dict], out_mb: float):
    """The hand-overs' cost beyond the stages, fitted as latency + b x out_mb x ms_per_mb
    (least squares, both kept >= 0)."""
    from cellserve.plan.pipeline import Link

    xs = np.array([b * out_mb for b in timings])
    ys = np.array([sum(t["hop_ms"]) for t in timings.values()])
    slope, intercept = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (0.0, float(ys.mean()))
    if slope < 0:
        slope, intercept = 0.0, float(ys.mean())
    if intercept < 0:
        slope, intercept = max(0.0, float((xs @ ys) / (xs @ xs))), 0.0
    return Link(float(intercept), float(slope))


def run(model_name: str, cut: int, tokens: int, slo_ms: float, quick: bool, seconds: float,
        seed: int = 0) -> dict:
    from cellserve import heap
    from cellserve.cluster.pipeline_real import RealPipeline, serve_load
    from cellserve.graph import zoo
    from cellserve.graph.cut import cut_model
    from cellserve.plan import pipeline_milp
    from cellserve.plan.pipeline import Block, Blocks, ModelBlocks, Pools
    from cellserve.plan.pipeline_check import check_plan
    from cellserve.plan.pipeline_io import blocks_to_dict, plan_to_dict, pools_to_dict
    from cellserve.plan.pipeline_sim import sustained_load

    model = zoo.load(model_name)
    if tokens > model.max_sequence_length:
        raise KeyError(f"--tokens {tokens} is over {model_name!r}'s limit of {model.max_sequence_length}")
    parts = cut_model(model, [cut])  # refused here, naming the cut, before any worker starts
    cores = sorted(os.sched_getaffinity(0))[:2]
    make = _requests(model, tokens, seed)
    started = time.time()
    heap.settle()  # the driver's start-up objects out of the collector's full passes (heap.py)
    with RealPipeline(model_name, (cut,), [[(cores[0],)], [(cores[1],)]]) as pipe:
        timings = _profile(pipe, make, quick)
        sample = make(0)
        carried = parts.carry(0, {**sample, **_part_outputs(parts, sample)})
        out_mb = sum(np.asarray(v).nbytes for v in carried.values()) / 1e6
        link = _link(timings, out_mb)
        slo = slo_ms

        def planned(margin: float, scale: tuple[float, float] = (1.0, 1.0)):
            blocks = Blocks({model_name: ModelBlocks(slo - margin, 1.0, tuple(
                Block({f"core{k}": {b: t["stage_ms"][k] * scale[k] for b, t in timings.items()}},
                      out_mb if k == 0 else 0.0, f"part{k}") for k in range(2)))})
            plan = pipeline_milp.plan(blocks, pools)
            problems = check_plan(plan, blocks, pools)
            if problems:
                raise AssertionError(f"the plan fails its checker: {problems}")  # a planner bug
            if not plan.models[model_name].pipelines:
                raise KeyError(f"no pipeline of {model_name!r} meets {slo - margin:.1f} ms (the SLO less a margin "
                               f"of {margin:.1f} ms) on these cores")
            return blocks, plan, blocks.models[model_name], plan.models[model_name]

        pools = Pools({"core0": 1, "core1": 1}, link)
        # Calibration: the plan run at CALIBRATION_LOAD of its throughput, as it will serve (the
        # driver sharing the cores). Each stage's times at the planned batch there, against the
        # timings', scale its table; how much later than predicted batches came back (p99) is
        # the margin the plan and the plane keep below the SLO.
        _, _, mblocks, mplan = planned(0.0)
        first_batch = mplan.pipelines[0].batch
        calibration = serve_load(pipe, mblocks, mplan, link, make, CALIBRATION_LOAD * mplan.throughput_rps,
                                 seconds, 1.0, seed + 2)
        scale = _scale(calibration, first_batch, timings)
        margin = max(0.0, float(np.percentile(calibration.overrun_ms, 99))) if calibration.overrun_ms else 0.0
        margin = min(margin, MAX_MARGIN * slo)
        blocks, plan, mblocks, mplan = planned(margin, scale)
        simulated = sustained_load(mblocks, mplan, link, 30.0, 2.0, seed, TARGET, steps=6)
        runs, real = _bisect(lambda x: serve_load(pipe, mblocks, mplan, link, make, x * mplan.throughput_rps,
                                                 seconds, 1.0, seed, slo_ms=slo),
                             seconds - 1.0, steps=3 if quick else 5)
        exact = _compare(pipe, model, make, mblocks, mplan, link, seed)
    planned = mplan.throughput_rps
    return {"schema_version": 1, "measured": True, "model": model_name, "cut_after_step": cut, "tokens": tokens,
            "slo_ms": slo, "margin_ms": margin, "stage_scale": list(scale),
            "calibration": {"load": CALIBRATION_LOAD, "batch": first_batch,
                                                                **calibration.to_dict(seconds - 1.0)},
            "quick": quick, "seconds": seconds, "target_attainment": TARGET, "seed": seed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "load_average": os.getloadavg(), "wall_s": time.time() - started,
            "timings": {str(b): t for b, t in timings.items()},
            "blocks": blocks_to_dict(blocks), "pools": pools_to_dict(pools), "plan": plan_to_dict(plan),
            "planned_rps": planned, "batch": mplan.pipelines[0].batch,
            "simulated": {"sustained_load": simulated.load, "sustained_rps": simulated.load * planned,
                          "search": simulated.bound, "run": simulated.run.to_dict(28.0)},
            "real": {**real, "sustained_rps": real["sustained_load"] * planned, "runs": runs},
            "real_vs_plan": real["sustained_load"], "within_15pct": abs(real["sustained_load"] - 1.0) <= 0.15,
            "answers_bit_exact": exact}


def _scale(calibration, batch: int, timings: dict[int, dict]) -> tuple[float, ...]:
    """Per stage: its STAGE_PERCENTILE time on the calibration's batches of `batch` rows over
    the timings' (1 where fewer than 5 such batches ran), within [0.5, 2]."""
    times = [ms for ms, n in zip(calibration.stage_ms, calibration.batch_sizes) if n == batch]
    if len(times) < 5 or batch not in timings:
        return tuple(1.0 for _ in timings[min(timings)]["stage_ms"])
    return tuple(min(2.0, max(0.5, float(np.percentile([t[k] for t in times], STAGE_PERCENTILE)) / profiled))
                 for k, profiled in enumerate(timings[batch]["stage_ms"]))


def _part_outputs(parts, sample: dict) -> dict:
    """Part 0's outputs for one request, on an engine here (to size what it hands on)."""
    from cellserve.engine.config import EngineConfig
    from cellserve.engine.engine import Engine
    from cellserve.engine.request import Request

    engine = Engine([parts.parts[0]], EngineConfig(admission=False, profile=False))
    got = []
    engine.submit(Request(parts.parts[0].name, parts.part_inputs(0, sample), on_done=got.append))
    engine.run_until_idle(timeout_s=60)
    return got[0].outputs


def _bisect(run_at, counted_s: float, steps: int, low: float = 0.5, high: float = 1.5):
    """The highest load (x planned) at which a real run meets TARGET, by bisection in
    [low, high]; every run's figures kept."""
    runs = []

    def attempt(x: float):
        result = run_at(x)
        runs.append({"load": x, **result.to_dict(counted_s)})
        return result.attainment >= TARGET

    if not attempt(low):
        return runs, {"sustained_load": low, "search": "below"}
    if attempt(high):
        return runs, {"sustained_load": high, "search": "above"}
    for _ in range(steps):
        mid = (low + high) / 2
        if attempt(mid):
            low = mid
        else:
            high = mid
    return runs, {"sustained_load": low, "search": "found"}


def _compare(pipe, model, make, mblocks, mplan, link, seed: int, n: int = 24) -> dict:
    """n requests through the pipeline at a tenth of the planned load, each answer compared
    bit for bit with the whole model's (stacking off, as the parts run) on one engine."""
    from cellserve.cluster.pipeline_real import serve_load
    from cellserve.engine.config import EngineConfig
    from cellserve.engine.engine import Engine
    from cellserve.engine.request import Request

    rate = max(1.0, 0.1 * mplan.throughput_rps)
    result = serve_load(pipe, mblocks, mplan, link, make, rate, n / rate, 0.0, seed + 1, keep_answers=True)
    engine = Engine([model], EngineConfig(admission=False, profile=False, stack_layers=False))
    whole: dict[int, object] = {}
    for i in result.answers:
        engine.submit(Request(model.name, make(i), on_done=lambda r, i=i: whole.__setitem__(i, r.outputs)))
    engine.run_until_idle(timeout_s=120)
    equal = sum(isinstance(a, dict) and all(np.array_equal(a[k], whole[i][k]) for k in whole[i])
                for i, a in result.answers.items())
    return {"requests": len(result.answers), "equal": int(equal)}


def table(r: dict) -> str:
    real, sim = r["real"], r["simulated"]
    lines = [f"bench pipeline: {r['model']} cut after step {r['cut_after_step']}, {r['tokens']} tokens, "
             f"SLO {r['slo_ms']:.1f} ms, one core per stage (measured; load average "
             f"{r['load_average'][0]:.2f} at the end)",
             "  batch   stage0 ms   stage1 ms   end-to-end ms"]
    for b, t in r["timings"].items():
        lines.append(f"  {b:>5}  {t['stage_ms'][0]:>10.2f}  {t['stage_ms'][1]:>10.2f}  {t['end_to_end_ms']:>14.2f}")
    link = r["pools"]["link"]
    lines.append(f"  hand-overs: {link['latency_ms']:.3f} ms + {link['ms_per_mb']:.3f} ms/MB (fitted)")
    cal = r["calibration"]
    lines.append(f"  calibration at {cal['load']:.2f}x the plan without a margin: batches back "
                 f"{cal['overrun_ms']['p50']:.1f} / {cal['overrun_ms']['p99']:.1f} ms (p50 / p99) after the plane's "
                 f"prediction: margin {r['margin_ms']:.1f} ms; stages there "
                 + ", ".join(f"{x:.2f}x" for x in r["stage_scale"]) + f" their timings at batch {cal['batch']}")
    lines.append(f"  plan (to the SLO less the margin): batch {r['batch']}, {r['planned_rps']:.0f} req/s")
    lines.append(f"  simulated: {sim['sustained_load']:.3f}x the plan at {TARGET:.0%} attainment "
                 f"({sim['search']})  [simulated]")
    lines.append("  real runs:  load    offered  served  late  dropped  failed  attainment  p50 ms  p99 ms  batch")
    for run in real["runs"]:
        p50 = f"{run['p50_ms']:.1f}" if run["p50_ms"] is not None else "-"
        p99 = f"{run['p99_ms']:.1f}" if run["p99_ms"] is not None else "-"
        lines.append(f"            {run['load']:>5.3f} {run['offered']:>9} {run['served']:>7} {run['late']:>5} "
                     f"{run['dropped']:>8} {run['failed']:>7} {run['attainment']:>11.4f} {p50:>7} {p99:>7} "
                     f"{run['mean_batch']:>6.1f}")
    lines.append(f"  real: {real['sustained_load']:.3f}x the plan ({real['sustained_rps']:.0f} req/s, "
                 f"{real['search']}); within 15% of the plan: {'yes' if r['within_15pct'] else 'no'}")
    ex = r["answers_bit_exact"]
    lines.append(f"  answers equal to the whole model's, bit for bit: {ex['equal']} of {ex['requests']}")
    return "\n".join(lines)


def plot(r: dict, path) -> None:
    """Attainment against offered load (the real runs), the simulated sustained load and the
    target, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cellserve.bench.plots import _save

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    runs = sorted(r["real"]["runs"], key=lambda x: x["load"])
    ax.plot([x["load"] for x in runs], [x["attainment"] for x in runs], "o-", label="real (measured)")
    sim = r["simulated"]
    ax.axvline(sim["sustained_load"], linestyle=":", color="gray", label="simulated sustained load")
    ax.axhline(TARGET, linestyle="--", color="red", label=f"target {TARGET:.0%}")
    ax.axvline(1.0, color="black", linewidth=0.8, label="the plan's throughput")
    ax.set_xlabel("offered load (x the plan's throughput)")
    ax.set_ylabel("requests within the SLO")
    ax.set_title(f"{r['model']}: two-stage pipeline, one core per stage")
    ax.legend(fontsize=8)
    _save(figure, path)
