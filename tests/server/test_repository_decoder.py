"""An encoder-decoder in a model repository: encoder.onnx and decoder_step.onnx in the version
directory, the decode spec in config.pbtxt's `decode.*` parameters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.errors import ModelLoadError
from cellserve.graph.decode_spec import DecodeSpec
from cellserve.graph.seq2seq_examples import (AdditiveEncoder, AdditiveSeq2Seq, AdditiveStep, additive_spec,
                                              greedy_reference)
from cellserve.graph.torch_import import export_onnx_bytes
from cellserve.server.repository import load_repository

OUTPUTS = ["memory", "h0", "feed0"]


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    m = AdditiveSeq2Seq(hidden=32).eval()
    enc = export_onnx_bytes(AdditiveEncoder(m), (torch.zeros((1, 3), dtype=torch.long),), ["source"], OUTPUTS,
                            {"source": {0: "b", 1: "t"}})
    names, outs = ["token", "memory", "memory_mask", "h", "feed"], ["logits", "h_next", "feed_next"]
    axes = {n: {0: "b"} for n in names + outs}
    axes["memory"] = axes["memory_mask"] = {0: "b", 1: "s"}
    step = export_onnx_bytes(AdditiveStep(m), (torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, 32),
                                               torch.ones(2, 3), torch.zeros(2, 32), torch.zeros(2, 32)),
                             names, outs, axes)
    return m, enc, step


def _config(name: str, spec: DecodeSpec, extra: str = "") -> str:
    params = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                       for k, v in spec.to_parameters().items())
    return f'name: "{name}"\nplatform: "onnxruntime_onnx"\n{params}\n{extra}'


def _write(root, exported, spec: DecodeSpec | None = None, files=("encoder.onnx", "decoder_step.onnx"),
           name: str = "translate"):
    _, enc, step = exported
    version = root / name / "1"
    version.mkdir(parents=True)
    for filename, data in (("encoder.onnx", enc), ("decoder_step.onnx", step)):
        if filename in files:
            (version / filename).write_bytes(data)
    if spec is not None:
        (root / name / "config.pbtxt").write_text(_config(name, spec))
    return root


def test_a_repository_encoder_decoder_loads_and_decodes_as_its_pytorch_reference(tmp_path, exported):
    m, _, _ = exported
    spec = additive_spec()
    (served,) = load_repository(_write(tmp_path, exported, spec))
    assert served.name == "translate" and [o.name for o in served.model.outputs] == ["tokens"]
    engine = Engine([served.model], EngineConfig(profile=False))
    rng = np.random.default_rng(0)
    sources = [rng.integers(3, 20, size=int(n)) for n in rng.integers(1, 8, 6)]
    done = {}
    for i, src in enumerate(sources):
        engine.submit(Request(served.engine_name, {"source": src[None, :]}, on_done=lambda r, i=i: done.__setitem__(i, r)))
    engine.run_until_idle()
    for i, src in enumerate(sources):
        assert done[i].status is Status.OK, done[i].reason
        want = greedy_reference(AdditiveEncoder(m), AdditiveStep(m), spec, torch.from_numpy(src), OUTPUTS)
        assert done[i].outputs["tokens"][0].tolist()[:len(want)] == want


def test_a_missing_decoder_step_file_is_named(tmp_path, exported):
    with pytest.raises(ModelLoadError, match=r"model 'translate' version 1: .*no decoder_step\.onnx"):
        load_repository(_write(tmp_path, exported, additive_spec(), files=("encoder.onnx",)))


def test_graphs_without_a_decode_spec_are_refused_naming_the_parameters(tmp_path, exported):
    with pytest.raises(ModelLoadError, match=r"no decode\.\* parameters"):
        load_repository(_write(tmp_path, exported, None))


def test_a_spec_naming_a_missing_tensor_is_refused_with_the_model_and_tensor(tmp_path, exported):
    spec = dataclasses.replace(additive_spec(), memory="encoder_states")
    with pytest.raises(ModelLoadError, match=r"model 'translate' version 1 .*memory 'encoder_states' is not an output"):
        load_repository(_write(tmp_path, exported, spec))


def test_an_eos_outside_the_vocabulary_is_refused(tmp_path, exported):
    with pytest.raises(ModelLoadError, match=r"eos 40 is outside the vocabulary \[0, 20\)"):
        load_repository(_write(tmp_path, exported, dataclasses.replace(additive_spec(), eos=40)))


def test_a_malformed_parameter_is_refused_naming_the_key(tmp_path, exported):
    root = _write(tmp_path, exported, additive_spec())
    config = root / "translate" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "2"', 'string_value: "two"', 1))
    with pytest.raises(ModelLoadError, match=r"parameter 'decode\.eos' must be an integer, got 'two'"):
        load_repository(root)


def test_a_repository_encoder_decoder_warms_up_from_its_config(tmp_path, exported):
    """model_warmup on an encoder-decoder: its source tensor made from the config and run
    through the engine (server/warmup.py), as for any model."""
    from cellserve.server.warmup import warm_up_before_serving

    spec = additive_spec()
    root = _write(tmp_path, exported, spec)
    config = root / "translate" / "config.pbtxt"
    config.write_text(config.read_text() + '\nmodel_warmup [ { name: "w" batch_size: 1 count: 2 inputs { key: "source" '
                                             'value { data_type: TYPE_INT64 dims: [ 3, 40 ] random_data: true } } } ]\n')
    (served,) = load_repository(root)
    [sample] = served.warmup
    tokens = sample.inputs["source"]
    vocab = served.model.semantics["source"].vocab
    assert tokens.shape == (3, 40) and vocab and 0 <= tokens.min() and tokens.max() < vocab
    engine = Engine([served.model], EngineConfig(profile=False))
    assert warm_up_before_serving(engine, served.engine_name, served.warmup, "translate") == 2
