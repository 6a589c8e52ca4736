"""Kernel versions profiled under interference (Veltair), as plain data.

A *version* of a cell type's step is how the fused step is threaded, named KIND-N:
- "openmp-N": OpenMP's team of N threads (N the executor's cores: how the engine runs without
  versions; fewer: the master alone or with fewer workers, floating over the cores);
- "elastic-N": an elastic team of N (kernels/_pointwise.c): the master never waits for a worker
  that has not started, so a worker another process holds off its core costs the step nothing
  but that worker's share of the panels.
The answers do not depend on the version: each panel of hidden units is computed whole by one
thread, so the engine may switch versions between steps without changing a lane's answer by a
bit (tests/executor/test_versions.py).

Which version is fastest depends on the batch and on what other processes do with the cores:
alone, OpenMP's team of all threads (its workers spin longer between steps); with another
process taking part of a core, OpenMP's step waits at its closing barrier for the thread that
process preempts, and the elastic team or fewer threads are faster. So a profile
holds, per cell type, the mean step time of each version at each batch size at each of a few
*interference levels*: others' load on the executor's cores, in cores, as the interference
meter (executor/interference.py) read it while a burner process (bench/burner.py) ran at a
set duty on one of them; and each twice: *steady*, steps one after another as under load (the
engine's work between them keeps the master busy and the workers spinning), and after a
*pause* (light load: the workers went to sleep, and waking one on a core another process
holds takes that process's time slice). `cellserve profile-versions` measures one; `serve --kernel-versions`
serves with one (executor/versions.py chooses from it). JSON round trip with a schema
version; `from_json` refuses a broken file naming the field.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

from cellserve.plan.json_io import as_list, check_version, read_json, write_json

SCHEMA_VERSION = 1
KIND = "kernel-versions"
AFTER = ("steady", "pause")  # a step among others, or after the executor paused
KINDS = ("openmp", "elastic")


def parse_version(name: str) -> tuple[str, int]:
    """("openmp" | "elastic", threads) of a version's name; VersionProfileError if it is none."""
    kind, _, n = name.rpartition("-")
    if kind not in KINDS or not n.isdigit() or int(n) < 1 or (kind == "elastic" and int(n) < 2):
        raise VersionProfileError(f"version {name!r} is not openmp-N (N >= 1) or elastic-N (N >= 2)")
    return kind, int(n)


def version_name(kind: str, threads: int) -> str:
    return f"{kind}-{threads}"


def profiles_model(profile_model: str, served: str) -> bool:
    """Whether a profile of `profile_model` (named as `profile-versions` names it) is of the
    engine model `served`: that model itself, a server's "NAME:VERSION" of it, or a reload
    "NAME:VERSION#N"."""
    return served == profile_model or served.startswith((profile_model + ":", profile_model + "#"))


class VersionProfileError(ValueError):
    """A kernel-versions profile that cannot be used; the message names the field."""


@dataclass(frozen=True)
class VersionProfile:
    model: str
    backend: str  # the step implementation whose versions these are ("fused")
    cores: int  # cores of the executor profiled; versions run 1 .. cores threads
    versions: tuple[str, ...]  # the versions' names (see the module)
    batches: tuple[int, ...]  # batch sizes measured, ascending
    duties: tuple[float, ...]  # the burner's duty at each level (0: none), as set
    levels: tuple[float, ...]  # others' load in cores at each level, as the meter read it, ascending
    # cell type -> version -> "steady" | "pause" -> [level][batch] mean seconds per step
    step_s: dict[str, dict[str, dict[str, tuple[tuple[float, ...], ...]]]]
    machine: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self)

    # ---- predictions ----

    def predict(self, cell_type: str, version: str, batch: int, level: float, paused: bool = False) -> float:
        """Mean seconds of one step of `batch` lanes on `version` when others take `level`
        cores, steady or after a pause: linear between the measured levels and batch sizes,
        the end values beyond them (a batch past the largest measured scales with it)."""
        table = self.step_s[cell_type][version][AFTER[paused]]
        i, w = _between(self.levels, level)
        row = [(1 - w) * a + w * b for a, b in zip(table[i], table[min(i + 1, len(table) - 1)])]
        if batch > self.batches[-1]:
            return row[-1] * batch / self.batches[-1]
        j, v = _between(self.batches, batch)
        return (1 - v) * row[j] + v * row[min(j + 1, len(row) - 1)]

    # ---- JSON ----

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": KIND, "model": self.model, "backend": self.backend,
                "cores": self.cores, "versions": list(self.versions), "batches": list(self.batches),
                "duties": list(self.duties), "levels": list(self.levels),
                "cell_types": {ct: {v: {a: [list(r) for r in rows] for a, rows in by_after.items()}
                                    for v, by_after in by_version.items()}
                               for ct, by_version in self.step_s.items()},
                "measured_on": self.machine}

    def to_json(self, path: str | Path) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: object) -> "VersionProfile":
        err = VersionProfileError
        if not isinstance(d, dict):
            raise err(f"a kernel-versions profile is a JSON object, got {type(d).__name__}")
        check_version(d, "kernel-versions profile", SCHEMA_VERSION, err)
        if d.get("kind") != KIND:
            raise err(f"kind must be {KIND!r} (a file from `cellserve profile-versions`), got {d.get('kind')!r}")
        missing = [k for k in ("model", "backend", "cores", "versions", "batches", "duties", "levels", "cell_types")
                   if k not in d]
        if missing:
            raise err(f"kernel-versions profile lacks {', '.join(missing)}")
        cell_types = d["cell_types"]
        if not isinstance(cell_types, dict):
            raise err(f"cell_types must be an object, got {type(cell_types).__name__}")
        step_s = {}
        for ct, by_version in cell_types.items():
            if not isinstance(by_version, dict):
                raise err(f"cell_types[{ct!r}] must be an object of versions, got {type(by_version).__name__}")
            table = {}
            for v, by_after in by_version.items():
                if not isinstance(by_after, dict) or sorted(by_after) != sorted(AFTER):
                    raise err(f"cell_types[{ct!r}][{v!r}] must be an object of {' and '.join(AFTER)} tables")
                table[v] = {a: _rows(rows, f"cell_types[{ct!r}][{v!r}][{a!r}]") for a, rows in by_after.items()}
            step_s[ct] = table
        machine = d.get("measured_on", {})
        return cls(model=_text(d["model"], "model"), backend=_text(d["backend"], "backend"),
                   cores=d["cores"], versions=tuple(as_list(d["versions"], "versions", err)),
                   batches=tuple(as_list(d["batches"], "batches", err)),
                   duties=tuple(_number(x, "duties") for x in as_list(d["duties"], "duties", err)),
                   levels=tuple(_number(x, "levels") for x in as_list(d["levels"], "levels", err)),
                   step_s=step_s, machine=machine if isinstance(machine, dict) else {})

    @classmethod
    def from_json(cls, path: str | Path) -> "VersionProfile":
        return cls.from_dict(read_json(path, "kernel-versions profile", VersionProfileError))


