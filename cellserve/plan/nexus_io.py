"""The planner's files as JSON: profiles, sessions (the workload) and plans.

Each `load_*` refuses a broken file with a NexusError naming the field (as
`sessions[2].slo_ms must be > 0, got -5`); each `*_to_dict` writes what the matching parser
reads back, with `schema_version`. Formats: docs/planning.md. The field helpers are the
profile parser's (plan/profile.py), so both files read alike.
"""

from __future__ import annotations

import functools
from pathlib import Path

from cellserve.decimal_text import positive_key
from cellserve.plan.nexus import (SCHEMA_VERSION, Assignment, Device, DeviceProfiles, LatencyProfile, ModelEntry,
                                  NexusError, Plan, Profiles, Query, QueryNode, QuerySplit, Session, Unserved,
                                  Workload)
from cellserve.plan.profile import ProfileError, _get, _int, _num, _obj, _str
from cellserve.plan.json_io import as_list, check_version, read_json, write_json  # noqa: F401 (write_json: this module's API)

_read = functools.partial(read_json, error=NexusError)
_version = functools.partial(check_version, version=SCHEMA_VERSION, error=NexusError)
_list = functools.partial(as_list, error=NexusError)

MAX_BATCH = 65536  # the planner tabulates every batch size up to the largest profiled


def _load(path: str | Path, what: str, parse, *args):
    d = _read(path, what)
    try:
        return parse(d, *args)
    except ProfileError as exc:
        raise NexusError(f"{what} {str(path)!r}: {exc}") from None


def _nexus_errors(parse):
    """The profile parser's helpers raise ProfileError; a parser here raises NexusError (a
    ProfileError too), whatever found the fault."""
    @functools.wraps(parse)
    def wrapped(*args):
        try:
            return parse(*args)
        except NexusError:
            raise
        except ProfileError as exc:
            raise NexusError(str(exc)) from None
    return wrapped


def _positive(x: object, where: str) -> float:
    return _num(x, where, positive=True)


# ---- profiles ----

def _latency(x: object, where: str) -> LatencyProfile:
    d = _obj(x, where)
    if not d:
        raise NexusError(f"{where} is empty; it maps batch sizes to milliseconds")
    points = []
    for key, ms in d.items():
        if (batch := positive_key(key)) is None or batch > MAX_BATCH:
            raise NexusError(f"{where} has key {key!r}; keys are batch sizes 1, 2, ... {MAX_BATCH}")
        points.append((batch, _positive(ms, f"{where}[{key!r}]")))
    return LatencyProfile(tuple(points))


@_nexus_errors
def parse_profiles(x: object) -> Profiles:
    d = _obj(x, "profiles")
    _version(d, "profiles")
    types = _obj(_get(d, "device_types", "profiles"), "profiles.device_types")
    if not types:
        raise NexusError("profiles.device_types is empty")
    out = {}
    for dt, body in types.items():
        where = f"profiles.device_types[{dt!r}]"
        body = _obj(body, where)
        prefixes = {_str(p, f"{where}.prefixes key"): _latency(_get(_obj(v, f"{where}.prefixes[{p!r}]"), "latency_ms",
                                                                    f"{where}.prefixes[{p!r}]"),
                                                               f"{where}.prefixes[{p!r}].latency_ms")
                    for p, v in _obj(body.get("prefixes", {}), f"{where}.prefixes").items()}
        models = {}
        for m, entry in _obj(_get(body, "models", where), f"{where}.models").items():
            mw = f"{where}.models[{m!r}]"
            entry = _obj(entry, mw)
            latency = _latency(_get(entry, "latency_ms", mw), f"{mw}.latency_ms")
            prefix = entry.get("prefix")
            if prefix is not None:
                if _str(prefix, f"{mw}.prefix") not in prefixes:
                    raise NexusError(f"{mw}.prefix is {prefix!r}, which {where}.prefixes does not define")
                pre = prefixes[prefix]
                for b in range(1, min(latency.max_batch, pre.max_batch) + 1):
                    if latency.ms(b) < pre.ms(b) - 1e-9:
                        raise NexusError(f"{mw}.latency_ms is below its prefix {prefix!r}'s at batch {b} "
                                         f"({latency.ms(b):g} < {pre.ms(b):g} ms): a model costs at least its prefix")
            models[_str(m, f"{where}.models key")] = ModelEntry(latency, prefix)
        if not models:
            raise NexusError(f"{where}.models is empty")
        out[_str(dt, "profiles.device_types key")] = DeviceProfiles(models, prefixes)
    return Profiles(out)


def load_profiles(path: str | Path) -> Profiles:
    return _load(path, "profiles", parse_profiles)


