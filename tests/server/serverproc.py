"""Starting a real `cellserve serve` process for the tests, on free ports it picks itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

READY = re.compile(r"cellserve: ready: http=(\S+) grpc=(\S+) metrics=(\S+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    http: str = ""  # host:port
    grpc: str = ""
    metrics: str = ""
    lines: list[str] = field(default_factory=list)  # everything it printed, stdout and stderr

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout} s after {sig!r}:\n{self.output()}")


def start_server(*args: str, timeout: float = 120.0) -> ServerProcess:
    """Run `cellserve serve ARGS` on port 0 for every protocol; return once it says ready."""
    cmd = [sys.executable, "-m", "cellserve.cli", "serve", "--http-port", "0", "--grpc-port", "0",
           "--metrics-port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = ServerProcess(proc)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            server.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match:
                server.http, server.grpc, server.metrics = match.groups()
                ready.set()
        ready.set()  # it exited

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server not ready within {timeout} s:\n{server.output()}")
    if not server.http:
        proc.wait(5)
        raise AssertionError(f"server exited with {proc.returncode} before it was ready:\n{server.output()}")
    return server


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of metric `name` over its series whose labels include `labels` (0 if none)."""
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=30).read().decode()
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        series = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(series.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_until(condition, what: str, timeout: float = 60.0, poll: float = 0.02) -> None:
    """Poll `condition()` until it holds. `timeout` only bounds a hang: it is no part of what
    a test asserts, so it is generous (a loaded machine may take many times the usual)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(poll)
