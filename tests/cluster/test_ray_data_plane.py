"""`--ray-data-plane`: the setting's checks, and the Ray actor-call path kept as the fallback
(the socket, the default, carries every other serve --ray test)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
import tritonclient.http as httpclient  # noqa: E402
from serverproc import serve_here, start_server  # noqa: E402
from zoo_reference import token_reference  # noqa: E402


def test_the_setting_needs_ray_and_is_socket_or_ray(capsys, monkeypatch):
    # in this process through cli.main: the flags' checks exit 2 before any server code runs
    done = serve_here(capsys, monkeypatch, "--ray-data-plane", "ray", "--model", "gru-256")
    assert done.returncode == 2 and "--ray-data-plane is for the Ray workers: it needs --ray" in done.stderr
    done = serve_here(capsys, monkeypatch, "--ray", "--ray-data-plane", "tcp")
    assert done.returncode == 2 and "invalid choice: 'tcp' (choose from 'socket', 'ray')" in done.stderr


@pytest.mark.slow
def test_over_rays_actor_calls_the_answers_and_sequences_are_the_same():
    pytest.importorskip("ray")
    server = start_server("--ray", "--ray-workers", "2", "--ray-data-plane", "ray", "--model", "gru-256",
                          timeout=240)
    try:
        assert "cellserve: ray: data plane: ray" in server.lines
        x = np.random.default_rng(2).integers(0, 10000, (1, 10))
        want = token_reference("gru-256", x)["probabilities"]

        def send(client, tokens, **kw):
            t = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
            t.set_data_from_numpy(tokens)
            return client.infer("gru-256", [t], **kw).as_numpy("probabilities")
        with httpclient.InferenceServerClient(server.http) as client:
            np.testing.assert_allclose(send(client, x), want, rtol=1e-4, atol=1e-6)
            send(client, x[:, :4], sequence_id="s", sequence_start=True)
            got = send(client, x[:, 4:], sequence_id="s", sequence_end=True)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # chunked as sent whole
    finally:
        assert server.stop() == 0
