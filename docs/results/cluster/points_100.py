"""Single points at 100 devices on the common-random-number traces (seed 0), --quick settings (2 simulated s,
0.5 s not counted), each appended to OUT as a JSON line. Usage: [SEEDS=K] python points_100.py OUT.jsonl SYSTEM@RATE ... (K traces per point, seeds 0..K-1, pooled)"""
import json, os, sys, time
from dataclasses import asdict
from cellserve.bench.cluster_bench import run_point, catalogue_for
from cellserve.bench.cluster_bench import ClusterConfig
out = sys.argv[1]
cat = catalogue_for(ClusterConfig(devices=(100,), json_path=None))
for spec in sys.argv[2:]:
    system, rate = spec.split("@")
    t0 = time.time()
    seeds = int(os.environ.get("SEEDS", "1"))
    p = run_point(system, cat, 100, float(rate), 2.0, 0.5, seeds=seeds)
    rec = {"system": system, "devices": 100, "seed": 0, "seeds": seeds, **asdict(p), "passed": p.passed}
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
