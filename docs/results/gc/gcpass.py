"""gen2 passes during a 60 s replay of gru-256 at 300 req/s through the real engine, with and without heap.settle()."""
import gc, time, sys, json, numpy as np, torch
from cellserve.bench.sim_bench import load_model, policy_config, model_trace
from cellserve.bench.engine_runner import replay
from cellserve.engine.engine import Engine
settle = sys.argv[1] == "settle"
model = load_model("gru-256", None)
eng = Engine([model], policy_config("cellular", 64))
passes = []; t0 = [0.0]
def cb(phase, info):
    if phase == "start": t0[0] = time.perf_counter()
    elif info["generation"] == 2: passes.append(round((time.perf_counter() - t0[0]) * 1e3, 1))
gc.callbacks.append(cb)
trace = model_trace(model, 0, 300, 60.0, False)
if settle:
    from cellserve import heap; heap.settle()
passes.clear()
st = replay(eng, model.name, "tokens", trace, "cellular", 300, 0.2)
lat = np.array([(o.finish_s - o.arrival_s) * 1e3 for o in st.outcomes if o.status == "ok"])
print(json.dumps({"settle": settle, "tracked_after": len(gc.get_objects()), "gen2_passes_ms": passes, "p50": round(float(np.percentile(lat, 50)), 1), "p99": round(float(np.percentile(lat, 99)), 1), "max": round(float(lat.max()), 1)}))
