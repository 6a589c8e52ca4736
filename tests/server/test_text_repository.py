"""A repository model that publishes a text vocabulary in its config.pbtxt `parameters`: the
dates model exported to ONNX (encoder.onnx + decoder_step.onnx) with decode.* and text.* keys.
Its parameters are published as written, a bad text.* key is refused at load naming it, and
`cellserve infer --text` works against it as against the zoo's (the client knows nothing of
the zoo)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cellserve.errors import ModelLoadError
from cellserve.graph.zoo import dates, dates_served
from cellserve.server.model_config import model_config, model_config_message
from cellserve.server.repository import load_repository
from serverproc import start_server


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dates_onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc, step = dates.export_onnx(dates.load_trained(), directory)
    return enc.read_bytes(), step.read_bytes()


def write_repository(root, onnx_files, parameters: dict[str, str], name: str = "isodate"):
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx")
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "encoder.onnx").write_bytes(onnx_files[0])
    (version / "decoder_step.onnx").write_bytes(onnx_files[1])
    (root / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return root


def test_config_parameters_are_published_as_written(tmp_path, onnx_files):
    params = {**dates_served.parameters(), "slo_ms": "500"}
    [served] = load_repository(write_repository(tmp_path, onnx_files, params))
    assert served.parameters == params
    config = model_config(served.name, served.platform, served.model, served.parameters, sequence_idle_s=60.0)
    assert config["input"] == [{"name": "source", "data_type": "TYPE_INT64", "dims": [-1, -1]}]
    assert config["parameters"]["text.output"] == {"string_value": "date"}
    assert "sequence_batching" not in config  # an encoder-decoder needs the whole input first
    message = model_config_message(config)  # what gRPC's ModelConfig carries
    assert message.parameters["text.input_vocabulary"].string_value == params["text.input_vocabulary"]


@pytest.mark.parametrize("change, message", [
    ({"text.input": "tokens"},
     "parameter text.input names 'tokens', which is not one of the model's inputs ['source']"),
    ({"text.output": "label"}, "parameter text.output names 'label', which is not one of the model's outputs ['date']"),
    ({"text.input_vocabulary": "[null, "}, "parameters: text.input_vocabulary is not valid JSON"),
])
def test_an_unusable_vocabulary_is_refused_at_load(tmp_path, onnx_files, change, message):
    params = {**dates_served.parameters(), **change}
    with pytest.raises(ModelLoadError, match=r"model 'isodate' version 1: " + message.replace("[", r"\[")
                       .replace("]", r"\]")):
        load_repository(write_repository(tmp_path, onnx_files, params))


@pytest.mark.slow  # a server process and a CLI process: seconds
def test_infer_text_against_a_repository_model(tmp_path, onnx_files):
    root = write_repository(tmp_path, onnx_files, dates_served.parameters())
    server = start_server("--model-repository", str(root))
    try:
        for protocol, url in (("http", server.http), ("grpc", server.grpc)):
            result = subprocess.run([sys.executable, "-m", "cellserve.cli", "infer", "--model", "isodate", "--text",
                                     "March 3, 1998", "--url", url, "--protocol", protocol],
                                    capture_output=True, text=True, timeout=60)
            assert (result.returncode, result.stdout, result.stderr) == (0, "1998-03-03\n", "")
    finally:
        assert server.stop() == 0
