"""Command-line flags derived from a settings dataclass (see cellserve/config.py).

`add_flags(parser, cls)` adds one option per setting of cls (its sections' included), in
argument groups named by each setting's `group`, with the help and "(default: ...)" from its
declaration: booleans as --x/--no-x, list[str] settings as a repeatable flag, deprecated
aliases hidden from --help and warned about when used. No option has an argparse default:
`given(args)` returns only what the command line set, so that it can override a config file.
`flag_names(args)` says which spelling set each key, for error messages.

Contracts: the options' dests are "cfg:<dotted key>"; argparse itself rejects a value that
does not parse as the setting's type (naming the flag, exit 2); bounds are checked when the
settings are built (config.build), where the caller names the flag with `flag_names`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cellserve.config import Leaf, leaves

_PREFIX = "cfg:"
_GIVEN = "_cfg_flags"  # namespace attribute: {dotted key: the option string the user typed}


def _record(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    flags = getattr(namespace, _GIVEN, None)
    if flags is None:
        flags = {}
        setattr(namespace, _GIVEN, flags)
    flags[dest[len(_PREFIX):]] = option_string


class _Store(argparse.Action):
    once: str | None = None  # the setting's `once`: why a second value is refused

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, argparse.SUPPRESS)
        if self.once and before is not argparse.SUPPRESS and before != values:
            parser.error(f"{option_string} given twice ({before} and {values}): {self.once}")
        setattr(namespace, self.dest, values)
        _record(namespace, self.dest, option_string)


class _Append(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        _record(namespace, self.dest, option_string)


class _Bool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record(namespace, self.dest, option_string)


class _Deprecated(argparse.Action):
    """A hidden old name of a flag: warns on stderr, then sets what the new name sets."""

    def __init__(self, *args, new_name: str, store, **kwargs):
        self.new_name, self.store = new_name, store
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new_name}", file=sys.stderr)
        self.store(parser, namespace, values, option_string)


def _parse_type(leaf: Leaf):
    base = leaf.base
    return {int: int, float: float, str: str, Path: Path}[base]


def _default_text(leaf: Leaf) -> str:
    default = leaf.default
    if default is None or default == []:
        return leaf.meta.get("unset") or "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _help(leaf: Leaf) -> str:
    text = leaf.help or "(undocumented)"
    extra = ""
    if leaf.meta.get("aliases"):
        extra = f"; formerly {', '.join(leaf.meta['aliases'])}, still accepted"
    # argparse formats help with %: a literal % must be doubled
    return f"{text} (default: {_default_text(leaf)}{extra})".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, group_order: tuple[str, ...] = (),
              default_group: str = "server") -> dict[str, Leaf]:
    """Add cls's settings to parser as options, in argument groups (those of group_order first, in
    that order; a setting without a group goes to default_group); return {dotted key: Leaf}."""
    groups = {title: parser.add_argument_group(title) for title in group_order}
    out = {}
    for leaf in leaves(cls):
        title = leaf.meta.get("group") or default_group
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        group = groups[title]
        dest = _PREFIX + leaf.key
        common: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=_help(leaf))
        if leaf.base is bool and not leaf.is_list:
            action = group.add_argument(leaf.flag, action=_Bool, **common)
        else:
            metavar = leaf.meta.get("metavar") or leaf.key.rsplit(".", 1)[-1].upper()
            kwargs = dict(common, type=_parse_type(leaf), metavar=metavar,
                          action=_Append if leaf.is_list else _Store)
            if leaf.meta.get("const") is not None:  # the value may be left out: `--ray` alone
                kwargs.update(nargs="?", const=leaf.meta["const"])
            if leaf.meta.get("choices"):
                kwargs["choices"] = leaf.meta["choices"]
                kwargs["metavar"] = "{" + ",".join(leaf.meta["choices"]) + "}"
            action = group.add_argument(leaf.flag, **kwargs)
            action.once = leaf.meta.get("once")
            for alias in leaf.meta.get("aliases", ()):
                group.add_argument(alias, **dict(kwargs, help=argparse.SUPPRESS, action=_Deprecated,
                                                 new_name=leaf.flag, store=action))
        out[leaf.key] = leaf
    return out


def given(args: argparse.Namespace) -> dict[str, Any]:
    """{dotted key: value} of the settings the command line set."""
    return {k[len(_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_PREFIX)}


def flag_names(args: argparse.Namespace) -> dict[str, str]:
    """{dotted key: the option string that set it} ("--max-queue" when the old name was used)."""
    return dict(getattr(args, _GIVEN, None) or {})


def resolve(cls: type, args: argparse.Namespace, config_file: Path | None = None) -> Any:
    """cls from its defaults, then `config_file`'s keys (TOML), then the flags `args` holds.

    Raises ValueError with one line naming every problem: a flag by the name the user typed
    ("--max-batch must be >= 1, got 0"), a file's key by its dotted key and the file
    ("serve.toml: engine.max_batch must be an integer, got '8' (a string)"); unknown keys in
    the file are problems too. Relative paths in the file are taken relative to the file.
    """
    from cellserve.config import ConfigError, build, from_mapping, leaves, load_file

    values: dict[str, Any] = {}
    from_file: set[str] = set()
    if config_file is not None:
        try:
            data = load_file(config_file)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"--config {config_file}: {reason}") from exc
        values, found = from_mapping(cls, data)
        if found:
            raise ValueError("; ".join(f"{config_file}: {p.render()}" for p in found))
        def from_file_folder(path: Path) -> Path:
            return path if path.is_absolute() else config_file.parent / path

        for leaf in leaves(cls):
            if values.get(leaf.key) is None:
                continue
            if leaf.base is Path:
                value = values[leaf.key]
                values[leaf.key] = [*map(from_file_folder, value)] if leaf.is_list else from_file_folder(value)
            elif leaf.meta.get("paths") is not None:
                values[leaf.key] = leaf.meta["paths"](values[leaf.key], from_file_folder)
        from_file = set(values)
    flags = flag_names(args)
    values.update(given(args))
    try:
        return build(cls, values)
    except ConfigError as exc:
        def name(key: str) -> str:
            if key in flags:
                return flags[key]
            return f"{key} (in {config_file})" if key in from_file else key

        lines = []
        for p in exc.problems:
            keys = (p.key, *p.others)
            if config_file is not None and all(k in from_file and k not in flags for k in keys):
                lines.append(f"{config_file}: {p.render()}")
            else:
                lines.append(p.render(name))
        raise ValueError("; ".join(lines)) from exc
