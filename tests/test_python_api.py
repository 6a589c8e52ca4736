"""The README's Python path: `from cellserve.graph import load_onnx, load_torch, zoo` and
`from cellserve.engine import Engine, EngineConfig, Request`, lazily (importing the packages'
modules does not import torch or onnx)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch


def test_the_readme_python_path_serves_a_pytorch_module_and_a_zoo_model():
    from cellserve.engine import Engine, EngineConfig, Request, Status
    from cellserve.graph import load_torch, zoo

    torch.manual_seed(0)
    module = torch.nn.GRU(4, 8, batch_first=True).eval()
    model = load_torch(module, "gru", (torch.zeros(1, 3, 4),), ["x"], ["y", "h"],
                       {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}, "h": {1: "batch"}})
    classifier = zoo.load("gru-256")
    engine = Engine([model, classifier], EngineConfig())
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    done: dict = {}
    gru = Request(model.name, {"x": x}, on_done=lambda r: done.setdefault(r.request_id, r))
    label = Request(classifier.name, {classifier.inputs[0].name: np.array([[1, 2, 3]])},
                    on_done=lambda r: done.setdefault(r.request_id, r))
    engine.submit(gru)
    engine.submit(label)
    engine.run_until_idle()
    assert done[gru.request_id].status is Status.OK and done[label.request_id].status is Status.OK
    with torch.no_grad():
        y, _ = module(torch.from_numpy(x))
    np.testing.assert_allclose(done[gru.request_id].outputs["y"], y.numpy(), rtol=1e-4, atol=1e-5)


def test_the_packages_import_their_loaders_on_first_use_only():
    code = ("import sys, cellserve.graph, cellserve.engine, cellserve.graph.model; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package, name", [("cellserve.graph", "load_keras"), ("cellserve.engine", "Server")])
def test_a_name_the_packages_do_not_have_is_an_import_error_naming_it(package, name):
    with pytest.raises(ImportError, match=name):
        exec(f"from {package} import {name}")


def test_the_readme_stays_a_front_door_under_12000_characters():
    """Issue 15: the README under 12,000 characters, the rest of the manual in docs/."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    assert len(text) < 12_000, f"README.md has {len(text)} characters: move detail into docs/"
