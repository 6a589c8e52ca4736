"""Import an encoder-decoder: an encoder graph, a decoder-step graph and a `DecodeSpec`.

`load_seq2seq` takes two ONNX graphs (files, bytes or ModelProtos); `load_torch_seq2seq`
takes two PyTorch modules and exports each in memory. The result is one `Model`: the
encoder's program followed by a `GraphDecoder` step whose lanes the engine batches like
any cell. Everything the spec names is checked here, and a bad spec is refused with a
`ModelLoadError` naming what is wrong: a tensor the graphs lack, a decoder-step input the
spec does not name, shapes that do not fit (memory [B, S, M], states [B, D] with each
state output shaped as its input, logits [B, V]), BOS or EOS outside the vocabulary.
The contract the graphs follow is docs/decoders.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from cellserve.errors import ModelLoadError
from cellserve.graph.decode_spec import DecodeSpec
from cellserve.graph.decoder_graph import DecoderStepGraph, load_decoder_step, run_step_graph, step_flops
from cellserve.graph.model import GraphDecoder, Model, TensorSpec
from cellserve.graph.onnx_import import _drop_unused, find_semantics, load_onnx, probe_tensors
from cellserve.graph.step_ops import torch_dtype

Source = str | Path | bytes | onnx.ModelProto
DECODER_STEP_NAME = "decoder"  # the decoder's cell type is "<model>/decoder"


def load_seq2seq(encoder: Source | Model, decoder_step: Source | DecoderStepGraph, spec: DecodeSpec,
                 name: str = "model") -> Model:
    """One model from an encoder and a decoder-step graph wired by `spec` (see the module
    docstring). Raises ModelLoadError naming what does not fit."""
    if not isinstance(spec, DecodeSpec):
        raise ModelLoadError(f"model {name!r}: spec must be a DecodeSpec, got {type(spec).__name__}")
    enc = encoder if isinstance(encoder, Model) else load_onnx(encoder, name=name)
    step = decoder_step if isinstance(decoder_step, DecoderStepGraph) else load_decoder_step(
        decoder_step, f"{name}/decoder_step")
    where = f"model {name!r}"
    _check_names(enc, step, spec, where)
    clash = {spec.output, spec.scores_output} & {i.name for i in enc.inputs}
    if clash:  # a response tensor named as a request's input: a client could not tell them apart
        raise ModelLoadError(f"{where}: decode spec output {sorted(clash)[0]!r} is also the name of an encoder input: "
                             "name the answer otherwise")
    env = probe_tensors(enc, [7, 5, 11, 13, 17, 19, 23])
    # the probe's batch, where the encoder's importer found a batch axis (an encoder of plain
    # ops only has no recurrent layer to find it by: then the memory says it, below)
    batch = enc.batch_size(env) if any(s.batch_axis is not None for s in enc.semantics.values()) else None
    memory_width, sizes = _check_encoder_shapes(enc, step, spec, env, batch, where)
    vocab, fixed, per_position = _probe_step(step, spec, memory_width, sizes, where, token=0)
    for key in ("bos", "eos"):
        if getattr(spec, key) >= vocab:
            raise ModelLoadError(f"{where}: decode spec {key} {getattr(spec, key)} is outside the vocabulary "
                                 f"[0, {vocab}) of logits output {spec.logits_output!r}")
    _probe_step(step, spec, memory_width, sizes, f"{where} (token bos = {spec.bos})", token=spec.bos)
    decoder = GraphDecoder(DECODER_STEP_NAME, step, spec, vocab, sizes, memory_width, fixed, per_position)
    wanted = {spec.memory, spec.memory_length} | {e for _, e in spec.init}
    program = _drop_unused(list(enc.program), {w for w in wanted if w}) + [decoder]
    outputs = [TensorSpec(spec.output, "int64", (-1, -1))]
    model = Model(name, list(enc.inputs), outputs, dict(enc.constants), program,
                  max_sequence_length=enc.max_sequence_length)
    model.semantics = find_semantics(model)
    return model


def _check_names(enc: Model, step: DecoderStepGraph, spec: DecodeSpec, where: str) -> None:
    enc_outputs = {o.name for o in enc.outputs}
    enc_inputs = {i.name for i in enc.inputs}
    if spec.memory not in enc_outputs:
        raise ModelLoadError(f"{where}: decode spec memory {spec.memory!r} is not an output of the encoder "
                             f"(outputs: {sorted(enc_outputs)})")
    if spec.memory_length and spec.memory_length not in enc_outputs | enc_inputs:
        raise ModelLoadError(f"{where}: decode spec memory_length {spec.memory_length!r} is neither an input nor "
                             f"an output of the encoder (inputs: {sorted(enc_inputs)}, outputs: {sorted(enc_outputs)})")
    for state, source in spec.init:
        if source not in enc_outputs:
            raise ModelLoadError(f"{where}: decode spec init {state!r} <- {source!r}: {source!r} is not an output "
                                 f"of the encoder (outputs: {sorted(enc_outputs)})")
    have = {i.name for i in step.inputs}
    named = {spec.token_input: "token_input"}
    if step.attends(spec):  # a step without attention takes neither (its exporter drops them as unused)
        if spec.memory_input not in have or spec.mask_input not in have:
            given, missing = ((spec.memory_input, spec.mask_input) if spec.memory_input in have
                              else (spec.mask_input, spec.memory_input))
            raise ModelLoadError(f"{where}: the decoder-step graph takes {given!r} but not {missing!r}: a step that "
                                 f"attends over the memory takes both memory_input and mask_input (lanes of "
                                 f"different source lengths share a batch, the mask hides the padding), one "
                                 f"without attention neither (inputs: {sorted(have)})")
        named.update({spec.memory_input: "memory_input", spec.mask_input: "mask_input"})
    named.update({s: "a state input" for s in spec.state_inputs})
    for tensor, role in named.items():
        if tensor not in have:
            raise ModelLoadError(f"{where}: decode spec {role} {tensor!r} is not an input of the decoder-step graph "
                                 f"(inputs: {sorted(have)})")
    stray = sorted(have - set(named))
    if stray:
        raise ModelLoadError(f"{where}: decoder-step input {stray[0]!r} is not named in the decode spec (inputs "
                             "must be token_input, memory_input, mask_input or a state input)")
    outs = {o.name for o in step.outputs}
    for tensor, role in [(spec.logits_output, "logits_output")] + [(o, "a state output") for o in spec.state_outputs]:
        if tensor not in outs:
            raise ModelLoadError(f"{where}: decode spec {role} {tensor!r} is not an output of the decoder-step graph "
                                 f"(outputs: {sorted(outs)})")
    for tensor in (spec.token_input,):
        dtype = step.input(tensor).dtype
        if not np.issubdtype(np.dtype(dtype), np.integer):
            raise ModelLoadError(f"{where}: decoder-step input {tensor!r} (token_input) must be integer token ids, "
                                 f"not {dtype}")


def _check_encoder_shapes(enc: Model, step: DecoderStepGraph, spec: DecodeSpec, env: dict, batch: int | None,
                          where: str) -> tuple[int, list[int]]:
    """Memory [B, S, M] and each initial state [B, D] on probe inputs, against the step
    graph's declared shapes. Returns M and each state's D."""
    memory = env[spec.memory]
    if memory.ndim != 3:
        raise ModelLoadError(f"{where}: encoder output {spec.memory!r} (memory) must be [batch, source, width]; "
                             f"on probe inputs it has shape {list(memory.shape)}")
    if batch is not None and memory.shape[0] != batch:
        raise ModelLoadError(f"{where}: encoder output {spec.memory!r} (memory) must be batch-first; on probe inputs "
                             f"of batch {batch} it has shape {list(memory.shape)}")
    width = int(memory.shape[2])
    declared = step.input(spec.memory_input).shape if step.attends(spec) else (-1, -1, width)
    if len(declared) != 3 or declared[2] not in (-1, width):
        raise ModelLoadError(f"{where}: decoder-step input {spec.memory_input!r} has shape {list(declared)}; the "
                             f"encoder's memory {spec.memory!r} is [batch, source, {width}]")
    if spec.memory_length:
        lengths = env[spec.memory_length]
        if lengths.shape != (memory.shape[0],):
            raise ModelLoadError(f"{where}: memory_length {spec.memory_length!r} must be [batch] = "
                                 f"[{memory.shape[0]}]; on probe inputs it has shape {list(lengths.shape)}")
    sizes = []
    for state in spec.state_inputs:
        shape = step.input(state).shape
        if len(shape) != 2:
            raise ModelLoadError(f"{where}: decoder-step state input {state!r} must be [batch, size], "
                                 f"it is declared {list(shape)}")
        source = spec.init_of(state)
        if source:
            value = env[source]
            if value.ndim != 2 or value.shape[0] != memory.shape[0] or shape[1] not in (-1, value.shape[1]):
                raise ModelLoadError(f"{where}: encoder output {source!r} initialises state {state!r} "
                                     f"(declared {list(shape)}) but has shape {list(value.shape)} on probe inputs "
                                     f"(batch {memory.shape[0]})")
            sizes.append(int(value.shape[1]))
        elif shape[1] == -1:
            raise ModelLoadError(f"{where}: state {state!r} starts at zeros but its size is not fixed "
                                 f"(declared {list(shape)})")
        else:
            sizes.append(int(shape[1]))
    return width, sizes


def _probe_step(step: DecoderStepGraph, spec: DecodeSpec, width: int, sizes: list[int],
                where: str, token: int) -> tuple[int, float, float]:
    """Run the step on probe lanes fed `token`: check the outputs' shapes; return the
    vocabulary and the FLOPs of one lane's step (fixed, per memory position)."""
    constants = {k: torch.as_tensor(np.array(v)) for k, v in step.constants.items()}
    flops = []
    for batch, length in ((3, 4), (3, 8)):
        feeds = {
            spec.token_input: torch.full((batch,), token, dtype=torch_dtype(np.dtype(step.input(spec.token_input).dtype))),
        }
        if step.attends(spec):
            feeds[spec.memory_input] = torch.zeros((batch, length, width),
                                                   dtype=torch_dtype(np.dtype(step.input(spec.memory_input).dtype)))
            feeds[spec.mask_input] = torch.ones((batch, length), dtype=torch_dtype(np.dtype(step.input(spec.mask_input).dtype)))
        for name, size in zip(spec.state_inputs, sizes):
            feeds[name] = torch.zeros((batch, size), dtype=torch_dtype(np.dtype(step.input(name).dtype)))
        try:
            env = run_step_graph(step, feeds, constants, keep=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{where}: the decoder-step graph does not run on probe inputs (batch {batch}, "
                                 f"memory [{batch}, {length}, {width}]): {exc}") from exc
        logits = env[spec.logits_output]
        if logits.dim() != 2 or logits.shape[0] != batch or not logits.dtype.is_floating_point:
            raise ModelLoadError(f"{where}: logits output {spec.logits_output!r} must be float [batch, vocabulary]; "
                                 f"on {batch} probe lanes it is {logits.dtype} {list(logits.shape)}")
        for (state_in, state_out), size in zip(spec.states, sizes):
            got = env[state_out]
            if tuple(got.shape) != (batch, size):
                raise ModelLoadError(f"{where}: state output {state_out!r} has shape {list(got.shape)} on {batch} "
                                     f"probe lanes; its state input {state_in!r} is [{batch}, {size}]")
        flops.append(step_flops(step, env, batch))
    per_position = (flops[1] - flops[0]) / 4
    return int(logits.shape[1]), flops[0] - 4 * per_position, per_position


def load_torch_seq2seq(encoder: torch.nn.Module, decoder_step: torch.nn.Module, spec: DecodeSpec, name: str,
                       example: tuple[torch.Tensor, ...], encoder_inputs: list[str], encoder_outputs: list[str],
                       dynamic_axes: dict[str, dict[int, str]] | None = None,
                       state_sizes: dict[str, int] | None = None) -> Model:
    """Import a PyTorch encoder and decoder step.

    encoder: forward(*example) returns its outputs, named `encoder_outputs` in order (they
    must include spec.memory [B, S, M] and the init sources [B, D]); `dynamic_axes` names
    the encoder's varying dimensions (default: axes 0 and 1 of every input, batch and time).
    decoder_step: forward(token, memory, memory_mask, *states) -> (logits, *next_states),
    states in spec.states order (a step without attention ignores memory and memory_mask: the
    exporter leaves them out, and the step is fed neither); it is exported with example inputs shaped from the
    encoder's outputs on `example` (`state_sizes` gives the size of a state that starts at
    zeros). Both are exported to ONNX in memory and loaded by `load_seq2seq`."""
    from cellserve.graph.torch_import import export_onnx_bytes

    axes = dynamic_axes or {n: {0: "batch", 1: "time"} for n in encoder_inputs}
    try:
        enc_bytes = export_onnx_bytes(encoder, example, encoder_inputs, encoder_outputs, axes)
    except Exception as exc:
        raise ModelLoadError(f"cannot export encoder {type(encoder).__name__} of {name!r}: {exc}") from exc
    with torch.no_grad():
        produced = encoder.eval()(*example)
    produced = dict(zip(encoder_outputs, produced if isinstance(produced, (tuple, list)) else (produced,)))
    if spec.memory not in produced:
        raise ModelLoadError(f"model {name!r}: decode spec memory {spec.memory!r} is not an output of the encoder "
                             f"(outputs: {encoder_outputs})")
    memory = produced[spec.memory]
    if memory.dim() != 3:
        raise ModelLoadError(f"model {name!r}: encoder output {spec.memory!r} must be [batch, source, width], "
                             f"got shape {list(memory.shape)}")
    batch = memory.shape[0]
    states = []
    for state in spec.state_inputs:
        source = spec.init_of(state)
        if source and source in produced:
            states.append(torch.zeros_like(produced[source]))
        elif (state_sizes or {}).get(state):
            states.append(torch.zeros((batch, state_sizes[state]), dtype=memory.dtype))
        else:
            raise ModelLoadError(f"model {name!r}: state {state!r} has no init source among the encoder's outputs "
                                 f"({encoder_outputs}); give its size in state_sizes")
    step_example = (torch.full((batch,), spec.bos, dtype=torch.long), torch.zeros_like(memory),
                    torch.ones(memory.shape[:2], dtype=memory.dtype), *states)
    step_inputs = [spec.token_input, spec.memory_input, spec.mask_input, *spec.state_inputs]
    step_outputs = [spec.logits_output, *spec.state_outputs]
    step_axes = {n: {0: "batch"} for n in step_inputs + step_outputs}
    step_axes[spec.memory_input] = step_axes[spec.mask_input] = {0: "batch", 1: "source"}
    try:
        step_bytes = export_onnx_bytes(decoder_step, step_example, step_inputs, step_outputs, step_axes)
    except Exception as exc:
        raise ModelLoadError(f"cannot export decoder step {type(decoder_step).__name__} of {name!r} (forward(token, "
                             f"memory, memory_mask, *states) -> (logits, *states)): {exc}") from exc
    return load_seq2seq(enc_bytes, step_bytes, spec, name)
