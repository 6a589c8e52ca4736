"""The first burst on a fresh engine, with and without a warm-up (docs/performance.md, "Warm-up
at load"): an engine serving lstm-512 and gru-256 takes 20 lstm-512 requests of 1,000 tokens at
once while a 3-token gru-256 probe is sent every 20 ms. With --warm the engine first runs one
warm-up sample of 20 x 1,000 tokens, as a config's model_warmup does (server/warmup.py).
Prints one JSON line: the warm-up's and the burst's seconds, the probes' worst, p99 and p50.

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/warmup/burst.py [--warm]
"""
import sys, threading, time, json
import numpy as np
from cellserve.graph import zoo
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.server.warmup import WarmupSample, warm_up_before_serving

warm = "--warm" in sys.argv
models = []
for n in ("lstm-512", "gru-256"):
    m = zoo.load(n); m.name = n; models.append(m)
engine = Engine(models, EngineConfig(pin_threads=False))
rng = np.random.default_rng(0)
t0 = time.perf_counter()
if warm:
    sample = WarmupSample("burst", {"tokens": rng.integers(0, 10000, (20, 1000))}, 1)
    warm_up_before_serving(engine, "lstm-512", [sample], "lstm-512")
warm_s = time.perf_counter() - t0
stop = threading.Event()
results = {"burst": [], "probe": []}

def driver():
    time.sleep(0.3)
    done = threading.Event(); left = [20]; start = time.perf_counter()
    def burst_done(r, s=None):
        assert r.status is Status.OK, r.reason
        left[0] -= 1
        if left[0] == 0:
            results["burst"].append(time.perf_counter() - start); done.set()
    for i in range(20):
        engine.submit(Request("lstm-512", {"tokens": rng.integers(0, 10000, (1, 1000))}, on_done=burst_done))
    while not done.is_set():
        ev = threading.Event(); t = time.perf_counter()
        engine.submit(Request("gru-256", {"tokens": rng.integers(0, 10000, (1, 3))},
                              on_done=lambda r, t=t, ev=ev: (results["probe"].append(time.perf_counter() - t), ev.set())))
        ev.wait(); time.sleep(0.02)
    stop.set()

threading.Thread(target=driver, daemon=True).start()
engine.serve_forever(stop)
p = np.array(results["probe"]) * 1e3
print(json.dumps({"warm": warm, "warmup_s": round(warm_s, 2), "burst_s": round(results["burst"][0], 2),
                  "probes": len(p), "probe_worst_ms": round(p.max(), 1), "probe_p99_ms": round(np.percentile(p, 99), 1),
                  "probe_p50_ms": round(np.median(p), 1)}))
