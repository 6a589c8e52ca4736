"""Typed settings: dataclass fields that carry their own help, bounds and flag, validated once.

A settings class is a dataclass whose fields are declared with `setting(...)` and whose
`__post_init__` calls `check(self)`. A field whose type is itself such a dataclass is a
*section* (a TOML table, e.g. `[engine]`); its keys are named `section.key`. Everything that
presents settings is derived from these declarations: the command-line flags
(cellserve/config_args.py), the config file's keys and types (`from_mapping`), and the TOML
the server prints (`to_toml`). Adding a field with `setting(...)` is all it takes to make it
reachable from all three.

Contracts:
- Supported field types: bool, int, float, str, Path, each optionally `| None`, and
  `list[str]`. `leaves(cls)` raises TypeError for any other type, naming the field.
- `check(obj)` raises ConfigError listing every field whose value has the wrong type or is out
  of its declared bounds or choices (and the class's own cross-field rules, from an optional
  `_problems(self)` method); nothing is constructed half-valid.
- A Problem names its key; `Problem.render(namer)` puts the name a user knows in front of it
  (a flag for the command line, `file: key` for a config file).
- stdlib only: importing this module, or a settings class built on it, imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NO_DEFAULT = dataclasses.MISSING


def setting(default: Any = _NO_DEFAULT, help: str = "", *, default_factory: Callable[[], Any] | None = None,
            flag: str | None = None, aliases: tuple[str, ...] = (), group: str | None = None,
            unset: str | None = None, ge: float | None = None, gt: float | None = None, le: float | None = None,
            choices: tuple[str, ...] | None = None, check: Callable[[Any], str | None] | None = None,
            metavar: str | None = None, const: Any = None,
            paths: Callable[[Any, Callable[[Path], Path]], Any] | None = None, once: str | None = None) -> Any:
    """A dataclass field with what the CLI, the config file and validation need to know.

    help: one line for --help and the printed TOML. flag: the option's name (default
    `--field-name`). aliases: deprecated option names, still accepted with a warning. group:
    the --help section. unset: what None means, for the help's "(default: ...)". ge/gt/le,
    choices: bounds checked on every non-None value. check: value -> None, or the text after the
    name of what is wrong ("must be ..., got ..."). const: the flag's value may be left out, and is
    then this (`--ray` alone means `--ray local`). paths: for a setting whose value holds file
    paths inside it (value, f) -> the value with f applied to each path, so that a config file's
    relative paths are taken from its folder and printed ones are absolute, as a Path setting's.
    once: a flag that the command line may give only once (argparse takes the last), with why
    (Triton's --model-repository is repeatable; here a second one would drop the first).
    """
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "group": group, "unset": unset, "ge": ge,
            "gt": gt, "le": le, "choices": tuple(choices) if choices is not None else None, "check": check,
            "metavar": metavar, "const": const, "paths": paths, "once": once}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_PLACEHOLDER = re.compile(r"\{(name|\d+)\}")


def path_list(value: list[str], f: Callable[[Path], Path]) -> list[str]:
    """`paths` of a setting that is a list of file paths."""
    return [str(f(Path(v))) for v in value]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one setting.

    key: the setting's dotted key ("max_batch", "engine.max_batch"). text: a template whose
    `{name}` is replaced by the name a user knows it by, and `{0}`, `{1}`, ... by the names of the
    keys in `others` (for rules that involve several settings).
    """

    key: str
    text: str
    others: tuple[str, ...] = ()

    def render(self, namer: Callable[[str], str] = str) -> str:
        # only these placeholders: the text also quotes the user's value, which may hold braces
        names = {"name": namer(self.key), **{str(i): namer(k) for i, k in enumerate(self.others)}}
        return _PLACEHOLDER.sub(lambda m: names.get(m.group(1), m.group(0)), self.text)

    def within(self, section: str) -> Problem:
        return Problem(f"{section}.{self.key}", self.text, tuple(f"{section}.{k}" for k in self.others))


class ConfigError(ValueError):
    """Settings that cannot be used; `problems` lists each, its key first."""

    def __init__(self, problems: list[Problem], what: str = "settings"):
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(p.render() for p in self.problems))


@dataclass(frozen=True)
class Leaf:
    """One setting as the outside sees it: its dotted key, type and declaration."""

    key: str
    field: dataclasses.Field
    base: type  # bool, int, float, str or Path
    optional: bool  # None allowed
    is_list: bool  # list[base]
    owner: type  # the dataclass declaring it

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def default(self) -> Any:
        if self.field.default_factory is not _NO_DEFAULT:
            return self.field.default_factory()
        return self.field.default

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def help(self) -> str:
        return self.meta.get("help", "")

    def type_name(self) -> str:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                Path: "a path (a string)"}[self.base]
        if self.is_list:
            name = {str: "a list of strings"}.get(self.base, f"a list of {name}")
        return name


