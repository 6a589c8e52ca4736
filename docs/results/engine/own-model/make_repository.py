"""The two user models of docs/performance.md's "Your own model" figures, exported from PyTorch
as a user would (untrained, seeded): `python make_repository.py DIR` writes DIR/lstmfeat
(an LSTM of width 160 over float feature rows of 20, time-major, a head per step) and
DIR/bigru3 (three bidirectional GRU layers of 96 over an embedding of 300 tokens, a classifier
on the last step)."""

import os
import sys

import torch


class FeatureTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(20, 160, num_layers=1)
        self.head = torch.nn.Linear(160, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class BiGRU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 48)
        self.rnn = torch.nn.GRU(48, 96, num_layers=3, bidirectional=True)
        self.head = torch.nn.Linear(192, 5)

    def forward(self, tokens):
        return torch.softmax(self.head(self.rnn(self.emb(tokens))[0][-1]), -1)


def main(root: str) -> None:
    torch.manual_seed(0)
    models = (("bigru3", BiGRU(), torch.randint(0, 300, (7, 1)), "tokens", {0: "B"}),
              ("lstmfeat", FeatureTagger(), torch.randn(9, 1, 20), "features", {0: "T", 1: "B"}))
    for name, module, example, input_name, out_axes in models:
        path = os.path.join(root, name, "1")
        os.makedirs(path, exist_ok=True)
        torch.onnx.export(module.eval(), (example,), os.path.join(path, "model.onnx"), input_names=[input_name],
                          output_names=["out"], dynamic_axes={input_name: {0: "T", 1: "B"}, "out": out_axes},
                          opset_version=14, dynamo=False)


if __name__ == "__main__":
    main(sys.argv[1])
