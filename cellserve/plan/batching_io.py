"""The analytic batcher's files: ARRIVALS, SERVICE, and the PLAN it writes (docs/batching.md).

Each `load_*` refuses a broken file with a BatchingError naming the file and the field
(`arrivals file 'A.json': map.D1[0][1] must be >= 0 (a rate), got -3.0`). A file may carry
`"schema_version": 1`; unknown fields are ignored.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from cellserve.decimal_text import positive_key
from cellserve.plan.batching import SCHEMA_VERSION, Service
from cellserve.plan.batching_map import BatchingError, Map, fit_mmpp2
from cellserve.plan.profile import ProfileError, _get, _num, _obj
from cellserve.plan.json_io import check_version, read_json, write_json  # noqa: F401 (write_json: this module's API)

_read_json = functools.partial(read_json, error=BatchingError)
_version = functools.partial(check_version, version=SCHEMA_VERSION, error=BatchingError)

MAX_SIZE = 65536


def load_arrivals(path: str | Path) -> Map:
    """ARRIVALS: {"map": {"D0": [[..]], "D1": [[..]]}} or {"poisson_rps": r} or {"trace": PATH};
    exactly one of the three. A trace path is relative to the ARRIVALS file's folder."""
    path = Path(path)
    what = f"arrivals file {str(path)!r}"
    try:
        d = _obj(_read_json(path, "arrivals file"), "arrivals")
        _version(d, "arrivals")
        given = [k for k in ("map", "poisson_rps", "trace") if k in d]
        if len(given) != 1:
            raise BatchingError(f"arrivals must have exactly one of 'map', 'poisson_rps' and 'trace', got "
                                f"{given or sorted(d)}")
        if given[0] == "poisson_rps":
            return Map.poisson(_num(d["poisson_rps"], "arrivals.poisson_rps", positive=True))
        if given[0] == "map":
            body = _obj(d["map"], "arrivals.map")
            return Map.of(_get(body, "D0", "arrivals.map"), _get(body, "D1", "arrivals.map"), "arrivals.map")
        trace = d["trace"]
        if not isinstance(trace, str) or not trace:
            raise BatchingError(f"arrivals.trace must be a non-empty path, got {trace!r}")
        trace_path = path.parent / trace
        return fit_mmpp2(read_trace(trace_path), f"arrivals.trace {str(trace_path)!r}")
    except ProfileError as exc:  # named once: a file that does not read names itself already
        raise BatchingError(str(exc) if str(exc).startswith(what) else f"{what}: {exc}") from None


def read_trace(path: Path) -> list[float]:
    """Arrival timestamps in seconds: a JSON array of numbers, or text with one number a line
    (blank lines and lines starting with # skipped)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BatchingError(f"cannot read trace {str(path)!r}: {exc.strerror}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BatchingError(f"trace {str(path)!r} is not a JSON array: {exc}") from None
        out = []
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BatchingError(f"trace {str(path)!r}[{i}] must be a finite number of seconds, got {v!r}")
            out.append(float(v))
        return out
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            v = float(line)
        except ValueError:
            raise BatchingError(f"trace {str(path)!r} line {no}: {line[:40]!r} is not a number of seconds") from None
        if not math.isfinite(v):
            raise BatchingError(f"trace {str(path)!r} line {no}: {line!r} is not finite")
        out.append(v)
    return out


def load_service(path: str | Path) -> Service:
    """SERVICE: {"latency_ms": {"1": .., "4": .., ...}}: batch sizes to ms (> 0), each a number
    (the mean) or a non-empty list of measured times (their distribution; `Service`)."""
    path = Path(path)
    try:
        d = _obj(_read_json(path, "service file"), "service")
        _version(d, "service")
        lat = _obj(_get(d, "latency_ms", "service"), "service.latency_ms")
        if not lat:
            raise BatchingError("service.latency_ms is empty; it maps batch sizes to milliseconds")
        given = {}
        for key, ms in lat.items():
            if (batch := positive_key(key)) is None or batch > MAX_SIZE:
                raise BatchingError(f"service.latency_ms has key {key!r}; keys are batch sizes 1, 2, ... {MAX_SIZE}")
            where = f"service.latency_ms[{key!r}]"
            if isinstance(ms, list):
                if not ms:
                    raise BatchingError(f"{where} is an empty list; give a number (ms) or measured times (ms)")
                given[batch] = [_num(x, f"{where}[{i}]", positive=True) for i, x in enumerate(ms)]
            else:
                given[batch] = _num(ms, where, positive=True)
        return Service.measured(given)
    except ProfileError as exc:
        what = f"service file {str(path)!r}"
        raise BatchingError(str(exc) if str(exc).startswith(what) else f"{what}: {exc}") from None


def plan_to_dict(ev, arrivals: Map, slo_ms: float | None = None, search: dict | None = None,
                 single_server: bool = False) -> dict:
    """PLAN: the issue's fields (max_batch, timeout_ms, batch_pmf, mean_batch,
    latency_percentile_ms, percentile) plus schema_version, device_ms_per_request, the SLO
    searched for (null when a given (B, T) was evaluated), the server model ("at-once": each
    batch served when dispatched; "single": one server), the arrival process used (a trace's
    fit) with its mean rate, and, for a search, how many grid points it had and evaluated."""
    d = ev.to_dict()
    d["slo_ms"] = slo_ms
    d["server"] = "single" if single_server else "at-once"
    d["arrivals"] = {"map": arrivals.to_dict(), "rate_rps": arrivals.rate_rps}
    if search is not None:
        d["search"] = search
    return d