_BASES = (bool, int, float, str, Path)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def sections(cls: type) -> dict[str, type]:
    """The fields of cls that are sections: name -> settings class."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if is_section(hints[f.name])}


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every setting of cls, sections' settings included (in declaration order)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            out += leaves(tp, f"{prefix}{f.name}.")
            continue
        base, optional, is_list = _unpack(tp, f"{cls.__name__}.{f.name}")
        out.append(Leaf(prefix + f.name, f, base, optional, is_list, cls))
    return out


def _unpack(tp: Any, where: str) -> tuple[type, bool, bool]:
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            optional, tp = True, rest[0]
    if typing.get_origin(tp) is list and len(typing.get_args(tp)) == 1 and typing.get_args(tp)[0] is str:
        return str, optional, True
    if tp in _BASES:
        return tp, optional, False
    raise TypeError(f"setting {where}: type {tp!r} is not supported (bool, int, float, str, Path, "
                    "optionally | None, or list[str])")


def coerce(leaf: Leaf, value: Any) -> tuple[Any, Problem | None]:
    """value as leaf's type (an int for a float, a string for a Path), or a Problem naming the type."""
    if value is None:
        if leaf.optional:
            return None, None
        return value, Problem(leaf.key, f"{{name}} must be {leaf.type_name()}, got nothing (null)")
    if leaf.is_list:
        if isinstance(value, (list, tuple)) and all(_is(leaf.base, v) for v in value):
            return [_convert(leaf.base, v) for v in value], None
    elif _is(leaf.base, value):
        return _convert(leaf.base, value), None
    return value, Problem(leaf.key, f"{{name}} must be {leaf.type_name()}, got {_show(value)} "
                                    f"({_kind_of(value)})")


def _is(base: type, value: Any) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is Path:
        return isinstance(value, (str, Path))
    return isinstance(value, base)


def _convert(base: type, value: Any) -> Any:
    return float(value) if base is float else Path(value) if base is Path else value


