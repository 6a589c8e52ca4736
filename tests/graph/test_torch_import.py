"""PyTorch models through the importers: exported by either of PyTorch's ONNX exporters or
imported by load_torch, served by the Engine, they give the module's (and onnxruntime's)
outputs for every request, alone or together with others; and the zoo's models match their
reference modules."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellserve.engine.engine import EngineConfig
from cellserve.graph import zoo
from cellserve.graph.model import InputSemantics, Model
from cellserve.graph.onnx_import import load_onnx
from cellserve.graph.torch_import import load_torch

from .helpers import (BACKENDS, VOCAB, NetSpec, assert_outputs_match, export_dynamo, export_torchscript,
                      ort_outputs, serve, torch_outputs)

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# (layers, bidirectional, batch_first)
SHAPES_OF_NETS = [(1, False, True), (2, True, True), (2, False, False), (1, True, False)]
NETS = [NetSpec(kind, layers=l, bidirectional=b, batch_first=bf, seed=i)
        for i, (kind, (l, b, bf)) in enumerate((k, s) for k in KINDS for s in SHAPES_OF_NETS)]
# (batch, time) of requests in flight together
MIX = [(1, 7), (3, 2), (2, 5), (1, 1)]


def _requests(spec: NetSpec, shapes=MIX, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [spec.request(rng, batch, time) for batch, time in shapes]


def _load(spec: NetSpec, module: torch.nn.Module) -> Model:
    return load_torch(module, "net", spec.example(), [spec.input_name], spec.output_names, spec.dynamic_axes())


def _check(model: Model, module: torch.nn.Module, spec: NetSpec, requests: list[dict], backend: str | None = None,
           onnx_data: bytes | None = None):
    """Serve the requests together; each one's outputs equal the module's (and onnxruntime's)."""
    for i, (inputs, got) in enumerate(zip(requests, serve(model, requests, EngineConfig(backend=backend)))):
        assert_outputs_match(got, torch_outputs(module, spec, inputs), where=f"request {i} vs PyTorch")
        if onnx_data is not None:
            assert_outputs_match(got, ort_outputs(onnx_data, inputs), where=f"request {i} vs onnxruntime")


# ---- torch.onnx.export, TorchScript exporter ----

@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "torch"])
@pytest.mark.parametrize("spec", NETS, ids=str)
def test_torchscript_export_matches_module_and_onnxruntime(spec, backend):
    module = spec.module()
    data = export_torchscript(module, spec, opset=14 if spec.layers == 2 else 17)
    _check(load_onnx(data, "net"), module, spec, _requests(spec), backend, data)


class _LastStateClassifier(torch.nn.Module):
    """Embedding, a 2-layer recurrent stack, a head on the last layer's final state (h[-1]:
    the exporter's Slice and Squeeze)."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(7)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.rnn = getattr(torch.nn, kind)(8, 16, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, tokens):
        _, h = self.rnn(self.embed(tokens))
        return self.head((h[0] if isinstance(h, tuple) else h)[-1])


@pytest.mark.parametrize("opset", [9, 11, 13])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_older_opsets_of_the_torchscript_exporter_load_and_answer_as_the_module(kind, opset):
    """Up to opset 9 Slice's bounds are attributes, up to 12 Squeeze's and Unsqueeze's axes."""
    module = _LastStateClassifier(kind).eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.zeros(1, 5, dtype=torch.long),), buffer, dynamo=False, opset_version=opset,
                      input_names=["tokens"], output_names=["logits"],
                      dynamic_axes={"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch"}})
    requests = [{"tokens": np.random.default_rng(i).integers(0, VOCAB, size=(b, t))} for i, (b, t) in enumerate(MIX)]
    for inputs, got in zip(requests, serve(load_onnx(buffer.getvalue(), "net"), requests)):
        with torch.no_grad():
            want = module(torch.from_numpy(inputs["tokens"])).numpy()
        assert_outputs_match(got, {"logits": want}, where=f"opset {opset}")


