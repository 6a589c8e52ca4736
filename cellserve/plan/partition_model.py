"""A model's partition graph from its profiles: one request of `length` tokens, as nodes the
engine can place and edges with the bytes they carry.

Nodes (ids are the engine's names, so a placement can name them):
- each cell type (`Model.cell_types()`: a direction of a layer, a stack, a decoder) over the
  request's steps: cost = steps x (the profile's step at batch 1, a lone lane's step when the
  profile runs one lane alone, + the engine's host cost of a step at one lane) + the lane's
  start and finish (per token x length, and the host's per-lane start and finish) + a cold
  step's extra once; steps = length for layers and stacks, for a decoder the mean steps its
  profile saw at that source length (the nearest profiled length);
- each run of consecutive plain ops in program order, `MODEL/ops/K`: cost = the sum of the
  profile's `plain_ops_s` (ops listed in `source.groups`);
- `MODEL/input` and `MODEL/output`, CPU only: the request arrives and its answer leaves on
  the host, so a plan that computes on the GPU pays those transfers; the input costs the
  engine's taking the request in (the CPU profile's `host.request_s`), the output nothing.
Memory per node: the bytes of the weights and constants it reads (the same on every device).
Edges: the tensors one node's outputs hand to another's inputs, sized by running the model's
plain ops on zeros of one request of `length` tokens (a layer's output is split evenly
between its directions). Links: the GPU class's host<->device bandwidth and a fixed
LINK_LATENCY_MS per transfer. Megabytes are 10^6 bytes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cellserve.graph import dense_ops
from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, Model, RecurrentLayer, layers_of, plain_group_key
from cellserve.plan.gpu_model import GpuClass
from cellserve.plan.partition_graph import Edge, Graph, Link, Node, PartitionError
from cellserve.plan.profile import CellTypeProfile, ModelProfile, check_step

LINK_LATENCY_MS = 0.01  # one host<->device copy's launch and synchronisation
MB = 1e6


def device_name(profile: ModelProfile) -> str:
    """"cpu" for a CPU profile, "gpu" for a CUDA one (measured or modelled)."""
    dev = profile.machine.device
    if dev == "cpu":
        return "cpu"
    if dev.startswith("cuda"):
        return "gpu"
    raise PartitionError(f"profile of {profile.model!r} is for device {dev!r}; partitioning reads CPU and CUDA "
                         "profiles (from `cellserve profile`, with --gpu CLASS for a modelled one)")


def _cell_ms(cell: CellTypeProfile, profile: ModelProfile, steps: float, length: int) -> float:
    host = profile.host
    if cell.lone_lanes >= 1 and cell.lone_step_s is not None:
        step, once = cell.lone_step_s.mean, cell.lone_call_s + cell.lone_cold_s
    else:
        step, once = cell.step_s[min(cell.step_s)].mean, cell.cold_s
    seconds = (steps * (step + host.step_s + host.step_s_per_lane) + once
               + length * (cell.start_s_per_token + cell.finish_s_per_token) + host.lane_start_s + host.lane_finish_s)
    return 1000.0 * seconds


def _decode_steps(profile: ModelProfile, cell_type: str, length: int) -> float:
    by_memory = profile.decode_steps.get(cell_type)
    if not by_memory:
        return length + 1.0
    memory = min(by_memory, key=lambda m: (abs(m - length), m))
    hist = by_memory[memory]
    return sum(n * c for n, c in hist.items()) / sum(hist.values())


def _weights(step) -> int:
    if isinstance(step, GraphDecoder):
        return step.weight_bytes()
    layers = layers_of(step)
    total = 0
    for layer in layers:
        d = layer.directions[0]
        total += sum(a.nbytes for a in (d.w_ih, d.w_hh, d.b_ih, d.b_hh))
        if layer.token_table is not None:  # and the projected table the kernel keeps beside it
            total += layer.token_table.nbytes + layer.projected_table_bytes()
    return total


def _shapes(model: Model, length: int, decode: dict[str, float]) -> dict[str, int]:
    """Bytes of every tensor of one request of `length` tokens (plain ops run on zeros)."""
    env = dict(model.constants)
    for spec in model.inputs:
        sem = model.semantics.get(spec.name)
        shape = [1 if sem and sem.batch_axis == i else length if sem and sem.time_axis == i else (d if d > 0 else 1)
                 for i, d in enumerate(spec.shape)]
        env[spec.name] = np.zeros(shape, dtype=spec.dtype)
    for step in model.program:
        if isinstance(step, DenseNode):
            dense_ops.run(step, env)
        elif isinstance(step, GraphDecoder):
            env[step.output] = np.zeros((1, int(round(decode[step.name]))), np.int64)
        else:
            for layer in layers_of(step):
                d, h = len(layer.directions), layer.hidden
                for name, shape in ((layer.y, (length, d, 1, h)), (layer.y_h, (d, 1, h)), (layer.y_c, (d, 1, h))):
                    if name:
                        env[name] = np.zeros(shape, np.float32)
    return {k: int(np.asarray(v).nbytes) for k, v in env.items() if k not in model.constants}


def _reads(step) -> list[str]:
    if isinstance(step, DenseNode):
        return [i for i in step.inputs if i]
    if isinstance(step, GraphDecoder):
        return step.reads()
    first = step.layers[0] if isinstance(step, LayerStack) else step
    return [t for t in (first.x, first.seq_lens, first.initial_h, first.initial_c) if t]


def _writes(step) -> list[str]:
    if isinstance(step, DenseNode):
        return list(step.outputs)
    if isinstance(step, GraphDecoder):
        return [step.output]
    layers = layers_of(step)
    return [t for layer in layers for t in (layer.y, layer.y_h, layer.y_c) if t]


def build_graph(model: Model, profiles: dict[str, ModelProfile], length: int, gpu: GpuClass | None,
                source: dict | None = None) -> Graph:
    """The graph of `model` (served as the profiles were made: stacked or not) for one request
    of `length` tokens, costs from `profiles` (device name -> profile); links from `gpu`."""
    if not 1 <= length <= model.max_sequence_length:
        raise PartitionError(f"--length must be 1 to model {model.name!r}'s max_sequence_length "
                             f"{model.max_sequence_length} tokens, got {length}")
    first = next(iter(profiles.values()))
    for dev, p in profiles.items():
        if p.model != model.name:
            raise PartitionError(f"the {dev} profile is of model {p.model!r}, not {model.name!r}")
        if p.stack_layers != first.stack_layers or set(p.cell_types) != set(first.cell_types):
            raise PartitionError(f"the {dev} profile's cell types differ from the others' (made with another "
                                 "stack_layers setting?)")
    if first.stack_layers:
        from cellserve.graph.stacking import stack_layers
        model = stack_layers(model)
    name = model.name
    decode = {s.name: _decode_steps(first, f"{name}/{s.name}", length)
              for s in model.recurrent_steps() if isinstance(s, GraphDecoder)}
    sizes = _shapes(model, length, decode)
    taking_in = profiles["cpu"].host.request_s if "cpu" in profiles else 0.0
    nodes: list[Node] = [Node(f"{name}/input", {"cpu": 1000.0 * taking_in}, {})]
    producers: dict[str, list[str]] = {spec.name: [f"{name}/input"] for spec in model.inputs}
    consumers: list[tuple[str, list[str]]] = []  # (node, tensors it reads)
    groups: dict[str, list[str]] = {}
    group: list[DenseNode] = []

    def close_group():
        if not group:
            return
        gid = plain_group_key(name, len(groups))
        groups[gid] = [op.name for op in group]
        cost = {d: 1000.0 * sum(p.plain_ops_s[o.name].mean for o in group if o.name in p.plain_ops_s)
                for d, p in profiles.items()}
        reads = [t for op in group for t in _reads(op)]
        consts = {t for t in reads if t in model.constants}
        nodes.append(Node(gid, cost, {d: sum(model.constants[t].nbytes for t in consts) / MB for d in profiles}))
        mine = {t for op in group for t in op.outputs}
        consumers.append((gid, [t for t in dict.fromkeys(reads) if t not in mine and t not in consts]))
        for t in mine:
            producers[t] = [gid]
        group.clear()

    types = iter(model.cell_types())
    for step in model.program:
        if isinstance(step, DenseNode):
            group.append(step)
            continue
        close_group()
        directions = len(step.directions) if isinstance(step, RecurrentLayer) else 1
        ids = [next(types) for _ in range(directions)]
        for cid in ids:
            steps = decode[step.name] if isinstance(step, GraphDecoder) else float(length)
            cost = {d: _cell_ms(check_step(p, cid, step), p, steps, length) for d, p in profiles.items()}
            nodes.append(Node(cid, cost, {d: _weights(step) / MB for d in profiles}))
            consumers.append((cid, _reads(step)))
        for t in _writes(step):
            producers[t] = ids
    close_group()
    out = f"{name}/output"
    nodes.append(Node(out, {"cpu": 0.0}, {}))
    consumers.append((out, [spec.name for spec in model.outputs]))
    mb: dict[tuple[str, str], float] = {}
    for dst, tensors in consumers:
        for t in tensors:
            for src in producers.get(t, []):
                if src != dst:
                    share = sizes.get(t, 0) / len(producers[t]) / MB
                    mb[(src, dst)] = mb.get((src, dst), 0.0) + share
    edges = tuple(Edge(s, d, v) for (s, d), v in mb.items())
    links = {}
    if gpu is not None and "gpu" in profiles:
        per_mb = 1000.0 * MB / gpu.transfer_bandwidth
        links = {("cpu", "gpu"): Link(LINK_LATENCY_MS, per_mb), ("gpu", "cpu"): Link(LINK_LATENCY_MS, per_mb)}
    devices = tuple(d for d in ("cpu", "gpu") if d in profiles or d == "cpu")
    info = dict(source or {})
    info.update({"model": name, "length_tokens": length, "groups": groups,
                 "decode_steps": decode, "stack_layers": first.stack_layers})
    return Graph(devices, tuple(nodes), edges, links, source=info)


def pinned(graph: Graph, device: str) -> Graph:
    """The graph with every node that can run on `device` held there (nodes that cannot, as
    the request's input and output on the CPU, keep their devices): the single-device
    baseline, planned by the same planner and evaluator."""
    nodes = tuple(replace(n, cost_ms={device: n.cost_ms[device]}) if device in n.cost_ms else n for n in graph.nodes)
    return replace(graph, nodes=nodes)
