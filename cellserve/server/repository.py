"""The models a server serves: a Triton-style model repository, or the zoo.

Layout, as Triton lays it out:

    <repository>/<model>/config.pbtxt          optional, Triton's ModelConfig in text format
    <repository>/<model>/<version>/model.onnx  versions are positive integers

Without a config the inputs and outputs come from the ONNX graph. Of the config, cellserve
reads: `name`, `platform`/`backend` (must be ONNX Runtime's, if set), `version_policy`,
`default_model_filename`, `input`/`output` (names, data types and dims are checked against
the graph; dims as Triton reads them, without the batch dimension when `max_batch_size` > 0;
a fixed size where the graph has a dynamic one holds requests to it),
`sequence_batching.max_sequence_idle_microseconds`,
`dynamic_batching.default_priority_level` (within `priority_levels`, if set), `model_warmup`
(samples run before the model is served, server/warmup.py), an output's
`label_filename` (its classes' labels for classification, server/classification.py), and
`parameters` `slo_ms` (the model's default
deadline for requests that send no `timeout`), `max_sequence_length` (the longest input
sequence a request may send, in steps; default 1024) and `max_request_rows` (the most
sequences one request may hold; else `max_batch_size` when > 0, as Triton reads it; default
1024; not more than a max_batch_size > 0). `max_batch_size` > 0 needs a batch-first model
and is published as given (the published dims then leave the batch out). See the README for
an example. Anything else a config sets (instance groups, queue policies, ...) is
logged at load as not applied. The config's `parameters` are published as they are
(server/model_config.py); `text.*` keys must make a text vocabulary (cellserve/text_vocab.py)
of the model's own tensors.

An encoder-decoder is a version directory holding `encoder.onnx` and `decoder_step.onnx`
instead of a model file, with its decode specification in the config's `parameters` as
`decode.*` keys (graph/decode_spec.py; docs/decoders.md):

    <repository>/<model>/<version>/encoder.onnx
    <repository>/<model>/<version>/decoder_step.onnx
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cellserve.decimal_text import ascii_int
from cellserve.errors import ModelLoadError
from cellserve.graph.decode_spec import PARAMETER_PREFIX, DecodeSpec
from cellserve.graph.model import Model

log = logging.getLogger(__name__)

ONNX_PLATFORMS = {"", "onnxruntime_onnx"}
ONNX_BACKENDS = {"", "onnxruntime"}
ENCODER_FILE, DECODER_STEP_FILE = "encoder.onnx", "decoder_step.onnx"


@dataclass
class ModelSettings:
    default_timeout_s: float | None = None  # deadline of requests that send no timeout
    sequence_idle_s: float | None = None  # None: the server's --sequence-idle-timeout
    default_priority: int = 0  # 0: after every explicit priority level


@dataclass
class ServedModel:
    name: str
    version: str
    model: Model  # its name is "<name>:<version>", unique in the engine
    platform: str
    settings: ModelSettings
    # published in the model's config (server/model_config.py): a config.pbtxt's parameters, or the zoo's
    parameters: dict[str, str] = field(default_factory=dict)
    # a config.pbtxt's max_batch_size, published as given: > 0 says every tensor's first
    # dimension is the batch (at most this many rows), and the published dims leave it out
    max_batch_size: int = 0
    # output -> its classes' labels (a config output's label_filename), for classification
    labels: dict[str, list[str]] = field(default_factory=dict)
    label_files: dict[str, str] = field(default_factory=dict)  # output -> its label_filename, published as given
    # published as a config.pbtxt declares them: its dynamic_batching (what of it applies), and
    # an output's dims where it fixes what the graph leaves dynamic
    dynamic_batching: dict | None = None
    output_dims: dict[str, list[int]] = field(default_factory=dict)
    # a config.pbtxt's model_warmup: the samples run before the model is served (server/warmup.py),
    # and the entries as declared, which the published config echoes
    warmup: list = field(default_factory=list)
    warmup_config: list[dict] = field(default_factory=list)
    source: Path | None = None  # the ONNX file this version was read from (None: the zoo, an encoder-decoder)

    @property
    def engine_name(self) -> str:
        return self.model.name


def load_zoo(names: list[str] | None = None, slo_ms: float | None = None) -> list[ServedModel]:
    from cellserve.graph import zoo
    from cellserve.server.model_config import check_parameters

    served = []
    for name in names or zoo.names():
        model = zoo.load(name)
        model.name = f"{name}:1"
        settings = ModelSettings(default_timeout_s=slo_ms / 1e3 if slo_ms else None)
        parameters = zoo.parameters(name)
        check_parameters(parameters, model, f"zoo model {name!r}")
        served.append(ServedModel(name, "1", model, "cellserve_zoo", settings, parameters))
    return served


def load_repository(root: Path) -> list[ServedModel]:
    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"model repository {str(root)!r} is not a directory")
    served = []
    for name in repository_models(root):
        served += _load_model_dir(root / name)
    if not served:
        raise ModelLoadError(f"model repository {str(root)!r} holds no models "
                             "(expected <model>/<version>/model.onnx)")
    return served


def repository_models(root: Path) -> list[str]:
    """The names of the models a repository holds (its model folders), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"model repository {str(root)!r} is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def repository_fingerprints(root: Path) -> dict[str, tuple]:
    """Per model folder of the repository, what is in it now: every file and folder under it
    with its size and modification time, so that a poll tells a changed model (a file
    written, added or removed) from one left as it was. ModelLoadError when the repository
    cannot be read."""
    root = Path(root)
    found = {}
    for name in repository_models(root):
        entries = []
        for path in sorted((root / name).rglob("*")):
            try:
                st = path.stat()
            except OSError:  # removed while listed: the next poll sees the folder as it is then
                continue
            entries.append((path.relative_to(root / name).as_posix(), st.st_size, st.st_mtime_ns))
        found[name] = tuple(entries)
    return found


