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

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cellserve.config import Problem, check, path_list, setting
from cellserve.engine.config import EngineConfig
from cellserve.server.tracing import check_trace_config, trace_config_paths

_MODELS = "models"
DEFAULT_POLL_S = 15.0  # Triton's --repository-poll-secs default
_NETWORK = "network"
_BATCHING = "batching and admission"
_COMPUTE = "compute"
_LIFECYCLE = "sequences and lifecycle"
_RAY = "Ray cluster (docs/ray.md)"
_TRACING = "tracing (docs/tracing.md)"
_LOGGING = "logging (changeable while serving: /v2/logging)"
GROUPS = (_MODELS, _NETWORK, _BATCHING, _COMPUTE, _LIFECYCLE, _RAY, _TRACING, _LOGGING)  # --help's sections


def _port(value: int) -> str | None:
    if not -1 <= value <= 65535:
        return f"must be a port number, 0 (any free port) or -1 (off), got {value}"
    return None


@dataclass
class ServerSettings:
    model_repository: Path | None = setting(None, "a Triton-style model repository: "
                                                  "<repo>/<model>/<version>/model.onnx (+ optional config.pbtxt)",
                                            unset="the zoo", group=_MODELS, metavar="DIR",
                                            once="one repository is served (Triton takes several; put the models "
                                                 "in one)")
    zoo_models: list[str] = setting(help="serve only these zoo models (repeat the flag for several; "
                                         "not with a model repository)",
                                    default_factory=list, flag="--model", unset="all", group=_MODELS,
                                    metavar="NAME")
    model_control_mode: str = setting("none", "none: serve the models found at start; explicit: load and unload "
                                              "models of --model-repository while serving (Triton's repository "
                                              "API: POST v2/repository/models/NAME/load, .../unload), starting "
                                              "with those of --load-model; poll: serve every model of "
                                              "--model-repository and follow its changes (a folder added, "
                                              "changed or removed loads, reloads or unloads its model)",
                                      choices=("none", "explicit", "poll"), group=_MODELS)
    load_models: list[str] = setting(help="with --model-control-mode explicit: a model to load at start (repeat "
                                          "the flag; * for every model of the repository)",
                                     default_factory=list, flag="--load-model", unset="none", group=_MODELS,
                                     metavar="NAME")
    repository_poll_s: float | None = setting(None, "with --model-control-mode poll: seconds between two looks at "
                                                    "the model repository (at least 0.1)", ge=0.1, flag="--repository-poll-secs",
                                              unset=f"{DEFAULT_POLL_S:g}", group=_MODELS, metavar="SECONDS")
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
    grpc_max_pending: int = setting(128, "gRPC calls waiting for the frontend's loop to take them; past half of it "
                                         "gRPC core itself refuses a growing share of new calls, past it all (status "
                                         "CANCELLED), before they cost any Python work or outwait their deadline in "
                                         "its queue; raise it for clients that send bursts of that many calls at "
                                         "once", ge=1, group=_NETWORK, metavar="N")
    # issue 16: the engines as Ray actors (cellserve/cluster/ray_cluster.py)
    ray_address: str | None = setting(None, "run the engines as workers on Ray: --ray alone starts a local Ray, "
                                            "--ray ADDRESS joins a running cluster (auto, HOST:6379, "
                                            "ray://HOST:10001); needs pip install cellserve[ray]",
                                      flag="--ray", const="local", unset="off: one engine in this process",
                                      group=_RAY, metavar="ADDRESS")
    ray_workers: int | None = setting(None, "engine workers (Ray actors), each serving every model", ge=1,
                                      unset="2, or one per device of --plan", group=_RAY, metavar="N")
    ray_cpus_per_worker: int = setting(1, "cores of each worker's device group (its Ray placement-group "
                                          "bundle and its kernel threads)", ge=1, group=_RAY, metavar="N")
    plan: Path | None = setting(None, "a Nexus plan (cellserve plan nexus): one worker per device, serving its "
                                      "sessions' models; each model's rate beyond the plan's is refused (429)",
                                unset="none", group=_RAY, metavar="PLAN.json")
    replan_every_s: float | None = setting(None, "run the Nexus planner in the cluster: re-plan every SECONDS (and "
                                                 "early when a model's measured rate leaves its plan's band, or at "
                                                 "once when a worker dies), loading and unloading models on the "
                                                 "workers; each model's SLO is its slo_ms", gt=0,
                                           flag="--replan-every", unset="off: the workers serve what they "
                                           "started with", group=_RAY, metavar="SECONDS")
    ray_data_plane: str = setting("socket", "how requests reach the Ray workers: socket (a direct stream to each "
                                            "worker; Ray only places and watches them) or ray (one actor call "
                                            "each)", choices=("socket", "ray"), group=_RAY)
    # issue 19: cores shared by models (Veltair) on the Ray workers (cellserve/cluster/ray_cores.py)
    core_allocation: list[str] = setting(help="serve each model on a Ray worker of its own, pinned to cores an "
                                              "allocator gives it from these kernel-versions profiles (cellserve "
                                              "profile-versions; one per model, repeat the flag) and each model's "
                                              "SLO, moved every second as the models' rates and the load other "
                                              "processes put on each core change (docs/tenancy.md); needs a "
                                              "local --ray and --slo-ms",
                                         default_factory=list, flag="--core-allocation",
                                         unset="off: the workers share every core", group=_RAY,
                                         metavar="V.json", paths=path_list)
    # issue 18: accuracy scaling (Proteus) on the Ray workers (cellserve/cluster/ray_accuracy*.py)
    accuracy_scaling: bool = setting(False, "serve the zoo's variant families by accuracy scaling: clients send to a "
                                            "family, each Ray worker hosts one variant, Proteus's plan re-solved "
                                            "every period (--replan-every, default 10 s) on the measured demand "
                                            "(docs/accuracy-scaling.md); needs --ray and --slo-ms",
                                     group=_RAY)
    accuracy_profiles: list[str] = setting(help="with --accuracy-scaling: a variant's profile file (cellserve "
                                                "profile --model VARIANT --json FILE; repeat the flag for several), "
                                                "whose step costs plan that variant's capacity",
                                           default_factory=list, flag="--accuracy-profiles",
                                           unset="each worker times every variant alone at start", group=_RAY,
                                           metavar="PROFILE.json", paths=path_list)
    # issue 21: Triton's trace extension (cellserve/server/tracing.py)
    trace_config: list[str] = setting(help="a trace setting, as Triton's (repeat the flag): level=TIMESTAMPS, "
                                           "rate=N (every N-th request), count=N (-1: no limit), mode=triton, "
                                           "triton,file=PATH, triton,log-frequency=N",
                                      default_factory=list, flag="--trace-config", unset="tracing off",
                                      check=check_trace_config, group=_TRACING, metavar="SETTING=VALUE",
                                      paths=trace_config_paths)

    # Triton's logging extension (cellserve/server/log_settings.py)
    log_file: Path | None = setting(None, "append the server's log to this file", unset="standard error",
                                    group=_LOGGING, metavar="FILE")
    log_info: bool = setting(False, "log information messages", group=_LOGGING)
    log_warning: bool = setting(True, "log warnings", group=_LOGGING)
    log_error: bool = setting(True, "log errors", group=_LOGGING)
    log_verbose: int = setting(0, "verbose level: 1 and up adds a line per inference request", ge=0,
                               group=_LOGGING, metavar="LEVEL")
    log_format: str = setting("default", "the log's line format: default (glog's, as Triton's) or ISO8601",
                              choices=("default", "ISO8601"), group=_LOGGING)

    def __post_init__(self) -> None:
        check(self)  # ConfigError (a ValueError) naming each bad field

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.model_repository is not None and self.zoo_models:
            problems.append(Problem("zoo_models", "{name} picks zoo models; it cannot be combined with {0}",
                                    ("model_repository",)))
        problems += _unused_engine_settings(self.engine)
        if self.model_repository is not None and self.default_slo_ms is not None:
            problems.append(Problem("default_slo_ms", "{name} is the zoo models' default deadline; a repository "
                                    "model's is its config's slo_ms parameter (for every model: --default-timeout)"))
        mode = self.model_control_mode
        if mode != "none":
            if self.model_repository is None:
                problems.append(Problem("model_control_mode", f"{{name}} {mode} follows a model repository: it needs "
                                        "--model-repository (model_repository)"))
            for key, value in (("ray_address", self.ray_address), ("engine.placement", self.engine.placement)):
                if value is not None:
                    problems.append(Problem("model_control_mode", f"{{name}} {mode} cannot be combined with {{0}}",
                                            (key,)))
        if self.load_models and mode != "explicit":
            problems.append(Problem("load_models", "{name} picks the models to load at start: it needs "
                                    "--model-control-mode explicit" + (" (poll loads every model of the repository)"
                                                                       if mode == "poll" else "")))
        if self.repository_poll_s is not None and mode != "poll":
            problems.append(Problem("repository_poll_s", "{name} sets how often the repository is polled: it needs "
                                    "--model-control-mode poll"))
        for key in ("ray_workers", "plan", "replan_every_s"):
            if getattr(self, key) is not None and self.ray_address is None:
                problems.append(Problem(key, "{name} is for the Ray workers: it needs --ray (ray_address)"))
        if self.ray_data_plane != "socket" and self.ray_address is None:
            problems.append(Problem("ray_data_plane", "{name} is for the Ray workers: it needs --ray (ray_address)"))
        if self.accuracy_profiles and not self.accuracy_scaling:
            problems.append(Problem("accuracy_profiles", "{name} gives the variants' capacities: it needs "
                                    "--accuracy-scaling"))
        if self.accuracy_scaling:
            if self.ray_address is None:
                problems.append(Problem("accuracy_scaling", "{name} places variants on the Ray workers: it needs "
                                        "--ray (ray_address)"))
            if self.default_slo_ms is None:
                problems.append(Problem("accuracy_scaling", "{name} plans each family's capacity by its SLO: it "
                                        "needs --slo-ms (default_slo_ms)"))
            for key in ("plan", "model_repository"):
                if getattr(self, key) is not None:
                    problems.append(Problem("accuracy_scaling", "{name} serves the zoo's variant families; it "
                                            "cannot be combined with {0}", (key,)))
        if self.engine.placement is not None and self.ray_address is not None:
            problems.append(Problem("engine.placement", "{name} partitions one engine's cell types; it cannot be "
                                    "combined with {0}", ("ray_address",)))
        if self.core_allocation:
            if self.ray_address != "local":
                problems.append(Problem("core_allocation", "{name} pins the workers to this machine's cores: it "
                                        "needs a local Ray (--ray alone, ray_address \"local\")"))
            for key in ("ray_workers", "plan", "replan_every_s", "accuracy_scaling", "engine.kernel_versions"):
                value = getattr(self.engine, key.split(".")[1]) if key.startswith("engine.") else getattr(self, key)
                if value:
                    problems.append(Problem("core_allocation", "{name} gives each model a worker of its own on "
                                            "cores it decides; it cannot be combined with {0}", (key,)))
            if self.ray_cpus_per_worker != 1:
                problems.append(Problem("core_allocation", "{name} decides each worker's cores; it cannot be "
                                        "combined with {0}", ("ray_cpus_per_worker",)))
        if self.plan is not None and self.ray_workers is not None:
            problems.append(Problem("ray_workers", "{name} cannot be combined with {0}, which says how many "
                                    "workers (one per device)", ("plan",)))
        return problems


def _unused_engine_settings(engine: EngineConfig) -> list[Problem]:
    """Engine settings the server's other settings leave without effect, refused rather than
    silently ignored (the engine itself, built by benchmarks and tests, takes them)."""
    default = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    problems = []
    if engine.policy == "none" and engine.max_batch is not None:
        problems.append(Problem("engine.max_batch", "{name} caps a batch; policy none runs each request alone"))
    if engine.policy != "padded" and engine.batch_timeout_s != default["batch_timeout_s"]:
        problems.append(Problem("engine.batch_timeout_s", "{name} is how long the padded policy waits for a batch; "
                                f"policy {engine.policy} never waits"))
    if not engine.admission and engine.admission_headroom != default["admission_headroom"]:
        problems.append(Problem("engine.admission_headroom", "{name} is admission's: it needs --admission"))
    return problems
