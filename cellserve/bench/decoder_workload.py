"""What `bench engine` asks an encoder-decoder: requests drawn from the model's own inputs,
each asking one beam width (`workload(model, width)`, a `Workload`).

A decoder's output length follows its input (the digit reverser answers as many digits as it
is given; a dates model always writes ten characters), so a trace of uniform random tokens
would not load the decoder as real use does. `decoder_inputs(model)` gives the sampler of
the model's task when it is one the zoo trained for, recognised by its vocabularies (the
token input's and the decoder's), not by the model's name, so a copy served under another
name is still recognised; any other decoder gets uniform token ids of varied lengths, and
the description says so (the bench records it).

`decoder_of(model)` finds a model's decoder-step graph; `allow_beam_width(model, k)` lets the
bench ask width k of a spec configured for less (recorded, see its docstring); `lengths`
summarises the input and output lengths a run saw, for the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from cellserve.bench.traces import InputSampler
from cellserve.errors import InvalidInput
from cellserve.graph.model import GraphDecoder, Model

UNIFORM_MAX_LENGTH = 64  # the fallback's longest row, when the model allows longer ones
_MAX_DRAWS = 20  # rounds of drawing before a task whose rows never fit the model gives up


@dataclass(frozen=True)
class DecoderInputs:
    """A decoder model's request inputs: `draw(rng, n)` gives n token rows (int64 [T], T in
    [1, the model's max_sequence_length]); `task` names the zoo task (None: uniform tokens)."""

    task: str | None
    description: str
    draw: Callable[[np.random.Generator, int], list[np.ndarray]]


@dataclass(frozen=True)
class _Task:
    name: str
    source_vocab: int
    target_vocab: int
    description: str
    sample: Callable[[np.random.Generator, int], list[list[int]]]  # n rows, some maybe too long


def _reverse_rows(rng: np.random.Generator, n: int) -> list[list[int]]:
    from cellserve.graph.zoo import seq2seq

    return [seq2seq.encode_digits(s) for s in seq2seq.reverse_task(rng, n)[0]]


def _date_rows(rng: np.random.Generator, n: int) -> list[list[int]]:
    from cellserve.graph.zoo import dates

    return [dates.encode_source(s) for s in dates.date_task(rng, n)[0]]


def _tasks() -> list[_Task]:
    from cellserve.graph.zoo import dates, seq2seq

    return [
        _Task("reverse-digits", seq2seq.VOCAB, seq2seq.VOCAB,
              f"digit strings of 1-{seq2seq.MAX_INPUT_DIGITS} digits, length uniform (seq2seq.reverse_task, "
              "what the reverser was trained on): outputs as long as the inputs", _reverse_rows),
        _Task("dates", dates.SOURCE_VOCAB, dates.TARGET_VOCAB,
              "dates written in the zoo's formats, with its typo rate (dates.date_task, what the dates model "
              "was trained on): outputs are ISO dates", _date_rows),
    ]


def decoder_of(model: Model) -> GraphDecoder | None:
    """The model's decoder-step graph (the first, should it have several), or None."""
    return next((s for s in model.program if isinstance(s, GraphDecoder)), None)


def decoder_inputs(model: Model) -> DecoderInputs:
    """The inputs `bench engine` sends `model`, which must have a decoder-step graph and one
    token input (InvalidInput naming the model otherwise)."""
    decoder = decoder_of(model)
    if decoder is None:
        raise InvalidInput(f"model {model.name!r} has no decoder-step graph")
    if len(model.inputs) != 1:
        raise InvalidInput(f"bench engine drives an encoder-decoder through one token input; model {model.name!r} "
                           f"has inputs {', '.join(t.name for t in model.inputs)}")
    name = model.inputs[0].name
    vocab = model.semantics[name].vocab if name in model.semantics else None
    longest = model.max_sequence_length
    for task in _tasks():
        if (vocab, decoder.vocab) == (task.source_vocab, task.target_vocab):
            return DecoderInputs(task.name, task.description, _fitting(task, longest))
    if not vocab:
        raise InvalidInput(f"model {model.name!r}: input {name!r} has no known vocabulary to draw token ids from")
    top = min(longest, UNIFORM_MAX_LENGTH)

    def uniform(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        lengths = rng.integers(1, top + 1, size=n)
        return [rng.integers(1 if vocab > 1 else 0, vocab, size=int(k), dtype=np.int64) for k in lengths]

    return DecoderInputs(None, f"no zoo task has this model's vocabularies ({vocab} in, {decoder.vocab} out): "
                               f"uniform token ids in [1, {vocab}), length uniform in [1, {top}]; not the "
                               "model's real input distribution", uniform)


def _fitting(task: _Task, longest: int) -> Callable[[np.random.Generator, int], list[np.ndarray]]:
    """The task's rows that the model takes (1 to `longest` tokens), drawn until there are n."""

    def draw(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        rows: list[np.ndarray] = []
        for _ in range(_MAX_DRAWS):
            rows += [np.asarray(r, np.int64) for r in task.sample(rng, n - len(rows)) if 1 <= len(r) <= longest]
            if len(rows) == n:
                return rows
        raise InvalidInput(f"task {task.name!r}: too few of its inputs fit the model's max_sequence_length "
                           f"{longest}")

    return draw


def allow_beam_width(model: Model, width: int) -> int:
    """Let the model's decoder take requests of beam width `width`: if its spec's
    max_beam_width is lower, raise it to `width` (the spec's search and everything else stay
    as they were; a server would take the same from the model's config). Returns the spec's
    max_beam_width as it was. InvalidInput when the model has no decoder or width < 1."""
    decoder = decoder_of(model)
    if decoder is None:
        raise InvalidInput(f"beam width {width} needs an encoder-decoder; model {model.name!r} has no decoder-step graph")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise InvalidInput(f"beam width must be an integer >= 1, got {width!r}")
    configured = decoder.spec.max_beam_width
    if width > configured:
        decoder.spec = dataclasses.replace(decoder.spec, max_beam_width=width)
    return configured


@dataclass(frozen=True)
class Workload:
    """What every request of a run is: its token rows (`inputs`; None: WMT-like rows over
    the vocabulary) and the beam width it asks (None: none sent, as for classifiers);
    `decoder`: the report's description of an encoder-decoder's workload (None: not one)."""

    inputs: InputSampler | None = None
    beam_width: int | None = None
    decoder: dict | None = None


def workload(model: Model, beam_width: int) -> Workload:
    """The workload of `model` at `beam_width`. An encoder-decoder's spec is let take the
    width (allow_beam_width); any other model takes only width 1 (InvalidInput otherwise)."""
    decoder = decoder_of(model)
    if decoder is None:
        if beam_width != 1:
            raise InvalidInput(f"--beam-width {beam_width} needs an encoder-decoder; model {model.name!r} has no "
                               "decoder-step graph")
        return Workload()
    configured = allow_beam_width(model, beam_width)
    inputs = decoder_inputs(model)
    return Workload(inputs.draw, beam_width, {
        "cell_type": f"{model.name}/{decoder.name}", "task": inputs.task, "inputs": inputs.description,
        "max_length": asdict(decoder.spec.max_length), "length_penalty": decoder.spec.length_penalty,
        # the spec's own limit, and the one the bench served with (raised to the width asked)
        "max_beam_width_configured": configured, "max_beam_width_served": decoder.spec.max_beam_width})


def lengths(model: Model, answers: list, light_trace: list) -> dict:
    """An encoder-decoder's input lengths (of the light-load trace) and output lengths (of the
    capacity bursts' answers: tokens in each best hypothesis), as min / mean / max."""
    out_name = decoder_of(model).output
    out = [int(r.outputs[out_name].shape[1]) for r in answers if out_name in r.outputs]
    ins = [int(t.sequence.size) for t in light_trace]

    def spread(xs: list[int]) -> dict:
        return {"min": min(xs), "mean": float(np.mean(xs)), "max": max(xs)} if xs else {}

    return {"input_tokens": spread(ins), "output_tokens": spread(out)}
