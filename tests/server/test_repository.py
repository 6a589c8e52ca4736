"""The model repository (cellserve/server/repository.py): which versions are served, what the
config may say and what it may not, and a repository of exported PyTorch models served end to
end over HTTP (JSON and binary tensors) and gRPC, checked against onnxruntime on the same files."""

from __future__ import annotations

import functools
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from torch import nn
from tritonclient.utils import InferenceServerException

from cellserve.errors import ModelLoadError
from cellserve.graph.torch_import import export_onnx_bytes
from cellserve.graph.zoo.modules import RNNClassifier, seeded
from cellserve.server.repository import load_repository
from serverproc import start_server, wait_until

LSTM_VOCAB, GRU_VOCAB, CLASSES = 50, 40, 3


# ---- the models: small, seeded, exported by PyTorch's TorchScript exporter ----

class SeqFirstGRU(nn.Module):
    """tokens [time, batch] -> (step_scores [time, batch, 3], probabilities [batch, 3])."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(GRU_VOCAB, 6)
        self.rnn = nn.GRU(6, 7)  # seq-first: no Transpose in the graph
        self.head = nn.Linear(7, CLASSES)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h_n = self.rnn(self.embedding(tokens))
        return self.head(y), torch.softmax(self.head(h_n[-1]), dim=-1)


@functools.lru_cache(maxsize=None)
def lstm_onnx(seed: int) -> bytes:
    """A batch-first 2-layer LSTM classifier (the exporter puts a Transpose before the LSTMs):
    tokens [batch, time] -> (probabilities [batch, 3], label [batch])."""
    module = seeded(RNNClassifier("lstm", LSTM_VOCAB, 8, 8, 2, classes=CLASSES), seed)
    return export_onnx_bytes(module, (torch.zeros((1, 3), dtype=torch.long),), ["tokens"], ["probabilities", "label"],
                             {"tokens": {0: "batch", 1: "time"}, "probabilities": {0: "batch"}, "label": {0: "batch"}})


@functools.lru_cache(maxsize=None)
def gru_onnx(seed: int) -> bytes:
    module = seeded(SeqFirstGRU(), seed)
    return export_onnx_bytes(module, (torch.zeros((3, 2), dtype=torch.long),), ["tokens"],
                             ["step_scores", "probabilities"],
                             {"tokens": {0: "time", 1: "batch"}, "step_scores": {0: "time", 1: "batch"},
                              "probabilities": {0: "batch"}})


def add_model(root: Path, name: str, versions: dict[int, bytes], config: str | None = None,
              filename: str = "model.onnx") -> Path:
    for version, data in versions.items():
        (root / name / str(version)).mkdir(parents=True, exist_ok=True)
        (root / name / str(version) / filename).write_bytes(data)
    if config is not None:
        (root / name / "config.pbtxt").write_text(config)
    return root / name


def served_versions(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for entry in load_repository(root):
        out.setdefault(entry.name, []).append(entry.version)
    return out


# ---- unit tests of load_repository ----

def test_highest_version_by_default(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0), 2: gru_onnx(1), 10: gru_onnx(2)})
    (tmp_path / "m" / "0").mkdir()  # not a version: versions are positive
    (tmp_path / "m" / "latest").mkdir()  # not a version either
    (tmp_path / ".hidden").mkdir()  # not a model
    (served,) = load_repository(tmp_path)
    assert (served.name, served.version, served.engine_name) == ("m", "10", "m:10")  # 10 > 2: numeric order
    assert served.platform == "onnxruntime_onnx"
    assert [s.name for s in served.model.inputs] == ["tokens"]


@pytest.mark.parametrize("policy, want", [
    ("all: {}", ["1", "2", "10"]),
    ("latest: { num_versions: 2 }", ["2", "10"]),
    ("latest: { num_versions: 5 }", ["1", "2", "10"]),
    ("specific: { versions: [1, 10] }", ["1", "10"]),
    ("specific: { versions: [2] }", ["2"]),
])
def test_version_policy(tmp_path, policy, want):
    add_model(tmp_path, "m", {1: gru_onnx(0), 2: gru_onnx(1), 10: gru_onnx(2)}, f"version_policy: {{ {policy} }}\n")
    assert served_versions(tmp_path) == {"m": want}


def test_specific_version_that_is_not_there(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, "version_policy: { specific: { versions: [1, 3] } }\n")
    with pytest.raises(ModelLoadError, match=r"'m'.*\[3\]"):
        load_repository(tmp_path)


def test_models_are_independent(tmp_path):
    add_model(tmp_path, "a", {1: gru_onnx(0), 2: gru_onnx(1)}, 'name: "a"\nversion_policy: { all: {} }\n')
    add_model(tmp_path, "b", {3: lstm_onnx(0), 4: lstm_onnx(1)})
    assert served_versions(tmp_path) == {"a": ["1", "2"], "b": ["4"]}


def test_config_name_must_match_the_directory(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, 'name: "other"\n')
    with pytest.raises(ModelLoadError, match=r"'other'.*directory"):
        load_repository(tmp_path)


def test_declared_tensors_are_checked_against_the_graph(tmp_path):
    ok = ('input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, -1 ] } ]\n'
          'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]\n')
    add_model(tmp_path, "m", {1: gru_onnx(0)}, ok)
    assert served_versions(tmp_path) == {"m": ["1"]}

    (tmp_path / "m" / "config.pbtxt").write_text('input [ { name: "tokens" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]')
    with pytest.raises(ModelLoadError, match=r"input 'tokens' as TYPE_FP32; the model has INT64"):
        load_repository(tmp_path)
    (tmp_path / "m" / "config.pbtxt").write_text('output [ { name: "probabilities" data_type: TYPE_INT32 } ]')
    with pytest.raises(ModelLoadError, match=r"output 'probabilities' as TYPE_INT32; the model has FP32"):
        load_repository(tmp_path)
    (tmp_path / "m" / "config.pbtxt").write_text('input [ { name: "words" data_type: TYPE_INT64 } ]')
    with pytest.raises(ModelLoadError, match=r"input 'words'.*\['tokens'\]"):
        load_repository(tmp_path)


@pytest.mark.parametrize("config, message", [
    ('input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]',
     r"input 'tokens' with dims \[-1\]; the graph's shape is \[-1, -1\]"),
    ('output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ -1, 5 ] } ]',
     r"output 'probabilities' with dims \[-1, 5\]; the graph's shape is \[-1, 3\]"),
    ('max_batch_size: 8\ninput [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, -1 ] } ]',
     r"with max_batch_size 8, a leading batch dimension: \[-1, -1, -1\]"),
])
def test_declared_dims_that_contradict_the_graph_are_refused(tmp_path, config, message):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, config)
    with pytest.raises(ModelLoadError, match=message):
        load_repository(tmp_path)


def test_declared_dims_as_triton_reads_them_and_requests_held_to_them(tmp_path):
    # Triton's form: max_batch_size > 0 and the dims without the leading batch dimension
    add_model(tmp_path, "m", {1: lstm_onnx(0)}, 'max_batch_size: 8\n'
              'input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
              'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] } ]\n')
    (served,) = load_repository(tmp_path)
    assert served.model.inputs[0].shape == (-1, -1)
    # a config may fix what the graph leaves dynamic: requests are then held to it
    (tmp_path / "m" / "config.pbtxt").write_text('input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, 5 ] } ]')
    (served,) = load_repository(tmp_path)
    assert served.model.inputs[0].shape == (-1, 5)
    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.engine.request import Request, Status

    engine, got = Engine([served.model], EngineConfig()), []
    for length in (3, 5):
        engine.submit(Request(served.model.name, {"tokens": np.ones((1, length), np.int64)}, on_done=got.append))
    engine.run_until_idle()
    assert got[0].status is Status.INVALID and "dimension 1 must be 5" in got[0].reason
    assert got[1].status is Status.OK


def test_settings_from_the_config(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)},
              'platform: "onnxruntime_onnx"\n'
              'sequence_batching { max_sequence_idle_microseconds: 5000000 }\n'
              'parameters { key: "slo_ms" value: { string_value: "250" } }\n')
    (served,) = load_repository(tmp_path)
    assert served.settings.default_timeout_s == pytest.approx(0.25)
    assert served.settings.sequence_idle_s == pytest.approx(5.0)
    assert served.settings.default_priority == 0
    # dynamic_batching and sequence_batching are one oneof in Triton's ModelConfig: one or the other
    (tmp_path / "m" / "config.pbtxt").write_text('dynamic_batching { default_priority_level: 2 }\n'
                                                 'parameters { key: "slo_ms" value: { string_value: "12.5" } }\n')
    (served,) = load_repository(tmp_path)
    assert served.settings.default_priority == 2
    assert served.settings.default_timeout_s == pytest.approx(0.0125)
    assert served.settings.sequence_idle_s is None


@pytest.mark.parametrize("config, message", [
    ('input [ { name: "tokens" data_type: TYPE_STRING } ]', r"input 'tokens' as TYPE_STRING; the model has INT64"),
    ('input [ { name: "tokens" data_type: TYPE_BF16 } ]', r"input 'tokens' as TYPE_BF16; the model has INT64"),
    ('dynamic_batching { default_priority_level: 5 priority_levels: 3 }',
     r"default_priority_level 5 must be within 1..priority_levels \(3\)"),
    ('version_policy: { specific: { } }', r"version_policy specific names no versions"),
    ('version_policy: { latest: { num_versions: 0 } }', r"version_policy latest needs num_versions of at least 1"),
])
def test_a_config_triton_would_refuse_is_refused_naming_the_field(tmp_path, config, message):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, config)
    with pytest.raises(ModelLoadError, match=message):
        load_repository(tmp_path)


def test_max_batch_size_on_a_graph_that_fixes_its_batch_is_refused(tmp_path):
    fixed = export_onnx_bytes(seeded(RNNClassifier("lstm", LSTM_VOCAB, 8, 8, 2, classes=CLASSES), 0),
                              (torch.zeros((1, 3), dtype=torch.long),), ["tokens"], ["probabilities", "label"],
                              {"tokens": {1: "time"}})  # batch fixed at 1
    add_model(tmp_path, "m", {1: fixed}, "max_batch_size: 8")
    with pytest.raises(ModelLoadError, match=r"max_batch_size 8, but the graph fixes input 'tokens''s first "
                                             r"dimension at 1 \(shape \[1, -1\]\)"):
        load_repository(tmp_path)
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 0")
    assert served_versions(tmp_path) == {"m": ["1"]}


def test_config_fields_cellserve_does_not_apply_are_logged_by_name(tmp_path, caplog):
    add_model(tmp_path, "m", {1: gru_onnx(0)},
              'instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]\n'
              'dynamic_batching { max_queue_delay_microseconds: 100 default_priority_level: 1 priority_levels: 2 '
              'default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 100 } }\n'
              'input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, -1 ] reshape { shape: [ 1 ] } } ]\n'
              'optimization { priority: PRIORITY_MAX }\n')
    with caplog.at_level("WARNING", logger="cellserve.server.repository"):
        (served,) = load_repository(tmp_path)
    assert served.settings.default_priority == 1  # what it does apply, applied
    (line,) = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert line == ("model 'm': config.pbtxt sets input.reshape, instance_group, "
                    "dynamic_batching.max_queue_delay_microseconds, dynamic_batching.default_queue_policy, "
                    "optimization, which cellserve does not apply")
    caplog.clear()
    add_model(tmp_path, "plain", {1: gru_onnx(0)}, 'max_batch_size: 0\nversion_policy: { all: { } }\n')
    with caplog.at_level("WARNING", logger="cellserve.server.repository"):
        load_repository(tmp_path / ".." / tmp_path.name)
    assert not [r for r in caplog.records if "'plain'" in r.getMessage()]


def test_both_batching_sections_are_refused(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, 'sequence_batching { }\ndynamic_batching { }\n')
    with pytest.raises(ModelLoadError, match=r"config.pbtxt: not a valid Triton model config"):
        load_repository(tmp_path)


def test_settings_default_without_a_config(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)})
    (served,) = load_repository(tmp_path)
    assert served.settings.default_timeout_s is None  # no deadline
    assert served.settings.sequence_idle_s is None  # the server's --sequence-idle-timeout
    assert served.settings.default_priority == 0  # after every explicit level


@pytest.mark.parametrize("value", ["0", "-5", "fast", ""])
def test_bad_slo_ms(tmp_path, value):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, f'parameters {{ key: "slo_ms" value: {{ string_value: "{value}" }} }}')
    with pytest.raises(ModelLoadError, match=r"slo_ms must be a positive number"):
        load_repository(tmp_path)


def test_max_sequence_length_from_the_config(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)})
    (served,) = load_repository(tmp_path)
    assert served.model.max_sequence_length == 1024  # the default
    (tmp_path / "m" / "config.pbtxt").write_text('parameters { key: "max_sequence_length" value: { string_value: "5000" } }')
    (served,) = load_repository(tmp_path)
    assert served.model.max_sequence_length == 5000


def test_max_request_rows_from_the_config_or_its_max_batch_size(tmp_path):
    add_model(tmp_path, "m", {1: lstm_onnx(0)})
    (served,) = load_repository(tmp_path)
    assert served.model.max_request_rows == 1024  # the default
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 8")  # Triton's bound on a request's batch
    (served,) = load_repository(tmp_path)
    assert served.model.max_request_rows == 8
    (tmp_path / "m" / "config.pbtxt").write_text(
        'max_batch_size: 8\nparameters { key: "max_request_rows" value: { string_value: "5" } }')
    (served,) = load_repository(tmp_path)
    assert served.model.max_request_rows == 5  # the parameter, where both are given
    (tmp_path / "m" / "config.pbtxt").write_text(
        'max_batch_size: 8\nparameters { key: "max_request_rows" value: { string_value: "20000" } }')
    with pytest.raises(ModelLoadError, match=r"model 'm': parameter max_request_rows 20000 is more than "
                                             r"max_batch_size 8, which clients read as the most rows"):
        load_repository(tmp_path)  # not silently more than clients are told
    (tmp_path / "m" / "config.pbtxt").write_text('parameters { key: "max_request_rows" value: { string_value: "0" } }')
    with pytest.raises(ModelLoadError, match=r"model 'm': parameter max_request_rows must be a positive integer "
                                             r"\(sequences\), got '0'"):
        load_repository(tmp_path)


def test_max_batch_size_is_refused_for_a_model_whose_batch_is_not_first(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, "max_batch_size: 8")  # tokens [time, batch]
    with pytest.raises(ModelLoadError, match=r"model 'm' version 1: max_batch_size 8 says every tensor's first "
                                             r"dimension is the batch, but input 'tokens' holds its batch in "
                                             r"dimension 1; set max_batch_size: 0"):
        load_repository(tmp_path)


def test_the_readmes_example_config_loads(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("### Model repository", 1)[1].split("```", 2)[1]
    add_model(tmp_path, "tagger", {1: lstm_onnx(0), 2: lstm_onnx(1)}, block)
    served = load_repository(tmp_path)
    assert [s.version for s in served] == ["1", "2"]  # version_policy all
    assert served[0].settings.sequence_idle_s == pytest.approx(5.0)
    assert served[0].settings.default_timeout_s == pytest.approx(0.2)
    assert served[0].model.max_sequence_length == 4096
    assert served[0].model.max_request_rows == 64
    assert [(w.name, w.inputs["tokens"].shape) for w in served[0].warmup] == [("burst", (16, 1000))]


@pytest.mark.parametrize("value", ["0", "-5", "long", "", "2.5"])
def test_bad_max_sequence_length(tmp_path, value):
    add_model(tmp_path, "m", {1: gru_onnx(0)},
              f'parameters {{ key: "max_sequence_length" value: {{ string_value: "{value}" }} }}')
    with pytest.raises(ModelLoadError, match=r"model 'm': parameter max_sequence_length must be a positive integer"):
        load_repository(tmp_path)


def test_default_model_filename(tmp_path):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, 'default_model_filename: "net.onnx"\n', filename="net.onnx")
    assert served_versions(tmp_path) == {"m": ["1"]}
    (tmp_path / "m" / "config.pbtxt").write_text("")  # model.onnx by default: not there
    with pytest.raises(ModelLoadError, match=r"version 1: no model.onnx"):
        load_repository(tmp_path)


@pytest.mark.parametrize("config", ['platform: "pytorch_libtorch"', 'backend: "python"'])
def test_other_platforms_are_refused(tmp_path, config):
    add_model(tmp_path, "m", {1: gru_onnx(0)}, config)
    with pytest.raises(ModelLoadError, match=r"ONNX"):
        load_repository(tmp_path)


def test_repository_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_repository(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="holds no models"):
        load_repository(tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match=r"'m': no version directories"):
        load_repository(tmp_path)
    add_model(tmp_path, "m", {1: b"not onnx"})
    with pytest.raises(ModelLoadError, match=r"'m' version 1"):
        load_repository(tmp_path)


# ---- served end to end ----

LSTM_VERSIONS = {1: 0, 2: 1}
LABELS = ["negative", "neutral", "positive"]  # lstm_clf's classes, for classification  # version -> seed: different weights, so the answering version shows
GRU_VERSIONS = {1: 2, 3: 3}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    add_model(root, "lstm_clf", {v: lstm_onnx(s) for v, s in LSTM_VERSIONS.items()},
              'name: "lstm_clf"\nplatform: "onnxruntime_onnx"\nversion_policy: { all: {} }\nmax_batch_size: 8\n'
              'input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
              'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]\n')
    (root / "lstm_clf" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    add_model(root, "gru_seq", {v: gru_onnx(s) for v, s in GRU_VERSIONS.items()})  # no config: version 3 only
    return root


@pytest.fixture(scope="module")
def server(repo):
    proc = start_server("--model-repository", str(repo))
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def http(server):
    with httpclient.InferenceServerClient(server.http) as client:
        yield client


@pytest.fixture(scope="module")
def grpc(server):
    with grpcclient.InferenceServerClient(server.grpc) as client:
        yield client


def ort_reference(path: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"tokens": tokens})))


def requests_for(model: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if model == "lstm_clf":
        return rng.integers(0, LSTM_VOCAB, (3, 7)).astype(np.int64)  # [batch, time]
    return rng.integers(0, GRU_VOCAB, (6, 2)).astype(np.int64)  # [time, batch]: seq-first


def infer(kind: str, http, grpc, model: str, version: str, tokens: np.ndarray):
    """(outputs by name, the version that answered)"""
    if kind == "grpc":
        tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
        tensor.set_data_from_numpy(tokens)
        result = grpc.infer(model, [tensor], model_version=version)
        response = result.get_response(as_json=True)
        return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}, response["model_version"]
    binary = kind == "http-binary"
    tensor = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens, binary_data=binary)
    names = ["probabilities", "label"] if model == "lstm_clf" else ["step_scores", "probabilities"]
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    result = http.infer(model, [tensor], model_version=version, outputs=outputs)
    response = result.get_response()
    return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}, response["model_version"]


@pytest.mark.parametrize("kind", ["http-json", "http-binary", "grpc"])
@pytest.mark.parametrize("model, version, answering", [
    ("lstm_clf", "1", "1"), ("lstm_clf", "2", "2"), ("lstm_clf", "", "2"),
    ("gru_seq", "3", "3"), ("gru_seq", "", "3"),
])
def test_outputs_match_onnxruntime(repo, http, grpc, kind, model, version, answering):
    tokens = requests_for(model)
    got, answered = infer(kind, http, grpc, model, version, tokens)
    assert answered == answering
    want = ort_reference(repo / model / answering / "model.onnx", tokens)
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], expected, err_msg=name)


def test_versions_really_differ(repo):
    tokens = requests_for("lstm_clf")
    v1 = ort_reference(repo / "lstm_clf" / "1" / "model.onnx", tokens)["probabilities"]
    v2 = ort_reference(repo / "lstm_clf" / "2" / "model.onnx", tokens)["probabilities"]
    assert not np.allclose(v1, v2, rtol=1e-3)


LSTM_META = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}],
             "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]},
                         {"name": "label", "datatype": "INT64", "shape": [-1]}]}
GRU_META = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}],
            "outputs": [{"name": "step_scores", "datatype": "FP32", "shape": [-1, -1, CLASSES]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]}]}


def grpc_metadata(grpc, model: str, version: str = "") -> dict:
    meta = grpc.get_model_metadata(model, version, as_json=True)
    for tensor in meta["inputs"] + meta["outputs"]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]
    return meta


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_metadata_lists_the_onnx_names_with_dynamic_dims(http, grpc, protocol):
    metadata = http.get_model_metadata if protocol == "http" else functools.partial(grpc_metadata, grpc)
    for model, want, versions in (("lstm_clf", LSTM_META, ["1", "2"]), ("gru_seq", GRU_META, ["3"])):
        meta = metadata(model)
        assert meta["name"] == model and meta["versions"] == versions and meta["platform"] == "onnxruntime_onnx"
        assert {k: meta[k] for k in ("inputs", "outputs")} == want
        for version in versions:
            one = metadata(model, version)
            assert one["versions"] == [version] and {k: one[k] for k in ("inputs", "outputs")} == want


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_published_config_says_max_batch_size_as_the_config_gave_it(http, grpc, protocol):
    """Triton's reading: max_batch_size > 0 and dims without the batch, or 0 and whole shapes."""
    def config(model):
        if protocol == "http":
            return http.get_model_config(model)
        found = grpc.get_model_config(model, as_json=True)["config"]
        for tensor in found["input"] + found["output"]:
            tensor["dims"] = [int(d) for d in tensor.get("dims", [])]  # protobuf's JSON leaves out []
        return found
    lstm, gru = config("lstm_clf"), config("gru_seq")
    assert lstm["max_batch_size"] == 8
    assert [(t["name"], t["dims"]) for t in lstm["input"] + lstm["output"]] == [
        ("tokens", [-1]), ("probabilities", [3]), ("label", [])]
    assert [t.get("label_filename") for t in lstm["output"]] == ["labels.txt", None]  # as Triton publishes it
    assert gru.get("max_batch_size", 0) == 0  # protobuf's JSON leaves out a zero
    assert [(t["name"], t["dims"]) for t in gru["input"]] == [("tokens", [-1, -1])]
    bigger = np.ones((9, 4), np.int64)  # more rows than max_batch_size
    with pytest.raises(InferenceServerException, match="9 sequences"):
        infer("http-binary" if protocol == "http" else "grpc", http, grpc, "lstm_clf", "", bigger)


