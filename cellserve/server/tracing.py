"""Triton's trace extension: per-request timestamps, sampled, written as Triton's JSON trace file.

What a Triton user knows carries over (docs/tracing.md): `--trace-config level=TIMESTAMPS`,
`rate=N`, `count=N`, `mode=triton`, `triton,file=PATH`, `triton,log-frequency=N`; `GET/POST
v2[/models/M]/trace/setting` (HTTP) and the `TraceSetting` RPC (gRPC) with the settings
trace_level, trace_rate, trace_count, log_frequency, trace_file, trace_mode; "trace" among the
server metadata's extensions; and the trace file, a JSON list with one object per traced
request: {"id", "model_name", "model_version", "request_id", "timestamps": [{"name", "ns"}]}.

Contracts:
- `Tracer.on` is False while no scope has level TIMESTAMPS: the frontends test it once per
  request and build nothing else. Everything below runs on the frontends' asyncio loop, except
  `Trace.stamp*`, which the engine thread also calls on the traces it was handed (one request's
  trace is touched by one thread at a time: the loop, then the engine, then the loop).
- Sampling (Triton's): a scope traces every `trace_rate`-th inference request it sees while its
  `trace_count` (-1: unlimited) is above 0, and each trace taken lowers that count by one. A
  model with settings of its own (POST v2/models/M/trace/setting) is a scope; its unset
  settings follow the server's. A setting posted as null clears the model's own value.
- Stamps are `time.perf_counter_ns()`, the clock the server reads (MonotonicClock), so stamps
  made from the server's clock readings (a request's arrival) line up with the others.
- Bad settings raise TraceSettingError naming the setting and the value (the frontends answer
  it 400 / INVALID_ARGUMENT); `parse_trace_config` raises ValueError naming the --trace-config
  entry. stdlib only: ServerSettings imports this module, and `serve --help` stays fast.
- Files: with log_frequency 0 the traces are written to trace_file when the server stops
  (`close`); with N > 0 every N traces go to `trace_file.<i>`, i = 0, 1, ..., and what is
  left at the stop to the next index. Each file is written whole (a temporary, then renamed).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cellserve.decimal_text import ascii_int

# Every timestamp a trace may hold, in the order they happen (docs/tracing.md says what each
# marks). Triton's names where they mean the same; the others are cellserve's.
STAMPS = ("HTTP_RECV_START", "HTTP_RECV_END", "GRPC_WAITREAD_END", "REQUEST_START", "QUEUE_START",
          "ENGINE_ADMIT", "COMPUTE_START", "COMPUTE_INPUT_END", "PROJECTION_END", "FIRST_STEP_START",
          "LAST_STEP_END", "COMPUTE_OUTPUT_START", "PLAIN_OPS_END", "COMPUTE_END", "RESPONSE_ON_LOOP",
          "REQUEST_END", "HTTP_SEND_START", "HTTP_SEND_END", "GRPC_SEND_START", "GRPC_SEND_END")
_ORDER = {name: i for i, name in enumerate(STAMPS)}
LEVELS = ("OFF", "TIMESTAMPS")
_KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_file", "trace_mode")
_SERVER_WIDE = ("log_frequency", "trace_file", "trace_mode")  # not per model here


class TraceSettingError(ValueError):
    """A trace/setting request that cannot be applied; the message names the setting."""


@dataclass(frozen=True)
class TraceSettings:
    """One scope's settings (the server's, or a model's own merged over them)."""

    level: str = "OFF"  # OFF or TIMESTAMPS
    rate: int = 1000  # trace every rate-th request
    count: int = -1  # traces left to take; -1: no limit
    log_frequency: int = 0  # 0: write at the stop; N: write every N traces
    file: str = ""

    def as_protocol(self) -> dict:
        """The settings as the protocol shows them: strings, trace_level a list."""
        return {"trace_level": [self.level], "trace_rate": str(self.rate), "trace_count": str(self.count),
                "log_frequency": str(self.log_frequency), "trace_file": self.file, "trace_mode": "triton"}


