"""NVIDIA Triton Inference Server: the Python backend running the ONNX graph with ONNX
Runtime, behind Triton's dynamic batcher.

Triton comes from the nvidia-pytriton wheel, which carries the `tritonserver` binary, its
libraries and the Python backend. We run that binary directly: PyTriton's own Python proxy
in front of it caps even a no-op model at ~174 req/s, the binary serves ~2,000. The venv is
made from Debian's /usr/bin/python3.11 because the backend stub we use links the system
libpython3.11; any other interpreter's packages fail to load in it (an RLock
`_recursion_count` error).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cellserve.bench.peers.base import (Peer, PeerModel, PeerUnavailable, RunningPeer, Tuning, free_port,
                                        spawn)

MODEL_FILE = Path(__file__).parent / "servers" / "triton_model.py"
PYTHON = "/usr/bin/python3.11"
PY_VERSION = "3.11"  # the stub to use, matching PYTHON

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [
  # ragged: the batcher may join different buckets (model.py pads to the widest), which
  # took the mean batch from 1.4 to 8-12 and gave 10-15% more req/s here
  {{ name: "tokens", data_type: TYPE_INT64, dims: [ -1 ], allow_ragged_batch: true }},
  {{ name: "lengths", data_type: TYPE_INT32, dims: [ 1 ] }}
]
output [
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ {classes} ] }},
  {{ name: "label", data_type: TYPE_INT64, dims: [ 1 ] }}  # sent as [n]: the Python backend answers the shape it is given
]
dynamic_batching {{ max_queue_delay_microseconds: {wait_us} }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters [
  {{ key: "onnx_path", value: {{ string_value: "{onnx_path}" }} }},
  {{ key: "threads", value: {{ string_value: "{threads}" }} }}
]
"""


class TritonPeer(Peer):
    name = "triton"
    python = PYTHON
    packages = ("nvidia-pytriton", "onnxruntime", "numpy")
    pads_on_client = True  # as Triton users do; ragged batching then joins different buckets

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{PY_VERSION}" / "site-packages"

    @property
    def dist_dir(self) -> Path:
        """The Triton distribution inside the nvidia-pytriton wheel."""
        return self.site_packages / "pytriton" / "tritonserver"

    def missing(self) -> str | None:
        reason = super().missing()
        if reason:
            return reason
        for path in (self.dist_dir / "bin" / "tritonserver",
                     self.dist_dir / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub"):
            if not path.exists():
                return f"{path} is missing from the nvidia-pytriton wheel"
        return None

    def start(self, model: PeerModel, workdir: Path, threads: int, tuning: Tuning) -> RunningPeer:
        reason = self.missing()
        if reason:
            raise PeerUnavailable(reason)
        workdir = Path(workdir).resolve()
        repo = workdir / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        version = repo / model.name / "1"
        version.mkdir(parents=True)
        shutil.copy(MODEL_FILE, version / "model.py")
        (repo / model.name / "config.pbtxt").write_text(CONFIG.format(
            name=model.name, max_batch=tuning.max_batch, classes=model.classes,
            wait_us=int(tuning.max_wait_ms * 1000), onnx_path=Path(model.onnx_path).resolve(), threads=threads))

        # The wheel ships the Python backend without a stub (PyTriton copies in the one for
        # its interpreter at start-up), so assemble a backend directory that has it.
        backend = workdir / "backends" / "python"
        shutil.rmtree(backend, ignore_errors=True)
        backend.mkdir(parents=True)
        for src in (self.dist_dir / "backends" / "python" / "libtriton_python.so",
                    self.dist_dir / "backends" / "python" / "triton_python_backend_utils.py",
                    self.dist_dir / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub"):
            shutil.copy2(src, backend / src.name)

        port = free_port()
        shm_prefix = f"cellserve-triton-{port}-"
        cmd = [str(self.dist_dir / "bin" / "tritonserver"),
               "--model-repository", str(repo),
               "--backend-directory", str(workdir / "backends"),
               "--http-address", "127.0.0.1", "--http-port", str(port),
               "--allow-grpc", "false", "--allow-metrics", "false",
               # Shared-memory names are global: a prefix per server lets several run at once.
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
               # Triton waits this long for clients' idle keep-alive connections to close
               # before it exits (default 30 s, longer than stop() waits before SIGKILL,
               # which leaves the backend's shared memory behind).
               "--exit-timeout-secs", "3",
               "--log-verbose", "0"]
        env = {
            # The copied backend and stub find Triton's bundled libraries by a relative
            # RPATH that no longer holds.
            "LD_LIBRARY_PATH": str(self.site_packages / "nvidia_pytriton.libs"),
            # The stub's embedded Python takes its prefix from the first `python3` on PATH:
            # the venv's, so it gets Debian's standard library and the venv's onnxruntime and
            # numpy, not those of whatever environment launched us. Empty means unset here.
            "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": "", "PYTHONHOME": "",
        }
        peer = TritonProcess(spawn(self.name, cmd, f"127.0.0.1:{port}", workdir / "triton.log", env=env),
                             shm_prefix)
        peer.wait_ready(120)
        return peer


class TritonProcess(RunningPeer):
    """A running tritonserver whose stop() also removes the Python backend's shared memory:
    Triton skips that cleanup when it exits on its exit timeout or is killed."""

    def __init__(self, spawned: RunningPeer, shm_prefix: str):
        super().__init__(spawned.name, spawned.proc, spawned.address, spawned.log_path, spawned.ready_path)
        self.shm_prefix = shm_prefix

    def stop(self, timeout_s: float = 20.0) -> None:
        super().stop(timeout_s)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
