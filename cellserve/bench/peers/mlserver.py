"""Seldon's MLServer with its adaptive batcher, serving the model through a small custom
runtime (servers/mlserver_runtime.py) on ONNX Runtime, in its own virtual environment (its
pins clash with ours).

MLServer's batcher merges requests by concatenating their data along the first axis and
keeps the first request's shape (mlserver/batching/requests.py), so it cannot batch ragged
sentences by itself: clients pad to LENGTH_BUCKETS and send `lengths`, and the runtime
re-pads a batch that mixes buckets. Its HTTP endpoint reads JSON tensors only, not Triton's
binary extension.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cellserve.bench.peers.base import (LENGTH_BUCKETS, Peer, PeerModel, PeerUnavailable, RunningPeer, Tuning,
                                        free_ports, spawn)

RUNTIME = Path(__file__).parent / "servers" / "mlserver_runtime.py"
# uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which kills
# MLServer 1.7.1's parallel workers at start.
PACKAGES = ("mlserver==1.7.1", "uvloop<0.22", "onnxruntime", "numpy")
# 1 runs predict() in one worker process, apart from the HTTP/JSON work and the batcher: on
# 2 cores it sustained more than 0 (all in the server's process) in 7 of 8 paired runs, about
# 138 vs 119 req/s at batch 8 / 2 ms (16 closed-loop clients, threads=2, a shared machine).
PARALLEL_WORKERS = 1


class MLServerPeer(Peer):
    name = "mlserver"
    packages = PACKAGES
    pads_on_client = True

    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        reason = self.missing()
        if reason:
            raise PeerUnavailable(reason)
        root = Path(workdir) / "mlserver"
        model_dir = root / model.name  # MLServer warns when the folder is not named after the model
        shutil.rmtree(root, ignore_errors=True)
        model_dir.mkdir(parents=True)
        shutil.copy(RUNTIME, model_dir / RUNTIME.name)
        port, grpc_port = free_ports(2)
        settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port,  # gRPC cannot be turned off
                    "metrics_endpoint": None, "parallel_workers": PARALLEL_WORKERS, "debug": False,
                    "environments_dir": str(root / ".envs"), "metrics_dir": str(root / ".metrics")}
        model_settings = {"name": model.name, "implementation": f"{RUNTIME.stem}.OnnxClassifier",
                          "max_batch_size": tuning.max_batch, "max_batch_time": tuning.max_wait_ms / 1000,
                          "parameters": {"extra": {"onnx_path": str(Path(model.onnx_path).resolve()),
                                                   "threads": threads, "buckets": list(LENGTH_BUCKETS)}}}
        (root / "settings.json").write_text(json.dumps(settings, indent=2))
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
        log_path = Path(workdir) / "mlserver.log"
        peer = spawn(self.name, [str(self.venv / "bin" / "mlserver"), "start", str(root)],
                     f"127.0.0.1:{port}", log_path, cwd=root,
                     # The server stays up and says ready when the model fails to load: ask the model.
                     ready_path=f"/v2/models/{model.name}/ready")
        try:
            peer.wait_ready(120)
        except PeerUnavailable as exc:
            # The log's tail is the shutdown after the timeout; the cause is further up.
            lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
            causes = [line for line in lines if "ERROR" in line or "Error" in line or "Couldn't" in line]
            raise PeerUnavailable(f"{exc}\ncauses in {log_path}:\n" + "\n".join(causes[-8:])) from None
        return peer