def load_repository_model(root: Path, name: str) -> list[ServedModel]:
    """One model of a repository (every version its config chooses), read now: what model
    control loads while serving. ModelLoadError names the model and what is wrong."""
    if name not in repository_models(root):
        raise ModelLoadError(f"model {name!r} is not in the model repository {str(root)!r} "
                             f"(it holds {', '.join(repository_models(root)) or 'no models'})")
    return _load_model_dir(Path(root) / name)


def model_source(name: str, repository: Path) -> Path | None:
    """The ONNX file of `name`'s highest version served from `repository` (None for an
    encoder-decoder, which is two files): what ONNX Runtime can run as it stands."""
    served = load_repository_model(Path(repository), name)
    return served[-1].source if served else None


def load_model(name: str, repository: Path | None = None) -> Model:
    """One model by name, for the tools that take `--model NAME [--model-repository DIR]`
    (profile, simulate, bench sim and cluster, plan partition): of `repository` when one is
    given (its engine name is `name`, as a profile records it), else of the zoo. A ValueError
    names the model and what there is instead."""
    if repository is not None:
        try:
            served = {s.name: s.model for s in load_repository(repository)}
        except ModelLoadError as exc:  # these tools report a bad file as a bad argument
            raise ValueError(str(exc)) from exc
        if name not in served:
            raise ValueError(f"model {name!r} is not in the model repository {str(repository)!r} "
                             f"(it has {sorted(served)})")
        model = served[name]
        model.name = name
        return model
    from cellserve.graph import zoo

    if name not in zoo.names():
        raise ValueError(f"model {name!r} is not a zoo model ({', '.join(zoo.names())}); "
                         "give --model-repository for your own")
    return zoo.load(name)