def _int(text: str, what: str, low: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {text!r}") from None
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")
    return value


def _count(text: str, what: str) -> int:
    value = _int(text, what, -1)
    return value


def _level(values: list[str], what: str) -> str:
    levels = {v.upper() for v in values}
    unknown = sorted(levels - set(LEVELS) - {"TENSORS"})
    if unknown or not levels:
        raise ValueError(f"{what} must be OFF or TIMESTAMPS, got {values!r}")
    if "TENSORS" in levels:
        raise ValueError(f"{what} TENSORS is not supported by cellserve (TIMESTAMPS only)")
    return "TIMESTAMPS" if "TIMESTAMPS" in levels else "OFF"


def _check_writable(path: str) -> None:
    """A trace file is written when the server stops (or every log-frequency traces): one
    that cannot be is refused at start, not found out at shutdown with the traces lost."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"file {path!r} is a directory")
    if not folder.is_dir():
        raise ValueError(f"file {path!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"file {path!r}: folder {str(folder)!r} is not writable")


def parse_trace_config(entries: list[str]) -> TraceSettings:
    """The server's settings from --trace-config entries (Triton's forms: `SETTING=VALUE` for
    level, rate, count, mode; `triton,file=PATH`, `triton,log-frequency=N`). ValueError names the
    entry and what is wrong with it."""
    settings = TraceSettings()
    for entry in entries:
        mode, _, rest = entry.rpartition(",")
        key, eq, value = rest.partition("=")
        where = f"entry {entry!r}"
        if not eq:
            raise ValueError(f"{where}: expected SETTING=VALUE or triton,SETTING=VALUE")
        try:
            if mode == "":
                if key == "level":
                    settings = replace(settings, level=_level([value], "level"))
                elif key == "rate":
                    settings = replace(settings, rate=_int(value, "rate", 1))
                elif key == "count":
                    settings = replace(settings, count=_count(value, "count"))
                elif key == "mode":
                    if value != "triton":
                        raise ValueError(f"mode {value!r} is not supported (triton only; no opentelemetry)")
                else:
                    raise ValueError(f"unknown setting {key!r} (level, rate, count, mode; or triton,file= and "
                                     "triton,log-frequency=)")
            elif mode == "triton":
                if key == "file":
                    if not value:
                        raise ValueError("file must be a path")
                    _check_writable(value)
                    settings = replace(settings, file=value)
                elif key == "log-frequency":
                    settings = replace(settings, log_frequency=_int(value, "log-frequency", 0))
                else:
                    raise ValueError(f"unknown triton setting {key!r} (file, log-frequency)")
            else:
                raise ValueError(f"mode {mode!r} is not supported (triton only)")
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if settings.level == "TIMESTAMPS" and not settings.file:
        raise ValueError("level=TIMESTAMPS needs a file to write the traces to: add triton,file=PATH")
    return settings


def trace_config_paths(entries: list[str], f: Callable[[Path], Path]) -> list[str]:
    """The entries with f applied to the trace file's path (`triton,file=PATH`): ServerSettings'
    `paths` hook, so that a config file's relative trace file is taken from the file's folder."""
    out = []
    for entry in entries:
        mode, _, rest = entry.rpartition(",")
        key, eq, value = rest.partition("=")
        out.append(f"{mode},file={f(Path(value))}" if mode == "triton" and key == "file" and value else entry)
    return out


def check_trace_config(entries: list[str]) -> str | None:
    """ServerSettings' check of --trace-config: None, or what is wrong (after the flag's name)."""
    try:
        parse_trace_config(entries)
    except ValueError as exc:
        return str(exc)
    return None


class Trace:
    """One traced request: its identity and its stamps ({name: ns})."""

    __slots__ = ("id", "model_name", "model_version", "request_id", "stamps")

    def __init__(self, trace_id: int, model_name: str, model_version: str, request_id: str = ""):
        self.id, self.model_name, self.model_version, self.request_id = trace_id, model_name, model_version, request_id
        self.stamps: dict[str, int] = {}

    def stamp(self, name: str) -> None:
        self.stamps[name] = time.perf_counter_ns()

    def stamp_first(self, name: str) -> None:
        """Stamp `name` unless it is there (a first step)."""
        if name not in self.stamps:
            self.stamps[name] = time.perf_counter_ns()

    def stamp_s(self, name: str, seconds: float) -> None:
        """Stamp a time read earlier from the server's clock (perf_counter seconds)."""
        self.stamps[name] = int(seconds * 1e9)

    def to_json(self) -> dict:
        version = ascii_int(self.model_version)
        version = -1 if version is None else version
        ordered = sorted(self.stamps.items(), key=lambda kv: (_ORDER.get(kv[0], len(STAMPS)), kv[1]))
        return {"id": self.id, "model_name": self.model_name, "model_version": version,
                "request_id": self.request_id, "timestamps": [{"name": n, "ns": ns} for n, ns in ordered]}


