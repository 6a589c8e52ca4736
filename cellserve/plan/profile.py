"""A model's profile on one device: what each piece of its work costs, as plain data.

`cellserve profile` measures one (see bench/profiler.py); `modelled_gpu_profile` predicts one
for a GPU this machine lacks. The simulator prices every executor call from a profile, and
the planners read them. A profile round-trips through JSON (`to_json` / `from_json`) with a
schema version, and `from_json` refuses anything broken with an error naming the field.

Cell types are named as the engine names them (see Model.cell_types): the profile of a model
served with stacked layers has the stacks' cell types, so `stack_layers` is recorded too.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from cellserve.decimal_text import positive_key

# 2: decode_steps is a histogram per source length (version 1 listed every lane's pair)
# 3: host.request_s and host.check_s_per_run (version 2 lacks them: read as 0, with a warning)
# 4: an idle bucket may carry its draws, [up_to_s, extra_s, [draw_s, ...]] (3 has pairs only)
SCHEMA_VERSION = 4
READABLE_VERSIONS = (2, 3, SCHEMA_VERSION)
CELL_KINDS = ("layer", "stack", "decoder")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the field."""


class ProfileWarning(UserWarning):
    """A profile that can be used but prices less than a current one would."""


class IdleBucket(NamedTuple):
    """What a call costs on top after its executor (or op) sat idle for a spell of at most
    `up_to_s` seconds (and longer than the bucket before's): `extra_s` on average. `draws_s`,
    when measured, are equally likely extras whose mean is `extra_s` (the means of equal
    shares of the sorted measurements): most calls after a spell cost little more, and a few
    (the machine's stalls) cost milliseconds, so charging the mean to every call would
    price a rare stall as a cost of each. Empty: every call costs `extra_s`."""

    up_to_s: float
    extra_s: float
    draws_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class Timing:
    """Seconds: mean, standard deviation and 99th percentile of `n` samples."""

    mean: float
    std: float
    p99: float
    n: int

    @classmethod
    def of(cls, samples, trim: bool = False) -> "Timing":
        """Of `samples`; with `trim`, the mean and spread of those up to the 99th percentile
        (a stall of the machine while measuring is no part of the cost; p99 keeps it)."""
        xs = sorted(float(x) for x in samples)
        if not xs:
            raise ValueError("no samples")
        p99 = xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]
        body = [x for x in xs if x <= p99] if trim else xs
        mean = sum(body) / len(body)
        var = sum((x - mean) ** 2 for x in body) / max(len(body) - 1, 1)
        return cls(mean, math.sqrt(var), p99, len(xs))

    @classmethod
    def fixed(cls, seconds: float) -> "Timing":
        return cls(seconds, 0.0, seconds, 1)


@dataclass(frozen=True)
class CellTypeProfile:
    kind: str  # layer | stack | decoder
    lone_lanes: int  # batches of up to this many lanes run each lane alone (see Engine._lone_steps)
    step_s: dict[int, Timing]  # batch size (1 .. max_batch) -> one batched step
    lone_step_s: Timing | None  # one step of a lane running alone (None when lone_lanes is 0)
    start_s_per_token: float  # admitting a lane: its input projection, per input token
    finish_s_per_token: float  # reading a finished lane's outputs, per token
    lone_call_s: float = 0.0  # a lone lane's run costs this once per call on top of its steps
    # A step that follows other work (a lane's start or finish, a plain op, another cell
    # type's step) finds its weights out of cache: it costs this much more than one that
    # follows a step of the same cell type (step_s and lone_step_s are the latter)
    cold_s: float = 0.0
    lone_cold_s: float = 0.0
    # A step (batched or a lone run) that comes after its executor ran no step for a while
    # costs more again (on a CPU: the kernel's threads went to sleep and are woken, caches
    # went cold): IdleBuckets, ascending; a step whose executor's previous step ended `gap`
    # seconds before costs the extra of the first bucket with gap <= up_to_s (see
    # idle_bucket), the last bucket's beyond it. Empty: no such cost measured.
    idle_extra_s: tuple[IdleBucket, ...] = ()
    # The measured cell's FLOPs per step (`step_flops`), so that a profile of another version
    # of the model (another width) is refused where it meets the model (`check_step`). None:
    # not recorded (profiles made before it was).
    flops_per_step: float | None = None

    def idle_extra(self, gap_s: float) -> float:
        """What a step costs on top, on average, after its executor ran no step for `gap_s` seconds."""
        bucket = idle_bucket(self.idle_extra_s, gap_s)
        return bucket.extra_s if bucket else 0.0

    def suspect_steps(self) -> list[str]:
        """What in the batched step table looks like the machine's noise rather than the cell's
        cost: a batch size some larger batch steps in under 70% of its time (a batch of more
        lanes does not run faster; `cellserve profile` now caps a size over 10% dearer than a
        larger one at that one's cost, so only older profiles show it), or whose spread exceeds
        its mean. Planners and the simulator take the table as it is: a profile taken on a busy
        machine misprices them all."""
        found, cheapest_above = [], None  # the cheapest step of a larger batch: (batch, seconds)
        for b, t in sorted(self.step_s.items(), reverse=True):
            if cheapest_above is not None and cheapest_above[1] < 0.7 * t.mean:
                found.append(f"batch {b} steps in {t.mean * 1e6:.1f} us, more than the {cheapest_above[1] * 1e6:.1f} us "
                             f"of batch {cheapest_above[0]}, a larger one")
            if t.std > t.mean > 0:
                found.append(f"batch {b}'s spread ({t.std * 1e6:.1f} us) exceeds its mean ({t.mean * 1e6:.1f} us)")
            if cheapest_above is None or t.mean < cheapest_above[1]:
                cheapest_above = (b, t.mean)
        return found[::-1]