def test_the_published_config_echoes_a_declared_dynamic_batching_and_output_dims(tmp_path):
    from cellserve.server.model_config import model_config, model_config_message

    add_model(tmp_path, "m", {1: gru_onnx(0)},
              'dynamic_batching { default_priority_level: 2 priority_levels: 3 max_queue_delay_microseconds: 5 }\n'
              'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]\n')  # the graph's [-1, 3]
    add_model(tmp_path, "plain", {1: gru_onnx(0)})
    served = {s.name: s for s in load_repository(tmp_path)}

    def published(entry):
        return model_config(entry.name, entry.platform, entry.model, entry.parameters, 60.0, entry.max_batch_size,
                            entry.label_files, entry.dynamic_batching, entry.output_dims)

    declared, plain = published(served["m"]), published(served["plain"])
    assert declared["dynamic_batching"] == {"default_priority_level": "2", "priority_levels": "3"}  # what applies
    assert "sequence_batching" not in declared  # one or the other, as in Triton's ModelConfig
    assert "sequence_batching" in plain and "dynamic_batching" not in plain  # it takes sequences
    assert [t["dims"] for t in declared["output"] if t["name"] == "probabilities"] == [[2, 3]]
    assert [t["dims"] for t in plain["output"] if t["name"] == "probabilities"] == [[-1, 3]]
    message = model_config_message(declared)  # and gRPC's message carries it
    assert (message.dynamic_batching.default_priority_level, message.dynamic_batching.priority_levels) == (2, 3)


