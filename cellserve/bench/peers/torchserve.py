"""TorchServe: PyTorch's model server (a Java frontend that batches, Python workers that run a
handler), serving the ONNX graph through a custom handler on ONNX Runtime.

TorchServe answers the Open Inference Protocol itself: its frontend routes POST
/v2/models/{name}/infer to the model's handler (the KServe v2 path), and with
`ts_open_inference_protocol=true` it also answers GET /v2/health/ready. The handler
(servers/torchserve_handler.py) reads each request's OIP JSON, pads the batch TorchServe hands
it and answers every request with its own row, so no padding is needed on the client.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from cellserve.bench.peers.base import (Peer, PeerModel, PeerUnavailable, RunningPeer, Tuning, free_port,
                                        make_venv, peers_root, run_logged, spawn, tail, venv_ready)

HANDLER = Path(__file__).parent / "servers" / "torchserve_handler.py"
PACKAGES = ["torch==2.13.0",  # the CPU build on this machine's disk; TorchServe's worker imports torch
            "torchserve==0.12.0", "torch-model-archiver==0.12.0", "onnxruntime", "numpy"]


def venv_dir() -> Path:
    return peers_root() / "torchserve" / "venv"


class TorchServePeer(Peer):
    name = "torchserve"
    pads_on_client = False  # the handler pads each batch itself
    tuning_grid = (Tuning(8, 2.0), Tuning(32, 2.0), Tuning(8, 10.0), Tuning(32, 10.0))

    def missing(self) -> str | None:
        if not venv_ready(venv_dir()):
            return f"TorchServe is not installed (no finished venv at {venv_dir()})"
        if not shutil.which("java"):
            return "TorchServe's frontend needs Java 11 or newer, and `java` is not on PATH"
        return None

    def install(self, log=print) -> None:
        log(f"installing TorchServe into {venv_dir()} ...")
        make_venv(venv_dir(), sys.executable, PACKAGES, peers_root() / "torchserve" / "install.log")

    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        reason = self.missing()
        if reason:
            raise PeerUnavailable(reason)
        workdir = Path(workdir).resolve()
        bin_dir = venv_dir() / "bin"
        store, source = workdir / "model-store", workdir / "archive-source"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        source.mkdir(parents=True, exist_ok=True)

        # The model archive: handler, ONNX file, threads, and the batching knobs.
        (source / "settings.json").write_text(json.dumps({"threads": threads}))
        (source / "model-config.yaml").write_text(
            f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {tuning.max_batch}\n"
            f"maxBatchDelay: {max(1, round(tuning.max_wait_ms))}\nresponseTimeout: 120\n")
        shutil.copy(HANDLER, source / HANDLER.name)
        run_logged([str(bin_dir / "torch-model-archiver"), "--model-name", model.name, "--version", "1.0",
                    "--serialized-file", str(model.onnx_path), "--handler", str(source / HANDLER.name),
                    "--extra-files", str(source / "settings.json"),
                    "--config-file", str(source / "model-config.yaml"),
                    "--archive-format", "no-archive", "--export-path", str(store), "--force"],
                   workdir / "torchserve-archive.log", 120)

        # TorchServe keeps a pid file in TMPDIR and its workers' sockets in TEMP (/tmp by
        # default), which would clash with another TorchServe: give this one its own.
        tmp = workdir / "tmp"
        if len(str(tmp)) > 80:  # a worker socket's path must stay under 108 bytes
            tmp = Path(tempfile.mkdtemp(prefix="cellserve-ts-"))
        tmp.mkdir(exist_ok=True)
        port = free_port()
        config = workdir / "config.properties"
        config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{free_port()}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            "grpc_inference_address=127.0.0.1", f"grpc_inference_port={free_port()}",
            "grpc_management_address=127.0.0.1", f"grpc_management_port={free_port()}",
            "ts_open_inference_protocol=true",  # GET /v2/health/ready and friends
            "disable_token_authorization=true",
            "enable_envvars_config=true",
            "disable_system_metrics=true",
            "default_workers_per_model=1",
            f"model_store={store}",
        ]) + "\n")
        env = {"TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(workdir / "logs"),
               "METRICS_LOCATION": str(workdir / "logs")}
        peer = spawn(self.name, [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs",
                                 "--disable-token-auth", "--model-store", str(store),
                                 "--models", f"{model.name}={model.name}", "--ts-config", str(config)],
                     f"127.0.0.1:{port}", workdir / "torchserve.log", env=env, cwd=workdir,
                     ready_path="/ping")  # 200 only once the model's worker is up
        peer.wait_ready(180)
        try:  # the OIP paths are what the load generator needs
            urllib.request.urlopen(f"http://{peer.address}/v2/health/ready", timeout=5).close()
        except OSError as exc:
            peer.stop()
            raise PeerUnavailable(f"TorchServe does not answer /v2/health/ready: {exc}\n"
                                  f"{tail(peer.log_path)}") from exc
        return peer
