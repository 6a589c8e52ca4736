"""Blocks from models and device profiles: a model cut at its recurrent steps.

One block per recurrent step of the model served *unstacked* (each layer its own cell type,
so a stack's layers are separate blocks; a bidirectional layer's two directions one block; an
encoder's layers, then the decoder). The block's latency at batch b on a device type is the
cellular latency of that step alone (plan/nexus_cellular.py, `cell_types=[...]`: the rounds
a request of `mean_tokens` needs times the step at b lanes, plus its lanes' start and finish);
the model's plain ops (embedding lookups folded into a table, reshapes, the head) and the
hand-back, which run per request on the host, go to the last block (the head). A block passes
on its outputs for the mean request: tokens x hidden x directions float32 values.

`model_blocks` takes one ModelProfile per device type: measured (`cellserve profile --model M
--no-stack-layers`) or modelled (`cellserve profile --gpu CLASS`, plan/gpu_model.py). The
blocks are plain data; building them needs the model (graph/), never the engine or server.
"""

from __future__ import annotations

from cellserve.graph.model import GraphDecoder, LayerStack, Model, RecurrentLayer
from cellserve.plan.nexus_cellular import cellular_latency
from cellserve.plan.pipeline import Block, ModelBlocks, PipelineError
from cellserve.plan.profile import ModelProfile


def _steps(model: Model) -> list[tuple[str, list[str], float]]:
    """(name, cell types, floats passed on per token) per recurrent step, in order."""
    types = iter(model.cell_types())
    out = []
    for i, step in enumerate(model.recurrent_steps()):
        if isinstance(step, LayerStack):
            raise PipelineError(f"model {model.name!r} is stacked; cut it into blocks unstacked "
                                "(profiles made with --no-stack-layers)")
        n = len(step.directions) if isinstance(step, RecurrentLayer) else 1
        kind = "decoder" if isinstance(step, GraphDecoder) else f"layer{i}"
        out.append((kind, [next(types) for _ in range(n)], float(step.hidden * n)))
    return out


def model_blocks(model: Model, profiles: dict[str, ModelProfile], mean_tokens: float, slo_ms: float,
                 weight: float = 1.0, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> ModelBlocks:
    """`model` (unstacked) cut into blocks, priced from `profiles` (device type -> profile)
    at those of `batches` every profile covers."""
    if not profiles:
        raise PipelineError("model_blocks needs at least one device profile")
    steps = _steps(model)
    tables: list[dict[str, dict[int, float]]] = [{} for _ in steps]
    for dt, profile in profiles.items():
        if profile.stack_layers:
            raise PipelineError(f"profile for {dt!r} was made with stacked layers; make it with --no-stack-layers")
        sizes = [b for b in batches if b <= profile.max_batch]
        whole = cellular_latency(profile, mean_tokens)
        parts = [cellular_latency(profile, mean_tokens, cell_types=types) for _, types, _ in steps]
        for i, part in enumerate(parts):
            tables[i][dt] = {b: part.ms(b) for b in sizes}
        # the plain ops and hand-back: what the whole model costs beyond its steps, on the head
        for b in sizes:
            tables[-1][dt][b] += max(0.0, whole.ms(b) - sum(p.ms(b) for p in parts))
    blocks = tuple(Block(tables[i], mean_tokens * width * 4 / 1e6, name)
                   for i, (name, _, width) in enumerate(steps))
    return ModelBlocks(slo_ms, weight, blocks)