def profiles_to_dict(profiles: Profiles) -> dict:
    def model(e: ModelEntry) -> dict:
        return {"latency_ms": e.latency.to_dict(), **({"prefix": e.prefix} if e.prefix else {})}
    return {"schema_version": profiles.schema_version,
            "device_types": {dt: {"models": {m: model(e) for m, e in dp.models.items()},
                                  **({"prefixes": {p: {"latency_ms": lp.to_dict()} for p, lp in dp.prefixes.items()}}
                                     if dp.prefixes else {})}
                             for dt, dp in profiles.device_types.items()}}


# ---- sessions (the workload) ----

def _node(x: object, where: str) -> QueryNode:
    d = _obj(x, where)
    children = _list(d.get("children", []), f"{where}.children")
    return QueryNode(_str(_get(d, "model", where), f"{where}.model"),
                     _positive(_get(d, "rate_rps", where), f"{where}.rate_rps"),
                     tuple(_node(c, f"{where}.children[{i}]") for i, c in enumerate(children)))


@_nexus_errors
def parse_workload(x: object, profiles: Profiles | None = None) -> Workload:
    """The sessions file; with `profiles`, also checked against them (device type and models known)."""
    d = _obj(x, "sessions file")
    _version(d, "sessions file")
    device_type = _str(_get(d, "device_type", "sessions file"), "device_type")
    max_devices = _int(_get(d, "max_devices", "sessions file"), "max_devices", 0)
    sessions = []
    for i, s in enumerate(_list(d.get("sessions", []), "sessions")):
        where = f"sessions[{i}]"
        s = _obj(s, where)
        sessions.append(Session(_str(s.get("id", f"s{i}"), f"{where}.id"), _str(_get(s, "model", where), f"{where}.model"),
                                _positive(_get(s, "slo_ms", where), f"{where}.slo_ms"),
                                _positive(_get(s, "rate_rps", where), f"{where}.rate_rps")))
    queries = []
    for i, q in enumerate(_list(d.get("queries", []), "queries")):
        where = f"queries[{i}]"
        q = _obj(q, where)
        queries.append(Query(_str(q.get("id", f"q{i}"), f"{where}.id"), _positive(_get(q, "slo_ms", where), f"{where}.slo_ms"),
                             _node(_get(q, "root", where), f"{where}.root")))
    workload = Workload(device_type, max_devices, tuple(sessions), tuple(queries))
    _check_names(workload, profiles)
    return workload


def _check_names(w: Workload, profiles: Profiles | None) -> None:
    """Ids unique, a model at most once per query, and (given profiles) every name known."""
    seen: dict[str, str] = {}

    def claim(id_: str, where: str) -> None:
        if id_ in seen:
            raise NexusError(f"{where} is {id_!r}, already the id of {seen[id_]}; ids must be unique")
        seen[id_] = where
    for i, s in enumerate(w.sessions):
        claim(s.id, f"sessions[{i}].id")
    for i, q in enumerate(w.queries):
        models: set[str] = set()
        for j, node in enumerate(q.root.walk()):
            if node.model in models:
                raise NexusError(f"queries[{i}] names model {node.model!r} twice; a model appears once per query "
                                 "(its split_ms is keyed by model)")
            models.add(node.model)
            claim(q.node_id(node), f"queries[{i}] node {node.model!r} (id {q.node_id(node)!r})")
    if profiles is None:
        return
    dp = profiles.device_types.get(w.device_type)
    if dp is None:
        raise NexusError(f"device_type is {w.device_type!r}, which the profiles lack "
                         f"(they have {sorted(profiles.device_types)})")
    for i, s in enumerate(w.sessions):
        if s.model not in dp.models:
            raise NexusError(f"sessions[{i}].model is {s.model!r}, which has no profile on {w.device_type!r}")
    for i, q in enumerate(w.queries):
        for node in q.root.walk():
            if node.model not in dp.models:
                raise NexusError(f"queries[{i}] node model {node.model!r} has no profile on {w.device_type!r}")


def load_workload(path: str | Path, profiles: Profiles | None = None) -> Workload:
    return _load(path, "sessions file", parse_workload, profiles)


def workload_to_dict(w: Workload) -> dict:
    def node(n: QueryNode) -> dict:
        return {"model": n.model, "rate_rps": n.rate_rps, **({"children": [node(c) for c in n.children]}
                                                             if n.children else {})}
    return {"schema_version": w.schema_version, "device_type": w.device_type, "max_devices": w.max_devices,
            "sessions": [{"id": s.id, "model": s.model, "slo_ms": s.slo_ms, "rate_rps": s.rate_rps} for s in w.sessions],
            "queries": [{"id": q.id, "slo_ms": q.slo_ms, "root": node(q.root)} for q in w.queries]}


