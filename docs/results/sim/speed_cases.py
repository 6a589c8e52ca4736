"""One simulated engine per case, as bench sim measures its sim_speedup, with the CPU time per
request and a digest of every outcome: the simulator's speed, and an A/B of two trees of the
code (run it alternately with PYTHONPATH=OLD and PYTHONPATH=NEW, each tree with its built
kernels extension; the digests must be the same).
Usage: [CASES=model@rate,...] [REPS=K] [PROFILES=DIR] [LABEL=L] python docs/results/sim/speed_cases.py
CASES defaults to cellular's highest rate of each model's 2026-12-01 validation ramp; REPS (default 1)
repeats each case and keeps the least CPU; DIR holds MODEL-poisson-profile.json (default: beside this file)."""
import hashlib, os, time
from dataclasses import replace
from cellserve.bench.sim_bench import policy_config, load_model
from cellserve.bench.profiler import model_trace
from cellserve.plan.profile import ModelProfile
from cellserve.sim.run import simulate_replay
from cellserve.bench.results import summarize
d = os.environ.get("PROFILES", os.path.dirname(os.path.abspath(__file__)))
label = os.environ.get("LABEL", "")
CASES = [(c.split("@")[0], float(c.split("@")[1])) for c in
         os.environ.get("CASES", "lstm-512@2026,gru-256@3908,seq2seq-reverse@4288").split(",")]
for name, rate in CASES:
    model = load_model(name, None)
    profile = ModelProfile.from_json(f"{d}/{name}-poisson-profile.json")
    trace = model_trace(model, 0, rate, 5.0, False)  # bench sim's full-mode 5 s per rate
    runs = []
    for _ in range(int(os.environ.get("REPS", "1"))):
        c0 = time.process_time()
        r = simulate_replay(model, profile, replace(policy_config("cellular", 64), pin_threads=False), trace,
                            "cellular", rate, 0.2, seed=0)
        runs.append((time.process_time() - c0, r))
    cpu, r = min(runs, key=lambda run: run[0])  # the least disturbed of the repeats
    s = summarize(r.stats, 0.2)
    digest = hashlib.sha256(repr([(o.request_id, None if o.finish_s is None else round(o.finish_s, 12), o.status)
                                  for o in r.stats.outcomes]).encode()).hexdigest()[:10]
    print(f"{label:4} {name:16} {rate:6.0f} req/s: sim_speedup {r.speedup:5.2f} (cpu {r.virtual_s / cpu:5.2f}) "
          f"CPU per request {cpu / len(trace) * 1e6:6.1f} us, virtual {r.virtual_s:.2f} s, requests {len(trace)}, "
          f"goodput {s['goodput_rps']:.0f} p50 {s['p50_ms']:.2f} p99 {s['p99_ms']:.2f} digest {digest}", flush=True)
