"""Running `cellserve serve` as a child process (for the demo and the benchmarks)."""

from __future__ import annotations

import subprocess
import sys


def serve_model_args(model: str, repository=None) -> tuple[str, ...]:
    """`cellserve serve`'s flags that serve `model`: the repository holding it, else the zoo's."""
    return ("--model-repository", str(repository)) if repository else ("--model", model)


class ServerProcess:
    """`cellserve serve ARGS` with every port picked free; ready once constructed."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "cellserve.cli", "serve", "--http-port", "0", "--grpc-port", "0",
               "--metrics-port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            if line.startswith("cellserve: ready:"):
                ports = dict(item.split("=", 1) for item in line.split()[2:])
                self.http, self.grpc, self.metrics = ports["http"], ports["grpc"], ports["metrics"]
                return
        self.proc.wait()
        raise RuntimeError(f"cellserve serve exited with {self.proc.returncode} before it was ready:\n"
                           + "".join(seen))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the graceful exit (killed if it takes longer than `timeout`)."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
