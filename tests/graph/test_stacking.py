"""stack_layers: layers that feed each other become one LayerStack, served with the outputs
the module gives, in one round per token; anything else that reads between the layers keeps
them apart."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.model import DenseNode, LayerStack, RecurrentLayer, TensorSpec
from cellserve.graph.stacking import stack_layers
from cellserve.graph.torch_import import load_torch

from .helpers import NetSpec, assert_outputs_match, serve, torch_outputs


def load(spec: NetSpec):
    module = spec.module()
    return load_torch(module, "net", spec.example(), [spec.input_name], spec.output_names,
                      spec.dynamic_axes()), module


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("batch_first", [True, False])
def test_unidirectional_layers_become_one_stack_that_gives_the_modules_outputs(kind, layers, batch_first):
    spec = NetSpec(kind, layers=layers, batch_first=batch_first, tokens=batch_first, seed=layers)
    model, module = load(spec)
    stacked = stack_layers(model)
    (stack,) = stacked.recurrent_steps()
    assert isinstance(stack, LayerStack)
    assert [layer.name for layer in stack.layers] == [step.name for step in model.recurrent_steps()]
    assert stacked.cell_types() == [f"net/{stack.name}"]
    rng = np.random.default_rng(0)
    requests = [spec.request(rng, batch, time) for batch, time in [(1, 9), (2, 3), (3, 1), (1, 14)]]
    for i, (inputs, got) in enumerate(zip(requests, serve(model, requests))):
        assert_outputs_match(got, torch_outputs(module, spec, inputs), where=f"request {i}")


def test_a_stack_takes_one_step_per_token_where_its_layers_take_one_each():
    spec = NetSpec("lstm", layers=2)
    model, _ = load(spec)
    tokens = spec.request(np.random.default_rng(1), 1, 20)
    for stack, steps in ((True, 20), (False, 40)):
        engine = Engine([model], EngineConfig(stack_layers=stack, profile=False))
        done = []
        engine.submit(Request("net", tokens, on_done=done.append))
        engine.run_until_idle()
        assert done[0].status is Status.OK
        assert engine.stats.cell_steps == steps
        assert len(engine.stats.steps_by_type) == (1 if stack else 2)


@pytest.mark.parametrize("spec", [NetSpec("lstm", layers=1), NetSpec("gru", layers=2, bidirectional=True)], ids=str)
def test_a_single_layer_or_bidirectional_layers_are_left_alone(spec):
    model, _ = load(spec)
    assert stack_layers(model) is model


def two_layer_model():
    model, _ = load(NetSpec("gru", layers=2))
    lower, squeeze, upper = model.program[1:4]
    assert isinstance(lower, RecurrentLayer) and squeeze.op == "Squeeze" and isinstance(upper, RecurrentLayer)
    assert isinstance(stack_layers(model).program[1], LayerStack)
    return model, lower, squeeze, upper


def replaced(model, old, new):
    return dataclasses.replace(model, program=[new if step is old else step for step in model.program])


def test_layers_stay_apart_when_something_else_reads_between_them():
    model, lower, squeeze, upper = two_layer_model()
    reads_y = dataclasses.replace(model, program=[*model.program, DenseNode("Relu", "peek", [lower.y], ["peeked"])])
    assert stack_layers(reads_y) is reads_y
    output = TensorSpec(squeeze.outputs[0], "float32", (-1,))
    squeezed_out = dataclasses.replace(model, outputs=[*model.outputs, output])
    assert stack_layers(squeezed_out) is squeezed_out


@pytest.mark.parametrize("change", [
    lambda upper, squeeze: (dataclasses.replace(upper, initial_h="h0"), squeeze),
    lambda upper, squeeze: (dataclasses.replace(upper, seq_lens="lens"), squeeze),
    lambda upper, squeeze: (upper, dataclasses.replace(squeeze, inputs=[squeeze.inputs[0]], attrs={"axes": [0]})),
    lambda upper, squeeze: (upper, dataclasses.replace(squeeze, inputs=[squeeze.inputs[0]], attrs={})),
], ids=["upper-initial-state", "upper-sequence-lengths", "squeeze-other-axis", "squeeze-every-unit-axis"])
def test_layers_stay_apart_when_the_upper_one_or_the_squeeze_differs(change):
    model, _, squeeze, upper = two_layer_model()
    new_upper, new_squeeze = change(upper, squeeze)
    model = replaced(replaced(model, upper, new_upper), squeeze, new_squeeze)
    assert stack_layers(model) is model


def test_squeeze_axes_given_as_an_attribute_are_read():
    model, _, squeeze, _ = two_layer_model()
    model = replaced(model, squeeze, dataclasses.replace(squeeze, inputs=[squeeze.inputs[0]], attrs={"axes": [1]}))
    assert isinstance(stack_layers(model).program[1], LayerStack)


@pytest.mark.slow  # torch.onnx.export(dynamo=True): seconds
def test_the_dynamo_exporters_squeeze_between_layers_stacks_them_too():
    """The dynamo exporter writes the squeeze between two layers as a Transpose and a Reshape
    to a computed shape: the layers still run as one stack, with the module's outputs."""
    from .helpers import export_dynamo_apart
    from cellserve.graph.onnx_import import load_onnx

    spec = NetSpec("lstm", layers=3, batch_first=True, tokens=True, seed=4)
    module = spec.module()
    model = load_onnx(export_dynamo_apart(spec, True), "net")
    (stack,) = stack_layers(model).recurrent_steps()
    assert isinstance(stack, LayerStack) and len(stack.layers) == 3
    rng = np.random.default_rng(2)
    requests = [spec.request(rng, batch, time) for batch, time in [(1, 9), (2, 3), (3, 1)]]
    for i, (inputs, got) in enumerate(zip(requests, serve(model, requests))):
        assert_outputs_match(got, torch_outputs(module, spec, inputs), where=f"request {i}")


def test_layers_stay_apart_when_the_ops_between_them_do_more_than_squeeze():
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.first, self.second = torch.nn.LSTM(4, 6), torch.nn.LSTM(6, 6)

        def forward(self, x):
            return self.second(2.0 * self.first(x)[0])[0]

    model = load_torch(Scaled().eval(), "net", (torch.zeros(3, 1, 4),), ["x"], ["y"],
                       {"x": {0: "time", 1: "batch"}, "y": {0: "time", 1: "batch"}})
    assert stack_layers(model) is model
