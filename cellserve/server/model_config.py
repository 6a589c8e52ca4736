"""Triton's model configuration extension: a served model's configuration as Triton's
ModelConfig, over HTTP (`GET /v2/models/{m}[/versions/{v}]/config`, the JSON form) and gRPC
(`ModelConfig`, the message), as tritonclient's `get_model_config` reads it.

What it holds: `name`, `platform`, `max_batch_size` (0, and the dims below are whole shapes,
the batch axis included, -1 for a dynamic size; or a repository config's max_batch_size > 0,
and the dims leave out the leading batch dimension, as Triton's do), `input` and `output`
(names, `data_type`, `dims`, an output's as its repository config declares them; an output's
`label_filename` as its repository config gives it), the `dynamic_batching` a repository
config declares (its priority levels), else `sequence_batching` with the idle timeout for a
model that takes sequences (one whose recurrences all run forwards; it still takes them when
its config declares dynamic batching), a repository config's `model_warmup` as declared, and
`parameters`, `{key: {"string_value": value}}`: a repository model's config.pbtxt parameters
as written, a zoo model's from `zoo.parameters` (the `dates` model's text vocabularies,
cellserve/text_vocab.py, and its decode spec).

`check_parameters` is run at load: published text.* keys must make a vocabulary whose input
and output are tensors the model has, so that a client never fetches one it cannot use.
"""

from __future__ import annotations

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from cellserve.errors import ModelLoadError
from cellserve.graph.model import Model
from cellserve.server.codec import datatype_of
from cellserve.text_vocab import TextVocabulary, VocabularyError

EXTENSION = "model_configuration"


def model_config(name: str, platform: str, model: Model, parameters: dict[str, str],
                 sequence_idle_s: float, max_batch_size: int = 0, label_files: dict[str, str] | None = None,
                 dynamic_batching: dict | None = None, output_dims: dict[str, list[int]] | None = None,
                 model_warmup: list[dict] | None = None) -> dict:
    """The ModelConfig of one served model version, as JSON (Triton's field names).
    `dynamic_batching`, `output_dims` and `model_warmup`: as a repository config declares them."""
    batch_dims = 1 if max_batch_size > 0 else 0
    label_files, output_dims = label_files or {}, output_dims or {}

    def tensors(specs, declared=None):
        out = [{"name": s.name, "data_type": _config_type(datatype_of(s.dtype)),
                "dims": (declared or {}).get(s.name, list(s.shape)[batch_dims:])} for s in specs]
        for tensor in out:
            if tensor["name"] in label_files:
                tensor["label_filename"] = label_files[tensor["name"]]
        return out

    config = {"name": name, "platform": platform, "max_batch_size": max_batch_size, "input": tensors(model.inputs),
              "output": tensors(model.outputs, output_dims),
              "parameters": {k: {"string_value": v} for k, v in sorted(parameters.items())}}
    if dynamic_batching is not None:  # one or the other, as in Triton's ModelConfig (a oneof)
        config["dynamic_batching"] = dynamic_batching
    elif model.why_not_streamable() is None:  # int64 fields are strings in protobuf's JSON
        config["sequence_batching"] = {"max_sequence_idle_microseconds": str(round(sequence_idle_s * 1e6))}
    if model_warmup:
        config["model_warmup"] = model_warmup
    return config


def model_config_message(config: dict) -> mc.ModelConfig:
    """The JSON form as the protobuf message gRPC's ModelConfigResponse carries."""
    return json_format.ParseDict(config, mc.ModelConfig())


def check_parameters(parameters: dict[str, str], model: Model, where: str) -> None:
    """Raise ModelLoadError naming the key when the published text vocabulary is unusable."""
    try:
        vocab = TextVocabulary.from_parameters(parameters)
    except VocabularyError as exc:
        raise ModelLoadError(f"{where}: parameters: {exc}") from None
    if vocab is None:
        return
    for key, name, specs in (("text.input", vocab.input, model.inputs), ("text.output", vocab.output, model.outputs)):
        names = [s.name for s in specs]
        if name not in names:
            raise ModelLoadError(f"{where}: parameter {key} names {name!r}, which is not one of the model's "
                                 f"{key.split('.')[1]}s {names}")


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
