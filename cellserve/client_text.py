"""`cellserve infer`'s text path for models that publish a text vocabulary (cellserve/text_vocab.py):
the vocabulary read from the server's model configuration, the text encoded with it, and the
answer (and, with --return-beams, every beam and its score) decoded back to text.

The vocabulary always comes from the server (`get_model_config`), never from a local import
of the zoo: the client may be on another machine, serving a model it has no copy of.
"""

from __future__ import annotations

import numpy as np

from cellserve.text_vocab import TextVocabulary, VocabularyError

# the beams' extra outputs (engine/beam.py's beam_output_names): <output>_beams, <output>_beam_scores
BEAMS_SUFFIX, SCORES_SUFFIX = "_beams", "_beam_scores"


class PublishedVocabularyError(Exception):
    """The server published a vocabulary that cannot be used (a server-side fault: exit 1)."""


def published_vocabulary(config: dict | None, metadata: dict) -> TextVocabulary | None:
    """The vocabulary in a ModelConfig (its JSON form, as either protocol's client gives it),
    or None when the model publishes none (or config is None: the server has no config).
    Raises PublishedVocabularyError naming what is wrong with a published one."""
    if not config:
        return None
    parameters = {key: (value or {}).get("string_value", "") for key, value in config.get("parameters", {}).items()}
    name = metadata["name"]
    try:
        vocab = TextVocabulary.from_parameters(parameters)
    except VocabularyError as exc:
        raise PublishedVocabularyError(f"model {name!r} publishes a text vocabulary that cannot be used: {exc}") \
            from None
    if vocab is None:
        return None
    inputs = {t["name"]: t for t in metadata["inputs"]}
    outputs = {t["name"] for t in metadata.get("outputs", [])}
    if vocab.input not in inputs or vocab.output not in outputs:
        raise PublishedVocabularyError(f"model {name!r} publishes text.input {vocab.input!r} and text.output "
                                       f"{vocab.output!r}; its inputs are {sorted(inputs)}, outputs {sorted(outputs)}")
    return vocab


def text_inputs(vocab: TextVocabulary, text: str, metadata: dict, np_dtype) -> dict[str, np.ndarray]:
    """The request's input: the text's ids as one row [1, characters]. Raises VocabularyError
    naming a character outside the vocabulary and its position."""
    spec = next(t for t in metadata["inputs"] if t["name"] == vocab.input)
    ids = vocab.encode(text)
    array = np.array([ids] if len(spec["shape"]) == 2 else ids)
    return {vocab.input: array.astype(np_dtype(spec["datatype"]))}


def format_text(vocab: TextVocabulary, outputs: dict[str, np.ndarray]) -> list[str]:
    """Each row's answer as text; after it, when the response has the beams, one line per beam:
    `beam <rank>  <text>  score <score>` (a beam of score -inf, where a row had fewer than k
    hypotheses, is left out). Other outputs are not printed."""
    best = np.atleast_2d(np.asarray(outputs[vocab.output]))
    beams = outputs.get(vocab.output + BEAMS_SUFFIX)
    scores = outputs.get(vocab.output + SCORES_SUFFIX)
    lines = []
    for row, ids in enumerate(best):
        prefix = f"[{row}] " if len(best) > 1 else ""
        lines.append(prefix + _decode(vocab, ids))
        if beams is None or scores is None:
            continue
        for rank, (hyp, score) in enumerate(zip(np.asarray(beams)[row], np.asarray(scores)[row]), start=1):
            if np.isneginf(score):
                continue
            lines.append(f"{prefix}beam {rank}  {_decode(vocab, hyp)}  score {float(score):.4f}")
    return lines


def _decode(vocab: TextVocabulary, ids) -> str:
    try:
        return vocab.decode(ids)
    except VocabularyError as exc:
        raise PublishedVocabularyError(f"the answer cannot be read with the published vocabulary: {exc}") from None