def step_flops(step) -> float:
    """What CellTypeProfile.flops_per_step records of a model's recurrent step (a layer's
    direction, a stack, a decoder): one step's FLOPs, a decoder's at a memory of one position."""
    from cellserve.graph.model import GraphDecoder

    return float(step.flops_per_step(1) if isinstance(step, GraphDecoder) else step.flops_per_step())


def check_step(profile: "ModelProfile", cell_type: str, step) -> CellTypeProfile:
    """The profile's cell type `cell_type`, refused (ProfileError naming it) when it was
    measured on a cell of another size than the model's `step`."""
    cell = profile.cell(cell_type)
    if cell.flops_per_step is not None and not math.isclose(cell.flops_per_step, step_flops(step), rel_tol=1e-6):
        raise ProfileError(f"profile.cell_types[{cell_type!r}] was measured on a cell of {cell.flops_per_step:.6g} "
                           f"FLOPs per step, but model {profile.model!r} has {step_flops(step):.6g}: a profile of "
                           "another version of the model? Profile it again (cellserve profile)")
    return cell


def idle_bucket(buckets: tuple[IdleBucket, ...], gap_s: float) -> IdleBucket | None:
    """The first bucket with gap_s <= up_to_s; past the last bound, the last; no buckets: None."""
    for bucket in buckets:
        if gap_s <= bucket.up_to_s:
            return bucket
    return buckets[-1] if buckets else None


@dataclass(frozen=True)
class HostProfile:
    """The engine's own time around the device's (Python: admission, scheduling, lanes'
    bookkeeping, responses), fitted per step as
    step_s + step_s_per_lane * batch + lane_start_s * lanes started + lane_finish_s * lanes finished
    + request_s * requests taken in + check_s_per_run * runs the drop check priced.
    The last two are what a step pays for arrivals whatever becomes of them (a refusal is
    priced and answered, and starts no lane) and for the drop check, which walks every run
    in flight: past capacity, where refusals and backlogs are, they are most of the
    difference (schema version 3; a version 2 profile lacks them, read as 0)."""

    step_s: float
    step_s_per_lane: float
    lane_start_s: float
    lane_finish_s: float
    request_s: float = 0.0
    check_s_per_run: float = 0.0


@dataclass(frozen=True)
class Machine:
    device: str  # "cpu", "cuda:0", or a modelled GPU class
    name: str  # CPU model or GPU name
    threads: int
    backend: str
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, numpy


