"""The real engine replaying a Poisson trace at fixed rates (4 s each, one warm-up), for an A/B
of two trees of the code: run it alternately with PYTHONPATH=OLD and PYTHONPATH=NEW (each tree
with its built kernels extension, or the old one runs the slower fallback).
Usage: OMP_NUM_THREADS=1 [LABEL=L] python docs/results/engine/replay_cases.py"""
import os, time
from cellserve.bench.sim_bench import policy_config, load_model
from cellserve.bench.profiler import model_trace
from cellserve.bench.engine_runner import replay
from cellserve.bench.results import summarize
from cellserve.engine.engine import Engine
label = os.environ.get("LABEL", "")
for name, rates in (("gru-256", (1000.0, 3000.0)), ("seq2seq-reverse", (1500.0, 5000.0))):
    model = load_model(name, None)
    engine = Engine([model], policy_config("cellular", 64))
    replay(engine, model.name, model.inputs[0].name, model_trace(model, 0, 500, 1.0, False), "cellular", 500, 0.2)
    for rate in rates:
        trace = model_trace(model, 0, rate, 4.0, False)
        s = summarize(replay(engine, model.name, model.inputs[0].name, trace, "cellular", rate, 0.2), 0.2)
        print(f"{label} {name:16} {rate:5.0f}: goodput {s['goodput_rps']:6.0f} p50 {s['p50_ms']:6.2f} "
              f"p99 {s['p99_ms']:6.2f}", flush=True)
