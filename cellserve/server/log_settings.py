"""Triton's logging extension: what the server writes about itself, where and how, set at
start by `cellserve serve --log-*` and read or changed while it runs (HTTP `GET`/`POST
/v2/logging`, gRPC `LogSettings`; tritonclient's get_log_settings / update_log_settings).

The settings, by Triton's names:
- `log_file`: the file the log is appended to ("": standard error);
- `log_info`, `log_warning`, `log_error`: whether messages of that severity are written (by
  default warnings and errors, as the server always wrote them; information off);
- `log_verbose_level`: 0, or 1 and up: a line per inference request besides (model, id,
  outcome, time in the server);
- `log_format`: "default" (`I1205 09:45:27.123456 4242 core.py:401] message`, Triton's glog
  style) or "ISO8601" (`2026-12-05T09:45:27Z I core.py:401] message`).

An update names only the settings it changes; anything unknown or of the wrong type is
refused naming it, and nothing changes. `log_file` is set at start only (`--log-file`), as
the trace file is: a client may not make the server write where it chooses. The log is the "cellserve" logger's, so every
module's messages go through it; its handler is installed by `install()` (the server does at
start), not on import, so that importing the server changes no one's logging.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

LOGGER = "cellserve"
FORMATS = ("default", "ISO8601")


class LogSettingError(ValueError):
    """A log setting that cannot be applied; the message names it."""


@dataclass(frozen=True)
class LogSettings:
    log_file: str = ""
    log_info: bool = False
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0
    log_format: str = "default"

    def checked(self, changes: dict) -> LogSettings:
        """These settings with `changes` (protocol names and JSON values) applied, or
        LogSettingError naming the first bad one."""
        if not isinstance(changes, dict):
            raise LogSettingError(f"the log settings must be an object, got {type(changes).__name__}")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise LogSettingError(f"unknown log setting(s) {unknown}; known: {sorted(known)}")
        for key, value in changes.items():
            if key in ("log_info", "log_warning", "log_error") and not isinstance(value, bool):
                raise LogSettingError(f"log setting {key!r} must be a boolean, got {value!r}")
            if key == "log_verbose_level" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise LogSettingError(f"log setting {key!r} must be an integer >= 0, got {value!r}")
            if key in ("log_file", "log_format") and not isinstance(value, str):
                raise LogSettingError(f"log setting {key!r} must be a string, got {value!r}")
            if key == "log_file" and value != self.log_file:
                raise LogSettingError("log setting 'log_file' is set only at start (--log-file): a client may "
                                      "not choose where the server writes")
        if changes.get("log_format", self.log_format) not in FORMATS:
            raise LogSettingError(f"log setting 'log_format' must be one of {list(FORMATS)}, "
                                  f"got {changes['log_format']!r}")
        return replace(self, **changes)


class _Formatter(logging.Formatter):
    def __init__(self, iso: bool):
        super().__init__()
        self.iso = iso

    def format(self, record: logging.LogRecord) -> str:
        letter = record.levelname[:1]
        where = f"{record.filename}:{record.lineno}"
        if self.iso:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            head = f"{stamp} {letter} {where}]"
        else:
            local = time.localtime(record.created)
            micros = int((record.created % 1) * 1e6)
            head = f"{letter}{time.strftime('%m%d %H:%M:%S', local)}.{micros:06d} {record.process} {where}]"
        text = f"{head} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Severities(logging.Filter):
    """Passes a record when its severity is turned on (below INFO: the verbose lines)."""

    def __init__(self, settings: LogSettings):
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        s, level = self.settings, record.levelno
        if level >= logging.ERROR:
            return s.log_error
        if level >= logging.WARNING:
            return s.log_warning
        if level >= logging.INFO:
            return s.log_info
        return s.log_verbose_level > 0


class ServerLog:
    """The server's log settings and the handler that applies them (module docstring)."""

    def __init__(self, settings: LogSettings | None = None):
        self.settings = settings or LogSettings()
        self._handler: logging.Handler | None = None

    @classmethod
    def from_settings(cls, settings) -> ServerLog:
        """The log as `cellserve serve`'s settings (server/settings.py, its log_* fields) set it."""
        return cls(LogSettings(str(settings.log_file or ""), settings.log_info, settings.log_warning,
                               settings.log_error, settings.log_verbose, settings.log_format))

    @property
    def verbose(self) -> int:
        return self.settings.log_verbose_level

    def get(self) -> dict:
        return asdict(self.settings)

    def install(self) -> None:
        """Write the log as the settings say from now on (replacing what this log installed)."""
        self._apply(self.settings)

    def close(self) -> None:
        """Stop writing the log (the handler this log installed goes, its file closed)."""
        if self._handler is not None:
            logging.getLogger(LOGGER).removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def update(self, changes: dict) -> dict:
        """Apply `changes` (LogSettingError, and nothing changed, when one is bad); the
        settings after."""
        settings = self.settings.checked(changes)
        if self._handler is not None:
            self._apply(settings)
        self.settings = settings
        return self.get()

    def _apply(self, settings: LogSettings) -> None:
        if settings.log_file:
            try:
                handler: logging.Handler = logging.FileHandler(settings.log_file, mode="a", encoding="utf-8")
            except OSError as exc:
                raise LogSettingError(f"log setting 'log_file': cannot open {settings.log_file!r} for appending: "
                                      f"{exc.strerror or exc}") from None
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(iso=settings.log_format == "ISO8601"))
        handler.addFilter(_Severities(settings))
        logger = logging.getLogger(LOGGER)
        old, self._handler = self._handler, handler
        logger.addHandler(handler)
        if old is not None:
            logger.removeHandler(old)
            old.close()
        logger.setLevel(logging.DEBUG if settings.log_verbose_level > 0 else logging.INFO)
