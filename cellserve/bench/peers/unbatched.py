"""The unbatched baseline: each request its own ONNX Runtime run behind a plain web app.
It needs nothing beyond cellserve's own dependencies, so it runs in this environment."""

from __future__ import annotations

import sys
from pathlib import Path

from cellserve.bench.peers.base import Peer, PeerModel, RunningPeer, Tuning, free_port, spawn

SERVER = Path(__file__).parent / "servers" / "unbatched_server.py"


class UnbatchedPeer(Peer):
    name = "unbatched"
    tuning_grid = (Tuning(1, 0.0),)  # nothing to tune: one request per run

    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        port = free_port()
        peer = spawn(self.name, [sys.executable, str(SERVER), "--model-path", str(model.onnx_path),
                                 "--model-name", model.name, "--port", str(port), "--threads", str(threads)],
                     f"127.0.0.1:{port}", Path(workdir) / "unbatched.log")
        peer.wait_ready(60)
        return peer
