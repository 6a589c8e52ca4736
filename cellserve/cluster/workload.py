"""The multi-model workload of `bench cluster`: sessions (a model, an SLO, a share of the
total rate), each a model of its own name, and their bursty traces as simulator arrivals.

A *variant* is a zoo model served under another name (the same weights and profile, another
SLO), as Nexus plans a (model, SLO) pair as one session: the simulator routes by model name,
so two sessions of one model with different SLOs are two names. `rename_model` and
`rename_profile` make the copy; the profile's cell-type keys carry the model name, so they are
renamed with it.

Contract of `session_arrivals`: for a (seed, session index, rate) the trace is always the same,
so every system meets the same requests at a given rate; and the rate only scales one draw
(common random numbers): at every rate a session meets the same bursts, and its k-th request
is the same sentence, arriving earlier the higher the rate. So a search over rates measures
the rate, not which bursts one trace happened to draw. (Drawing each rate's trace afresh, as
this did before 2026-12-04, moved a 2 s trace's realised rate between 0.74x and 1.02x of the
nominal one, and with it the systems' measured capacities by tens of %.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cellserve.bench.traces import UNIT_CHUNK, burst_path, modulated_arrivals, sentence_lengths, sequence_input
from cellserve.plan.profile import ModelProfile

PROFILE_DIR = Path(__file__).resolve().parents[2] / "docs" / "results" / "sim"
PROFILE_FILE = "{model}-poisson-profile.json"  # this machine's measured profiles (docs/results/sim)

# Bursts: a two-state MMPP per session, short sojourns so that a run of a few simulated
# seconds holds several bursts (bench/traces.py's defaults, 1 s and 4 s, need minutes).
BURST_FACTOR = 3.0
MEAN_BURST_S = 0.25
MEAN_CALM_S = 1.0


@dataclass(frozen=True)
class ClusterSession:
    """One session: `name` is the model name it is served under (a zoo model's, or a variant's),
    `base` the zoo model, `weight` its share of the total rate (relative)."""

    name: str
    base: str
    slo_ms: float
    weight: float


# Six sessions of three zoo models: SLOs 50-500 ms, rates 1:20.
DEFAULT_SESSIONS: tuple[ClusterSession, ...] = (
    ClusterSession("gru-256", "gru-256", 50.0, 20.0),
    ClusterSession("gru-256-slo200", "gru-256", 200.0, 5.0),
    ClusterSession("lstm-512", "lstm-512", 100.0, 8.0),
    ClusterSession("lstm-512-slo500", "lstm-512", 500.0, 2.0),
    ClusterSession("seq2seq-reverse", "seq2seq-reverse", 300.0, 3.0),
    ClusterSession("seq2seq-reverse-slo150", "seq2seq-reverse", 150.0, 1.0),
)


def rates(sessions: tuple[ClusterSession, ...], total_rps: float) -> dict[str, float]:
    """Each session's rate when the total is `total_rps` (shares by weight)."""
    total_weight = sum(s.weight for s in sessions)
    return {s.name: total_rps * s.weight / total_weight for s in sessions}


def rename_model(model, name: str):
    """The same model (weights, program) served under `name`."""
    return model if model.name == name else replace(model, name=name)


def rename_profile(profile: ModelProfile, name: str) -> ModelProfile:
    """`profile` for the model renamed `name`: cell types are keyed `MODEL/...`."""
    if profile.model == name:
        return profile

    def key(k: str) -> str:
        return name + k[len(profile.model):] if k.startswith(profile.model + "/") else k

    return replace(profile, model=name, cell_types={key(k): v for k, v in profile.cell_types.items()},
                   decode_steps={key(k): v for k, v in profile.decode_steps.items()})


@dataclass
class Catalogue:
    """The sessions' models and profiles, by session name."""

    sessions: tuple[ClusterSession, ...]
    models: dict[str, object]  # name -> cellserve.graph.model.Model
    profiles: dict[str, ModelProfile]
    # figures derived from these models and profiles (cluster/systems.py's planned and engine
    # capacities), kept with them so that another catalogue never reads them
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def slo_s(self) -> dict[str, float]:
        return {s.name: s.slo_ms / 1e3 for s in self.sessions}


def parse_sessions(x: object, where: str = "sessions file") -> tuple[ClusterSession, ...]:
    """A workload's sessions from JSON: `{"sessions": [{"id": NAME, "model": MODEL, "slo_ms": MS,
    "weight": W}, ...]}` (`schema_version` 1 if given). A session's share of the total rate is
    its weight over the sum of weights; `rate_rps` stands for the weight, so that a `cellserve
    plan nexus` sessions file serves as it is (its device_type and max_devices are not read
    here; queries are refused). `id`, the
    name the session is served under, defaults to the model's name; two sessions of one model
    (with different SLOs) need ids of their own. A ValueError names the field at fault."""
    from cellserve.plan.json_io import as_list, check_version

    if not isinstance(x, dict):
        raise ValueError(f"{where} must be a JSON object with a \"sessions\" list, got {type(x).__name__}")
    check_version(x, where, 1, ValueError)
    if x.get("queries"):
        raise ValueError(f"{where}: queries are not simulated here; give sessions only")
    entries = as_list(x.get("sessions"), f"{where}: sessions", ValueError)
    if not entries:
        raise ValueError(f"{where}: sessions is empty; give at least one")
    sessions, seen = [], set()
    for i, e in enumerate(entries):
        at = f"{where}: sessions[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{at} must be an object, got {type(e).__name__}")
        model = e.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{at}.model must be a model's name, got {model!r}")
        name = e.get("id", model)
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"{at}.id must be a name without '/', got {name!r}")
        if name in seen:
            raise ValueError(f"{at}.id {name!r} is taken by an earlier session; give each session of one model "
                             "an id of its own")
        seen.add(name)
        key = "weight" if "weight" in e else "rate_rps"
        if key not in e:
            raise ValueError(f"{at} has no weight (or rate_rps): its share of the total rate")
        slo_ms, weight = _positive(e.get("slo_ms"), f"{at}.slo_ms"), _positive(e[key], f"{at}.{key}")
        sessions.append(ClusterSession(name, model, slo_ms, weight))
    return tuple(sessions)


