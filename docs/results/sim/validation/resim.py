"""(docs/performance.md, "A step after an idle spell") Re-simulate a `bench sim` report's rates with its profile,
against the report's stored real figures: as it is (idle buckets with draws, schema 4), with each bucket at its mean
(as schema 3 priced it), and with no idle extra; with --monotone, as it is and with its step tables capped as
`cellserve profile` now caps them (bench/profiler.py _monotone).
Usage: python docs/results/sim/validation/resim.py REPORT.json [MODEL_REPOSITORY] [--monotone]"""
import json, sys
from dataclasses import replace
from cellserve.bench.profiler import _monotone, model_trace
from cellserve.bench.sim_bench import load_model, policy_config, relative_error
from cellserve.bench.results import summarize
from cellserve.plan.profile import ModelProfile
from cellserve.sim.run import simulate_replay

args = [a for a in sys.argv[1:] if a != "--monotone"]
rep = json.load(open(args[0]))
model = load_model(rep["model"], args[1] if len(args) > 1 else None)
prof = ModelProfile.from_json(rep["profile"]["path"])
means = lambda buckets: tuple(b._replace(draws_s=()) for b in buckets)
if "--monotone" in sys.argv:
    variants = {"as is": prof,
                "monotone": replace(prof, cell_types={t: replace(c, step_s=_monotone(c.step_s)[0])
                                                      for t, c in prof.cell_types.items()})}
else:
    variants = {"draws": prof,
                "means": replace(prof, cell_types={t: replace(c, idle_extra_s=means(c.idle_extra_s))
                                                   for t, c in prof.cell_types.items()},
                                 plain_idle_extra_s={op: means(b) for op, b in prof.plain_idle_extra_s.items()}),
                "without": replace(prof, cell_types={t: replace(c, idle_extra_s=())
                                                     for t, c in prof.cell_types.items()})}
slo_s = rep["slo_ms"] / 1e3
seconds = 2.0 if rep["quick"] else 5.0
for policy, pv in rep["policies"].items():
    light = set(pv["rates_compared_for_latency"])
    res = {k: {"p50": [], "p99": [], "gp": []} for k in variants}
    for r in pv["rates"]:
        trace = model_trace(model, 0, r["rate_rps"], seconds, rep["arrivals"] == "bursty")
        timeout = slo_s if policy.startswith("cellular") else None
        for k, p in variants.items():
            sim = summarize(simulate_replay(model, p, replace(policy_config(policy, 64), pin_threads=False), trace,
                                            policy, r["rate_rps"], timeout, seed=0).stats, slo_s)
            res[k]["gp"].append(sim["goodput_rps"])
            if r["rate_rps"] in light:
                res[k]["p50"].append(relative_error(sim["p50_ms"], r["real"]["p50_ms"]))
                res[k]["p99"].append(relative_error(sim["p99_ms"], r["real"]["p99_ms"]))
    for k, v in res.items():
        gp = relative_error(max(v["gp"]), pv["real_max_goodput_rps"])
        print(f"{rep['model']:16} {rep['arrivals']:8} {policy:9} {k:10} goodput {gp:5.0%}  p50 max {max(v['p50'], default=0):5.0%} "
              f"median {sorted(v['p50'])[len(v['p50'])//2] if v['p50'] else 0:5.0%}  p99 max {max(v['p99'], default=0):5.0%} "
              f"median {sorted(v['p99'])[len(v['p99'])//2] if v['p99'] else 0:5.0%}")
