"""A performance model for the persistent recurrent kernel (kernels/triton_cells.py): ranks tile
configurations for one cell shape, batch and GPU, and picks one without timing them all (GRNN's
cost model, in seconds rather than FMA-normalised cycles). Plain Python over plain data: no
torch, no triton, so the planner and `cellserve bench kernels` use it anywhere.

A configuration (TileConfig) is: hidden units per program (BU; a program owns all G gates of
them), warps per program, lanes per inner block (LB), and whether the program's slice of W_hh
stays on chip for the launch (resident) or is re-read from L2 at every step (streaming).
A step of the launch is priced as

    launch / steps_per_launch + barrier + latency + blocks + max(compute, h_exchange, weight_stream)

- compute: G * BU * H FMAs per lane for each program, padded to whole lane blocks; a program
  issues at most warps * 32 lanes of an SM's FP32 units, and the programs that share an SM
  share its units.
- h_exchange: every program reads all of h (lanes x H floats) from L2 at every step; its share
  of L2 bandwidth is L2 bandwidth / SMs.
- weight_stream: streaming configurations re-read W_hh each step (from L2 when W_hh fits in it,
  else from HBM); resident ones load their slice once per launch (counted in the launch term).
- barrier: a fixed cost per step plus a small one per arriving program (the atomics on one
  counter serialise).
- latency: a dependent round trip to L2 per step (read h, compute, write h), the floor at
  batch 1.
- blocks: a program runs its lane blocks one after another, each ending in cross-thread
  reductions (shuffles) whose latency does not overlap: ceil(batch / LB) x block_s. This is
  what makes wider lane blocks pay at larger batches, against their registers.

Feasibility (pruned, never ranked): registers per thread at most 255 and at least one program
per SM; for the grid barrier, all programs co-resident. The grid is kept within the SM
count (one program per SM, as persistent RNNs and cuDNN's persistent modes do) rather than
SMs x programs per SM from the register estimate: ptxas allocates up to a third more registers
than the estimate at wide lane blocks, and a grid one program too large never passes its
first barrier. A resident grid has one program per tile; a streaming grid is capped at the SM
count and its programs loop over the tiles.
A resident tile whose weights need more than 255 registers per thread would spill: it is kept
but priced as streaming plus the spill traffic, so it ranks below any tile that fits.

The figures per GPU class are datasheet numbers and rough published latencies: every
prediction is modelled, and `cellserve bench kernels` labels it so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellserve.plan.gpu_model import GPU_CLASSES, GpuClass

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MAX_REGS_PER_THREAD = 255
REGS_OVERHEAD = 40  # indices, pointers, masks and loop state per thread, besides the tiles
STEPS_PER_LAUNCH = 16  # what a launch runs between scheduling points (kernels/triton_rnn.py)


@dataclass(frozen=True)
class GpuChip:
    """What the tiling model needs of a GPU, beyond GpuClass's peak FLOP/s and bandwidth."""

    gpu: GpuClass
    sms: int
    regs_per_sm: int = 65536  # 32-bit registers
    fp32_lanes_per_sm: int = 128
    l2_bytes: int = 40 << 20
    l2_bandwidth: float = 5e12  # bytes/s
    launch_s: float = 20e-6  # a Triton launch from Python, host side
    barrier_s: float = 1.0e-6  # one grid barrier, few programs
    barrier_per_program_s: float = 5e-9
    l2_latency_s: float = 0.6e-6  # a dependent round trip to L2 and back
    block_s: float = 50e-9  # one lane block's cross-thread reductions and loop, in sequence

    @property
    def name(self) -> str:
        return self.gpu.name


CHIPS = {
    "t4": GpuChip(GPU_CLASSES["t4"], sms=40, fp32_lanes_per_sm=64, l2_bytes=4 << 20, l2_bandwidth=1.0e12),
    "l4": GpuChip(GPU_CLASSES["l4"], sms=58, l2_bytes=48 << 20, l2_bandwidth=2.0e12),
    "a100": GpuChip(GPU_CLASSES["a100"], sms=108, fp32_lanes_per_sm=64, l2_bytes=40 << 20, l2_bandwidth=4.0e12),
    "h100": GpuChip(GPU_CLASSES["h100"], sms=132, l2_bytes=50 << 20, l2_bandwidth=7.0e12),
    "h200": GpuChip(GPU_CLASSES["h200"], sms=132, l2_bytes=50 << 20, l2_bandwidth=7.0e12),
}


@dataclass(frozen=True)
class CellShape:
    kind: str  # lstm | gru | rnn_tanh | rnn_relu
    hidden: int

    @property
    def gates(self) -> int:
        return GATES[self.kind]


