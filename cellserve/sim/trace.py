"""A simulation's trace in columns: arrays, not an object per request.

A simulation of many engines holds millions of arrivals for its whole run. As `SimArrival`
objects (a dataclass, a dict and an array each) they took most of a long run's memory, and a
forked worker (parallel.py) copied the pages of every object it read, since reading an
object writes its reference count. `SimTrace` keeps the same fields in a few arrays: times,
models, deadlines, priorities and tags as columns, and each input's values end to end in one
buffer with each arrival's offset and shape. An arrival's inputs come back as read-only views
into those buffers (a request's inputs are read, never written), so a worker reads the trace
in place without copying it.

Arrivals are kept in time order; arrivals at the same time keep the order they were given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SimArrival:
    """One request of a trace: when it arrives (virtual seconds), to which model, with what."""

    time_s: float
    model: str
    inputs: dict[str, np.ndarray]
    timeout_s: float | None = None
    priority: int = 0
    tag: int = 0  # the trace's id for it


@dataclass(frozen=True)
class _Column:
    """One input's values for a group of arrivals: end to end, with each one's offset and shape."""

    data: np.ndarray
    offsets: np.ndarray  # int64, one more than the group's arrivals
    # The shape every arrival's value has, with -1 at the one axis where they differ (the
    # usual case: a sequence's length), or, where they differ on more axes, None and each
    # one's shape in `shapes` (int64, arrivals x rank)
    template: tuple[int, ...] | None
    shapes: np.ndarray | None

    def value(self, row: int) -> np.ndarray:
        x = self.data[self.offsets[row]:self.offsets[row + 1]]
        return x.reshape(self.template if self.template is not None else tuple(self.shapes[row].tolist()))


@dataclass(frozen=True)
class _Group:
    """Arrivals of one model whose inputs have the same names, dtypes and ranks."""

    names: tuple[str, ...]
    columns: tuple[_Column, ...]

    def inputs(self, row: int) -> dict[str, np.ndarray]:
        return {name: col.value(row) for name, col in zip(self.names, self.columns)}


def _group_key(model: str, inputs: dict[str, np.ndarray]) -> tuple:
    return (model,) + tuple((k, v.dtype.str, v.ndim) for k, v in inputs.items())


class SimTrace(Sequence):
    """Arrivals in columns, in time order (see the module docstring). Indexing gives a
    `SimArrival` (its inputs views into the trace); a simulation reads the columns."""

    def __init__(self, arrivals: Iterable[SimArrival] = ()):
        arrivals = list(arrivals)
        order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].time_s)  # stable: ties keep their order
        n = len(arrivals)
        self.time_s = np.fromiter((arrivals[i].time_s for i in order), np.float64, n)
        self.tag = np.fromiter((arrivals[i].tag for i in order), np.int64, n)
        self.priority = np.fromiter((arrivals[i].priority for i in order), np.int64, n)
        self.timeout_s = np.fromiter((math.nan if arrivals[i].timeout_s is None else arrivals[i].timeout_s
                                      for i in order), np.float64, n)
        self.models: tuple[str, ...] = tuple(dict.fromkeys(a.model for a in arrivals))
        index_of = {m: k for k, m in enumerate(self.models)}
        self.model = np.fromiter((index_of[arrivals[i].model] for i in order), np.int32, n)
        group_of: dict[tuple, int] = {}  # (model, inputs' names, dtypes and ranks) -> group
        members: list[list[dict]] = []
        self.group = np.empty(n, np.int32)
        self.row = np.empty(n, np.int64)
        for j, i in enumerate(order):
            a = arrivals[i]
            inputs = {k: np.asarray(v) for k, v in a.inputs.items()}
            g = group_of.setdefault(_group_key(a.model, inputs), len(group_of))
            if g == len(members):
                members.append([])
            self.group[j], self.row[j] = g, len(members[g])
            members[g].append(inputs)
        self._groups = tuple(map(_pack, members))
        self._freeze()

    @classmethod
    def concat(cls, traces: Sequence[SimTrace]) -> SimTrace:
        """One trace of several (the arrivals of each, as `SimTrace` of their lists joined
        would order them), built from their columns."""
        out = cls()
        if not traces:
            return out
        out.models = tuple(dict.fromkeys(m for t in traces for m in t.models))
        index_of = {m: k for k, m in enumerate(out.models)}
        time_s = np.concatenate([t.time_s for t in traces])
        order = np.argsort(time_s, kind="stable")
        out.time_s = time_s[order]
        for name in ("tag", "priority", "timeout_s", "row"):
            setattr(out, name, np.concatenate([getattr(t, name) for t in traces])[order])
        out.model = np.concatenate([np.array([index_of[m] for m in t.models], np.int32)[t.model]
                                    for t in traces])[order]
        bases = np.cumsum([0] + [len(t._groups) for t in traces[:-1]])
        out.group = np.concatenate([t.group + base for t, base in zip(traces, bases)])[order].astype(np.int32)
        out._groups = tuple(g for t in traces for g in t._groups)
        out._freeze()
        return out

    @classmethod
    def of(cls, arrivals: Iterable[SimArrival] | SimTrace) -> SimTrace:
        """`arrivals` as a trace (itself, if it is one)."""
        return arrivals if isinstance(arrivals, SimTrace) else cls(arrivals)

    def _freeze(self) -> None:
        for col in (self.time_s, self.tag, self.priority, self.timeout_s, self.model, self.group, self.row):
            col.flags.writeable = False

    def __len__(self) -> int:
        return len(self.time_s)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"arrival {i} of a trace of {len(self)}")
        return SimArrival(float(self.time_s[i]), self.models[self.model[i]], self.inputs(i), self.timeout(i),
                          int(self.priority[i]), int(self.tag[i]))

    def inputs(self, i: int) -> dict[str, np.ndarray]:
        """Arrival `i`'s inputs: read-only views into the trace."""
        return self._groups[self.group[i]].inputs(self.row[i])

    def timeout(self, i: int) -> float | None:
        t = float(self.timeout_s[i])
        return None if math.isnan(t) else t


def _pack(members: list[dict]) -> _Group:
    names = tuple(members[0])
    columns = []
    for name in names:
        values = [inputs[name] for inputs in members]
        sizes = np.fromiter((v.size for v in values), np.int64, len(values))
        offsets = np.zeros(len(values) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        data = np.concatenate([v.ravel() for v in values])
        shapes = np.array([v.shape for v in values], np.int64).reshape(len(values), values[0].ndim)
        template = _template(shapes)
        for a in (data, offsets, shapes):
            a.flags.writeable = False
        columns.append(_Column(data, offsets, template, shapes if template is None else None))
    return _Group(names, tuple(columns))


def _template(shapes: np.ndarray) -> tuple[int, ...] | None:
    """The shape all rows of `shapes` have with -1 at the one axis where they differ, if
    they differ on at most one axis of positive sizes (-1 needs a size to divide by)."""
    if shapes.shape[1] == 0:
        return ()
    differ = np.flatnonzero((shapes != shapes[0]).any(axis=0))
    if len(differ) > 1:
        return None
    template = shapes[0].tolist()
    if len(differ) == 1:
        others = [n for k, n in enumerate(template) if k != differ[0]]
        if 0 in others:
            return None
        template[differ[0]] = -1
    return tuple(template)
