"""Stack layers that feed each other, so that they run as a wavefront.

PyTorch exports an `nn.LSTM(num_layers=2)` as LSTM -> Squeeze(axis 1) -> LSTM. Run layer
by layer, a sequence of T tokens takes 2T batched steps, and its second layer waits for the
first to finish. `stack_layers` rewrites such a chain into one `LayerStack`: one lane per
sequence, whose step t runs step t of each layer, so the request takes T rounds and every
round batches all the stack's lanes together.

PyTorch's dynamo exporter writes the same squeeze as a Transpose and a Reshape to a shape it
computes (Shape, Slice, Mul, Concat): any run of plain ops between two layers stacks them
when it computes exactly that squeeze.

A layer joins the stack below it only when nothing but that chain can tell the difference:
- both are forward, one-direction layers without sequence lengths (every sequence runs the
  whole input, as a lane of the stack does);
- the plain ops between them read nothing but the lower layer's y (and constants) and turn
  it into the upper layer's x by removing its direction axis: a Squeeze of axis 1, or any
  other run of ops that does exactly that, as checked on made-up outputs of two shapes
  whose every value differs; and nothing else reads y or any tensor of the run (no other
  node, no model output);
- the upper layer takes no initial state from the graph (a stream's carried state is fine:
  it is per layer and the stack keeps it so).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cellserve.graph import dense_ops
from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, Model, RecurrentLayer


def stack_layers(model: Model) -> Model:
    """The model with every stackable chain of layers made into a `LayerStack` (the same
    model when there is none)."""
    program = []
    i = 0
    while i < len(model.program):
        step = model.program[i]
        layers = [step] if _plain_forward(step) else []
        while layers:
            j = _next_recurrent(model.program, i + 1)
            if j is None or not _feeds(model, layers[-1], model.program[i + 1:j], model.program[j]):
                break
            layers.append(model.program[j])
            i = j
        if len(layers) > 1:
            program.append(LayerStack("+".join(layer.name for layer in layers), layers))
        else:
            program.append(step)
        i += 1
    return dataclasses.replace(model, program=program) if len(program) < len(model.program) else model


def _next_recurrent(program: list, start: int) -> int | None:
    for j in range(start, len(program)):
        if not isinstance(program[j], DenseNode):
            return j
    return None


def _plain_forward(step) -> bool:
    return (isinstance(step, RecurrentLayer) and len(step.directions) == 1 and not step.reverse_only
            and not step.seq_lens)


def _feeds(model: Model, lower: RecurrentLayer, between: list[DenseNode], upper) -> bool:
    """Whether the plain ops `between` only take the direction axis off lower's y and hand it
    to `upper`, and nothing else reads what they or lower's y make."""
    if not between or not _plain_forward(upper) or not lower.y:
        return False
    if upper.initial_h or upper.initial_c or upper.token_table is not None:
        return False
    made = {lower.y}
    for node in between:
        if any(name and name not in made and name not in model.constants for name in node.inputs):
            return False
        made.update(name for name in node.outputs if name)
    if upper.x not in made or _read_elsewhere(model, made, between, upper):
        return False
    return _squeezes_directions(model, lower, between, upper)


def _squeezes_directions(model: Model, lower: RecurrentLayer, between: list[DenseNode],
                         upper: RecurrentLayer) -> bool:
    """Whether `between` computes upper's x [T, B, H] = lower's y [T, 1, B, H] without its
    direction axis, on two shapes of made-up y whose every value differs."""
    hidden = lower.hidden
    for steps, rows in ((3, 2), (5, 1)):
        y = np.arange(steps * rows * hidden, dtype=np.float32).reshape(steps, 1, rows, hidden)
        env = {**model.constants, lower.y: y}
        try:
            for node in between:
                dense_ops.run(node, env)
        except Exception:  # noqa: BLE001 - ops that fail on a plain y are not a squeeze
            return False
        x = env.get(upper.x)
        if not isinstance(x, np.ndarray) or x.shape != (steps, rows, hidden) or not np.array_equal(x, y[:, 0]):
            return False
    return True


def _read_elsewhere(model: Model, names: set[str], between: list[DenseNode], upper: RecurrentLayer) -> bool:
    if names & {spec.name for spec in model.outputs}:
        return True
    skip = {id(node) for node in between} | {id(upper)}
    for step in model.program:
        if id(step) in skip:
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