# ---- torch.onnx.export, dynamo exporter ----

# (spec, whether time is dynamic). The dynamo exporter of torch 2.13 keeps time dynamic for a
# batch-first LSTM; for a seq-first model it bakes the example's time into a Reshape (onnxruntime
# then returns wrong shapes at other lengths) and it unrolls nn.RNN at the example's length, so
# those are exported and tested at a fixed time.
DYNAMO_NETS = [
    (NetSpec("lstm", layers=2, bidirectional=True, batch_first=True), True),
    (NetSpec("gru", layers=1, batch_first=False, seed=1), False),
    (NetSpec("rnn_tanh", layers=1, batch_first=True, seed=2), False),
]
DYNAMO_TIME = 4


@functools.cache
def _dynamo_export(spec: NetSpec, time_dynamic: bool) -> tuple[torch.nn.Module, bytes]:
    module = spec.module()
    return module, export_dynamo(module, spec, time_dynamic, DYNAMO_TIME)


@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "torch"])
@pytest.mark.parametrize("spec, time_dynamic", DYNAMO_NETS,
                         ids=[f"{s}-{'dynamic' if d else 'fixed'}_time" for s, d in DYNAMO_NETS])
@pytest.mark.slow  # torch.onnx.export(dynamo=True): seconds per net
def test_dynamo_export_matches_module_and_onnxruntime(spec, time_dynamic, backend):
    module, data = _dynamo_export(spec, time_dynamic)
    shapes = MIX if time_dynamic else [(1, DYNAMO_TIME), (3, DYNAMO_TIME), (2, DYNAMO_TIME)]
    _check(load_onnx(data, "net"), module, spec, _requests(spec, shapes), backend, data)


# ---- load_torch ----

LOAD_TORCH_NETS = NETS[::3] + [NetSpec("gru", layers=2, bidirectional=True, batch_first=False, tokens=False),
                               NetSpec("rnn_relu", hidden=16, batch_first=True, tokens=False)]


@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "torch"])
@pytest.mark.parametrize("spec", LOAD_TORCH_NETS, ids=str)
def test_load_torch_matches_module(spec, backend):
    module = spec.module()
    _check(_load(spec, module), module, spec, _requests(spec, seed=1), backend)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "features"])
def test_semantics_name_batch_and_time_axes_and_vocabulary(tokens, batch_first):
    spec = NetSpec("lstm", batch_first=batch_first, tokens=tokens)
    model = _load(spec, spec.module())
    batch, time = (0, 1) if batch_first else (1, 0)
    assert model.semantics[spec.input_name] == InputSemantics(batch, time, VOCAB if tokens else None)


@pytest.mark.parametrize("fixed", ["time", "batch"])
def test_a_fixed_axis_is_never_taken_for_the_dynamic_one(fixed):
    """Exported with only one of time and batch dynamic, at every small size of the other."""
    spec = NetSpec("gru", batch_first=False)
    module = spec.module()
    dynamic, want = ({1: "batch"}, InputSemantics(1, None, VOCAB)) if fixed == "time" else \
        ({0: "time"}, InputSemantics(None, 0, VOCAB))
    wrong = {}
    for size in range(1, 13):
        example = spec.example(batch=2, time=size) if fixed == "time" else spec.example(batch=size, time=3)
        model = load_torch(module, "net", example, ["tokens"], spec.output_names, {"tokens": dynamic})
        if model.semantics["tokens"] != want:
            wrong[size] = model.semantics["tokens"]
    assert not wrong, f"{fixed} fixed at these sizes: {wrong}"


# ---- the zoo ----

@functools.cache
def _zoo_model(name: str):
    return zoo.load(name)


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_loads_with_batch_and_time_axes(name):
    model = _zoo_model(name)
    (spec,) = model.inputs
    assert model.cell_types() and model.outputs
    assert (model.semantics[spec.name].batch_axis, model.semantics[spec.name].time_axis) == (0, 1)


