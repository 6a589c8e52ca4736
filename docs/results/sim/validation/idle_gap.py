"""(docs/performance.md, "A step after an idle spell") Real engine at light rates: each executor call's busy time against the profile's warm
prediction, by the idle spell before the burst of work it belongs to and its place in it.
Usage: python docs/results/sim/validation/idle_gap.py MODEL PROFILE.json RATE[,RATE..] [SECONDS]"""
import sys, time
from collections import defaultdict
import numpy as np
from cellserve import heap
from cellserve.bench.profiler import RecordingExecutor, model_trace
from cellserve.bench.engine_runner import replay
from cellserve.bench.sim_bench import load_model, policy_config
from cellserve.engine.engine import Engine
from cellserve.plan.profile import ModelProfile

name, ppath = sys.argv[1], sys.argv[2]
rates = [float(r) for r in sys.argv[3].split(",")]
seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
model = load_model(name, None)
profile = ModelProfile.from_json(ppath)


class Timeline(RecordingExecutor):
    def __init__(self):
        super().__init__("cpu", None)
        self.calls = []  # (t0, t1, kind, busy, predicted)

    def start_lane(self, cell_type, x, states):
        t0 = time.perf_counter()
        r = super().start_lane(cell_type, x, states)
        c = profile.cell(cell_type)
        self.calls.append((t0, time.perf_counter(), "start", r.busy_s, c.start_s_per_token * r.storage.length))
        return r

    def execute(self, batch, slots, rows, lone_steps, stop):
        t0 = time.perf_counter()
        r = super().execute(batch, slots, rows, lone_steps, stop)
        c = profile.cell(batch.cell_type)
        if lone_steps:
            pred = batch.size * c.lone_call_s + r.steps * batch.size * c.lone_step_s.mean
            kind = "lone"
        else:
            pred = c.step_s[batch.size].mean
            kind = "step"
        self.calls.append((t0, time.perf_counter(), kind, r.busy_s, pred))
        return r

    def finish_lane(self, cell_type, storage):
        t0 = time.perf_counter()
        r = super().finish_lane(cell_type, storage)
        c = profile.cell(cell_type)
        self.calls.append((t0, time.perf_counter(), "finish", r.busy_s, c.finish_s_per_token * storage.length))
        return r

    def run_plain(self, model_name, nodes, env):
        t0 = time.perf_counter()
        s = super().run_plain(model_name, nodes, env)
        self.calls.append((t0, time.perf_counter(), "plain", s, sum(profile.plain_ops_s[n.name].mean for n in nodes)))
        return s


ex = Timeline()
engine = Engine([model], policy_config("cellular", 64), executors={"cpu": ex})
heap.settle()
# warm up
replay(engine, model.name, model.inputs[0].name, model_trace(model, 5, rates[-1], 1.0), "cellular", rates[-1], 0.2)
for rate in rates:
    ex.calls.clear()
    time.sleep(0.2)
    real = replay(engine, model.name, model.inputs[0].name, model_trace(model, 0, rate, seconds), "cellular", rate, 0.2)
    lat = np.array([o.finish_s - o.arrival_s for o in real.outcomes]) * 1e3
    calls = ex.calls
    buckets = defaultdict(lambda: defaultdict(list))  # idle bucket -> position -> excess
    bykind = defaultdict(lambda: defaultdict(list))  # idle bucket -> kind -> excess
    poskind = defaultdict(lambda: defaultdict(int))
    kinds = defaultdict(lambda: [0.0, 0.0, 0])
    prev_end, spell, pos = None, 0.0, 0
    edges = [0.0002, 0.001, 0.003, 0.01, 0.03, 1e9]
    for t0, t1, kind, busy, pred in calls:
        gap = t0 - prev_end if prev_end is not None else 1.0
        if gap > 0.0002:
            spell, pos = gap, 0
        pos += 1
        b = next(i for i, e in enumerate(edges) if spell <= e)
        buckets[b][min(pos, 6)].append((busy - pred) * 1e6)
        bykind[b][kind].append((busy - pred) * 1e6)
        poskind[min(pos, 6)][kind] += 1
        k = kinds[kind]; k[0] += busy; k[1] += pred; k[2] += 1
        prev_end = t1
    print(f"rate {rate}: p50 {np.median(lat):.2f} ms, mean {lat.mean():.2f}; {len(calls)} calls; busy {sum(c[3] for c in calls)*1e3:.0f} ms vs predicted {sum(c[4] for c in calls)*1e3:.0f} ms over {len(lat)} requests")
    for kind, (b_, p_, n) in kinds.items():
        print(f"   {kind:6} n={n:6d} real {b_/n*1e6:8.1f} us, profile {p_/n*1e6:8.1f} us, ratio {b_/p_ if p_ else 0:.2f}")
    names = ["<=0.2ms(no idle)", "0.2-1ms", "1-3ms", "3-10ms", "10-30ms", ">30ms"]
    print("   kinds at positions:", {p: dict(v) for p, v in sorted(poskind.items())})
    for b in sorted(bykind):
        print(f"   by kind after idle {b}: " + "  ".join(f"{k}: {np.mean(v):+6.1f}us(n{len(v)})" for k, v in sorted(bykind[b].items())))
    for b in sorted(buckets):
        row = buckets[b]
        print(f"   after idle {names[b]:16}: " + "  ".join(
            f"#{p}{'+' if p == 6 else ''}: {np.mean(row[p]):+6.0f}us(n{len(row[p])})" for p in sorted(row)))