@dataclass(frozen=True)
class TileConfig:
    units: int  # BU: hidden units per program (a power of two)
    warps: int
    lane_block: int  # LB: lanes per inner block (a power of two)
    resident: bool  # W_hh's slice kept on chip for the launch

    def tiles(self, hidden: int) -> int:
        return -(-hidden // self.units)


@dataclass(frozen=True)
class Prediction:
    config: TileConfig
    step_s: float  # predicted seconds per step of the launch
    programs: int
    regs_per_thread: int
    programs_per_sm: int
    weights_on_chip: bool
    terms: dict[str, float] = field(default_factory=dict)  # seconds per step, by term


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def regs_per_thread(cell: CellShape, config: TileConfig) -> int:
    """Registers one thread needs: its share of the weight tile [G, BU, H], of the lane
    block's h [LB, H], and of the [LB, BU, H] product before its reduction. A streaming tile
    holds its weights too, for the step it loaded them for (ptxas agrees: lstm-512 at 8 units,
    4 warps, 1 lane takes 205 registers resident and 208 streaming)."""
    bh = _pow2(cell.hidden)
    threads = 32 * config.warps
    floats = config.lane_block * bh + config.lane_block * config.units * bh + cell.gates * config.units * bh
    return REGS_OVERHEAD + -(-floats // threads)


def predict(chip: GpuChip, cell: CellShape, batch: int, config: TileConfig,
            steps_per_launch: int = STEPS_PER_LAUNCH) -> Prediction | None:
    """Predicted seconds per step, or None where the configuration cannot run (see the
    module docstring)."""
    if batch < 1 or config.lane_block > _pow2(batch) and config.lane_block > 1:
        return None  # a lane block wider than the padded batch only wastes work
    h, g = cell.hidden, cell.gates
    tiles = config.tiles(h)
    regs = regs_per_thread(cell, config)
    spill = regs > MAX_REGS_PER_THREAD
    if spill and not config.resident:
        return None  # not even the working set fits
    regs_used = min(regs, MAX_REGS_PER_THREAD) * 32 * config.warps
    per_sm = chip.regs_per_sm // regs_used
    if per_sm < 1 or config.resident and tiles > chip.sms:
        return None  # the grid barrier needs every program resident at once
    # a streaming grid is capped likewise; its programs loop over the tiles
    programs = tiles if config.resident else min(tiles, chip.sms)
    tiles_each = -(-tiles // programs)
    on_chip = config.resident and not spill
    # compute: FMAs of one program, padded to whole lane blocks, at its share of an SM
    padded = -(-batch // config.lane_block) * config.lane_block
    fmas = g * config.units * _pow2(h) * padded * tiles_each
    sharing = -(-programs // chip.sms)  # programs per SM, spread evenly
    program_lanes = min(32 * config.warps, chip.fp32_lanes_per_sm)
    sm_fma_rate = chip.gpu.peak_flops / 2 / chip.sms
    compute = fmas * sharing / (sm_fma_rate * program_lanes / chip.fp32_lanes_per_sm)
    # every program reads all of h from L2 each step
    h_exchange = sharing * tiles_each * batch * h * 4 / (chip.l2_bandwidth / chip.sms)
    weight_bytes = 4 * g * h * h
    weight_bw = chip.l2_bandwidth if weight_bytes <= chip.l2_bytes else chip.gpu.memory_bandwidth
    stream = 0.0 if on_chip else weight_bytes / weight_bw
    if spill:  # the spilled part goes to local memory and back each step
        stream += 2 * (regs - MAX_REGS_PER_THREAD) * 4 * 32 * config.warps * programs / chip.l2_bandwidth
    load_once = weight_bytes / chip.gpu.memory_bandwidth if on_chip else 0.0
    launch = (chip.launch_s + load_once) / steps_per_launch
    barrier = chip.barrier_s + programs * chip.barrier_per_program_s
    blocks = -(-batch // config.lane_block) * tiles_each * chip.block_s
    terms = {"launch": launch, "barrier": barrier, "latency": chip.l2_latency_s, "blocks": blocks,
             "compute": compute, "h_exchange": h_exchange, "weight_stream": stream}
    step = launch + barrier + chip.l2_latency_s + blocks + max(compute, h_exchange, stream)
    return Prediction(config, step, programs, regs, per_sm, on_chip, terms)


def candidates(cell: CellShape, batch: int) -> list[TileConfig]:
    """Every configuration considered: units 1..64, warps 1..8, lane blocks 1..16 (not past
    the padded batch), resident or streaming."""
    units = [u for u in (1, 2, 4, 8, 16, 32, 64) if u <= _pow2(cell.hidden)]
    blocks = [b for b in (1, 2, 4, 8, 16) if b <= _pow2(batch)]
    return [TileConfig(u, w, b, r) for u in units for w in (1, 2, 4, 8) for b in blocks for r in (True, False)]


def rank(chip: GpuChip, cell: CellShape, batch: int, steps_per_launch: int = STEPS_PER_LAUNCH) -> list[Prediction]:
    """Feasible configurations, fastest predicted first (ties: fewer programs, then fewer
    warps, so the choice is deterministic)."""
    found = [p for c in candidates(cell, batch) if (p := predict(chip, cell, batch, c, steps_per_launch))]
    return sorted(found, key=lambda p: (p.step_s, p.programs, p.config.warps, p.config.lane_block,
                                        not p.config.resident, p.config.units))


def choose(chip: GpuChip, cell: CellShape, batch: int) -> Prediction:
    """The configuration the model ranks first; raises ValueError if none can run."""
    ranked = rank(chip, cell, batch)
    if not ranked:
        raise ValueError(f"no tile configuration of {cell} at batch {batch} fits {chip.name}")
    return ranked[0]


def chip(name: str) -> GpuChip:
    try:
        return CHIPS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU class {name!r}; choose one of {', '.join(CHIPS)}") from None
