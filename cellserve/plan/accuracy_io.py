"""The accuracy-scaling planner's files as JSON: PROBLEM and PLAN.

`load_problem` / `load_plan` refuse a broken file with an AccuracyError naming the file and
the field (as `problem 'p.json': families['resnet'].variants['r18'].accuracy must be in
[0, 1], got 76.1`); `parse_*` do the same for parsed JSON (naming the field); `*_to_dict`
write what the parsers read back, with `schema_version`. Formats: docs/accuracy-scaling.md.
Unknown fields are ignored, so fields may be added.
"""

from __future__ import annotations

import functools
from pathlib import Path

from cellserve.decimal_text import positive_key
from cellserve.plan.accuracy import (DEFAULT_HEADROOM, MAX_HEADROOM, SCHEMA_VERSION, AccuracyError, AccuracyPlan, AccuracyProblem,
                                     Device, Family, LatencyPoints, Variant)
from cellserve.plan.profile import ProfileError, _get, _num, _obj, _str
from cellserve.plan.json_io import check_version, read_json, write_json  # noqa: F401 (write_json: this module's API)

_read = functools.partial(read_json, error=AccuracyError)
_version = functools.partial(check_version, version=SCHEMA_VERSION, error=AccuracyError)

MAX_BATCH = 65536


def _parse(parse, x: object, *args):
    """Run a parser; the profile helpers' ProfileError becomes an AccuracyError."""
    try:
        return parse(x, *args)
    except AccuracyError:
        raise
    except ProfileError as exc:
        raise AccuracyError(str(exc)) from None


# ---- PROBLEM ----

def _families(x: object) -> dict[str, Family]:
    fams = _obj(x, "problem.families")
    if not fams:
        raise AccuracyError("problem.families is empty; it maps family names to their demand and variants")
    out: dict[str, Family] = {}
    owner: dict[str, str] = {}
    for name, body in fams.items():
        where = f"problem.families[{name!r}]"
        body = _obj(body, where)
        demand = _num(_get(body, "demand_rps", where), f"{where}.demand_rps")
        slo = body.get("slo_ms")
        slo = None if slo is None else _num(slo, f"{where}.slo_ms", positive=True)
        variants = _obj(_get(body, "variants", where), f"{where}.variants")
        if not variants:
            raise AccuracyError(f"{where}.variants is empty; a family needs at least one variant")
        vs = []
        for vname, vbody in variants.items():
            vw = f"{where}.variants[{vname!r}]"
            acc = _num(_get(_obj(vbody, vw), "accuracy", vw), f"{vw}.accuracy")
            if acc > 1.0:
                raise AccuracyError(f"{vw}.accuracy must be in [0, 1] (a fraction), got {acc!r}")
            if vname in owner:
                raise AccuracyError(f"{vw}: variant {vname!r} is also in problem.families[{owner[vname]!r}]; "
                                    "variant names must be unique across families")
            owner[vname] = name
            vs.append(Variant(_str(vname, f"{where}.variants key"), acc))
        out[_str(name, "problem.families key")] = Family(name, demand, tuple(vs), slo)
    return out


def _devices(x: object) -> tuple[Device, ...]:
    if not isinstance(x, list):
        raise AccuracyError(f"problem.devices must be a list, got {type(x).__name__}")
    if not x:
        raise AccuracyError("problem.devices is empty: a plan needs at least one device")
    out, seen = [], {}
    for i, body in enumerate(x):
        where = f"problem.devices[{i}]"
        body = _obj(body, where)
        raw = _get(body, "id", where)
        if isinstance(raw, bool) or not isinstance(raw, (str, int)) or raw == "":
            raise AccuracyError(f"{where}.id must be a non-empty string or an integer, got {raw!r}")
        did = str(raw)
        if did in seen:
            raise AccuracyError(f"{where}.id {raw!r} repeats problem.devices[{seen[did]}].id")
        seen[did] = i
        out.append(Device(did, _str(_get(body, "type", where), f"{where}.type")))
    return tuple(out)


def _per_type(x: object, field: str, types: set[str], variants: set[str]) -> dict[str, dict]:
    """`field`'s two outer levels: device type -> variant -> value, both names known."""
    d = _obj(x, f"problem.{field}")
    for dt, body in d.items():
        if dt not in types:
            raise AccuracyError(f"problem.{field}[{dt!r}] names a device type no device has "
                                f"(types: {', '.join(sorted(types)) or 'none'})")
        for v in _obj(body, f"problem.{field}[{dt!r}]"):
            if v not in variants:
                raise AccuracyError(f"problem.{field}[{dt!r}][{v!r}] names a variant no family has")
    return d


def _latency(x: object, where: str) -> LatencyPoints:
    d = _obj(x, where)
    if not d:
        raise AccuracyError(f"{where} is empty; it maps batch sizes to milliseconds")
    points = []
    for key, ms in d.items():
        if (batch := positive_key(key)) is None or batch > MAX_BATCH:
            raise AccuracyError(f"{where} has key {key!r}; keys are batch sizes 1, 2, ... {MAX_BATCH}")
        points.append((batch, _num(ms, f"{where}[{key!r}]", positive=True)))
    return LatencyPoints(tuple(sorted(points)))


