"""Modelled profiles for GPUs this machine lacks: a roofline per kernel launch.

The torch backend runs a cell step as a handful of kernel launches (gathers, the recurrent
GEMM, the gate math, scatters). A step is priced as
    launches * launch_s + max(flops / peak_flops, bytes / memory_bandwidth)
where bytes are the weights the step reads once plus each lane's state and rows. Plain ops
run in numpy on the host whatever the device, so they keep the host profile's figures, as do
the engine's own costs (HostProfile). Every profile made here is marked `modelled`.

The GPU classes below carry datasheet figures (FP32 without tensor cores, HBM/GDDR bandwidth);
`launch_s` is the host-side cost of one eager torch op, the floor at small batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cellserve.graph.model import GATES, GraphDecoder, LayerStack, Model, RecurrentLayer, layers_of
from cellserve.plan.profile import CellTypeProfile, Machine, ModelProfile, ProfileError, Timing, step_flops

_LAUNCHES_PER_LAYER = 10  # torch backend: index_select x2, mm, add, 4-6 pointwise, index_copy x2
_LAUNCHES_DECODER = 18  # the LSTM cell's as above, plus attention (gather, bmm x2, softmax, mask), combine, out, argmax
_LAUNCHES_START = 3  # a lane's projection (or table lookup) and the copies of its initial state


@dataclass(frozen=True)
class GpuClass:
    name: str
    peak_flops: float  # FP32, FLOP/s
    memory_bandwidth: float  # bytes/s
    launch_s: float  # one eager op, host side
    memory_bytes: int
    transfer_bandwidth: float = 25e9  # host <-> device, bytes/s


GPU_CLASSES = {
    "t4": GpuClass("NVIDIA T4 (modelled)", 8.1e12, 320e9, 8e-6, 16 << 30, 12e9),
    "l4": GpuClass("NVIDIA L4 (modelled)", 30.3e12, 300e9, 8e-6, 24 << 30, 25e9),
    "a100": GpuClass("NVIDIA A100 40GB (modelled)", 19.5e12, 1555e9, 8e-6, 40 << 30, 25e9),
    "h100": GpuClass("NVIDIA H100 SXM (modelled)", 67e12, 3350e9, 8e-6, 80 << 30, 50e9),
    "h200": GpuClass("NVIDIA H200 (modelled)", 67e12, 4800e9, 8e-6, 141 << 30, 50e9),
}


def gpu_class(name: str) -> GpuClass:
    try:
        return GPU_CLASSES[name.lower()]
    except KeyError:
        raise ProfileError(f"unknown GPU class {name!r}; choose one of {', '.join(GPU_CLASSES)}") from None


def modelled_gpu_profile(model: Model, host_profile: ModelProfile, gpu: GpuClass) -> ModelProfile:
    """A profile of `model` (as the engine serves it: stacked if host_profile says so) on
    `gpu`, with the engine's own costs and the plain ops taken from `host_profile`."""
    if model.name != host_profile.model:
        raise ProfileError(f"host profile is of model {host_profile.model!r}, not {model.name!r}")
    types = iter(model.cell_types())
    cells, weights = {}, 0
    for step in model.recurrent_steps():
        directions = len(step.directions) if isinstance(step, RecurrentLayer) else 1
        for _ in range(directions):
            cell_type = next(types)
            step_bytes, fixed_flops, lane_flops, lane_bytes, launches = _step_shape(step)
            weights += step_bytes
            table = {}
            for b in range(1, host_profile.max_batch + 1):
                seconds = launches * gpu.launch_s + max((fixed_flops + b * lane_flops) / gpu.peak_flops,
                                                        (step_bytes + b * lane_bytes) / gpu.memory_bandwidth)
                table[b] = Timing.fixed(seconds)
            proj = 0.0 if isinstance(step, GraphDecoder) else step.flops_per_token_projection()
            hidden = step.hidden if not isinstance(step, LayerStack) else sum(l.hidden for l in step.layers)
            cells[cell_type] = CellTypeProfile(
                kind="decoder" if isinstance(step, GraphDecoder) else "stack" if isinstance(step, LayerStack)
                else "layer",
                lone_lanes=0, step_s=table, lone_step_s=None,
                start_s_per_token=proj / gpu.peak_flops + _LAUNCHES_START * gpu.launch_s / 25,
                finish_s_per_token=4 * hidden / gpu.transfer_bandwidth + gpu.launch_s / 25,
                flops_per_step=step_flops(step))
    if weights > gpu.memory_bytes:
        raise ProfileError(f"model {model.name!r} needs {weights} bytes of weights, more than {gpu.name}'s "
                           f"{gpu.memory_bytes}")
    missing = sorted(set(host_profile.cell_types) ^ set(cells))
    if missing:
        raise ProfileError(f"host profile's cell types differ from the model's: {missing} (stack_layers?)")
    machine = Machine(device="cuda (modelled)", name=gpu.name, threads=1, backend="torch",
                      versions=dict(host_profile.machine.versions))
    return replace(host_profile, machine=machine, cell_types=cells, weight_bytes={"cuda": weights}, modelled=True)


def _step_shape(step) -> tuple[int, float, float, float, int]:
    """(weight bytes read per step, FLOPs per step whatever the batch, FLOPs per lane,
    bytes per lane, launches) of one batched step."""
    if isinstance(step, GraphDecoder):
        mem = 25  # a typical source length; attention reads it per lane
        # per lane: its memory, its states read and written, its logits
        lane_bytes = 4 * (mem * step.memory_width + 2 * sum(step.state_sizes) + step.vocab)
        return step.step_weight_bytes(), 0.0, step.flops_per_step(mem), lane_bytes, _LAUNCHES_DECODER
    layers = layers_of(step)
    weight = sum(4 * (l.directions[0].w_hh.size + (l.directions[0].w_ih.size if i else 0)) for i, l in enumerate(layers))
    lane_bytes = sum(4 * (GATES[l.kind] * l.hidden + 3 * l.hidden) for l in layers)
    return weight, 0.0, step.flops_per_step(), lane_bytes, _LAUNCHES_PER_LAYER * len(layers)