def _between(xs: tuple, x: float) -> tuple[int, float]:
    """Index i and weight w with x = (1 - w) xs[i] + w xs[i + 1], clamped to the ends."""
    if x <= xs[0] or len(xs) == 1:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, 0.0
    i = bisect.bisect_right(xs, x) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def _rows(rows: object, where: str) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(_number(x, f"{where}[{i}]") for x in as_list(r, f"{where}[{i}]", VersionProfileError))
                 for i, r in enumerate(as_list(rows, where, VersionProfileError)))


def _number(x: object, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or x == float("inf"):
        raise VersionProfileError(f"{where} must be a finite number >= 0, got {x!r}")
    return float(x)


def _text(x: object, where: str) -> str:
    if not isinstance(x, str) or not x:
        raise VersionProfileError(f"{where} must be a non-empty string, got {x!r}")
    return x


def _ints_ascending(xs: tuple, where: str) -> None:
    if not xs or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in xs):
        raise VersionProfileError(f"{where} must be a non-empty list of integers >= 1, got {list(xs)}")
    if list(xs) != sorted(set(xs)):
        raise VersionProfileError(f"{where} must be ascending without repeats, got {list(xs)}")


def _check(p: VersionProfile) -> None:
    err = VersionProfileError
    if isinstance(p.cores, bool) or not isinstance(p.cores, int) or p.cores < 1:
        raise err(f"cores must be an integer >= 1, got {p.cores!r}")
    _ints_ascending(p.batches, "batches")
    if not p.versions or len(set(p.versions)) != len(p.versions) or not all(isinstance(v, str) for v in p.versions):
        raise err(f"versions must be a non-empty list of distinct names, got {list(p.versions)}")
    for v in p.versions:
        if parse_version(v)[1] > p.cores:
            raise err(f"version {v!r} runs more threads than the {p.cores} cores profiled")
    if not p.levels or len(p.levels) != len(p.duties):
        raise err(f"levels and duties must be non-empty lists of one length, got {len(p.levels)} and "
                  f"{len(p.duties)}")
    if list(p.levels) != sorted(set(p.levels)):
        raise err(f"levels must be ascending without repeats, got {list(p.levels)}")
    if not p.step_s:
        raise err("cell_types is empty: nothing was profiled")
    for ct, table in p.step_s.items():
        if sorted(table) != sorted(p.versions):
            raise err(f"cell_types[{ct!r}] has versions {sorted(table)}, not the profile's {sorted(p.versions)}")
        for v, by_after in table.items():
            if sorted(by_after) != sorted(AFTER):
                raise err(f"cell_types[{ct!r}][{v!r}] must hold {' and '.join(AFTER)} tables")
            for a, rows in by_after.items():
                where = f"cell_types[{ct!r}][{v!r}][{a!r}]"
                if len(rows) != len(p.levels) or any(len(r) != len(p.batches) for r in rows):
                    raise err(f"{where} must hold {len(p.levels)} levels of {len(p.batches)} batch sizes")
                if any(x <= 0 for r in rows for x in r):
                    raise err(f"{where} holds a step time <= 0")
