"""Variant families: trained models of one task at several sizes, with measured accuracy.

Accuracy scaling (docs/accuracy-scaling.md, Proteus) serves a *family* under one name and
chooses per device which *variant* runs: bigger variants are more accurate and cost more.
This module is the zoo's list of them: family name -> variants, each with its weights file,
how it was trained (train_variants.py reproduces the weights from these fields) and the
accuracy measured on fresh inputs.

The family (one so far):

- `reverse`: the digit reverser (seq2seq.py, the same architecture and training loop as the
  zoo's `seq2seq-reverse`) at three widths. Accuracy = greedy exact match on strings of 1-12
  uniform random digits. Inputs are uniform random strings, so any set drawn from a stream
  other than training's is fresh with overwhelming probability (10^12 strings of length 12).

Contracts:
- `ACCURACY_SEED` is the measurement's input stream (distinct from training's: train_seq2seq
  uses seed 0 for batches and [0, 1] for held-out checks); `VariantSpec.accuracy` is
  `measure(name, ACCURACY_INPUTS, ACCURACY_SEED)` of the checked-in weights, written by
  `train_variants.py --measure` (tests/plan/test_accuracy_families.py repeats it on another
  fresh stream and holds each variant to `floor`, and the order of the accuracies).
- Variant names are unique across families and are the names a server serves them under
  (`load(name)` -> the served graph Model, `name` as its model name).
- Every variant of a family takes the same inputs and gives the same outputs (it is what lets
  the server answer a family's request with any of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_DIR = Path(__file__).parent / "weights"
ACCURACY_SEED = 2024_12_02
ACCURACY_INPUTS = 4000


@dataclass(frozen=True)
class VariantSpec:
    """One trained variant. `accuracy`: measured (see the module's contract); `floor`: what
    the test holds it to on other fresh inputs (accuracy less about four standard errors of a
    1000-input measurement, so that a correct model does not fail by chance)."""

    name: str
    family: str
    weights: str  # file name under WEIGHTS_DIR
    embed: int
    hidden: int
    steps: int  # teacher-forced training steps (train_seq2seq's defaults otherwise: batch 128, lr 3e-3)
    seed: int
    accuracy: float
    floor: float

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.weights


@dataclass(frozen=True)
class FamilySpec:
    name: str
    task: str  # what the accuracy measures
    variants: tuple[VariantSpec, ...]  # by size, smallest first

    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]


def _reverse(hidden: int, embed: int, steps: int, accuracy: float, floor: float) -> VariantSpec:
    return VariantSpec(f"reverse-h{hidden}", "reverse", f"reverse_h{hidden}.npz", embed, hidden, steps, 0,
                       accuracy, floor)


# One training budget (600 steps of 128) for all three, so that width alone sets the accuracy,
# and they differ materially (a family whose variants were all ~99% would leave the planner
# nothing to trade); each trains in under a minute on one core of the 2-core VM.
FAMILIES: dict[str, FamilySpec] = {
    "reverse": FamilySpec("reverse", "greedy exact match reversing 1-12 random digits", (
        _reverse(16, 16, 600, accuracy=0.5357, floor=0.47),
        _reverse(32, 32, 600, accuracy=0.9605, floor=0.935),
        _reverse(128, 32, 600, accuracy=1.0, floor=0.99),
    )),
}

VARIANTS: dict[str, VariantSpec] = {v.name: v for f in FAMILIES.values() for v in f.variants}


def variant(name: str) -> VariantSpec:
    """The spec of a variant; KeyError naming the known ones."""
    if name not in VARIANTS:
        raise KeyError(f"no variant {name!r}; the families' variants are {', '.join(VARIANTS)}")
    return VARIANTS[name]


def family_of(name: str) -> FamilySpec:
    return FAMILIES[variant(name).family]


def families_of(models: list[str]) -> dict[str, list[str]]:
    """The families formed by these model names: family -> its variants among them (in the
    family's order), for every family with at least one. Names that are no variant are left out."""
    out: dict[str, list[str]] = {}
    for f in FAMILIES.values():
        got = [v for v in f.variant_names() if v in models]
        if got:
            out[f.name] = got
    return out


def load_reference(name: str):
    """The variant's PyTorch module (seq2seq.Seq2SeqAttention), trained weights, eval mode."""
    from cellserve.graph.zoo import seq2seq

    return seq2seq.load_trained(variant(name).path)


def load(name: str):
    """The variant as a served graph Model named `name` (the zoo's seq2seq path)."""
    from cellserve.graph import zoo

    return zoo._seq2seq_model(name, load_reference(name))


def measure(name: str, inputs: int, seed) -> float:
    """Exact-match accuracy of the variant on `inputs` random strings from `seed`'s stream."""
    import torch

    from cellserve.graph.zoo.seq2seq import MAX_INPUT_DIGITS, reverse_task

    srcs, tgts = reverse_task(np.random.default_rng(seed), inputs, 1, MAX_INPUT_DIGITS)
    with torch.no_grad():
        outs = batched_greedy(load_reference(name), srcs)
    return sum(o == t for o, t in zip(outs, tgts)) / inputs


def batched_greedy(model, srcs: list[str], chunk: int = 500) -> list[str]:
    """Greedy decodes of many digit strings at once: the same answers as seq2seq.greedy_decode
    one by one (same steps, same argmax, each row stopping at its EOS; a test checks they
    agree), in batches of `chunk` so that measuring thousands takes a second, not a minute."""
    import torch

    from cellserve.graph.zoo.seq2seq import (BOS, EOS, MAX_INPUT_DIGITS, PAD, decode_digits, encode_digits)

    out: list[str] = []
    for i in range(0, len(srcs), chunk):
        part = [encode_digits(s) for s in srcs[i:i + chunk]]
        lens = torch.tensor([len(p) for p in part])
        src = torch.full((len(part), int(lens.max())), PAD, dtype=torch.long)
        for r, p in enumerate(part):
            src[r, :len(p)] = torch.tensor(p)
        enc_out, state = model.encode(src, lens)
        mask = torch.arange(src.shape[1])[None, :] < lens[:, None]
        prev = torch.full((len(part),), BOS, dtype=torch.long)
        done = torch.zeros(len(part), dtype=torch.bool)
        rows: list[list[int]] = [[] for _ in part]
        for _ in range(MAX_INPUT_DIGITS + 1):
            logits, state = model.step(prev, state, enc_out, mask)
            prev = logits.argmax(dim=-1)
            for r in torch.nonzero(~done).flatten().tolist():
                if int(prev[r]) == EOS:
                    done[r] = True
                else:
                    rows[r].append(int(prev[r]))
            if bool(done.all()):
                break
        # an id that is no digit (BOS/PAD emitted) makes the answer wrong, not an exception
        out += [decode_digits(r) if all(t >= 3 for t in r) else "?" for r in rows]
    return out
