"""Stack layers that feed each other, so that they run as a wavefront.

PyTorch exports an `nn.LSTM(num_layers=2)` as LSTM -> Squeeze(axis 1) -> LSTM. Run layer
by layer, a sequence of T tokens takes 2T batched steps, and its second layer waits for the
first to finish. `stack_layers` rewrites such a chain into one `LayerStack`: one lane per
sequence, whose step t runs step t of each layer, so the request takes T rounds and every
round batches all the stack's lanes together.

A layer joins the stack below it only when nothing but that chain can tell the difference:
- both are forward, one-direction layers without sequence lengths (every sequence runs the
  whole input, as a lane of the stack does);
- the Squeeze removes exactly the direction axis of the lower layer's y, and neither y nor
  the squeezed tensor is read by anything else (no other node, no model output);
- the upper layer takes no initial state from the graph (a stream's carried state is fine:
  it is per layer and the stack keeps it so).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, Model, RecurrentLayer


def stack_layers(model: Model) -> Model:
    """The model with every stackable chain of layers made into a `LayerStack` (the same
    model when there is none)."""
    program = []
    i = 0
    while i < len(model.program):
        step = model.program[i]
        layers = [step] if _plain_forward(step) else []
        while layers and i + 2 < len(model.program) and _feeds(model, layers[-1], *model.program[i + 1:i + 3]):
            layers.append(model.program[i + 2])
            i += 2
        if len(layers) > 1:
            program.append(LayerStack("+".join(layer.name for layer in layers), layers))
        else:
            program.append(step)
        i += 1
    return dataclasses.replace(model, program=program) if len(program) < len(model.program) else model


def _plain_forward(step) -> bool:
    return (isinstance(step, RecurrentLayer) and len(step.directions) == 1 and not step.reverse_only
            and not step.seq_lens)


def _feeds(model: Model, lower: RecurrentLayer, squeeze, upper) -> bool:
    """Whether `squeeze` takes the direction axis off lower's y and hands it to `upper` only."""
    if not (isinstance(squeeze, DenseNode) and squeeze.op == "Squeeze" and _plain_forward(upper)):
        return False
    if not lower.y or squeeze.inputs[0] != lower.y or upper.x != squeeze.outputs[0]:
        return False
    if upper.initial_h or upper.initial_c or upper.token_table is not None:
        return False
    if len(squeeze.inputs) > 1 and squeeze.inputs[1]:
        axes = model.constants.get(squeeze.inputs[1])
        if axes is None:
            return False
    else:
        axes = squeeze.attrs.get("axes")
    if axes is None or np.asarray(axes).reshape(-1).tolist() != [1]:
        return False
    return not _read_elsewhere(model, {lower.y, upper.x}, squeeze, upper)


def _read_elsewhere(model: Model, names: set[str], squeeze: DenseNode, upper: RecurrentLayer) -> bool:
    if names & {spec.name for spec in model.outputs}:
        return True
    for step in model.program:
        if step is squeeze or step is upper:
            continue
        if isinstance(step, DenseNode):
            read = step.inputs
        elif isinstance(step, RecurrentLayer):
            read = [step.x, step.seq_lens, step.initial_h, step.initial_c]
        elif isinstance(step, GraphDecoder):
            read = step.reads()
        else:
            read = []
        if names & set(read):
            return True
    return False
