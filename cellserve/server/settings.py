"""`cellserve serve`'s settings: the one definition of everything a server can be told.

ServerSettings holds the server's own settings and, in `engine`, the EngineConfig the engine
runs with. Every field is declared with `setting(...)` (cellserve/config.py), so that each is,
with no other code to write:
- a `cellserve serve` flag with its help and default (cellserve/config_args.py), booleans as
  --x/--no-x;
- a key of the `--config` TOML file (top-level keys, and the [engine] table);
- a line of `cellserve serve --print-config`.

To add a setting, append a field here with `setting(default, "help", ...)` (bounds with
ge/gt/le/choices, the flag's name with flag=, the --help section with group=);
tests/test_config.py fails for a field without help.

Building a ServerSettings validates it (ConfigError names each bad field). This module
imports no torch, so that `cellserve serve --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cellserve.config import Problem, check, setting
from cellserve.engine.config import EngineConfig

_MODELS = "models"
_NETWORK = "network"
_BATCHING = "batching and admission"
_COMPUTE = "compute"
_LIFECYCLE = "sequences and lifecycle"
GROUPS = (_MODELS, _NETWORK, _BATCHING, _COMPUTE, _LIFECYCLE)  # --help's sections, in order


def _port(value: int) -> str | None:
    if not -1 <= value <= 65535:
        return f"must be a port number, 0 (any free port) or -1 (off), got {value}"
    return None


@dataclass
class ServerSettings:
    model_repository: Path | None = setting(None, "a Triton-style model repository: "
                                                  "<repo>/<model>/<version>/model.onnx (+ optional config.pbtxt)",
                                            unset="the zoo", group=_MODELS, metavar="DIR")
    zoo_models: list[str] = setting(help="serve only these zoo models (repeat the flag for several; "
                                         "not with a model repository)",
                                    default_factory=list, flag="--model", unset="all", group=_MODELS,
                                    metavar="NAME")
    host: str = setting("127.0.0.1", "address to bind", group=_NETWORK)
    http_port: int = setting(8000, "HTTP port (0: any free; -1: off)", check=_port, group=_NETWORK, metavar="PORT")
    grpc_port: int = setting(8001, "gRPC port (0: any free; -1: off)", check=_port, group=_NETWORK, metavar="PORT")
    metrics_port: int = setting(8002, "Prometheus metrics port (0: any free; -1: off)", check=_port,
                                group=_NETWORK, metavar="PORT")
    default_slo_ms: float | None = setting(None, "default deadline in milliseconds of zoo models' requests that "
                                                 "send no timeout", gt=0, flag="--slo-ms", unset="none",
                                           group=_BATCHING, metavar="MS")
    max_request_bytes: int = setting(64 << 20, "largest request body in bytes", gt=0, flag="--max-request-size",
                                     group=_NETWORK, metavar="BYTES")
    sequence_idle_s: float = setting(60.0, "seconds before an idle sequence is released (a model's config may "
                                           "override)", gt=0, flag="--sequence-idle-timeout", group=_LIFECYCLE,
                                     metavar="SECONDS")
    max_sequences: int = setting(100_000, "active sequences at once", gt=0, group=_LIFECYCLE, metavar="N")
    grace_s: float = setting(30.0, "seconds in-flight requests get to finish after SIGTERM/SIGINT", ge=0,
                             flag="--grace-period", group=_LIFECYCLE, metavar="SECONDS")
    threads: int | None = setting(None, "CPU threads for the cell kernels", ge=1, unset="torch's, one per core",
                                  group=_COMPUTE, metavar="N")
    engine: EngineConfig = setting(help="the engine's settings", default_factory=EngineConfig)
    # issue 15: bounds on connections and slow clients (HTTP and gRPC)
    max_connections: int = setting(4096, "open client connections per protocol; past it a new HTTP connection is "
                                         "answered 503 and closed", ge=1, group=_NETWORK, metavar="N")
    idle_timeout_s: float = setting(5.0, "seconds a client connection may stay idle between requests",
                                    gt=0, flag="--idle-timeout", group=_NETWORK, metavar="SECONDS")
    read_timeout_s: float = setting(10.0, "seconds a client may take to send a request's headers, or leave its "
                                          "body stalled, before a 408 and close (slowloris)",
                                    gt=0, flag="--read-timeout", group=_NETWORK, metavar="SECONDS")
    grpc_max_pending: int = setting(128, "gRPC calls waiting for the frontend's loop to take them; past it gRPC core "
                                         "itself refuses new calls (status CANCELLED), before they cost any Python "
                                         "work or outwait their deadline in its queue", ge=1, group=_NETWORK,
                                    metavar="N")

    def __post_init__(self) -> None:
        check(self)  # ConfigError (a ValueError) naming each bad field

    def _problems(self) -> list[Problem]:
        if self.model_repository is not None and self.zoo_models:
            return [Problem("zoo_models", "{name} picks zoo models; it cannot be combined with {0}",
                            ("model_repository",))]
        return []