def _load_model_dir(model_dir: Path) -> list[ServedModel]:
    from cellserve.server.model_config import check_parameters
    from cellserve.server.warmup import published_warmup, warmup_samples

    name = model_dir.name
    if ":" in name or not name:
        raise ModelLoadError(f"model directory name {name!r} must not contain ':'")
    config = _read_config(model_dir)
    where = f"model {name!r}"
    if config.name and config.name != name:
        raise ModelLoadError(f"{where}: config.pbtxt names it {config.name!r}; it must match the directory")
    if config.platform not in ONNX_PLATFORMS or config.backend not in ONNX_BACKENDS:
        raise ModelLoadError(f"{where}: platform {config.platform!r} / backend {config.backend!r} is not served; "
                             "cellserve serves ONNX models (platform onnxruntime_onnx)")
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and (ascii_int(p.name) or 0) > 0)
    chosen = _choose_versions(config, versions, where)
    ignored = unapplied_fields(config)
    if ignored:
        log.warning("%s: config.pbtxt sets %s, which cellserve does not apply", where, ", ".join(ignored))
    filename = config.default_model_filename or "model.onnx"
    settings = _settings(config, where)
    max_length = _positive_parameter(config, "max_sequence_length", "steps", where)
    max_rows = _row_limit(config, where)
    labels = _labels(config, model_dir, where)
    decode = {k: p.string_value for k, p in config.parameters.items() if k.startswith(PARAMETER_PREFIX)}
    parameters = {k: p.string_value for k, p in config.parameters.items()}
    served = []
    for version in chosen:
        version_dir = model_dir / str(version)
        source = None
        if decode or (version_dir / ENCODER_FILE).is_file() or (version_dir / DECODER_STEP_FILE).is_file():
            model = _load_seq2seq(version_dir, decode, f"{name}:{version}", f"{where} version {version}")
        else:
            source = version_dir / filename
            model = _load_version(source, f"{name}:{version}", f"{where} version {version}")
        model.max_sequence_length = max_length or model.max_sequence_length
        model.max_request_rows = max_rows or model.max_request_rows
        _check_declared_tensors(config, model, f"{where} version {version}")
        _check_batch_first(config, model, f"{where} version {version}")
        check_parameters(parameters, model, f"{where} version {version}")
        warmup = warmup_samples(config, model, model_dir, f"{where} version {version}")
        batching = None
        if config.HasField("dynamic_batching"):  # what of it applies; int fields as protobuf's JSON writes them
            declared = config.dynamic_batching
            batching = {k: str(v) for k, v in (("default_priority_level", declared.default_priority_level),
                                               ("priority_levels", declared.priority_levels)) if v}
        served.append(ServedModel(name, str(version), model, "onnxruntime_onnx", settings, parameters,
                                  config.max_batch_size, labels,
                                  {o.name: o.label_filename for o in config.output if o.label_filename},
                                  batching, {o.name: [int(d) for d in o.dims] for o in config.output if o.dims},
                                  warmup, published_warmup(config), source))
    return served


def _load_version(path: Path, engine_name: str, where: str) -> Model:
    """A version's ONNX model file; ModelLoadError naming the version and file when it fails."""
    from cellserve.graph.onnx_import import load_onnx

    if not path.is_file():
        raise ModelLoadError(f"{where}: no {path.name} in {str(path.parent)!r}")
    try:
        return load_onnx(path, engine_name)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where} ({path}): {exc}") from exc
    except Exception as exc:  # a corrupt file: protobuf, onnx checker, ...
        raise ModelLoadError(f"{where} ({path}): cannot load: {type(exc).__name__}: {exc}") from exc


def _row_limit(config: mc.ModelConfig, where: str) -> int | None:
    """The most sequences one request may hold: the parameter max_request_rows, else the
    config's max_batch_size (None: neither gives one). The parameter may be the smaller of
    the two, not the larger: Triton's clients read max_batch_size as the limit."""
    rows = _positive_parameter(config, "max_request_rows", "sequences", where)
    if config.max_batch_size < 0:
        raise ModelLoadError(f"{where}: max_batch_size must be 0 or more, got {config.max_batch_size}")
    if rows is not None and 0 < config.max_batch_size < rows:
        raise ModelLoadError(f"{where}: parameter max_request_rows {rows} is more than max_batch_size "
                             f"{config.max_batch_size}, which clients read as the most rows a request may hold; "
                             "raise max_batch_size, or set max_batch_size: 0 and limit rows by max_request_rows alone")
    return rows or config.max_batch_size or None


def _labels(config: mc.ModelConfig, model_dir: Path, where: str) -> dict[str, list[str]]:
    """Each config output's `label_filename` read: a file beside config.pbtxt, one label per
    line (line i names class i), as Triton reads it for classification."""
    labels = {}
    for output in config.output:
        if not output.label_filename:
            continue
        path = model_dir / output.label_filename
        if Path(output.label_filename).is_absolute() or ".." in Path(output.label_filename).parts \
                or not path.is_file():
            raise ModelLoadError(f"{where}: output {output.name!r}: label_filename {output.label_filename!r} "
                                 f"is not a file in {model_dir}")
        try:
            labels[output.name] = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{where}: output {output.name!r}: cannot read label_filename "
                                 f"{output.label_filename!r}: {exc}") from None
    return labels


