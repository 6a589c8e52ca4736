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
import tempfile
import time
import urllib.request
from pathlib import Path

from cellserve.bench.peers.base import (Peer, PeerModel, PeerUnavailable, RunningPeer, Tuning, free_ports,
                                        run_logged, spawn, tail)

HANDLER = Path(__file__).parent / "servers" / "torchserve_handler.py"
PACKAGES = ("torch==2.13.0",  # the CPU build on this machine's disk; TorchServe's worker imports torch
            "torchserve==0.12.0", "torch-model-archiver==0.12.0",
            "pyyaml",  # imported by TorchServe's worker, not declared by the package
            "onnxruntime", "numpy")


class TorchServePeer(Peer):
    name = "torchserve"
    packages = PACKAGES
    pads_on_client = False  # the handler pads each batch itself

    def missing(self) -> str | None:
        if not shutil.which("java"):
            return "TorchServe's frontend needs Java 11 or newer, and `java` is not on PATH"
        return super().missing()

    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        reason = self.missing()
        if reason:
            raise PeerUnavailable(reason)
        workdir = Path(workdir).resolve()
        bin_dir = self.venv / "bin"
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
        port, management, metrics, grpc_inference, grpc_management = free_ports(5)
        config = workdir / "config.properties"
        config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{management}",
            f"metrics_address=http://127.0.0.1:{metrics}",
            "grpc_inference_address=127.0.0.1", f"grpc_inference_port={grpc_inference}",
            "grpc_management_address=127.0.0.1", f"grpc_management_port={grpc_management}",
            "ts_open_inference_protocol=true",  # GET /v2/health/ready and friends
            "disable_token_authorization=true",
            "enable_envvars_config=true",
            "disable_system_metrics=true",
            "default_workers_per_model=1",
            f"model_store={store}",
        ]) + "\n")
        env = {"TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(workdir / "logs"),
               "METRICS_LOCATION": str(workdir / "logs")}
        launcher = spawn(self.name, [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs",
                                     "--disable-token-auth", "--model-store", str(store),
                                     "--models", f"{model.name}={model.name}", "--ts-config", str(config)],
                         f"127.0.0.1:{port}", workdir / "torchserve.log", env=env, cwd=workdir,
                         ready_path="/v2/health/ready")  # the frontend is up (it says ready at once)
        peer = TorchServeProcess(self.name, launcher.proc, launcher.address, launcher.log_path, launcher.ready_path)
        peer.wait_ready(120)
        wait_for_worker(peer, f"http://127.0.0.1:{management}/models/{model.name}", 180)
        return peer


class TorchServeProcess(RunningPeer):
    """`torchserve --foreground` is a Python launcher whose child is the Java frontend, whose
    children are the Python workers, all in the launcher's process group. The group signals
    reach them all, but the launcher exits first: stop() also waits until the rest are gone."""

    def stop(self, timeout_s: float = 20.0) -> None:
        super().stop(timeout_s)
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(self.proc.pid):
            raise RuntimeError(f"TorchServe's processes (group {self.proc.pid}) outlived SIGKILL")


def _group_alive(pgid: int) -> bool:
    """Whether process group `pgid` still has a running thread. A dying JVM's main thread shows
    as a zombie while its other threads still hold its sockets, so every thread counts."""
    for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def wait_for_worker(peer: RunningPeer, describe_url: str, timeout_s: float) -> None:
    """Poll the management API until the model's worker is READY (it loads the model after
    the frontend already answers); PeerUnavailable with the log's tail otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            raise PeerUnavailable(f"torchserve exited with {peer.proc.returncode}:\n{tail(peer.log_path)}")
        try:
            with urllib.request.urlopen(describe_url, timeout=5) as reply:
                workers = [w for m in json.load(reply) for w in m.get("workers", [])]
            if any(w.get("status") == "READY" for w in workers):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    peer.stop()
    raise PeerUnavailable(f"TorchServe's worker was not ready after {timeout_s:.0f} s:\n{tail(peer.log_path, 25)}")
