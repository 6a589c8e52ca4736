"""How an encoder-decoder decodes: which tensors connect the encoder, the decoder-step graph
and the engine, and when a lane stops (see docs/decoders.md and the decoder-step contract).

`DecodeSpec` is plain data: it round-trips through JSON (`to_dict` / `from_dict`) and through
the string `parameters` of a Triton config.pbtxt (`from_parameters` / `to_parameters`, keys
prefixed `decode.`). Every reader validates and names the field and value that are wrong
(`DecodeSpecError`, a ModelLoadError). Checks against the graphs themselves (missing tensors,
shapes, EOS inside the vocabulary) are the importer's (graph/seq2seq_import.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cellserve.errors import ModelLoadError

PARAMETER_PREFIX = "decode."


class DecodeSpecError(ModelLoadError):
    """A decode specification that cannot be used; the message names the field."""


@dataclass(frozen=True)
class MaxLength:
    """A lane's most tokens: `absolute` if set, else ceil(ratio * S + constant) for a source of
    S positions (at least 1 either way)."""

    absolute: int | None = None
    ratio: float = 0.0
    constant: int = 0

    def __post_init__(self) -> None:
        if self.absolute is not None:
            if isinstance(self.absolute, bool) or not isinstance(self.absolute, int) or self.absolute < 1:
                raise DecodeSpecError(f"decode spec: max_length must be a positive integer, got {self.absolute!r}")
            if self.ratio or self.constant:
                raise DecodeSpecError("decode spec: give max_length, or max_length_ratio with "
                                      "max_length_constant, not both")
            return
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and self.ratio >= 0):
            raise DecodeSpecError(f"decode spec: max_length_ratio must be a finite number >= 0, got {self.ratio!r}")
        if isinstance(self.constant, bool) or not isinstance(self.constant, int):
            raise DecodeSpecError(f"decode spec: max_length_constant must be an integer, got {self.constant!r}")
        if self.ratio == 0 and self.constant < 1:
            raise DecodeSpecError("decode spec: no maximum length: give max_length, or max_length_ratio / "
                                  "max_length_constant with a positive result")

    def limit(self, source_length: int) -> int:
        if self.absolute is not None:
            return self.absolute
        return max(1, math.ceil(self.ratio * source_length + self.constant))


@dataclass(frozen=True)
class DecodeSpec:
    """The decode specification of an encoder-decoder (names are the graphs' tensor names).

    memory: the encoder output holding the attention memory [B, S, M]; memory_length: an
    encoder input or output [B] giving each row's S ("" : every row is the full S).
    init: (decoder state input, encoder output [B, D]) pairs: where each state starts.
    states: (state input, state output) pairs of the decoder-step graph, in one order.
    token_input / memory_input / mask_input / logits_output: the step graph's other tensors.
    bos, eos, pad: token ids (bos and eos inside the vocabulary: checked at import).
    beam_width, max_beam_width, length_penalty: the search (width 1 is greedy; the only one
    served yet). output / scores_output: the response tensors (tokens int64 [B, L] padded
    with `pad`; the score output is optional, "" for none).
    """

    memory: str
    states: tuple[tuple[str, str], ...]
    init: tuple[tuple[str, str], ...]
    bos: int
    eos: int
    max_length: MaxLength
    output: str
    pad: int = 0
    memory_length: str = ""
    token_input: str = "token"
    memory_input: str = "memory"
    mask_input: str = "memory_mask"
    logits_output: str = "logits"
    beam_width: int = 1
    max_beam_width: int = 1
    length_penalty: float = 0.0
    scores_output: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(tuple(p) for p in self.states))
        object.__setattr__(self, "init", tuple(tuple(p) for p in self.init))
        for key in ("memory", "output", "token_input", "memory_input", "mask_input", "logits_output"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise DecodeSpecError(f"decode spec: {key} must be a non-empty tensor name, got {value!r}")
        for key in ("memory_length", "scores_output"):
            if not isinstance(getattr(self, key), str):
                raise DecodeSpecError(f"decode spec: {key} must be a tensor name or empty, got {getattr(self, key)!r}")
        for key in ("bos", "eos", "pad", "beam_width", "max_beam_width"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if "beam" in key else 0):
                least = 1 if "beam" in key else 0
                raise DecodeSpecError(f"decode spec: {key} must be an integer >= {least}, got {value!r}")
        if self.beam_width > self.max_beam_width:
            raise DecodeSpecError(f"decode spec: beam_width {self.beam_width} exceeds max_beam_width "
                                  f"{self.max_beam_width}")
        if not (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)
                and self.length_penalty >= 0):
            raise DecodeSpecError(f"decode spec: length_penalty must be a finite number >= 0, "
                                  f"got {self.length_penalty!r}")
        if not isinstance(self.max_length, MaxLength):
            raise DecodeSpecError(f"decode spec: max_length must be a MaxLength, got {self.max_length!r}")
        self._check_pairs()
        self._check_outputs()

    def _check_outputs(self) -> None:
        """The response's tensor names must not meet: a scores output named like the tokens
        output, or like a return_beams tensor, would overwrite it in the answer."""
        if not self.scores_output:
            return
        if self.scores_output == self.output:
            raise DecodeSpecError(f"decode spec: scores_output {self.scores_output!r} is also the output's name; "
                                  "name the scores otherwise")
        if self.scores_output in beam_output_names(self.output):
            raise DecodeSpecError(f"decode spec: scores_output {self.scores_output!r} is the name of a tensor "
                                  f"return_beams adds {list(beam_output_names(self.output))}; name the scores otherwise")

    def _check_pairs(self) -> None:
        if not self.states:
            raise DecodeSpecError("decode spec: states is empty; a decoder step needs at least one state")
        for what, pairs in (("states", self.states), ("init", self.init)):
            for pair in pairs:
                if len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
                    raise DecodeSpecError(f"decode spec: {what} entry {pair!r} must be two tensor names")
        inputs = [i for i, _ in self.states]
        outputs = [o for _, o in self.states]
        for what, names in (("state input", inputs), ("state output", outputs)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise DecodeSpecError(f"decode spec: {what} {dup[0]!r} is listed twice in states")
        fixed = {self.token_input, self.memory_input, self.mask_input}
        clash = sorted(fixed.intersection(inputs))
        if clash or len(fixed) < 3:
            raise DecodeSpecError(f"decode spec: token_input, memory_input, mask_input and the state inputs "
                                  f"must be distinct names ({clash or sorted(fixed)})")
        if self.logits_output in outputs:
            raise DecodeSpecError(f"decode spec: logits_output {self.logits_output!r} is also a state output")
        init_names = [s for s, _ in self.init]
        for s in init_names:
            if s not in inputs:
                raise DecodeSpecError(f"decode spec: init names {s!r}, which is not a state input "
                                      f"(state inputs: {inputs})")
        if len(set(init_names)) != len(init_names):
            raise DecodeSpecError(f"decode spec: init names a state twice ({init_names})")

    @property
    def state_inputs(self) -> list[str]:
        return [i for i, _ in self.states]

    @property
    def state_outputs(self) -> list[str]:
        return [o for _, o in self.states]

    def init_of(self, state_input: str) -> str:
        """The encoder output that initialises a state ("" : zeros)."""
        return dict(self.init).get(state_input, "")

    # ---- JSON ----

    def to_dict(self) -> dict:
        d = asdict(self)
        d["states"] = [list(p) for p in self.states]
        d["init"] = {s: e for s, e in self.init}
        ml = self.max_length
        d["max_length"] = ml.absolute
        d["max_length_ratio"], d["max_length_constant"] = ml.ratio, ml.constant
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DecodeSpec:
        if not isinstance(d, dict):
            raise DecodeSpecError(f"decode spec must be an object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__) | {"max_length_ratio", "max_length_constant"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DecodeSpecError(f"decode spec: unknown field {unknown[0]!r} (fields: {sorted(known)})")
        for key in ("memory", "states", "bos", "eos", "output"):
            if key not in d:
                raise DecodeSpecError(f"decode spec: missing field {key!r}")
        fields = dict(d)
        max_length = MaxLength(fields.pop("max_length", None), fields.pop("max_length_ratio", 0.0),
                               fields.pop("max_length_constant", 0))
        states, init = fields.pop("states"), fields.pop("init", {})
        if not isinstance(states, list):
            raise DecodeSpecError(f"decode spec: states must be a list of [input, output] pairs, got {states!r}")
        if not isinstance(init, dict):
            raise DecodeSpecError(f"decode spec: init must be an object {{state input: encoder output}}, got {init!r}")
        try:
            return cls(states=tuple(tuple(p) for p in states), init=tuple(init.items()),
                       max_length=max_length, **fields)
        except TypeError as exc:
            raise DecodeSpecError(f"decode spec: {exc}") from exc

    # ---- config.pbtxt parameters ----

    def to_parameters(self) -> dict[str, str]:
        """String parameters, as a config.pbtxt `parameters` block holds them."""
        out = {}
        for key, value in self.to_dict().items():
            if value is None or value == "" or (key in ("max_length_ratio", "max_length_constant") and not value):
                continue
            if key == "states":
                value = ",".join(f"{i}:{o}" for i, o in value)
            elif key == "init":
                value = ",".join(f"{s}:{e}" for s, e in value.items())
            out[PARAMETER_PREFIX + key] = str(value)
        return out

    @classmethod
    def from_parameters(cls, params: dict[str, str], where: str = "config.pbtxt") -> DecodeSpec:
        """Read the `decode.*` keys of a config's string parameters (others are ignored).
        Pairs are written `a:b,c:d`; numbers as decimal strings."""
        d: dict = {}
        for key, text in params.items():
            if not key.startswith(PARAMETER_PREFIX):
                continue
            field_name = key[len(PARAMETER_PREFIX):]
            d[field_name] = _parse_field(field_name, text, where)
        try:
            return cls.from_dict(d)
        except DecodeSpecError as exc:
            raise DecodeSpecError(f"{where}: parameters {exc}") from exc


_INTS = {"bos", "eos", "pad", "beam_width", "max_beam_width", "max_length", "max_length_constant"}
_FLOATS = {"length_penalty", "max_length_ratio"}


def _parse_field(name: str, text: str, where: str):
    key = PARAMETER_PREFIX + name
    if name in ("states", "init"):
        pairs = []
        for item in [p.strip() for p in text.split(",") if p.strip()]:
            parts = item.split(":")
            if len(parts) != 2 or not all(parts):
                raise DecodeSpecError(f"{where}: parameter {key!r}: {item!r} is not 'name:name'")
            pairs.append(parts)
        return pairs if name == "states" else dict(pairs)
    try:
        if name in _INTS:
            return int(text)
        if name in _FLOATS:
            return float(text)
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise DecodeSpecError(f"{where}: parameter {key!r} must be {kind}, got {text!r}") from None
    return text


def spec_fields() -> list[str]:
    """Every field a spec may hold (for documentation and error messages)."""
    return sorted(set(DecodeSpec.__dataclass_fields__) | {"max_length_ratio", "max_length_constant"})


__all__ = ["DecodeSpec", "DecodeSpecError", "MaxLength", "PARAMETER_PREFIX", "spec_fields"]


def beam_output_names(output: str) -> tuple[str, str]:
    """The extra response tensors a request asking return_beams gets: the k best token rows
    and their scores."""
    return f"{output}_beams", f"{output}_beam_scores"