# ---- plans ----

def _assignment(x: object, where: str) -> Assignment:
    d = _obj(x, where)
    prefix = d.get("prefix")
    return Assignment(_str(_get(d, "id", where), f"{where}.id"), _str(_get(d, "model", where), f"{where}.model"),
                      _positive(_get(d, "slo_ms", where), f"{where}.slo_ms"),
                      _int(_get(d, "batch", where), f"{where}.batch", 1),
                      _positive(_get(d, "rate_rps", where), f"{where}.rate_rps"),
                      _num(d.get("latency_ms", 0.0), f"{where}.latency_ms"),
                      _num(d.get("worst_case_ms", 0.0), f"{where}.worst_case_ms"),
                      None if prefix is None else _str(prefix, f"{where}.prefix"))


@_nexus_errors
def parse_plan(x: object) -> Plan:
    d = _obj(x, "plan")
    _version(d, "plan")
    devices = []
    for i, dev in enumerate(_list(_get(d, "devices", "plan"), "devices")):
        where = f"devices[{i}]"
        dev = _obj(dev, where)
        sessions = _list(_get(dev, "sessions", where), f"{where}.sessions")
        if not sessions:
            raise NexusError(f"{where}.sessions is empty; a plan lists only devices that serve")
        devices.append(Device(_int(dev.get("id", i), f"{where}.id"),
                              _str(_get(dev, "device_type", where), f"{where}.device_type"),
                              _positive(_get(dev, "duty_cycle_ms", where), f"{where}.duty_cycle_ms"),
                              _num(_get(dev, "occupancy", where), f"{where}.occupancy"),
                              tuple(_assignment(s, f"{where}.sessions[{j}]") for j, s in enumerate(sessions))))
    ids = [dev.id for dev in devices]
    if len(set(ids)) != len(ids):
        raise NexusError("devices: device ids repeat")
    used = _int(_get(d, "devices_used", "plan"), "devices_used")
    if used != len(devices):
        raise NexusError(f"devices_used is {used}, but devices lists {len(devices)}")
    queries = []
    for i, q in enumerate(_list(d.get("queries", []), "queries")):
        where = f"queries[{i}]"
        q = _obj(q, where)
        split = _obj(_get(q, "split_ms", where), f"{where}.split_ms")
        queries.append(QuerySplit(_str(q.get("id", f"q{i}"), f"{where}.id"), _positive(_get(q, "slo_ms", where), f"{where}.slo_ms"),
                                  {_str(m, f"{where}.split_ms key"): _positive(v, f"{where}.split_ms[{m!r}]")
                                   for m, v in split.items()}))
    unserved = []
    for i, u in enumerate(_list(d.get("unserved", []), "unserved")):
        where = f"unserved[{i}]"
        u = _obj(u, where)
        unserved.append(Unserved(_str(_get(u, "id", where), f"{where}.id"), _str(_get(u, "model", where), f"{where}.model"),
                                 _positive(_get(u, "slo_ms", where), f"{where}.slo_ms"),
                                 _positive(_get(u, "rate_rps", where), f"{where}.rate_rps"),
                                 _str(_get(u, "reason", where), f"{where}.reason")))
    device_type = d.get("device_type", devices[0].device_type if devices else None)
    return Plan(_str(device_type, "device_type"), tuple(devices), tuple(queries), tuple(unserved))


def load_plan(path: str | Path) -> Plan:
    return _load(path, "plan file", parse_plan)


def plan_to_dict(plan: Plan) -> dict:
    def assignment(a: Assignment) -> dict:
        return {"id": a.id, "model": a.model, "slo_ms": a.slo_ms, "batch": a.batch, "rate_rps": a.rate_rps,
                "latency_ms": a.latency_ms, "worst_case_ms": a.worst_case_ms, **({"prefix": a.prefix} if a.prefix else {})}
    return {"schema_version": plan.schema_version, "device_type": plan.device_type,
            "devices": [{"id": dev.id, "device_type": dev.device_type, "duty_cycle_ms": dev.duty_cycle_ms,
                         "occupancy": dev.occupancy, "sessions": [assignment(a) for a in dev.sessions]}
                        for dev in plan.devices],
            "queries": [{"id": q.id, "slo_ms": q.slo_ms, "split_ms": dict(q.split_ms)} for q in plan.queries],
            "devices_used": plan.devices_used,
            "unserved": [{"id": u.id, "model": u.model, "slo_ms": u.slo_ms, "rate_rps": u.rate_rps, "reason": u.reason}
                         for u in plan.unserved]}


