"""The real engine (lstm-512, cellular, 50 ms deadlines) at light load right after a
closed-loop burst, then at moderate load: requests refused or dropped per run, with the
reasons. For an A/B of two trees of the code, run it alternately with PYTHONPATH=OLD and
PYTHONPATH=NEW (each tree with its built kernels extension).
Usage: python docs/results/engine/light_drops.py [RATE ...]   (default: 10 10 276 359)"""
import collections, sys
import numpy as np
from cellserve.bench.engine_bench import closed_loop_capacity
from cellserve.bench.engine_runner import replay
from cellserve.bench.traces import make_trace
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.graph import zoo

model = zoo.load("lstm-512")
engine = Engine([model], EngineConfig(policy="cellular", device="cpu"))
closed_loop_capacity(engine, model.name, "tokens", 10000, 1, n=300)  # as `bench engine` starts
for rate in [float(a) for a in sys.argv[1:]] or [10.0, 10.0, 276.0, 359.0]:
    trace = make_trace(np.random.default_rng(int(rate)), rate, max(300, int(rate * 5)), 10000)
    run = replay(engine, model.name, "tokens", trace, "cellular", rate, 0.05)
    print(f"{rate:5.0f} req/s: {dict(collections.Counter(o.status for o in run.outcomes))}, per-step overhead "
          f"{engine.step_overhead_s * 1e6:.0f} us", flush=True)
    for o in run.outcomes:
        if o.status != "ok":
            print(f"    {o.status} at {o.arrival_s:.2f} s: {o.reason}")