def _check_batch_first(config: mc.ModelConfig, model: Model, where: str) -> None:
    """max_batch_size > 0 says, as Triton reads it, that every tensor's first dimension is the
    batch: refused for a model whose batch is elsewhere (time-major inputs)."""
    if config.max_batch_size <= 0:
        return
    for name, semantics in model.semantics.items():
        if semantics.batch_axis not in (None, 0):
            raise ModelLoadError(f"{where}: max_batch_size {config.max_batch_size} says every tensor's first "
                                 f"dimension is the batch, but input {name!r} holds its batch in dimension "
                                 f"{semantics.batch_axis}; set max_batch_size: 0 (dims are then whole shapes) and "
                                 "limit rows with the parameter max_request_rows")
    for spec in model.inputs:  # as Triton's ONNX backend: a batch dimension must be dynamic
        if spec.shape and spec.shape[0] != -1 and spec.shape[0] < config.max_batch_size:
            raise ModelLoadError(f"{where}: max_batch_size {config.max_batch_size}, but the graph fixes input "
                                 f"{spec.name!r}'s first dimension at {spec.shape[0]} (shape {list(spec.shape)}): "
                                 "export it with a dynamic batch dimension, or set max_batch_size: 0")


def _positive_parameter(config: mc.ModelConfig, name: str, unit: str, where: str) -> int | None:
    """The config's parameter `name`, a positive integer of `unit` (None when it gives none)."""
    given = config.parameters.get(name)
    if given is None:
        return None
    text = given.string_value.strip()
    if (ascii_int(text) or 0) < 1:
        raise ModelLoadError(f"{where}: parameter {name} must be a positive integer ({unit}), "
                             f"got {given.string_value!r}")
    return int(text)


def _load_seq2seq(version_dir: Path, decode: dict[str, str], engine_name: str, where: str) -> Model:
    """An encoder-decoder version: both graphs present and a decode spec in the config."""
    from cellserve.graph.seq2seq_import import load_seq2seq

    for filename in (ENCODER_FILE, DECODER_STEP_FILE):
        if not (version_dir / filename).is_file():
            raise ModelLoadError(f"{where}: an encoder-decoder needs {ENCODER_FILE} and {DECODER_STEP_FILE}; "
                                 f"no {filename} in {str(version_dir)!r}")
    if not decode:
        raise ModelLoadError(f"{where}: {str(version_dir)!r} holds {ENCODER_FILE} and {DECODER_STEP_FILE} but "
                             f"config.pbtxt has no {PARAMETER_PREFIX}* parameters (the decode spec; see docs/decoders.md)")
    try:
        spec = DecodeSpec.from_parameters(decode, f"{where}: config.pbtxt")
        return load_seq2seq(version_dir / ENCODER_FILE, version_dir / DECODER_STEP_FILE, spec, engine_name)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{where} ({version_dir}): {exc}") from exc
    except Exception as exc:  # a corrupt file: protobuf, onnx checker, ...
        raise ModelLoadError(f"{where} ({version_dir}): cannot load: {type(exc).__name__}: {exc}") from exc