def test_classification_names_the_classes_from_the_config_s_label_file(http, grpc):
    tokens = requests_for("lstm_clf")
    probabilities, _ = infer("http-json", http, grpc, "lstm_clf", "2", tokens)
    tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens)
    result = grpc.infer("lstm_clf", [tensor], model_version="2",
                        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)])
    for row, classes in zip(probabilities["probabilities"], result.as_numpy("probabilities")):
        best = np.argsort(-row, kind="stable")[:2]
        assert [c.decode().split(":", 1)[1] for c in classes] == [f"{i}:{LABELS[i]}" for i in best]


def test_a_label_file_that_is_not_there_is_refused(tmp_path):
    add_model(tmp_path, "m", {1: lstm_onnx(0)},
              'output [ { name: "probabilities" data_type: TYPE_FP32 label_filename: "nope.txt" } ]')
    with pytest.raises(ModelLoadError, match=r"model 'm': output 'probabilities': label_filename 'nope.txt' is "
                                             r"not a file in"):
        load_repository(tmp_path)


def get(server, path: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(f"http://{server.http}{path}", timeout=10) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_versioned_routes(server):
    assert get(server, "/v2/models/lstm_clf/versions/1")[1]["versions"] == ["1"]
    assert get(server, "/v2/models/lstm_clf/versions/2")[1]["versions"] == ["2"]
    assert get(server, "/v2/models/lstm_clf")[1]["versions"] == ["1", "2"]
    for path in ("/v2/models/lstm_clf/versions/1/ready", "/v2/models/lstm_clf/versions/2/ready",
                 "/v2/models/gru_seq/versions/3/ready", "/v2/models/gru_seq/ready"):
        assert get(server, path)[0] == 200, path
    # gru_seq has a version 1 on disk, but without a config only the highest is served
    status, body = get(server, "/v2/models/gru_seq/versions/1")
    assert status == 404 and "'1'" in body["error"] and "gru_seq" in body["error"]
    assert get(server, "/v2/models/gru_seq/versions/1/ready")[0] == 404


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unserved_version_is_not_found(http, grpc, protocol):
    tokens = requests_for("gru_seq")
    with pytest.raises(InferenceServerException) as info:
        infer("http-binary" if protocol == "http" else "grpc", http, grpc, "gru_seq", "1", tokens)
    assert str(info.value.status()) in ("404", "StatusCode.NOT_FOUND")
    assert "version '1'" in info.value.message() and "3" in info.value.message()


# ---- model control (--model-control-mode explicit) ----

@pytest.fixture(scope="module")
def controlled(repo):
    proc = start_server("--model-repository", str(repo), "--model-control-mode", "explicit",
                        "--load-model", "gru_seq")
    yield proc
    assert proc.stop() == 0


def _index(client) -> list[tuple[str, str, str, str]]:
    if isinstance(client, grpcclient.InferenceServerClient):
        models = client.get_model_repository_index(as_json=True).get("models", [])
    else:
        models = client.get_model_repository_index()
    return sorted((m["name"], m.get("version", ""), m["state"], m.get("reason", "")) for m in models)


def test_model_control_loads_and_unloads_while_serving(controlled, repo):
    """Triton's EXPLICIT mode through tritonclient: what --load-model named is served, the
    rest of the repository is indexed as unloaded; a load serves every version the config
    chooses, an unload takes the model out of service."""
    http = httpclient.InferenceServerClient(controlled.http)
    grpc = grpcclient.InferenceServerClient(controlled.grpc)
    assert _index(http) == [("gru_seq", "3", "READY", ""), ("lstm_clf", "", "UNAVAILABLE", "unloaded")]
    with pytest.raises(InferenceServerException, match="model 'lstm_clf' is not loaded"):
        infer("http-json", http, grpc, "lstm_clf", "", requests_for("lstm_clf"))
    http.load_model("lstm_clf")
    assert http.is_model_ready("lstm_clf", "1") and grpc.is_model_ready("lstm_clf", "2")
    tokens = requests_for("lstm_clf")
    for version, seed in LSTM_VERSIONS.items():
        path = repo / "lstm_clf" / str(version) / "model.onnx"
        got, _ = infer("grpc", http, grpc, "lstm_clf", str(version), tokens)
        np.testing.assert_allclose(got["probabilities"], ort_reference(path, tokens)["probabilities"],
                                   rtol=1e-4, atol=1e-6)
    grpc.unload_model("gru_seq")
    assert not http.is_model_ready("gru_seq")
    assert _index(grpc) == [("gru_seq", "", "UNAVAILABLE", "unloaded"), ("lstm_clf", "1", "READY", ""),
                            ("lstm_clf", "2", "READY", "")]
    grpc.load_model("gru_seq")  # and back
    assert http.is_model_ready("gru_seq")
    http.load_model("lstm_clf")  # a reload: read again, served again
    assert http.is_model_ready("lstm_clf", "2")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_control_names_a_model_the_repository_lacks(controlled, protocol):
    module = grpcclient if protocol == "grpc" else httpclient
    with module.InferenceServerClient(controlled.grpc if protocol == "grpc" else controlled.http) as c:
        with pytest.raises(InferenceServerException, match=r"cannot load model 'gru_seq' with parameters \['config'\]"
                                                           ": this server reads the model from the repository"):
            c.load_model("gru_seq", config='{"max_batch_size": 4}')  # an override is refused, not ignored
        with pytest.raises(InferenceServerException, match="model 'nope' is not in the model repository"):
            c.load_model("nope")
        with pytest.raises(InferenceServerException, match="cannot unload model 'nope': it is not in the model "
                                                           "repository"):
            c.unload_model("nope")


def test_an_unload_waits_for_the_models_requests_in_flight(repo):
    """In process, the engine held between steps: the unload takes the model out of service at
    once, but removes it from the engine only once its queued request is answered (OK)."""
    import asyncio

    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.core import Core, InferInput
    from cellserve.server.errors import NotFound
    from cellserve.server.metrics import Metrics
    from cellserve.server.repository import load_repository_model
    from inprocess import PausableEngine

    served = load_repository_model(repo, "gru_seq")
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    core = Core(served, engine, Metrics(engine), repository=repo)
    worker = PausableEngine(engine)  # not started yet: the request waits in the inbox

    async def go():
        request = asyncio.ensure_future(core.infer(InferInput("gru_seq", "", {"tokens": requests_for("gru_seq")})))
        await asyncio.sleep(0)  # submitted
        unload = asyncio.ensure_future(core.load_model("gru_seq", unload=True))
        for _ in range(3):  # the unload's own task (shielded from its caller) has begun
            await asyncio.sleep(0)
        with pytest.raises(NotFound, match="model 'gru_seq' is not loaded"):
            core.model("gru_seq")  # out of service at once
        assert not unload.done() and not request.done()
        worker.start()
        answer = await request
        await unload
        return answer

    try:
        answer = asyncio.run(go())
    finally:
        worker.stop.set()
    assert "probabilities" in answer.outputs and "gru_seq:3" not in engine.models


def test_a_failed_load_says_why_in_the_index_until_the_model_loads(tmp_path):
    """In process: a model whose folder does not load is indexed with the load's error (not
    "unloaded"); once its folder is fixed, it loads and the reason goes."""
    import asyncio

    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.core import Core
    from cellserve.server.errors import BadRequest
    from cellserve.server.metrics import Metrics
    from inprocess import PausableEngine

    add_model(tmp_path, "gru_seq", {3: b"not onnx"})
    engine = Engine([], EngineConfig(profile=False, pin_threads=False))
    core = Core([], engine, Metrics(engine), repository=tmp_path)
    worker = PausableEngine(engine)
    worker.start()

    async def go():
        with pytest.raises(BadRequest, match="cannot load model 'gru_seq': .*version 3"):
            await core.load_model("gru_seq")
        [entry] = core.repository_index()
        assert entry["state"] == "UNAVAILABLE" and "cannot load model 'gru_seq'" in entry["reason"]
        (tmp_path / "gru_seq" / "3" / "model.onnx").write_bytes(gru_onnx(3))
        # loads and unloads of one model wait their turn (as Triton queues them), not refused
        await asyncio.gather(core.load_model("gru_seq"), core.load_model("gru_seq", unload=True),
                             core.load_model("gru_seq"))
        return core.repository_index()

    try:
        index = asyncio.run(go())
    finally:
        worker.stop.set()
    assert index == [{"name": "gru_seq", "version": "3", "state": "READY", "reason": ""}]


# ---- model control (--model-control-mode poll) ----

def _touch_later(path: Path) -> None:
    """Move a rewritten file's modification time a second on: the kernel's file clock ticks
    coarsely, and a file written twice within one tick would look unchanged to a poll."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_poll_loads_reloads_and_unloads_as_the_folders_change(tmp_path, caplog):
    """In process, each poll called by the test (no timer): a new folder loads, a changed one
    reloads (its answers are the new file's), a reload that fails keeps the versions served
    and is not tried again until the folder changes, a removed folder unloads; the API's
    loads and unloads are refused, naming the mode."""
    import asyncio

    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.core import Core, InferInput
    from cellserve.server.errors import BadRequest, NotFound
    from cellserve.server.metrics import Metrics
    from cellserve.server.repository import repository_fingerprints
    from inprocess import PausableEngine

    caplog.set_level("INFO", logger="cellserve.server.model_control")
    add_model(tmp_path, "gru_seq", {3: gru_onnx(3)})
    start = repository_fingerprints(tmp_path)
    served = load_repository(tmp_path)
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    core = Core(served, engine, Metrics(engine), repository=tmp_path, poll_s=15.0, fingerprints=start)
    worker = PausableEngine(engine)
    worker.start()
    gru_file = tmp_path / "gru_seq" / "3" / "model.onnx"
    lstm_file = tmp_path / "lstm_clf" / "1" / "model.onnx"

    async def answer(model: str) -> np.ndarray:
        result = await core.infer(InferInput(model, "", {"tokens": requests_for(model)}))
        return result.outputs["probabilities"]

    async def go():
        assert await core.poll_repository() == []  # nothing changed since the start
        add_model(tmp_path, "lstm_clf", {1: lstm_onnx(0)})
        with pytest.raises(NotFound, match="model 'lstm_clf' is not loaded: its folder is new to the repository"):
            core.model("lstm_clf")
        assert core.repository_index()[-1]["reason"] == "not loaded yet (the repository is polled every 15 s)"
        assert await core.poll_repository() == ["model 'lstm_clf' loaded: its folder appeared"]
        np.testing.assert_allclose(await answer("lstm_clf"),
                                   ort_reference(lstm_file, requests_for("lstm_clf"))["probabilities"], rtol=1e-4)
        gru_file.write_bytes(gru_onnx(4))  # new weights
        _touch_later(gru_file)
        assert await core.poll_repository() == ["model 'gru_seq' reloaded: its folder changed"]
        np.testing.assert_allclose(await answer("gru_seq"),
                                   ort_reference(gru_file, requests_for("gru_seq"))["probabilities"], rtol=1e-4)
        before = await answer("lstm_clf")
        lstm_file.write_bytes(b"half a file")
        [failed] = await core.poll_repository()
        assert failed.startswith("cannot load model 'lstm_clf'") and failed.endswith(
            "; the versions loaded before are still served")
        np.testing.assert_array_equal(await answer("lstm_clf"), before)
        assert await core.poll_repository() == []  # not tried again while the folder stays as it is
        shutil.rmtree(tmp_path / "gru_seq")
        assert await core.poll_repository() == ["model 'gru_seq' unloaded: its folder left the repository"]
        with pytest.raises(NotFound, match="unknown model 'gru_seq'"):
            core.model("gru_seq")
        for unload in (False, True):
            with pytest.raises(BadRequest, match=r"this server polls its model repository \(--model-control-mode "
                                                 r"poll, every 15 s\): add, change or remove the model's folder"):
                await core.load_model("lstm_clf", unload=unload)
        return core.repository_index()

    try:
        index = asyncio.run(go())
    finally:
        worker.stop.set()
    [entry] = index  # served still, and saying its folder's new files did not load
    assert (entry["name"], entry["version"], entry["state"]) == ("lstm_clf", "1", "READY")
    assert entry["reason"].startswith("cannot load model 'lstm_clf'") and entry["reason"].endswith(
        "; the versions loaded before are still served")
    assert "gru_seq:3" not in engine.models
    logged = [r.getMessage() for r in caplog.records if r.name == "cellserve.server.model_control"]
    assert "model 'lstm_clf' loaded: its folder appeared" in logged
    assert any(m.startswith("cannot load model 'lstm_clf'") and m.endswith(
        "the versions loaded before are still served (its folder changed)") for m in logged), logged


def test_a_server_polling_its_repository_serves_a_model_added_while_it_runs(tmp_path):
    """A real server in mode POLL, tritonclient's view: what the folder held at start is
    served, a model folder added later is served once a poll has seen it (waited for, not
    timed), and the repository API's load is refused naming the mode."""
    add_model(tmp_path, "gru_seq", {3: gru_onnx(3)})
    proc = start_server("--model-repository", str(tmp_path), "--model-control-mode", "poll",
                        "--repository-poll-secs", "0.2")
    try:
        http = httpclient.InferenceServerClient(proc.http)
        assert _index(http) == [("gru_seq", "3", "READY", "")]
        add_model(tmp_path, "lstm_clf", {1: lstm_onnx(0)})
        # the real poll is the point here: waited for (no window asserted), as a client would
        wait_until(lambda: http.is_model_ready("lstm_clf"), "the added model served after a poll")
        got, version = infer("http-json", http, None, "lstm_clf", "", requests_for("lstm_clf"))
        np.testing.assert_allclose(got["probabilities"], ort_reference(tmp_path / "lstm_clf" / "1" / "model.onnx",
                                                                       requests_for("lstm_clf"))["probabilities"],
                                   rtol=1e-4, atol=1e-6)
        with pytest.raises(InferenceServerException, match="cannot load model 'gru_seq': this server polls its "
                                                           "model repository"):
            http.load_model("gru_seq")
    finally:
        assert proc.stop() == 0


def test_a_reload_serves_the_new_weights_without_a_moment_of_not_loaded(tmp_path):
    """In process, mode EXPLICIT: while a reload runs the model is never "not loaded" (checked
    at every turn of the loop until it is done); a request sent before it is answered by the
    old weights, one sent after by the new; the old version then leaves the engine."""
    import asyncio

    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.core import Core, InferInput
    from cellserve.server.metrics import Metrics
    from inprocess import PausableEngine

    add_model(tmp_path, "gru_seq", {3: gru_onnx(3)})
    path = tmp_path / "gru_seq" / "3" / "model.onnx"
    old_want = ort_reference(path, requests_for("gru_seq"))["probabilities"]
    served = load_repository(tmp_path)
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    core = Core(served, engine, Metrics(engine), repository=tmp_path)
    worker = PausableEngine(engine)
    worker.start()

    async def answer() -> np.ndarray:
        result = await core.infer(InferInput("gru_seq", "", {"tokens": requests_for("gru_seq")}))
        return result.outputs["probabilities"]

    async def go():
        await answer()
        executions = core.model_statistics("gru_seq")["model_stats"][0]["execution_count"]
        before = asyncio.ensure_future(answer())
        await asyncio.sleep(0)  # submitted to the old version
        path.write_bytes(gru_onnx(4))
        reload = asyncio.ensure_future(core.load_model("gru_seq"))
        turns = 0
        while not reload.done():
            core.model("gru_seq")  # raises NotFound if the model were ever out of service
            turns += 1
            await asyncio.sleep(0)
        await reload
        got = await before, await answer(), turns
        # every reload of a version counted as that version: no counter goes back, no new series
        assert core.model_statistics("gru_seq")["model_stats"][0]["execution_count"] > executions
        scraped = core.metrics.exposition().decode()
        assert 'cellserve_inference_exec_count_total{model="gru_seq",version="3"}' in scraped
        assert "#1" not in scraped
        return got

    try:
        old, new, turns = asyncio.run(go())
    finally:
        worker.stop.set()
    np.testing.assert_allclose(old, old_want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new, ort_reference(path, requests_for("gru_seq"))["probabilities"],
                               rtol=1e-4, atol=1e-6)
    assert turns > 0 and list(engine.models) == ["gru_seq:3#1"]


def test_a_load_whose_client_gives_up_still_completes(tmp_path):
    """In process, mode EXPLICIT: the load's caller is cancelled (a gRPC client's deadline)
    while the load waits for the engine; the load goes on to its end, the model is served and
    the engine steps on (a cancelled load used to kill the serving loop)."""
    import asyncio

    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.core import Core
    from cellserve.server.metrics import Metrics
    from inprocess import PausableEngine

    add_model(tmp_path, "gru_seq", {3: gru_onnx(3)})
    engine = Engine([], EngineConfig(profile=False, pin_threads=False))
    core = Core([], engine, Metrics(engine), repository=tmp_path)
    worker = PausableEngine(engine)

    async def go():
        queued = asyncio.Event()  # set once the load, read, waits for the engine's next step
        between_steps = engine.between_steps
        engine.between_steps = lambda fn: (between_steps(fn), queued.set())[0]
        load = asyncio.ensure_future(core.load_model("gru_seq"))
        await queued.wait()
        load.cancel()
        worker.start()
        with pytest.raises(asyncio.CancelledError):
            await load
        async with core._changing["gru_seq"]:  # held by the load until it has finished on its own
            pass
        assert worker.worker.is_alive()  # the serving loop goes on
        return core.model("gru_seq")

    try:
        entry = asyncio.run(go())
    finally:
        worker.stop.set()
    assert entry.engine_name in engine.models


def test_an_unload_says_at_once_that_its_sequences_ended(tmp_path, caplog):
    """In process, mode EXPLICIT: a sequence started, then its model unloaded through the
    API: the sequences gauge reads 0 at once (not at the next sequence), and the unload is
    logged with its cause."""
    import asyncio

    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.core import Core, InferInput
    from cellserve.server.metrics import Metrics
    from inprocess import PausableEngine

    caplog.set_level("INFO", logger="cellserve.server.model_control")
    add_model(tmp_path, "gru_seq", {3: gru_onnx(3)})
    served = load_repository(tmp_path)
    engine = Engine([s.model for s in served], EngineConfig(profile=False, pin_threads=False))
    core = Core(served, engine, Metrics(engine), repository=tmp_path)
    worker = PausableEngine(engine)
    worker.start()

    def gauge() -> str:
        return [line for line in core.metrics.exposition().decode().splitlines()
                if line.startswith('cellserve_sequences_active{model="gru_seq"}')][0]

    async def go():
        await core.infer(InferInput("gru_seq", "", {"tokens": requests_for("gru_seq")},
                                    parameters={"sequence_id": 7, "sequence_start": True}))
        started = gauge()
        await core.load_model("gru_seq", unload=True)
        return started, gauge()

    try:
        started, unloaded = asyncio.run(go())
    finally:
        worker.stop.set()
    assert started.endswith(" 1.0") and unloaded.endswith(" 0.0")
    assert "model 'gru_seq' unloaded: asked through the repository API" in [r.getMessage() for r in caplog.records]
