"""The launcher test every peer shares: install (or skip with the reason), start on the
exported lstm-512, answer one request with tritonclient exactly as ONNX Runtime does on the
same graph, stop, and leave nothing listening."""

from __future__ import annotations

import os
import socket

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from cellserve.bench.peers import export_model, load_peer
from cellserve.bench.peers.base import PeerUnavailable, Tuning, pad_to_bucket


def check_peer(name: str, tmp_path, tuning: Tuning | None = None) -> None:
    peer = load_peer(name)
    try:
        if os.environ.get("CELLSERVE_INSTALL_PEERS", "1") != "0":
            peer.install(log=lambda *a: None)
    except PeerUnavailable as exc:
        pytest.skip(f"{name} cannot be installed here: {exc}")
    reason = peer.missing()
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    model = export_model("lstm-512", tmp_path / "model")
    rng = np.random.default_rng(7)
    sentences = [rng.integers(0, model.vocab, size=n, dtype=np.int64) for n in (5, 23)]
    reference = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    running = peer.start(model, tmp_path / "work", threads=1, tuning=tuning or peer.tuning_grid[0])
    try:
        port = int(running.address.rsplit(":", 1)[1])
        client = httpclient.InferenceServerClient(running.address)
        for tokens in sentences:
            sent = pad_to_bucket(tokens) if peer.pads_on_client else tokens
            inputs = [httpclient.InferInput("tokens", [1, sent.size], "INT64")]
            inputs[0].set_data_from_numpy(sent.reshape(1, -1), binary_data=False)
            if peer.pads_on_client:
                inputs.append(httpclient.InferInput("lengths", [1, 1], "INT32"))
                inputs[1].set_data_from_numpy(np.array([[tokens.size]], dtype=np.int32), binary_data=False)
            result = client.infer(model.name, inputs)
            want_p, want_label = reference.run(None, {"tokens": tokens.reshape(1, -1),
                                                      "lengths": np.array([tokens.size], dtype=np.int32)})
            np.testing.assert_allclose(result.as_numpy("probabilities").reshape(want_p.shape), want_p,
                                       rtol=1e-4, atol=1e-6)
            assert result.as_numpy("label").reshape(-1).tolist() == want_label.tolist()
    finally:
        running.stop()
    assert running.proc.poll() is not None, f"{name} still running after stop()"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name} still listening on {port} after stop()"
