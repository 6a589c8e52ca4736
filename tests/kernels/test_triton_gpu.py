"""The Triton kernel on a real GPU: the multi-program grid barrier (which the interpreter cannot
run) gives PyTorch's results, and a timed comparison with the torch backend and cuDNN. Skipped
without a CUDA device. Runs in a child process without TRITON_INTERPRET (test_triton_kernel.py sets it
for its own tests), so that a GPU's figures never come from the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")]

pytest.importorskip("triton", reason="triton is not installed (pip install 'cellserve[gpu]')")

_CHECK = r"""
import json, numpy as np, torch
from cellserve.graph.model import DirectionWeights
from cellserve.graph.zoo.modules import make_rnn
from cellserve.kernels.triton_rnn import TritonCellKernel
from cellserve.kernels.triton_tiling import TileConfig
dev, errors = torch.device("cuda"), {}
for kind, hidden in (("lstm", 512), ("gru", 256), ("rnn_tanh", 100)):
    torch.manual_seed(0)
    layer = make_rnn(kind, 32, hidden, 1, False).eval()
    get = lambda n: getattr(layer, n + "_l0").detach().numpy()
    w = DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))
    for tile in (None, TileConfig(8, 4, 2, True), TileConfig(4, 4, 4, False)):
        k = TritonCellKernel(kind, hidden, w, dev, tile=tile)
        rng = np.random.default_rng(1)
        lengths = [20, 7, 13, 1, 20]
        xs = [rng.standard_normal((n, 32)).astype(np.float32) for n in lengths]
        lanes = [k.start(x) for x in xs]
        k.run_lanes(np.array([l.slot for l in lanes]), np.array([l.base for l in lanes]),
                    np.ones(len(lanes), np.int64), np.array(lengths))
        worst = 0.0
        for lane, x in zip(lanes, xs):
            with torch.no_grad():
                y_ref, _ = layer(torch.as_tensor(x)[None])
            y, h, _ = k.read(lane)
            worst = max(worst, float(np.abs(y - y_ref[0].numpy()).max()))
        errors[f"{kind}-{hidden}-{tile}"] = worst
# a stack of two LSTM layers as one wavefront launch
from cellserve.graph.model import LayerStack, RecurrentLayer
from cellserve.kernels.triton_rnn import TritonStackKernel
torch.manual_seed(1)
rnn = make_rnn("lstm", 256, 256, 2, False).eval()
get = lambda n, i: getattr(rnn, f"{n}_l{i}").detach().numpy()
stack = LayerStack("s", [RecurrentLayer(f"l{i}", "lstm", 256, [DirectionWeights(get("weight_ih", i),
        get("weight_hh", i), get("bias_ih", i), get("bias_hh", i))]) for i in range(2)])
k = TritonStackKernel(stack, dev)
xs = [np.random.default_rng(2).standard_normal((n, 256)).astype(np.float32) for n in (9, 4)]
lanes = [k.start_lane(x, None) for x in xs]
k.run_lanes(np.array([l.slot for l in lanes]), np.array([l.base for l in lanes]), np.ones(2, np.int64),
            np.array([9, 4]))
worst = 0.0
for lane, x in zip(lanes, xs):
    with torch.no_grad():
        y_ref, _ = rnn(torch.as_tensor(x)[None])
    worst = max(worst, float(np.abs(k.finish_lane(lane)[-1][0] - y_ref[0].numpy()).max()))
errors["stack-lstm-256x2"] = worst
print(json.dumps(errors))
"""


def _child(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_many_programs_with_the_grid_barrier_match_pytorch():
    errors = json.loads(_child(_CHECK))
    assert errors and all(e <= 1e-4 for e in errors.values()), errors


def test_timed_against_the_torch_backend_and_cudnn():
    """Records the timings (printed with -s); asserts only that each was measured."""
    code = ("import json\nfrom cellserve.kernels.triton_bench import gpu_timings\n"
            "print(json.dumps(gpu_timings(batches=(1, 8, 64), repeats=5)))")
    result = json.loads(_child(code))
    print(json.dumps(result, indent=1))
    for rows in result["per_step_us"].values():
        assert all(r["triton_us"] > 0 and r["torch_backend_us"] > 0 and r["cudnn_us"] > 0 for r in rows)