@dataclass(frozen=True)
class ModelProfile:
    model: str
    machine: Machine
    max_batch: int
    stack_layers: bool
    cell_types: dict[str, CellTypeProfile]
    plain_ops_s: dict[str, Timing]  # plain op (DenseNode name) -> one run for one request
    host: HostProfile
    hand_back_s: Timing  # a response passed from the engine's thread to another
    wake_s: Timing  # from a request's arrival at an idle engine to the engine's step beginning
    weight_bytes: dict[str, int]  # device -> bytes of the model's weights kept there
    # decoder -> memory (source) length -> steps a lane ran -> how many lanes did, as profiled
    decode_steps: dict[str, dict[int, dict[int, int]]] = field(default_factory=dict)
    # plain op -> what a run costs on top of plain_ops_s after that op last ran `gap` seconds
    # before, in IdleBuckets as CellTypeProfile.idle_extra_s: an op that runs once per
    # request (an embedding, a head) finds its weights out of cache at light load and in
    # cache under a flood. Missing: no such cost measured.
    plain_idle_extra_s: dict[str, tuple[IdleBucket, ...]] = field(default_factory=dict)
    modelled: bool = False  # predicted, not measured
    schema_version: int = SCHEMA_VERSION

    # ---- JSON ----

    def to_dict(self) -> dict:
        d = asdict(self)
        for cell in d["cell_types"].values():
            cell["step_s"] = {str(b): t for b, t in cell["step_s"].items()}
            cell["idle_extra_s"] = [_bucket_json(b) for b in cell["idle_extra_s"]]
        d["plain_idle_extra_s"] = {op: [_bucket_json(x) for x in b] for op, b in d["plain_idle_extra_s"].items()}
        d["decode_steps"] = {k: {str(m): {str(n): c for n, c in h.items()} for m, h in v.items()}
                             for k, v in d["decode_steps"].items()}
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: object) -> "ModelProfile":
        return _parse_profile(d)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelProfile":
        try:
            d = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ProfileError(f"cannot read profile {str(path)!r}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {str(path)!r} is not JSON: {exc}") from None
        try:
            return _parse_profile(d)
        except ProfileError as exc:
            raise ProfileError(f"profile {str(path)!r}: {exc}") from None

    # ---- questions the simulator asks ----

    def cell(self, cell_type: str) -> CellTypeProfile:
        found = self.cell_types.get(cell_type)
        if found is None:
            raise ProfileError(f"profile of model {self.model!r} has no cell type {cell_type!r} in "
                               f"cell_types (it has {sorted(self.cell_types)}); was it made with "
                               f"stack_layers={not self.stack_layers}?")
        return found

    def suspect(self) -> list[str]:
        """Each cell type's CellTypeProfile.suspect_steps, named: empty for a clean profile."""
        return [f"{name}: {line}" for name, cell in self.cell_types.items() for line in cell.suspect_steps()]

    def summary(self) -> dict:
        """A few lines of it for a report that points at the whole: the machine, and per cell
        type its kind and the mean step at batch 1 and at the cap."""
        return {"model": self.model, "modelled": self.modelled, "max_batch": self.max_batch,
                "machine": asdict(self.machine),
                "cell_types": {name: {"kind": c.kind, "step_1_s": c.step_s[min(c.step_s)].mean,
                                      f"step_{max(c.step_s)}_s": c.step_s[max(c.step_s)].mean}
                               for name, c in self.cell_types.items()},
                "host_step_s": self.host.step_s}

    def label(self) -> str:
        return f"{self.model} on {self.machine.name} ({self.machine.backend})" + (" [modelled]" if self.modelled else "")


# ---- parsing with errors that name the field ----

def _get(d: dict, key: str, where: str):
    if key not in d:
        raise ProfileError(f"{where}.{key} is missing")
    return d[key]


def _obj(x: object, where: str) -> dict:
    if not isinstance(x, dict):
        raise ProfileError(f"{where} must be an object, got {type(x).__name__}")
    return x


