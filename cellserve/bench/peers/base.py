"""What every peer server shares: the model they all serve, the request format they all
answer, and the plumbing to install a peer into its own virtual environment, start it as a
child process on loopback, wait until it is ready and stop it.

Request format (Open Inference Protocol over HTTP, JSON tensors, POST
/v2/models/{PeerModel.name}/infer): input `tokens`, INT64 [1, T]; for a peer whose batcher
needs equal shapes (`pads_on_client`), `tokens` is padded with id 0 to a length in
LENGTH_BUCKETS and a second input `lengths`, INT32 [1, 1], holds the true length. Every peer
answers `probabilities` FP32 [1, classes] and `label` INT64 [1], and GET /v2/health/ready
returns 200 once it serves.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellserve.openmp_env import peer_environ

LENGTH_BUCKETS = (16, 32, 64, 100)  # the sentence generator's lengths lie in [1, 100]


class PeerUnavailable(RuntimeError):
    """The peer cannot be installed or started here; the message says why."""


@dataclass(frozen=True)
class PeerModel:
    """The model every server runs: the zoo's weights exported once to ONNX.

    onnx_path: tokens int64 [batch, time], lengths int32 [batch] ->
    probabilities float32 [batch, classes], label int64 [batch]. Padded rows keep the state
    of their own last token, so padding never changes an answer.
    """

    name: str
    onnx_path: Path
    vocab: int
    classes: int


@dataclass(frozen=True)
class Tuning:
    """A peer's batching knobs: the largest batch and how long the batcher waits to fill one."""

    max_batch: int
    max_wait_ms: float

    def label(self) -> str:
        return f"batch {self.max_batch}, wait {self.max_wait_ms:g} ms"


def peers_root() -> Path:
    """Where peers' virtual environments live (CELLSERVE_PEERS_DIR, else the user's cache)."""
    root = os.environ.get("CELLSERVE_PEERS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "cellserve" / "peers"


def pad_to_bucket(tokens: np.ndarray) -> np.ndarray:
    """`tokens` [T] padded with id 0 to the smallest bucket that holds it."""
    size = next((b for b in LENGTH_BUCKETS if b >= tokens.size), tokens.size)
    out = np.zeros(size, dtype=np.int64)
    out[:tokens.size] = tokens
    return out


def free_ports(n: int) -> list[int]:
    """`n` different ports free on 127.0.0.1 now. Each socket stays bound until all are
    chosen: ports asked for one after another may come back the same (a peer whose HTTP
    and gRPC ports were equal answered its readiness poll in HTTP/2)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> None:
    """Run an install step, its output to `log_path`; PeerUnavailable with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**peer_environ(), **(env or {})})
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"`{' '.join(cmd[:4])} ...` took over {timeout_s:.0f} s (log: {log_path})")
    if done.returncode != 0:
        raise PeerUnavailable(f"`{' '.join(cmd[:4])} ...` failed with exit {done.returncode}:\n"
                              f"{tail(log_path)}\n(log: {log_path})")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def make_venv(venv: Path, python: str, packages: list[str], log_path: Path, timeout_s: float = 1800) -> None:
    """Create `venv` with `python` and pip-install `packages` into it. A marker file written
    last means a venv whose install was cut short is rebuilt, never half-used."""
    marker = venv / "cellserve-installed.txt"
    wanted = "\n".join(packages)
    if marker.exists() and marker.read_text() == wanted:
        return
    if not shutil.which(python) and not Path(python).exists():
        raise PeerUnavailable(f"{python} is not on this machine")
    shutil.rmtree(venv, ignore_errors=True)
    run_logged([python, "-m", "venv", str(venv)], log_path, 300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run_logged(pip + ["--upgrade", "pip"], log_path, 300)
    run_logged(pip + packages, log_path, timeout_s)
    marker.write_text(wanted)


def venv_ready(venv: Path) -> bool:
    return (venv / "cellserve-installed.txt").exists()


class RunningPeer:
    """A started peer process: `address` is host:port of its OIP HTTP endpoint."""

    def __init__(self, name: str, proc: subprocess.Popen, address: str, log_path: Path,
                 ready_path: str = "/v2/health/ready"):
        self.name, self.proc, self.address, self.log_path = name, proc, address, log_path
        self.ready_path = ready_path

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll the readiness endpoint; PeerUnavailable with the log's tail if the process
        exits or is not ready within `timeout_s` (the process is stopped then)."""
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.address}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                      f"{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                pass  # not listening yet, or not yet answering HTTP there
            time.sleep(0.25)
        self.stop()
        raise PeerUnavailable(f"{self.name} was not ready after {timeout_s:.0f} s:\n{tail(self.log_path)}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the peer's whole process group, SIGKILL after `timeout_s`."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Stragglers the group signal missed (a child that made its own session, as Ray's do).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> RunningPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn(name: str, cmd: list[str], address: str, log_path: Path, env: dict | None = None,
          cwd: Path | None = None, ready_path: str = "/v2/health/ready") -> RunningPeer:
    """Start `cmd` in its own process group, output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**peer_environ(), **(env or {})}, cwd=cwd, start_new_session=True)
    log.close()
    return RunningPeer(name, proc, address, log_path, ready_path)


class Peer(ABC):
    """A server users would run instead of cellserve, serving the same model.

    name: short, used in tables and JSON. pads_on_client: its batcher only batches equal
    shapes, so the load generator pads to LENGTH_BUCKETS and sends `lengths`.
    tuning_grid: the batch sizes and waits the comparison tries, keeping the best.
    """

    name: str = ""
    python: str = sys.executable  # the interpreter its venv is made from
    packages: tuple[str, ...] = ()  # what install() puts into its venv; none: runs in ours
    pads_on_client: bool = False
    tuning_grid: tuple[Tuning, ...] = (Tuning(8, 2.0), Tuning(32, 2.0), Tuning(8, 10.0), Tuning(32, 10.0))

    @property
    def quick_tuning_grid(self) -> tuple[Tuning, ...]:
        """The grid of a --quick comparison: the middle of the full one (batch 32 / 2 ms and
        batch 8 / 10 ms in the peers' grids, where every peer had its best so far)."""
        return self.tuning_grid[1:3] or self.tuning_grid

    @property
    def venv(self) -> Path:
        return peers_root() / self.name / "venv"

    def missing(self) -> str | None:
        """Why the peer cannot start now (not installed, no Java, ...), or None when it can."""
        if self.packages and not venv_ready(self.venv):
            return f"not installed (no finished venv at {self.venv})"
        return None

    def install(self, log=print) -> None:
        """Install the peer (idempotent); PeerUnavailable with the reason when it cannot be."""
        if self.packages:
            log(f"installing {', '.join(self.packages)} into {self.venv}")
            make_venv(self.venv, self.python, list(self.packages), peers_root() / self.name / "install.log")

    @abstractmethod
    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        """Start serving `model` with `threads` compute threads and `tuning`, files under
        `workdir`; return once it answers readiness (PeerUnavailable otherwise)."""

