"""The pipeline planner on a GPU pool and a CPU pool: the zoo's models (unstacked) cut into
blocks priced from this machine's *measured* one-core CPU profiles (cpu-profiles/, made with
`cellserve profile --model M --no-stack-layers --threads 1 --json cpu-profiles/M.json`) and a
*modelled* GPU class using the same host costs (plan/gpu_model.py). Objective: min over the
four models of planned req/s (weights 1), SLO 5x the model's batch-1 latency on its faster
device type. Usage: python docs/results/pipeline/gpu_and_cpu.py [--json PATH]"""
import json
import sys
from pathlib import Path

from cellserve.graph import zoo
from cellserve.plan.gpu_model import gpu_class, modelled_gpu_profile
from cellserve.plan.pipeline import Blocks, ModelBlocks, Pools
from cellserve.plan.pipeline_bench import LINK, MEAN_TOKENS, ZOO, _one
from cellserve.plan.pipeline_milp import Options
from cellserve.plan.pipeline_zoo import model_blocks
from cellserve.plan.profile import ModelProfile

HERE = Path(__file__).parent
BATCHES = (1, 2, 4, 8, 16, 32, 64)  # what the CPU profiles measured
results = {}
for gpu, n_gpu, n_cpu in (("t4", 4, 12), ("l4", 4, 12), ("a100", 4, 12), ("t4", 2, 14)):
    models = {}
    for name in ZOO:
        model = zoo.load(name)
        cpu = ModelProfile.from_json(HERE / "cpu-profiles" / f"{name}.json")
        profiles = {gpu: modelled_gpu_profile(model, cpu, gpu_class(gpu)), "cpu": cpu}
        probe = model_blocks(model, profiles, MEAN_TOKENS, slo_ms=1.0, batches=BATCHES)
        one = min(sum(b.latency_ms[d][1] for b in probe.blocks) for d in profiles)
        models[name] = ModelBlocks(5.0 * one, 1.0, probe.blocks)
    r = _one(Blocks(models), Pools({gpu: n_gpu, "cpu": n_cpu}, LINK), Options(time_limit_s=10.0))
    results[f"{gpu}x{n_gpu}+cpux{n_cpu}"] = r
    print(f"{gpu} x{n_gpu} + cpu x{n_cpu}: objective {r['objective']:.1f} req/s, no pipelining "
          f"{r['baseline_objective']:.1f}, {r['ratio']:.3f}x, feasible {r['feasible']}, {r['pipelines']}", flush=True)
if "--json" in sys.argv:
    Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(
        {"benchmark": "plan pipeline, GPU (modelled) + CPU (measured)", "modelled": True, "results": results}, indent=1))
