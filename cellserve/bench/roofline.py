"""Measured SGEMM rates: the machine's practical roofline and the engine's GEMM shapes.

The roofline is what this machine reaches with the libraries at hand (numpy's and
torch's BLAS on large square float32 matrices), not a datasheet peak.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch

Backend = Literal["numpy", "torch"]

_REPEATS = 3


def sgemm_gflops(m: int, k: int, n: int, backend: Backend, min_time_s: float = 0.2) -> float:
    """GFLOP/s of C = A @ B with A [m, k], B [k, n] in float32: best of a few timed repeats.

    Each repeat runs the product until `min_time_s` has passed, so small shapes are timed
    over many calls (including the per-call overhead the engine would also pay).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)
    if backend == "numpy":
        def matmul() -> None:
            np.matmul(a, b, out=c)
    elif backend == "torch":
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)

        def matmul() -> None:
            torch.matmul(ta, tb, out=tc)
    else:
        raise ValueError(f"unknown backend {backend!r}")

    matmul()  # warm up: thread pools, page faults on the output
    best = 0.0
    for _ in range(_REPEATS):
        calls = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time_s:
            matmul()
            calls += 1
        best = max(best, 2.0 * m * k * n * calls / elapsed / 1e9)
    return best


def measure_roofline(quick: bool) -> dict:
    """{"roofline_gflops": best square-SGEMM rate, "sgemm": {"<backend>_<size>": GFLOP/s}}."""
    sizes = [2048] if quick else [2048, 3072]
    sgemm = {f"{backend}_{size}": sgemm_gflops(size, size, size, backend)
             for size in sizes for backend in ("numpy", "torch")}
    return {"roofline_gflops": max(sgemm.values()), "sgemm": sgemm}


def engine_shape_gflops(batch_sizes: list[int], k: int, n: int) -> dict[int, float]:
    """numpy SGEMM rate at [b, k] x [k, n] for each batch size b (the engine's cell GEMMs)."""
    return {b: sgemm_gflops(b, k, n, "numpy") for b in batch_sizes}
