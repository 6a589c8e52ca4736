"""A model's text vocabularies, published as model-config parameters so that a client on
another machine can turn text into the model's token ids and its output ids back into text.

The format (docs/zoo_dates.md, "The vocabulary over the protocol"): four string parameters of
the model's configuration (Triton's model configuration extension: HTTP
`GET /v2/models/{m}/config`, gRPC `ModelConfig`; `parameters` as `{key: {"string_value": ...}}`):

    text.input             the input tensor that takes text, int64 [batch, time]
    text.input_vocabulary  a JSON array: entry i is the text of token id i, null for ids no
                           text maps to (e.g. padding); one character per entry
    text.output            the output tensor that holds token ids, int64 [batch, length]
    text.output_vocabulary a JSON array as above; null for the ids that are not text
                           (padding, begin- and end-of-sequence)

Tokens are characters: each character of the text is one input id. An output row's text is
its ids' entries up to its first id whose entry is null (the end-of-sequence id, or the
padding that fills rows after their last token). Nothing here imports torch or the zoo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

INPUT, INPUT_VOCABULARY = "text.input", "text.input_vocabulary"
OUTPUT, OUTPUT_VOCABULARY = "text.output", "text.output_vocabulary"
KEYS = (INPUT, INPUT_VOCABULARY, OUTPUT, OUTPUT_VOCABULARY)


class VocabularyError(ValueError):
    """Published parameters that do not make a vocabulary, or text/ids outside it."""


@dataclass(frozen=True)
class TextVocabulary:
    """What a model publishes about its text: which tensors, and id <-> text both ways.

    `input_tokens[i]` / `output_tokens[i]`: the text of id i, or None for an id that is not
    text. Input entries are single characters, unique among themselves."""

    input: str
    input_tokens: tuple[str | None, ...]
    output: str
    output_tokens: tuple[str | None, ...]

    def __post_init__(self) -> None:
        for key, name in ((INPUT, self.input), (OUTPUT, self.output)):
            if not isinstance(name, str) or not name:
                raise VocabularyError(f"{key} must name a tensor, got {name!r}")
        for key, tokens in ((INPUT_VOCABULARY, self.input_tokens), (OUTPUT_VOCABULARY, self.output_tokens)):
            for i, token in enumerate(tokens):
                if token is not None and (not isinstance(token, str) or not token):
                    raise VocabularyError(f"{key} entry {i} must be a non-empty string or null, got {token!r}")
        seen: dict[str, int] = {}
        for i, token in enumerate(self.input_tokens):
            if token is None:
                continue
            if len(token) != 1:
                raise VocabularyError(f"{INPUT_VOCABULARY} entry {i} is {token!r}: input tokens are single characters")
            if token in seen:
                raise VocabularyError(f"{INPUT_VOCABULARY} has {token!r} twice (ids {seen[token]} and {i})")
            seen[token] = i

    # ---- as parameters ----

    def to_parameters(self) -> dict[str, str]:
        return {INPUT: self.input, INPUT_VOCABULARY: json.dumps(list(self.input_tokens), ensure_ascii=False),
                OUTPUT: self.output, OUTPUT_VOCABULARY: json.dumps(list(self.output_tokens), ensure_ascii=False)}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "TextVocabulary | None":
        """The vocabulary in a model's parameters (string values), or None when it publishes
        none of the keys. Raises VocabularyError naming the key when some are missing or bad."""
        present = [k for k in KEYS if k in parameters]
        if not present:
            return None
        missing = [k for k in KEYS if k not in parameters]
        if missing:
            raise VocabularyError(f"the model publishes {', '.join(present)} but not {', '.join(missing)}")
        return cls(parameters[INPUT], _tokens(parameters, INPUT_VOCABULARY), parameters[OUTPUT],
                   _tokens(parameters, OUTPUT_VOCABULARY))

    # ---- text <-> ids ----

    def encode(self, text: str) -> list[int]:
        """Text -> input ids, one a character. Raises VocabularyError naming the first character
        outside the vocabulary and its position (0 first), or saying that the text is empty."""
        if not text:
            raise VocabularyError("the text is empty")
        ids = {token: i for i, token in enumerate(self.input_tokens) if token is not None}
        for position, ch in enumerate(text):
            if ch not in ids:
                raise VocabularyError(f"character {ch!r} at position {position} of {text!r} is not in the "
                                      f"vocabulary of input {self.input!r}")
        return [ids[ch] for ch in text]

    def decode(self, ids) -> str:
        """One output row's ids -> its text, up to the first id that is not text. Raises
        VocabularyError naming an id outside the vocabulary."""
        out = []
        for i in map(int, ids):
            if not 0 <= i < len(self.output_tokens):
                raise VocabularyError(f"output id {i} is outside the vocabulary of {self.output!r} "
                                      f"(0..{len(self.output_tokens) - 1})")
            token = self.output_tokens[i]
            if token is None:
                break
            out.append(token)
        return "".join(out)


def _tokens(parameters: dict[str, str], key: str) -> tuple[str | None, ...]:
    try:
        value = json.loads(parameters[key])
    except (TypeError, json.JSONDecodeError) as exc:
        raise VocabularyError(f"{key} is not valid JSON: {exc}") from None
    if not isinstance(value, list) or not value:
        raise VocabularyError(f"{key} must be a non-empty JSON array of strings and nulls, got {str(value)[:80]}")
    return tuple(value)