def _read_config(model_dir: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    path = model_dir / "config.pbtxt"
    if path.is_file():
        try:
            text_format.Parse(path.read_text(), config)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: not a valid Triton model config: {exc}") from exc
    return config


def _choose_versions(config: mc.ModelConfig, versions: list[int], where: str) -> list[int]:
    if not versions:
        raise ModelLoadError(f"{where}: no version directories (positive integers) found")
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return versions
    if kind == "specific":
        if not policy.specific.versions:
            raise ModelLoadError(f"{where}: version_policy specific names no versions (versions: [N, ...])")
        missing = sorted(set(policy.specific.versions) - set(versions))
        if missing:
            raise ModelLoadError(f"{where}: version_policy asks for version(s) {missing}, found {versions}")
        return sorted(set(policy.specific.versions))
    if kind == "latest" and policy.latest.num_versions < 1:
        raise ModelLoadError(f"{where}: version_policy latest needs num_versions of at least 1, "
                             f"got {policy.latest.num_versions}")
    count = policy.latest.num_versions if kind == "latest" else 1
    return versions[-count:]


def _settings(config: mc.ModelConfig, where: str) -> ModelSettings:
    settings = ModelSettings()
    slo = config.parameters.get("slo_ms")
    if slo is not None:
        try:
            value = float(slo.string_value)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ModelLoadError(f"{where}: parameter slo_ms must be a positive number, got {slo.string_value!r}")
        settings.default_timeout_s = value / 1e3
    idle = config.sequence_batching.max_sequence_idle_microseconds
    if config.HasField("sequence_batching") and idle > 0:
        settings.sequence_idle_s = idle / 1e6
    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        if batching.priority_levels and not 0 < batching.default_priority_level <= batching.priority_levels:
            raise ModelLoadError(f"{where}: dynamic_batching.default_priority_level "
                                 f"{batching.default_priority_level} must be within 1..priority_levels "
                                 f"({batching.priority_levels})")
        settings.default_priority = batching.default_priority_level
    return settings


# What of a config cellserve applies (see the module docstring): field paths, "[]" for each
# item of a repeated field. Anything else a config sets is logged as not applied.
_APPLIED = {"name", "platform", "backend", "version_policy", "max_batch_size", "default_model_filename",
            "parameters", "input[].name", "input[].data_type", "input[].dims", "output[].name",
            "output[].data_type", "output[].dims", "output[].label_filename",
            "sequence_batching.max_sequence_idle_microseconds", "dynamic_batching.default_priority_level",
            "dynamic_batching.priority_levels", "model_warmup"}
_PARTLY = {"input[]", "output[]", "sequence_batching", "dynamic_batching"}


def unapplied_fields(config: mc.ModelConfig) -> list[str]:
    """The fields `config` sets that cellserve does not apply (Triton's instance groups,
    queue policies, rate limits, ...), as dotted paths."""
    found = []

    def walk(message, prefix: str) -> None:
        for fd, value in message.ListFields():
            repeated = _is_repeated(fd)
            path = f"{prefix}{fd.name}" + ("[]" if repeated else "")
            if path in _APPLIED or path.removesuffix("[]") in _APPLIED:
                continue
            if path in _PARTLY:
                for item in (value if repeated else [value]):
                    walk(item, path + ".")
            elif path.replace("[]", "") not in found:
                found.append(path.replace("[]", ""))

    walk(config, "")
    return found


def _is_repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf 6 (`label` is deprecated there)
    if flag is None:
        return fd.label == fd.LABEL_REPEATED
    return bool(flag() if callable(flag) else flag)


_CONFIG_TYPES = {getattr(mc, f"TYPE_{t}"): t for t in
                 ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                  "FP16", "FP32", "FP64")}


def _check_declared_tensors(config: mc.ModelConfig, model: Model, where: str) -> None:
    from cellserve.server.codec import datatype_of

    for declared, actual, kind in ((config.input, model.inputs, "input"), (config.output, model.outputs, "output")):
        by_name = {spec.name: spec for spec in actual}
        for tensor in declared:
            spec = by_name.get(tensor.name)
            if spec is None:
                raise ModelLoadError(f"{where}: config declares {kind} {tensor.name!r}; "
                                     f"the model's {kind}s are {sorted(by_name)}")
            want = _CONFIG_TYPES.get(tensor.data_type, mc.DataType.Name(tensor.data_type).removeprefix("TYPE_"))
            have = datatype_of(np.dtype(spec.dtype))
            if tensor.data_type != mc.TYPE_INVALID and want != have:  # TYPE_INVALID: none declared
                raise ModelLoadError(f"{where}: config declares {kind} {tensor.name!r} as TYPE_{want}; "
                                     f"the model has {have}")
            if tensor.dims:
                narrowed = _declared_shape(config, tensor, spec, kind, where)
                if kind == "input" and narrowed != spec.shape:  # requests are held to it, as Triton holds them
                    model.inputs[model.inputs.index(spec)] = replace(spec, shape=narrowed)


def _declared_shape(config: mc.ModelConfig, tensor, spec, kind: str, where: str) -> tuple[int, ...]:
    """A config's dims against the graph's shape, as Triton reads them: with max_batch_size > 0
    the dims leave out a leading batch dimension. Each fixed size must be the graph's where the
    graph fixes it; where the graph leaves a dimension dynamic, the config may fix it. Returns
    the shape requests are held to."""
    dims = [-1] * (config.max_batch_size > 0) + [int(d) for d in tensor.dims]
    shape = list(spec.shape)
    if len(dims) != len(shape) or any(g != -1 and d != -1 and g != d for g, d in zip(shape, dims)):
        batch = (f" (with max_batch_size {config.max_batch_size}, a leading batch dimension: {dims})"
                 if config.max_batch_size > 0 else "")
        raise ModelLoadError(f"{where}: config declares {kind} {tensor.name!r} with dims {list(tensor.dims)}{batch}; "
                             f"the graph's shape is {shape} (-1: dynamic)")
    return tuple(g if d == -1 else d for g, d in zip(shape, dims))