def _positive(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where} must be a number > 0, got {v!r}")
    return float(v)


def load_sessions(path: Path) -> tuple[ClusterSession, ...]:
    """The sessions file at `path` (parse_sessions); a ValueError names the file and the field."""
    from cellserve.plan.json_io import read_json

    return parse_sessions(read_json(path, "sessions file", ValueError), f"sessions file {str(path)!r}")


def _repository_models(repository: Path | None) -> dict:
    """name -> Model of a model repository (none: {}); a bad repository is a ValueError."""
    if repository is None:
        return {}
    from cellserve.errors import ModelLoadError
    from cellserve.server.repository import load_repository

    try:
        return {s.name: s.model for s in load_repository(repository)}
    except ModelLoadError as exc:
        raise ValueError(str(exc)) from exc


def _sequence_model(name: str, repository_models: dict):
    """Model `name` of the repository if it has one, else of the zoo (server/repository.py's
    load_model, whose error names the zoo's models); it must take one sequence, of token ids
    or feature rows (bench/traces.sequence_input: the traces are sentences)."""
    from cellserve.server.repository import load_model

    model = repository_models.get(name)
    if model is not None:
        model.name = name  # the engine's name for it, as the profile records it
    else:
        model = load_model(name)
    sequence_input(model)
    return model


def load_catalogue(sessions: tuple[ClusterSession, ...] = DEFAULT_SESSIONS, profile_dir: Path = PROFILE_DIR,
                   model_repository: Path | None = None) -> Catalogue:
    """The sessions' models (of `model_repository` where it has them, else of the zoo) and their
    measured profiles (`profile_dir/MODEL-poisson-profile.json`), renamed per session. A
    ValueError (a ProfileError for a profile) names what is missing or broken."""
    from cellserve.plan.profile import ProfileError

    repository_models = _repository_models(model_repository)
    bases: dict[str, tuple[object, ModelProfile]] = {}
    models, profiles = {}, {}
    for s in sessions:
        if s.base not in bases:
            model = _sequence_model(s.base, repository_models)
            path = Path(profile_dir) / PROFILE_FILE.format(model=s.base)
            if not path.exists():
                hint = f" --model-repository {model_repository}" if model_repository is not None else ""
                raise ProfileError(f"cannot read profile {str(path)!r}: no such file; measure it with `cellserve "
                                   f"profile --model {s.base}{hint} --json {path}`")
            profile = ModelProfile.from_json(path)
            if profile.model != s.base:
                raise ProfileError(f"profile {str(path)!r} is of model {profile.model!r}, not {s.base!r} (the file "
                                   f"session {s.name!r} reads); measure it with `cellserve profile --model {s.base} "
                                   f"--json {path}`")
            bases[s.base] = (model, profile)
        model, profile = bases[s.base]
        models[s.name] = rename_model(model, s.name)
        profiles[s.name] = rename_profile(profile, s.name)
    return Catalogue(tuple(sessions), models, profiles)


def session_arrivals(catalogue: Catalogue, total_rps: float, seconds: float, seed: int = 0) -> list:
    """`seconds` of bursty arrivals of every session at `total_rps` in all, as SimArrivals with
    the session's SLO as timeout, tagged 0..n-1 in time order. Each session's bursts (its MMPP
    path), its arrivals' places in that path and its k-th request's sequence come from (seed,
    session index) alone (bench/traces.modulated_arrivals), so the rate scales one draw."""
    from cellserve.sim.loop import SimArrival

    out = []
    for i, (s, rate) in enumerate(zip(catalogue.sessions, rates(catalogue.sessions, total_rps).values())):
        model = catalogue.models[s.name]
        path_rng, point_rng, length_rng, token_rng = (
            np.random.default_rng(np.random.SeedSequence([seed, i, stream])) for stream in range(4))
        edges, multipliers = burst_path(path_rng, seconds, BURST_FACTOR, MEAN_BURST_S, MEAN_CALM_S)
        times = modulated_arrivals(point_rng, rate, edges, multipliers)
        chunks = -(-times.size // UNIT_CHUNK)  # lengths drawn in fixed chunks: the k-th is one draw
        lengths = np.concatenate([sentence_lengths(length_rng, UNIT_CHUNK) for _ in range(max(1, chunks))])
        lengths = np.minimum(lengths[:times.size], model.max_sequence_length)
        seq = sequence_input(model)
        for t, length in zip(times, lengths):
            out.append(SimArrival(float(t), s.name, seq.request_inputs(seq.draw(token_rng, int(length))),
                                  s.slo_ms / 1e3))
    out.sort(key=lambda a: a.time_s)
    return [replace(a, tag=n) for n, a in enumerate(out)]