ZOO_REQUESTS = {"lstm-512": [(1, 10), (1, 8)], "gru-256": [(1, 9), (2, 4), (1, 1)],
                "bilstm-tagger": [(2, 6), (1, 11), (1, 1)]}
LABELS = {"label": "probabilities", "tags": "tag_probabilities"}  # argmax output -> its scores


@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "torch"])
@pytest.mark.parametrize("name", ZOO_REQUESTS)
def test_zoo_model_matches_its_reference_module(name, backend):
    model, module = _zoo_model(name), zoo.reference_module(name)
    vocab = model.semantics["tokens"].vocab
    rng = np.random.default_rng(0)
    requests = [{"tokens": rng.integers(0, vocab, shape)} for shape in ZOO_REQUESTS[name]]
    for inputs, got in zip(requests, serve(model, requests, EngineConfig(backend=backend))):
        with torch.no_grad():
            outs = module(torch.as_tensor(inputs["tokens"]))
        want = {spec.name: out.numpy() for spec, out in zip(model.outputs, outs)}
        for label, scores in LABELS.items():
            if label in want:  # an argmax: compared where the top two scores are clearly apart
                top2 = np.sort(want[scores], axis=-1)[..., -2:]
                clear = top2[..., 1] - top2[..., 0] > 1e-4
                np.testing.assert_array_equal(got.pop(label)[clear], want.pop(label)[clear])
        assert_outputs_match(got, want, where=name)


# ---- any mix of requests, any small model ----

@functools.cache
def _imported(spec: NetSpec):
    module = spec.module()
    return module, _load(spec, module)


@st.composite
def models_and_mixes(draw):
    spec = NetSpec(draw(st.sampled_from(KINDS)), hidden=draw(st.integers(4, 16)), layers=draw(st.integers(1, 2)),
                   bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()), tokens=draw(st.booleans()),
                   seed=draw(st.integers(0, 3)))
    shapes = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 9)), min_size=1, max_size=6))
    return spec, shapes, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(models_and_mixes())
def test_concurrent_requests_equal_running_alone_and_the_module(case):
    spec, shapes, seed = case
    module, model = _imported(spec)
    requests = _requests(spec, shapes, seed)
    for i, (inputs, together) in enumerate(zip(requests, serve(model, requests))):
        (alone,) = serve(model, [inputs], EngineConfig(profile=False))
        assert_outputs_match(together, alone, where=f"{spec} request {i}: together vs alone")
        assert_outputs_match(together, torch_outputs(module, spec, inputs), where=f"{spec} request {i} vs PyTorch")


def test_load_torch_refuses_dynamic_axes_that_name_nothing_and_leaves_the_module_in_its_mode():
    """A misspelt dynamic_axes key would have exported fixed dimensions (the exporter only
    warns); the module is exported in eval mode and handed back in the mode it came in."""
    from cellserve.errors import ModelLoadError

    module = _LastStateClassifier("GRU").train()
    with pytest.raises(ModelLoadError, match=r"dynamic_axes names \['toks'\], which are not among the input names "
                                             r"\['tokens'\] or output names \['logits'\]"):
        load_torch(module, "net", (torch.zeros(1, 5, dtype=torch.long),), ["tokens"], ["logits"],
                   {"toks": {0: "batch", 1: "time"}})
    model = load_torch(module, "net", (torch.zeros(1, 5, dtype=torch.long),), ["tokens"], ["logits"],
                       {"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch"}})
    assert module.training and model.inputs[0].shape == (-1, -1)


def test_an_unsupported_operator_is_refused_naming_what_a_model_may_use():
    from cellserve.errors import UnsupportedOperator

    class Normed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.norm = torch.nn.GRU(4, 6), torch.nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.rnn(x)[0])

    with pytest.raises(UnsupportedOperator, match=r"unsupported operator 'LayerNormalization' \(node .*\): a model "
                                                  r"may use GRU, LSTM, RNN and around them .*Gather.*"):
        load_torch(Normed(), "net", (torch.zeros(3, 1, 4),), ["x"], ["y"], {"x": {0: "time", 1: "batch"}})