class _Scope:
    """A scope's sampling state: requests seen, traces left."""

    def __init__(self, count: int):
        self.seen = 0
        self.left = count


class Tracer:
    """The server's trace settings, sampling and trace files (see the module docstring)."""

    def __init__(self, settings: TraceSettings | None = None):
        self.settings = settings or TraceSettings()
        self._global = _Scope(self.settings.count)
        self._models: dict[str, dict] = {}  # model -> its own settings {key: value}
        self._scopes: dict[str, _Scope] = {}  # model -> its sampling state, when it has settings
        self._ids = itertools.count(1)
        self._buffer: list[dict] = []
        self._file_index = 0
        self.written = 0  # traces written so far
        self.on = False
        self._refresh()

    # ---- settings ----

    def effective(self, model: str | None = None) -> TraceSettings:
        own = self._models.get(model, {}) if model else {}
        base = replace(self.settings, count=self._global.left)
        if model in self._scopes:
            base = replace(base, count=self._scopes[model].left)
        return replace(base, **{k: v for k, v in own.items() if k != "count"})

    def get(self, model: str | None = None) -> dict:
        return self.effective(model).as_protocol()

    def update(self, changes: dict, model: str | None = None) -> dict:
        """Apply a trace/setting request ({setting: value, list of values, or None}); return
        the scope's settings after it. TraceSettingError names the first bad setting; nothing changes
        then."""
        if not isinstance(changes, dict):
            raise TraceSettingError(f"the trace setting request must be a JSON object, got {type(changes).__name__}")
        parsed: dict[str, object] = {}
        for key, value in changes.items():
            if key not in _KEYS:
                raise TraceSettingError(f"unknown trace setting {key!r}; known: {', '.join(_KEYS)}")
            if value is None:
                if model is None:
                    raise TraceSettingError(f"trace setting {key!r}: only a model's own settings can be cleared (null)")
                parsed[key] = None
                continue
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
                raise TraceSettingError(f"trace setting {key!r} must be a string (or a list of strings), got {value!r}")
            values = [str(v) for v in values]
            if key != "trace_level" and len(values) != 1:
                raise TraceSettingError(f"trace setting {key!r} takes one value, got {value!r}")
            parsed[key] = self._parse(key, values, model)
        if model is None:
            self._apply_global(parsed)
        else:
            self._apply_model(model, parsed)
        self._refresh()
        return self.get(model)

    def _parse(self, key: str, values: list[str], model: str | None) -> object:
        try:
            if key == "trace_file":
                raise ValueError("is set when the server starts (--trace-config triton,file=PATH), not over "
                                 "the protocol")
            if key in _SERVER_WIDE and model is not None:
                raise ValueError(f"is server-wide here: set it without a model (v2/trace/setting), got {values[0]!r}")
            if key == "trace_mode":
                if values[0] != "triton":
                    raise ValueError(f"{values[0]!r} is not supported (triton only)")
                return "triton"
            if key == "trace_level":
                level = _level(values, "")
                if level == "TIMESTAMPS" and not self.settings.file:
                    raise ValueError("TIMESTAMPS needs a trace file, and none was given at start "
                                     "(--trace-config triton,file=PATH)")
                return level
            if key == "trace_rate":
                return _int(values[0], "", 1)
            if key == "trace_count":
                return _count(values[0], "")
            return _int(values[0], "", 0)  # log_frequency
        except ValueError as exc:
            text = str(exc).lstrip()
            raise TraceSettingError(f"trace setting {key!r} {text}") from None

    _FIELDS = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count", "log_frequency": "log_frequency"}

    def _apply_global(self, parsed: dict) -> None:
        fields = {self._FIELDS[k]: v for k, v in parsed.items() if k in self._FIELDS}
        self.settings = replace(self.settings, **fields)
        if "count" in fields:
            self._global.left = fields["count"]

    def _apply_model(self, model: str, parsed: dict) -> None:
        own = self._models.setdefault(model, {})
        for key, value in parsed.items():
            name = self._FIELDS.get(key)
            if name is None:
                continue  # trace_mode: triton, as the server's
            if value is None:
                own.pop(name, None)
            else:
                own[name] = value
        scope = self._scopes.get(model)
        if scope is None:
            scope = self._scopes[model] = _Scope(self._global.left)
        if "count" in own and parsed.get("trace_count") is not None:
            scope.left = own["count"]
        if not own:  # every setting cleared: the model follows the server's again
            del self._models[model]
            del self._scopes[model]

    def _refresh(self) -> None:
        self.on = self.settings.level == "TIMESTAMPS" or any(s.get("level") == "TIMESTAMPS"
                                                              for s in self._models.values())

    # ---- traces ----

    def start(self, model: str, version: str, request_id: str = "") -> Trace | None:
        """A trace for this inference request, or None when its scope does not sample it."""
        own = self._models.get(model)
        level = own.get("level", self.settings.level) if own else self.settings.level
        if level != "TIMESTAMPS":
            return None
        scope = self._scopes.get(model, self._global)
        rate = own.get("rate", self.settings.rate) if own else self.settings.rate
        scope.seen += 1
        if scope.left == 0 or scope.seen % rate:
            return None
        if scope.left > 0:
            scope.left -= 1
        return Trace(next(self._ids), model, version, request_id)

    def finish(self, trace: Trace) -> None:
        """A traced request was answered: keep its trace; write a file every log_frequency."""
        self._buffer.append(trace.to_json())
        every = self.settings.log_frequency
        if every and len(self._buffer) >= every:
            self._write(f"{self.settings.file}.{self._file_index}")
            self._file_index += 1

    def close(self) -> None:
        """Write what is left (the server stops)."""
        if not self._buffer or not self.settings.file:
            return
        if self.settings.log_frequency:
            self._write(f"{self.settings.file}.{self._file_index}")
            self._file_index += 1
        else:
            self._write(self.settings.file)

    def _write(self, path: str) -> None:
        traces, self._buffer = self._buffer, []
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(traces))
        os.replace(tmp, target)
        self.written += len(traces)


def read_trace_files(path: str | Path) -> list[dict]:
    """Every trace written for `path`: the file itself and its numbered parts (path.0, ...),
    in order. Triton's newer layout (an object per stamp, and one with the model, sharing an
    id) is merged into one object per id as well."""
    path = Path(path)
    files = [path] if path.exists() else []
    i = 0
    while Path(f"{path}.{i}").exists():
        files.append(Path(f"{path}.{i}"))
        i += 1
    merged: dict[int, dict] = {}
    for file in files:
        data = json.loads(file.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{file}: a trace file is a JSON list, got {type(data).__name__}")
        for k, item in enumerate(data):
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{file}: entry {k} is not a trace object with an 'id'")
            into = merged.setdefault(item["id"], {"id": item["id"], "timestamps": []})
            for key, value in item.items():
                if key == "timestamps":
                    into["timestamps"] += value
                elif key != "id":
                    into[key] = value
    return list(merged.values())
