"""A/B of the engine in-process (before and after the executor split): the same traces at fixed
rates, cellular, lstm-512. Usage: PYTHONPATH=CHECKOUT python ab_engine.py LABEL (prints one JSON line)."""
import json, sys, time
import numpy as np
from cellserve.graph import zoo
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request
from cellserve.bench.engine_runner import replay
from cellserve.bench.traces import make_trace
from cellserve.bench.results import summarize
label = sys.argv[1]
m = zoo.load("lstm-512")
e = Engine([m], EngineConfig(policy="cellular", max_batch=64))
def capacity(seed):
    tr = make_trace(np.random.default_rng(seed), 1.0, 300, 10000)
    e.config.admission = e.config.drop_late = False
    t0 = time.perf_counter()
    for it in tr: e.submit(Request(m.name, {"tokens": it.sequence.reshape(1, -1)}))
    e.run_until_idle(timeout_s=120)
    e.config.admission = e.config.drop_late = True
    return 300 / (time.perf_counter() - t0)
caps = [capacity(s) for s in (1, 2, 3)]
out = {"label": label, "capacity": max(caps), "rates": {}}
for rate in [100, 400, 700, 900, 1100]:
    tr = make_trace(np.random.default_rng([7, rate]), rate, int(rate * 4), 10000)
    time.sleep(0.3)
    s = summarize(replay(e, m.name, "tokens", tr, "cellular", rate, 0.2), 0.2)
    out["rates"][rate] = {k: round(s[k], 2) for k in ("goodput_rps", "p50_ms", "p99_ms", "mean_batch", "overhead_us_per_step")}
print(json.dumps(out))