def _parse_problem(x: object) -> AccuracyProblem:
    d = _obj(x, "problem")
    _version(d, "problem")
    families = _families(_get(d, "families", "problem"))
    devices = _devices(_get(d, "devices", "problem"))
    types = {dev.type for dev in devices}
    variants = {v.name for f in families.values() for v in f.variants}
    if "capacity_rps" not in d and "latency_ms" not in d:
        raise AccuracyError("problem needs capacity_rps (device type -> variant -> req/s) or latency_ms "
                            "(device type -> variant -> batch -> ms), or both")
    capacity: dict[str, dict[str, float]] = {}
    for dt, body in _per_type(d.get("capacity_rps", {}), "capacity_rps", types, variants).items():
        capacity[dt] = {v: _num(c, f"problem.capacity_rps[{dt!r}][{v!r}]") for v, c in body.items()}
    latency: dict[str, dict[str, LatencyPoints]] = {}
    for dt, body in _per_type(d.get("latency_ms", {}), "latency_ms", types, variants).items():
        latency[dt] = {}
        for v, prof in body.items():
            where = f"problem.latency_ms[{dt!r}][{v!r}]"
            if v in capacity.get(dt, {}):
                raise AccuracyError(f"{where}: problem.capacity_rps[{dt!r}][{v!r}] gives this capacity already; "
                                    "give each (device type, variant) one way")
            fam = next(f for f in families.values() if any(x.name == v for x in f.variants))
            if fam.slo_ms is None:
                raise AccuracyError(f"problem.families[{fam.name!r}].slo_ms is missing: {where} derives a capacity "
                                    "from the SLO (the best batch under half of it)")
            latency[dt][v] = _latency(prof, where)
    headroom = _num(d.get("headroom", DEFAULT_HEADROOM), "problem.headroom")
    if not 1.0 <= headroom <= MAX_HEADROOM:
        raise AccuracyError(f"problem.headroom must be in [1.0, {MAX_HEADROOM:g}] (routed demand x headroom <= "
                            f"capacity), got {headroom!r}")
    return AccuracyProblem(families, devices, capacity, latency, headroom)


def parse_problem(x: object) -> AccuracyProblem:
    return _parse(_parse_problem, x)


def load_problem(path: str | Path) -> AccuracyProblem:
    d = _read(path, "problem file")
    try:
        return parse_problem(d)
    except AccuracyError as exc:
        raise AccuracyError(f"problem file {str(path)!r}: {exc}") from None


def problem_to_dict(p: AccuracyProblem) -> dict:
    out: dict = {"schema_version": SCHEMA_VERSION, "families": {}, "devices": [], "headroom": p.headroom}
    for f in p.families.values():
        body: dict = {"demand_rps": f.demand_rps, "variants": {v.name: {"accuracy": v.accuracy} for v in f.variants}}
        if f.slo_ms is not None:
            body["slo_ms"] = f.slo_ms
        out["families"][f.name] = body
    out["devices"] = [{"id": d.id, "type": d.type} for d in p.devices]
    if p.capacity_rps:
        out["capacity_rps"] = {dt: dict(body) for dt, body in p.capacity_rps.items()}
    if p.latency_ms:
        out["latency_ms"] = {dt: {v: {str(b): ms for b, ms in lp.points} for v, lp in body.items()}
                             for dt, body in p.latency_ms.items()}
    return out


# ---- PLAN ----

def _parse_plan(x: object) -> AccuracyPlan:
    d = _obj(x, "plan")
    _version(d, "plan")
    placement = {}
    for dev, v in _obj(_get(d, "placement", "plan"), "plan.placement").items():
        placement[dev] = None if v is None else _str(v, f"plan.placement[{dev!r}]")
    routing = {}
    for fam, shares in _obj(_get(d, "routing", "plan"), "plan.routing").items():
        routing[fam] = {dev: _num(s, f"plan.routing[{fam!r}][{dev!r}]")
                        for dev, s in _obj(shares, f"plan.routing[{fam!r}]").items()}
    unserved = {fam: _num(r, f"plan.unserved_rps[{fam!r}]")
                for fam, r in _obj(_get(d, "unserved_rps", "plan"), "plan.unserved_rps").items()}
    acc = _num(_get(d, "effective_accuracy", "plan"), "plan.effective_accuracy")
    headroom = _num(_get(d, "headroom", "plan"), "plan.headroom")
    solver = d.get("solver", "")
    return AccuracyPlan(placement, routing, acc, headroom, unserved, solver if isinstance(solver, str) else "")


def parse_plan(x: object) -> AccuracyPlan:
    return _parse(_parse_plan, x)


def load_plan(path: str | Path) -> AccuracyPlan:
    d = _read(path, "plan file")
    try:
        return parse_plan(d)
    except AccuracyError as exc:
        raise AccuracyError(f"plan file {str(path)!r}: {exc}") from None


def plan_to_dict(plan: AccuracyPlan) -> dict:
    return {"schema_version": SCHEMA_VERSION, "placement": dict(plan.placement),
            "routing": {f: dict(s) for f, s in plan.routing.items()},
            "effective_accuracy": plan.effective_accuracy, "headroom": plan.headroom,
            "unserved_rps": dict(plan.unserved_rps), "solver": plan.solver}


