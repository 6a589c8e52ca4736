"""The simulator's CPU time per request on one engine, and a digest of every outcome, for an
A/B of two trees of the code: run it alternately with PYTHONPATH=OLD and PYTHONPATH=NEW (each
tree with its built kernels extension; the outcomes must digest the same).
Usage: [CASES=model@rate,...] [REPS=3] [LABEL=L] python docs/results/sim/speed_cases.py
(profiles: docs/results/sim/MODEL-poisson-profile.json beside this file)."""
import hashlib, os, time
from dataclasses import replace
from cellserve.bench.sim_bench import policy_config, load_model
from cellserve.bench.profiler import model_trace
from cellserve.plan.profile import ModelProfile
from cellserve.sim.run import simulate_replay
from cellserve.bench.results import summarize
d = os.path.dirname(os.path.abspath(__file__))
label = os.environ.get("LABEL", "")
CASES = [(c.split("@")[0], float(c.split("@")[1])) for c in
         os.environ.get("CASES", "gru-256@2500,lstm-512@1500,seq2seq-reverse@3500,gru-256@800").split(",")]
for name, rate in CASES:
    model = load_model(name, None)
    profile = ModelProfile.from_json(f"{d}/{name}-poisson-profile.json")
    trace = model_trace(model, 0, rate, 5.0, False)
    cpus = []
    for _ in range(int(os.environ.get("REPS", "3"))):
        c0 = time.process_time()
        r = simulate_replay(model, profile, replace(policy_config("cellular", 64), pin_threads=False), trace,
                            "cellular", rate, 0.2, seed=0)
        cpus.append(time.process_time() - c0)
    cpu = min(cpus)  # the least disturbed of the repeats
    s = summarize(r.stats, 0.2)
    digest = hashlib.sha256(repr([(o.request_id, None if o.finish_s is None else round(o.finish_s, 12), o.status)
                                  for o in r.stats.outcomes]).encode()).hexdigest()[:10]
    print(f"{label:4} {name:16} {rate:6.0f}: simulated/CPU s {r.virtual_s / cpu:5.2f} CPU per request "
          f"{cpu / len(trace) * 1e6:6.1f} us goodput {s['goodput_rps']:.0f} p50 {s['p50_ms']:.2f} digest {digest}", flush=True)
