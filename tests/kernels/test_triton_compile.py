"""The GPU build of the persistent kernel, compiled here without a GPU (Triton's own ptxas): it
compiles for sm_80 and sm_90, the grid barrier is a GPU-scope release and acquire, the exchanged
h is read past L1, and ptxas's register count agrees with the tiling model's rule where the
model says the tile fits."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'cellserve[gpu]')")

from cellserve.kernels.triton_compile import compile_tile  # noqa: E402
from cellserve.kernels.triton_tiling import CellShape, TileConfig, regs_per_thread  # noqa: E402


@pytest.fixture(autouse=True)
def fp_fusion(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset


@pytest.mark.slow  # a few seconds of ptxas per tile
@pytest.mark.parametrize("cell, config, arch", [
    (CellShape("lstm", 512), TileConfig(8, 4, 1, True), 90),
    (CellShape("lstm", 512), TileConfig(8, 4, 1, False), 90),
    (CellShape("gru", 256), TileConfig(16, 4, 1, True), 80),
], ids=["lstm-512-resident-sm90", "lstm-512-streaming-sm90", "gru-256-resident-sm80"])
def test_the_gpu_build_compiles_with_its_barrier_and_the_modelled_registers(cell, config, arch):
    compiled = compile_tile(cell, config, arch)
    assert compiled.barrier_release and compiled.barrier_acquire
    assert compiled.l2_only_loads > 0
    assert compiled.spill_bytes == 0  # the model says this tile fits in registers
    modelled = regs_per_thread(cell, config)
    assert abs(compiled.registers - modelled) <= 0.1 * modelled, (compiled.registers, modelled)


@pytest.mark.slow
def test_the_stack_wavefront_compiles_for_sm90_with_a_barrier_after_each_layer():
    compiled = compile_tile(CellShape("lstm", 512), TileConfig(4, 8, 4, False), 90, stack=True)
    assert compiled.barrier_release and compiled.barrier_acquire and compiled.l2_only_loads > 0
    assert compiled.spill_bytes == 0