def _kind_of(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    return repr(value)


def _bounds_text(meta: Mapping[str, Any]) -> str | None:
    lo = ("(", meta["gt"]) if meta.get("gt") is not None else ("[", meta["ge"]) if meta.get("ge") is not None else None
    hi = meta.get("le")
    if lo and hi is not None:
        return f"must be in {lo[0]}{lo[1]:g}, {hi:g}]"
    if lo:
        return f"must be {'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    if hi is not None:
        return f"must be <= {hi:g}"
    return None


def value_problems(leaf: Leaf, value: Any) -> list[Problem]:
    """Type, bounds, choices and the field's own check, for one value."""
    _, wrong = coerce(leaf, value)
    if wrong:
        return [wrong]
    if value is None:
        return []
    meta = leaf.meta
    if meta.get("choices") is not None and value not in meta["choices"]:
        return [Problem(leaf.key, f"{{name}} {_show(value)} is not one of {', '.join(meta['choices'])}")]
    if not leaf.is_list and leaf.base in (int, float):
        ok = ((meta.get("ge") is None or value >= meta["ge"]) and (meta.get("gt") is None or value > meta["gt"])
              and (meta.get("le") is None or value <= meta["le"]) and not math.isnan(value))
        if not ok:
            shown = value if leaf.base is int else f"{value:g}"
            return [Problem(leaf.key, f"{{name}} {_bounds_text(meta)}, got {shown}")]
        if math.isinf(value) and _bounds_text(meta):  # a bounded setting is a real number: inf is no setting
            bounds = _bounds_text(meta).removeprefix("must be ")
            return [Problem(leaf.key, f"{{name}} must be a finite number {bounds}, got {value:g}")]
    if meta.get("check") is not None:
        text = meta["check"](value)
        if text:
            return [Problem(leaf.key, "{name} " + text)]
    return []


def problems(obj: Any) -> list[Problem]:
    """Everything wrong with obj's own settings (not its sections': they checked themselves)."""
    out = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if is_section(hints[f.name]):
            if not isinstance(getattr(obj, f.name), hints[f.name]):
                out.append(Problem(f.name, f"{{name}} must be a {hints[f.name].__name__}"))
            continue
        base, optional, is_list = _unpack(hints[f.name], f"{type(obj).__name__}.{f.name}")
        out += value_problems(Leaf(f.name, f, base, optional, is_list, type(obj)), getattr(obj, f.name))
    rules = getattr(obj, "_problems", None)
    if not out and rules is not None:  # cross-field rules assume each field is valid
        out += rules()
    return out


def check(obj: Any) -> None:
    """Raise ConfigError if anything is wrong with obj; call from __post_init__."""
    found = problems(obj)
    if found:
        raise ConfigError(found, type(obj).__name__)


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[Problem]]:
    """Read a config file's table for cls: {dotted key: value} of what it sets, and what is wrong.

    Unknown keys are problems (with the closest known key as a hint); values are checked
    against each key's type (ints are accepted for numbers, strings for paths), not yet against
    bounds: `build` does that, with every other source merged in.
    """
    found: list[Problem] = []
    values: dict[str, Any] = {}
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            named = _keys_by_flag(fields.values()).get(str(key))
            if named is not None:  # the flag's name written as a key
                hint = f" (the key of {_flag_of(fields[named])} is {prefix}{named})"
            for name, sub in sections(cls).items():
                sub_fields = dataclasses.fields(sub)
                if key in {f.name for f in sub_fields}:
                    hint = f" here (it belongs in the [{prefix}{name}] table)"
                elif str(key) in _keys_by_flag(sub_fields):
                    named = _keys_by_flag(sub_fields)[str(key)]
                    flag = _flag_of(next(f for f in sub_fields if f.name == named))
                    hint = f" (the key of {flag} is {named}, in the [{prefix}{name}] table)"
            found.append(Problem(dotted, "{name}: unknown key" + hint))
            continue
        tp = hints[key]
        if is_section(tp):
            if not isinstance(value, Mapping):
                found.append(Problem(dotted, f"{{name}} must be a table ([{dotted}]), got {_kind_of(value)}"))
                continue
            sub, more = from_mapping(tp, value, dotted + ".")
            values.update(sub)
            found += more
            continue
        base, optional, is_list = _unpack(tp, f"{cls.__name__}.{key}")
        converted, wrong = coerce(Leaf(dotted, fields[key], base, optional, is_list, cls), value)
        if wrong:
            found.append(wrong)
        else:
            values[dotted] = converted
    return values, found


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """cls from {dotted key: value} (missing keys keep their defaults); ConfigError lists every problem."""
    found: list[Problem] = []
    kwargs: dict[str, Any] = {}
    secs = sections(cls)
    for name, sub in secs.items():
        inner = {k[len(name) + 1:]: v for k, v in values.items() if k.startswith(name + ".")}
        try:
            kwargs[name] = build(sub, inner)
        except ConfigError as exc:
            found += [p.within(name) for p in exc.problems]
            kwargs[name] = sub()
    kwargs.update({k: v for k, v in values.items() if "." not in k})
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        found += exc.problems
    if found:
        raise ConfigError(found, cls.__name__)
    return obj


def _flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _keys_by_flag(fields) -> dict[str, str]:
    """A setting's key by its flag's name written as a key (--max-inflight: max_inflight), for
    the settings whose flag is named otherwise than their key."""
    out = {}
    for f in fields:
        as_key = _flag_of(f).lstrip("-").replace("-", "_")
        if as_key != f.name:
            out[as_key] = f.name
    return out


def to_toml(obj: Any) -> str:
    """obj's settings as a TOML document that `from_mapping` reads back to the same settings.

    Each key is preceded by its help as a comment; a setting left unset (None) is written as a
    comment, since TOML has no null.
    """
    lines: list[str] = []
    _toml_table(obj, lines)
    return "\n".join(lines).rstrip() + "\n"


def _toml_table(obj: Any, lines: list[str], prefix: str = "") -> None:
    hints = _hints(type(obj))
    later = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_section(hints[f.name]):
            later.append((f.name, value))
            continue
        lines.append(f"# {f.metadata.get('help') or '(undocumented)'} ({_flag_of(f)})")
        if value is None:
            unset = f.metadata.get("unset")
            lines.append(f"# {f.name} =  (unset{': ' + unset if unset else ''})")
        else:
            if f.metadata.get("paths") is not None:  # read back from the file's folder: absolute
                value = f.metadata["paths"](value, Path.absolute)
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, value in later:
        lines += ["", f"[{prefix}{name}]"]
        _toml_table(value, lines, f"{prefix}{name}.")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return ("-" if value < 0 else "") + ("inf" if math.isinf(value) else "nan")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Path):  # a file read back takes relative paths from its own directory
        value = value.absolute()
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def load_file(path: Path) -> dict[str, Any]:
    """A config file's contents (TOML); OSError or ValueError with the reason when it cannot be read."""
    import tomllib

    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not valid TOML: {exc}") from exc
