"""A stack's batched step timed in process (docs/performance.md, "Kernels", the joint GEMM):
lstm-512's two layers on the fused backend, 64 lanes started, then 150 steps at each batch
size; prints the median of the last 130.

    .venv/bin/python docs/results/kernels/stack_step.py [THREADS]
"""
import time, sys, numpy as np, torch
from cellserve.graph import zoo
from cellserve.graph.stacking import stack_layers
from cellserve.graph.model import LayerStack
from cellserve.kernels.stack import StackKernel
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
m = stack_layers(zoo.load("lstm-512"))
stack = next(s for s in m.recurrent_steps() if isinstance(s, LayerStack))
k = StackKernel(stack, torch.device("cpu"), "fused")
rng = np.random.default_rng(0)
lanes = [k.start(rng.integers(0, 10000, 200)) for _ in range(64)]
out = []
for B in (4, 10, 32, 64):
    slots = np.array([l.slot for l in lanes[:B]], np.int64)
    ts = []
    for t in range(150):
        rows = np.array([l.base + t for l in lanes[:B]], np.int64)
        a = time.perf_counter(); k.step(slots, rows, rows); ts.append(time.perf_counter() - a)
    out.append(f"B={B}: {np.median(ts[20:])*1e6:.0f}us")
print(" ".join(out))
