"""Load a PyTorch module built from nn.Embedding, nn.LSTM, nn.GRU, nn.RNN and nn.Linear.

The module is exported to ONNX in memory (PyTorch's TorchScript-based exporter, which writes
real LSTM/GRU/RNN operators) and loaded by the ONNX importer, so both paths share one
importer and one set of checks.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

from cellserve.errors import ModelLoadError
from cellserve.graph.model import Model
from cellserve.graph.onnx_import import load_onnx


def export_onnx_bytes(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                      output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int = 17) -> bytes:
    # the exporter only warns of a dynamic_axes key that names nothing, and then exports fixed
    # dimensions: every later request of another length would be refused
    unknown = sorted(set(dynamic_axes) - set(input_names) - set(output_names))
    if unknown:
        raise ValueError(f"dynamic_axes names {unknown}, which are not among the input names {input_names} "
                         f"or output names {output_names}")
    buffer = io.BytesIO()
    training = module.training
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example, buffer, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    finally:
        module.train(training)  # exported in eval mode; the caller's module left as it was
    return buffer.getvalue()


def load_torch(module: torch.nn.Module, name: str, example: tuple[torch.Tensor, ...], input_names: list[str],
               output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> Model:
    """Import `module`; `example` are inputs it accepts (their values do not matter),
    `dynamic_axes` names the dimensions that vary between requests (e.g. batch and time)."""
    try:
        data = export_onnx_bytes(module, example, input_names, output_names, dynamic_axes)
    except Exception as exc:
        raise ModelLoadError(f"cannot export PyTorch module {type(module).__name__} for {name!r}: {exc}") from exc
    return load_onnx(data, name=name)
