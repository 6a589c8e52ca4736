"""A small model of float feature rows, as a user exports one from PyTorch (a speech or sensor
tagger): rows of 6, time-major, a GRU of 8 (both directions, if asked) and a head of 3 at every
step. For the benchmarks' tests of models that are not token classifiers."""

from __future__ import annotations

import torch

FEATURES, HIDDEN, CLASSES = 6, 8, 3


class Frames(torch.nn.Module):
    def __init__(self, bidirectional: bool = False):
        super().__init__()
        self.rnn = torch.nn.GRU(FEATURES, HIDDEN, bidirectional=bidirectional)
        self.head = torch.nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, features):
        return self.head(self.rnn(features)[0])


def export_frames(path, bidirectional: bool = False, seed: int = 0) -> None:
    """Write the model to `path` (its folder made), input `features` [time, batch, 6]."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "time", 1: "batch"}
    torch.onnx.export(Frames(bidirectional).eval(), (torch.zeros(5, 1, FEATURES),), str(path),
                      input_names=["features"], output_names=["scores"], opset_version=17, dynamo=False,
                      dynamic_axes={"features": axes, "scores": axes})


def export_stateful(path, lengths: bool = True, extra: bool = False, seed: int = 0) -> None:
    """Write to `path` (its folder made) an ONNX LSTM of 8 over rows of 6 as a streaming model
    is exported, its state an input: `features` [time, batch, 6], `lengths` [batch] (int32, if
    asked), `h0` and `c0` [1, batch, 8]; output `Y` [time, 1, batch, 8]. With `extra`, one
    more input `scale` [1] multiplies Y: neither a state nor lengths."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape).astype(np.float32), name)
               for name, shape in (("W", (1, 32, FEATURES)), ("R", (1, 32, HIDDEN)), ("B", (1, 64)))]
    value = helper.make_tensor_value_info
    inputs = [value("features", TensorProto.FLOAT, ["time", "batch", FEATURES])]
    inputs += [value("lengths", TensorProto.INT32, ["batch"])] if lengths else []
    inputs += [value(n, TensorProto.FLOAT, [1, "batch", HIDDEN]) for n in ("h0", "c0")]
    rnn_out = "Y_rnn" if extra else "Y"
    nodes = [helper.make_node("LSTM", ["features", "W", "R", "B", "lengths" if lengths else "", "h0", "c0"], [rnn_out],
                              hidden_size=HIDDEN)]
    if extra:
        inputs.append(value("scale", TensorProto.FLOAT, [1]))
        nodes.append(helper.make_node("Mul", [rnn_out, "scale"], ["Y"]))
    graph = helper.make_graph(nodes, "stateful", inputs, [value("Y", TensorProto.FLOAT, ["time", 1, "batch", HIDDEN])],
                              weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
