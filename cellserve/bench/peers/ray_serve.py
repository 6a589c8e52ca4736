"""Ray Serve with `@serve.batch`: the batching a Ray user gets, padding inside the batch
function. Installed into its own virtual environment (Ray's pins clash with ours)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellserve.bench.peers.base import (Peer, PeerModel, PeerUnavailable, RunningPeer, Tuning, free_port,
                                        spawn)

SERVER = Path(__file__).parent / "servers" / "ray_serve_app.py"
PACKAGES = ("ray[serve]==2.60.0", "onnxruntime==1.32.0", "numpy==2.4.6")
# Ray puts Unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store (about 70
# characters below <temp>) and a socket path may not exceed 107 characters.
MAX_TEMP_DIR_CHARS = 35


class RayServePeer(Peer):
    name = "ray-serve"
    python = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else sys.executable
    packages = PACKAGES
    pads_on_client = False  # the batch function pads to the batch's longest row itself

    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        temp_dir = workdir / "ray"
        if len(str(temp_dir)) > MAX_TEMP_DIR_CHARS:
            temp_dir = Path(tempfile.mkdtemp(prefix="cs-ray-", dir="/tmp"))
        port = free_port()
        cmd = [str(self.venv / "bin" / "python"), str(SERVER), "--model-path", str(model.onnx_path),
               "--model-name", model.name, "--port", str(port), "--threads", str(threads),
               "--max-batch", str(tuning.max_batch), "--max-wait-ms", str(tuning.max_wait_ms),
               "--temp-dir", str(temp_dir)]
        peer = RayRunningPeer(spawn(self.name, cmd, f"127.0.0.1:{port}", workdir / "ray-serve.log"),
                              temp_dir, owns_temp_dir=not temp_dir.is_relative_to(workdir))
        try:
            peer.wait_ready(300)  # Ray starts GCS, raylet, controller, proxy: slow on 2 cores
        except PeerUnavailable:
            peer.stop()
            raise
        return peer


class RayRunningPeer(RunningPeer):
    """Stops the driver script first, alone, so it can shut Serve and Ray down in order,
    then kills whatever of its cluster outlived it. Ray's workers move to their own process
    groups but stay in the script's session, so the session id finds them all (and only
    this peer's cluster, never another user's Ray)."""

    def __init__(self, running: RunningPeer, temp_dir: Path, owns_temp_dir: bool):
        super().__init__(running.name, running.proc, running.address, running.log_path, running.ready_path)
        self.temp_dir, self.owns_temp_dir = temp_dir, owns_temp_dir

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve.shutdown(); ray.shutdown()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        super().stop(10.0)  # the process group, if the script hung
        deadline = time.monotonic() + 15
        while (left := self._session_pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _session_pids(self) -> list[int]:
        """Live (not zombie) processes in the script's session."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, session = fields[0], int(fields[3])
            if session == self.proc.pid and state != "Z":
                pids.append(int(entry.name))
        return pids