def _num(x: object, where: str, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ProfileError(f"{where} must be a finite number, got {x!r}")
    if x < 0 or (positive and x == 0):
        raise ProfileError(f"{where} must be {'> 0' if positive else '>= 0'}, got {x!r}")
    return float(x)


def _int(x: object, where: str, minimum: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ProfileError(f"{where} must be an integer >= {minimum}, got {x!r}")
    return x


def _str(x: object, where: str) -> str:
    if not isinstance(x, str) or not x:
        raise ProfileError(f"{where} must be a non-empty string, got {x!r}")
    return x


def _timing(x: object, where: str) -> Timing:
    d = _obj(x, where)
    return Timing(_num(_get(d, "mean", where), f"{where}.mean"), _num(_get(d, "std", where), f"{where}.std"),
                  _num(_get(d, "p99", where), f"{where}.p99"), _int(_get(d, "n", where), f"{where}.n", 1))


def _cell(x: object, where: str, max_batch: int) -> CellTypeProfile:
    d = _obj(x, where)
    kind = _get(d, "kind", where)
    if kind not in CELL_KINDS:
        raise ProfileError(f"{where}.kind must be one of {', '.join(CELL_KINDS)}, got {kind!r}")
    lone = _int(_get(d, "lone_lanes", where), f"{where}.lone_lanes")
    steps = _obj(_get(d, "step_s", where), f"{where}.step_s")
    parsed = {}
    for key, t in steps.items():
        if (batch := positive_key(key)) is None:
            raise ProfileError(f"{where}.step_s has key {key!r}; keys are batch sizes 1, 2, ...")
        parsed[batch] = _timing(t, f"{where}.step_s[{key}]")
    missing = [b for b in range(1, max_batch + 1) if b not in parsed]
    if missing:
        raise ProfileError(f"{where}.step_s lacks batch sizes {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                           f"(it must hold every batch size from 1 to max_batch={max_batch})")
    lone_step = d.get("lone_step_s")
    if lone and lone_step is None:
        raise ProfileError(f"{where}.lone_step_s is missing (lone_lanes is {lone})")
    return CellTypeProfile(kind, lone, dict(sorted(parsed.items())),
                           None if lone_step is None else _timing(lone_step, f"{where}.lone_step_s"),
                           _num(_get(d, "start_s_per_token", where), f"{where}.start_s_per_token"),
                           _num(_get(d, "finish_s_per_token", where), f"{where}.finish_s_per_token"),
                           _num(d.get("lone_call_s", 0.0), f"{where}.lone_call_s"),
                           _num(d.get("cold_s", 0.0), f"{where}.cold_s"),
                           _num(d.get("lone_cold_s", 0.0), f"{where}.lone_cold_s"),
                           _idle_buckets(d.get("idle_extra_s", []), f"{where}.idle_extra_s"),
                           None if d.get("flops_per_step") is None
                           else _num(d["flops_per_step"], f"{where}.flops_per_step"))


def _bucket_json(bucket) -> list:
    up_to, extra, draws = bucket
    return [up_to, extra, list(draws)] if draws else [up_to, extra]


def _idle_buckets(x: object, where: str) -> tuple[IdleBucket, ...]:
    """[[up_to_s, extra_s], or [up_to_s, extra_s, [draw_s, ...]], ...]: bounds > 0 and strictly
    ascending, extras >= 0, draws finite (one may be below zero: a call quicker than the warm
    price) and averaging extra_s."""
    if not isinstance(x, list):
        raise ProfileError(f"{where} must be a list of [up_to_s, extra_s] pairs, got {type(x).__name__}")
    out: list[IdleBucket] = []
    for i, item in enumerate(x):
        if not (isinstance(item, list) and len(item) in (2, 3)):
            raise ProfileError(f"{where}[{i}] must be a pair [up_to_s, extra_s] or a triple "
                               f"[up_to_s, extra_s, [draw_s, ...]], got {item!r}")
        up_to = _num(item[0], f"{where}[{i}][0] (up_to_s)", positive=True)
        if out and up_to <= out[-1].up_to_s:
            raise ProfileError(f"{where}[{i}][0] (up_to_s) is {up_to!r}, not above the bucket before it "
                               f"({out[-1].up_to_s!r}): the buckets must ascend")
        extra = _num(item[1], f"{where}[{i}][1] (extra_s)")
        draws = () if len(item) == 2 else _draws(item[2], extra, f"{where}[{i}][2] (draws_s)")
        out.append(IdleBucket(up_to, extra, draws))
    return tuple(out)


def _draws(x: object, extra: float, where: str) -> tuple[float, ...]:
    if not (isinstance(x, list) and x) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                               or not math.isfinite(v) for v in x):
        raise ProfileError(f"{where} must be a non-empty list of finite numbers, got {x!r}")
    mean = sum(x) / len(x)
    if not math.isclose(mean, extra, rel_tol=1e-6, abs_tol=1e-12):
        raise ProfileError(f"{where} average {mean!r}, not the bucket's extra_s {extra!r}")
    return tuple(float(v) for v in x)


def _parse_profile(x: object) -> ModelProfile:
    d = _obj(x, "profile")
    version = _get(d, "schema_version", "profile")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProfileError(f"profile.schema_version must be an integer, got {version!r}")
    if version == 1:
        raise ProfileError(f"profile.schema_version is 1, whose profile.decode_steps lists every decoder lane's "
                           f"[memory length, steps] pair; this cellserve reads version {SCHEMA_VERSION}, a histogram "
                           "per memory length: make the profile again with `cellserve profile --model M --json PATH`")
    if version not in READABLE_VERSIONS:
        raise ProfileError(f"profile.schema_version is {version!r}; this cellserve reads versions 2 to "
                           f"{SCHEMA_VERSION} (make the profile again with `cellserve profile --model M --json PATH`)")
    m = _obj(_get(d, "machine", "profile"), "profile.machine")
    versions = _obj(m.get("versions", {}), "profile.machine.versions")
    machine = Machine(_str(_get(m, "device", "profile.machine"), "profile.machine.device"),
                      _str(_get(m, "name", "profile.machine"), "profile.machine.name"),
                      _int(_get(m, "threads", "profile.machine"), "profile.machine.threads", 1),
                      _str(_get(m, "backend", "profile.machine"), "profile.machine.backend"),
                      {str(k): str(v) for k, v in versions.items()})
    max_batch = _int(_get(d, "max_batch", "profile"), "profile.max_batch", 1)
    stack = _get(d, "stack_layers", "profile")
    if not isinstance(stack, bool):
        raise ProfileError(f"profile.stack_layers must be true or false, got {stack!r}")
    cells = _obj(_get(d, "cell_types", "profile"), "profile.cell_types")
    if not cells:
        raise ProfileError("profile.cell_types is empty")
    cell_types = {_str(k, "profile.cell_types key"): _cell(v, f"profile.cell_types[{k!r}]", max_batch)
                  for k, v in cells.items()}
    plain = _obj(_get(d, "plain_ops_s", "profile"), "profile.plain_ops_s")
    h = _obj(_get(d, "host", "profile"), "profile.host")
    terms = ["step_s", "step_s_per_lane", "lane_start_s", "lane_finish_s"]
    if version == 2:
        warnings.warn(f"profile of {d.get('model')!r} is schema version 2: it has no host.request_s or "
                      "host.check_s_per_run, so requests taken in (a refusal too) and drop checks are priced at "
                      "nothing, and a simulation past capacity runs faster than the engine did. "
                      "Make it again with `cellserve profile` to measure them", ProfileWarning, stacklevel=3)
    else:
        terms += ["request_s", "check_s_per_run"]
    host = HostProfile(*(_num(_get(h, k, "profile.host"), f"profile.host.{k}") for k in terms))
    weights = _obj(_get(d, "weight_bytes", "profile"), "profile.weight_bytes")
    decode = _obj(d.get("decode_steps", {}), "profile.decode_steps")
    decode_steps = {}
    for k, by_memory in decode.items():
        where = f"profile.decode_steps[{k!r}]"
        if k not in cell_types or cell_types[k].kind != "decoder":
            raise ProfileError(f"{where} names no decoder cell type of the profile")
        decode_steps[k] = _histograms(by_memory, where)
    missing = [k for k, c in cell_types.items() if c.kind == "decoder" and k not in decode_steps]
    if missing:
        raise ProfileError(f"profile.decode_steps lacks decoders {missing}: the simulator ends a decoder's lanes "
                           "by the steps seen when profiling")
    plain_idle = _obj(d.get("plain_idle_extra_s", {}), "profile.plain_idle_extra_s")
    unknown = sorted(set(plain_idle) - set(plain))
    if unknown:
        raise ProfileError(f"profile.plain_idle_extra_s names {unknown[0]!r}, which is not in profile.plain_ops_s")
    modelled = d.get("modelled", False)
    if not isinstance(modelled, bool):
        raise ProfileError(f"profile.modelled must be true or false, got {modelled!r}")
    return ModelProfile(
        model=_str(_get(d, "model", "profile"), "profile.model"), machine=machine, max_batch=max_batch,
        stack_layers=stack, cell_types=cell_types,
        plain_ops_s={_str(k, "profile.plain_ops_s key"): _timing(v, f"profile.plain_ops_s[{k!r}]")
                     for k, v in plain.items()},
        host=host, hand_back_s=_timing(_get(d, "hand_back_s", "profile"), "profile.hand_back_s"),
        wake_s=_timing(_get(d, "wake_s", "profile"), "profile.wake_s"),
        weight_bytes={_str(k, "profile.weight_bytes key"): _int(v, f"profile.weight_bytes[{k!r}]")
                      for k, v in weights.items()},
        decode_steps=decode_steps, modelled=modelled, schema_version=version,
        plain_idle_extra_s={op: _idle_buckets(b, f"profile.plain_idle_extra_s[{op!r}]") for op, b in plain_idle.items()})


def _count_key(key: object, where: str, what: str) -> int:
    if (count := positive_key(key)) is None:
        raise ProfileError(f"{where} has key {key!r}; keys are {what} 1, 2, ...")
    return count


def _histograms(x: object, where: str) -> dict[int, dict[int, int]]:
    """{memory length: {steps: lanes}}, every key and count >= 1, sorted by key."""
    by_memory = _obj(x, where)
    if not by_memory:
        raise ProfileError(f"{where} must be a non-empty object of memory length -> {{steps: lanes}}")
    out = {}
    for m, hist in by_memory.items():
        memory = _count_key(m, where, "memory lengths")
        h = _obj(hist, f"{where}[{m!r}]")
        if not h:
            raise ProfileError(f"{where}[{m!r}] must be a non-empty object of steps -> lanes")
        out[memory] = dict(sorted((_count_key(n, f"{where}[{m!r}]", "step counts"),
                                   _int(c, f"{where}[{m!r}][{n!r}]", 1)) for n, c in h.items()))
    return dict(sorted(out.items()))


def synthetic_profile(model, step_s, max_batch: int = 64, lone_lanes: int = 0, lone_step_s: float = 0.0,
                      start_s_per_token: float = 0.0, finish_s_per_token: float = 0.0, plain_op_s: float = 0.0,
                      host: HostProfile | None = None, decode_steps: int | None = None,
                      stack_layers: bool = True, wake_s: float = 0.0) -> ModelProfile:
    """A profile given rather than measured: every cell type of `model` (served with
    `stack_layers` as the engine's setting) steps in `step_s(batch)` seconds (a number for a
    constant), every plain op in `plain_op_s`, the engine's own work in `host` (none by
    default), an idle engine's wake-up in `wake_s`. Decoder lanes run `decode_steps` steps
    (default: the source length plus one).
    For planning with costs from elsewhere and for tests with exact figures."""
    from cellserve.graph.model import DenseNode, GraphDecoder, LayerStack, RecurrentLayer
    from cellserve.graph.stacking import stack_layers as stacked

    model = stacked(model) if stack_layers else model
    cost = step_s if callable(step_s) else (lambda b: float(step_s))
    cells, types = {}, iter(model.cell_types())
    for step in model.recurrent_steps():
        directions = len(step.directions) if isinstance(step, RecurrentLayer) else 1
        kind = "decoder" if isinstance(step, GraphDecoder) else "stack" if isinstance(step, LayerStack) else "layer"
        for _ in range(directions):
            cells[next(types)] = CellTypeProfile(
                kind, min(lone_lanes, 1) if kind == "decoder" else lone_lanes,  # a decoder's lane runs alone by itself
                {b: Timing.fixed(cost(b)) for b in range(1, max_batch + 1)},
                Timing.fixed(lone_step_s) if lone_lanes else None,
                start_s_per_token, finish_s_per_token, flops_per_step=step_flops(step))
    decodes = {t: {n: {decode_steps or n + 1: 1} for n in range(1, model.max_sequence_length + 1)}
               for t, c in cells.items() if c.kind == "decoder"}
    return ModelProfile(
        model=model.name, machine=Machine("synthetic", "given costs", 1, "none"), max_batch=max_batch,
        stack_layers=stack_layers, cell_types=cells,
        plain_ops_s={s.name: Timing.fixed(plain_op_s) for s in model.program if isinstance(s, DenseNode)},
        host=host or HostProfile(0.0, 0.0, 0.0, 0.0), hand_back_s=Timing.fixed(0.0), wake_s=Timing.fixed(wake_s),
        weight_bytes={},
        decode_steps=decodes, modelled=True)
