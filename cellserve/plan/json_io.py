"""The file handling every planner shares: reading a JSON file, its schema version, a list
field, writing a plan. Each planner raises its own error type (NexusError, PartitionError, ...),
passed in, so that its CLI reports every bad file the same way: the file, the field, the value."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: str | Path, what: str, error: type[Exception]) -> object:
    """The JSON document at `path`; `error` naming the file (`what` says which) if it cannot be
    read or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {str(path)!r} is not JSON: {exc}") from None


def check_version(d: dict, where: str, version: int, error: type[Exception]) -> int:
    """A file may omit schema_version (it is then `version`); another version is refused, and
    a model profile (`cellserve profile`'s file, a format of its own) given in place of this
    file is named as such: its version alone says nothing of what is wrong."""
    found = d.get("schema_version", version)
    if isinstance(found, bool) or not isinstance(found, int):
        raise error(f"{where}.schema_version must be an integer, got {found!r}")
    if found != version:
        if "machine" in d and "cell_types" in d:
            raise error(f"this file is a model profile (written by `cellserve profile`), not a {where} file")
        raise error(f"{where}.schema_version is {found!r}; this cellserve reads version {version}")
    return found


def as_list(x: object, where: str, error: type[Exception]) -> list:
    if not isinstance(x, list):
        raise error(f"{where} must be a list, got {type(x).__name__}")
    return x


class OutputError(OSError):
    """A result that cannot be written where asked; the message names the path and why."""


def write_json(d: dict, path: str | Path) -> None:
    """Write a plan (or any result), creating its folder. Raises OutputError naming the path
    when it cannot (a directory there, no permission, a read-only file system)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=1) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def check_output(path: str | Path) -> None:
    """Before a long run: OutputError naming `path` when its folder cannot be made or written,
    so that a run is not lost to a bad output path at its end."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write {str(path)!r}: " + ("it is a directory" if path.is_dir()
                                                             else f"folder {str(path.parent)!r} is not writable"))
