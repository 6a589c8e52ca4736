"""One simulated engine at cellular's highest rate of the 2026-12-01 validation ramps, as bench sim measures its
sim_speedup. Usage: [PROFILES=DIR] [LABEL=L] python docs/results/sim/speed_one_engine.py (DIR: the profiles;
default docs/results/sim of this checkout)."""
import os, sys, time
from dataclasses import replace
from cellserve.bench.sim_bench import policy_config, load_model
from cellserve.bench.profiler import model_trace
from cellserve.plan.profile import ModelProfile
from cellserve.sim.run import simulate_replay
from cellserve.bench.results import summarize
d = os.environ.get("PROFILES", os.path.dirname(os.path.abspath(__file__)))
for name, rate in (("lstm-512", 2026.0), ("gru-256", 3908.0), ("seq2seq-reverse", 4288.0)):
    model = load_model(name, None)
    profile = ModelProfile.from_json(f"{d}/{name}-poisson-profile.json")
    trace = model_trace(model, 0, rate, 5.0, False)  # bench sim's full-mode 5 s per rate
    c0 = time.process_time()
    r = simulate_replay(model, profile, replace(policy_config("cellular", 64), pin_threads=False), trace, "cellular", rate, 0.2, seed=0)
    cpu = time.process_time() - c0
    s = summarize(r.stats, 0.2)
    print(f"{os.environ.get('LABEL','')} {name} {rate:.0f} req/s: sim_speedup {r.speedup:.2f} (cpu {r.virtual_s/cpu:.2f}) wall {r.wall_s:.2f} s virtual {r.virtual_s:.2f} s requests {len(trace)} goodput {s['goodput_rps']:.0f} p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f}", flush=True)
