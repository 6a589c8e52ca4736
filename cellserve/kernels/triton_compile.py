"""Compile the persistent kernel for a GPU architecture without a GPU, and read what the compiler
made of it: registers per thread, spills, and the barrier's instructions.

Triton compiles to PTX and then to a cubin with the ptxas it ships, so none of this needs a
device; cuobjdump (shipped too) reports the registers and local memory of the cubin. This
checks, ahead of any GPU, the tiling model's register rule (kernels/triton_tiling.py) and that
the GPU build of the kernel (which the interpreter never runs) compiles, with the grid barrier's
release and acquire operations and L2-only loads of the exchanged h.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cellserve.kernels.triton_tiling import GATES, CellShape, TileConfig

_INT64_ARGS = ("slot_ptr", "row_ptr", "stride_ptr", "steps_ptr")
_CONSTEXPRS = ("KIND", "G", "BU", "BH", "LB", "RESIDENT")


@dataclass(frozen=True)
class Compiled:
    arch: int  # compute capability x 10: 80 (A100), 90 (H100/H200)
    registers: int  # per thread, as ptxas allocated them
    spill_bytes: int  # local memory per thread (spilled registers)
    barrier_release: bool  # the arrival is a release operation at GPU scope
    barrier_acquire: bool  # the spin reads with acquire at GPU scope
    l2_only_loads: int  # ld.global.cg: loads of the exchanged h that bypass L1


@functools.cache
def compile_tile(cell: CellShape, config: TileConfig, arch: int = 90, stack: bool = False) -> Compiled:
    """Compile recurrent_steps (stack: stack_steps, the wavefront over a stack's layers, which
    always streams its weights) for `cell` and `config` for sm_<arch>; raises on a compile
    error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cellserve.kernels.triton_loader import triton_cells

    cells = triton_cells(interpret=False)
    fn = cells.stack_steps if stack else cells.recurrent_steps
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in _CONSTEXPRS:
            signature[name] = "constexpr"
        elif name == "counter_ptr":
            signature[name] = "*i32"
        elif name in _INT64_ARGS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "i32"
    hidden_pow2 = 1 << max(0, (cell.hidden - 1).bit_length())
    values = {"KIND": cells.KIND_CODE[cell.kind], "G": GATES[cell.kind], "BU": config.units, "BH": hidden_pow2,
              "LB": config.lane_block, "RESIDENT": config.resident}
    if stack:
        del values["RESIDENT"]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(k),): v for k, v in values.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.warps})
    registers, spill = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    return Compiled(arch, registers, spill,
                    barrier_release=bool(re.search(r"\b(red|atom)\.global\.gpu\.release\.add", ptx)),
                    barrier_acquire=bool(re.search(r"\bld\.global\.gpu\.acquire|atom\.global\.gpu\.acquire", ptx)),
                    l2_only_loads=len(re.findall(r"\bld\.global\.cg", ptx)))


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) of the cubin's kernel, by the cuobjdump that Triton ships."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if not match:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-300:]}")
    return int(match.group(1)), int(match.group(2))
