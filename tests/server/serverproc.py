"""Starting a real `cellserve serve` process for the tests, on free ports it picks itself."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import tritonclient.http as httpclient

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
    return launch_server(*args).wait_ready(timeout)


class PendingServer:
    """A `cellserve serve` process started, not yet waited for: its start-up (imports,
    profiling) runs in its own process while the caller goes on."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "cellserve.cli", "serve", "--http-port", "0", "--grpc-port", "0",
               "--metrics-port", "0", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.server = ServerProcess(self.proc)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.server.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match:
                self.server.http, self.server.grpc, self.server.metrics = match.groups()
                self.ready.set()
        self.ready.set()  # it exited

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        """The server, once it says ready; an AssertionError with its output if it exits first
        or takes longer than `timeout` seconds from now."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"server not ready within {timeout} s:\n{self.server.output()}")
        if not self.server.http:
            self.proc.wait(5)
            raise AssertionError(f"server exited with {self.proc.returncode} before it was ready:\n"
                                 f"{self.server.output()}")
        return self.server


def launch_server(*args: str) -> PendingServer:
    """Start `cellserve serve ARGS` on port 0 for every protocol without waiting for it."""
    return PendingServer(*args)


# Servers a test module's fixture will start, declared at import (`early_server`) so that the
# session can start them ahead of the module's tests (tests/server/conftest.py), one at a time
# in the order their modules run: each one's start-up (imports, the start-up profile) then
# runs in its own process beside the tests before it, on a core the tests leave idle.
_declared: dict[str, tuple[str, ...]] = {}  # "module.fixture" -> serve arguments
_launched: dict[str, PendingServer] = {}
_launch_lock = threading.Lock()


def early_server(module: str, fixture: str, *args: str) -> str:
    """Declare that fixture `fixture` of test module `module` (its __name__) serves with ARGS;
    returns the key `take_server` takes it by."""
    key = f"{module}.{fixture}"
    _declared[key] = args
    return key


def declared_for(module: str, fixtures) -> list[str]:
    """The declared keys a test of `module` that uses `fixtures` needs."""
    return [f"{module}.{f}" for f in fixtures if f"{module}.{f}" in _declared]


def launch_declared(keys: list[str]) -> None:
    """Start the declared servers `keys`, one after another, each once the one before is ready
    (a daemon thread; a key already taken by its fixture is skipped)."""
    def run() -> None:
        for key in keys:
            with _launch_lock:
                if key in _launched:
                    continue
                pending = _launched[key] = launch_server(*_declared[key])
            pending.ready.wait(120)

    threading.Thread(target=run, daemon=True).start()


def take_server(key: str, timeout: float = 120.0) -> ServerProcess:
    """The declared server `key`, ready: the one started ahead of time, or one started now."""
    with _launch_lock:
        pending = _launched.get(key)
        if pending is None:
            pending = _launched[key] = launch_server(*_declared[key])
    return pending.wait_ready(timeout)


def stop_untaken() -> None:
    """Stop servers started ahead whose fixture never ran (the session ended before)."""
    with _launch_lock:
        for pending in _launched.values():
            if pending.proc.poll() is None:
                pending.server.stop()


def scrape(server: ServerProcess) -> str:
    return urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=30).read().decode()


def metric(server: ServerProcess, name: str, text: str | None = None, **labels: str) -> float:
    """The sum of metric `name` over its series whose labels include `labels` (0 if none),
    from `text` (one scrape) or a scrape made now."""
    text = scrape(server) if text is None else text
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        series = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(series.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def arrived(server: ServerProcess, model: str) -> int:
    """Inference requests for `model` that reached the server so far: answered, refused or
    still pending. Unlike the pending gauge it never falls, so a wait on it cannot miss a
    request that was answered before the next look."""
    text = scrape(server)  # success and failure are exposed before pending: a request answered
    # while this is written is counted once or not at all, never twice
    return int(sum(metric(server, name, text, model=model) for name in (
        "cellserve_inference_request_success_total", "cellserve_inference_request_failure_total",
        "cellserve_inference_pending_request_count")))


def wait_until(condition, what: str, timeout: float = 60.0, poll: float = 0.02) -> None:
    """Poll `condition()` until it holds. `timeout` only bounds a hang: it is no part of what
    a test asserts, so it is generous (a loaded machine may take many times the usual)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(poll)


def sized_shape(server: ServerProcess, model: str, base: tuple[int, int], alone_s: float = 1.5,
                max_rows: int = 512) -> tuple[int, int]:
    """`base` (sentences, tokens) with its sentences multiplied until one request alone
    takes `alone_s` or more on this machine (the tokens stay: models cap the length).

    For requests that must still be in flight when a test acts: a fixed size finishes first
    on a machine fast enough. A request takes no less when others share the engine, so one
    that takes `alone_s` alone stays in flight at least that long. The timing only sizes the
    work (on a slow machine, `base` as it is); no assertion uses it."""
    tokens = np.random.default_rng(0).integers(1, 10000, base).astype(np.int64)
    with httpclient.InferenceServerClient(server.http, network_timeout=300) as client:
        tensor = httpclient.InferInput("tokens", list(base), "INT64")
        tensor.set_data_from_numpy(tokens, binary_data=True)
        client.infer(model, [tensor])  # warm-up: the first request pays for lazy start-up
        start = time.perf_counter()
        client.infer(model, [tensor])
        took = time.perf_counter() - start
    return min(base[0] * max(math.ceil(alone_s / took), 1), max(max_rows, base[0])), base[1]


def serve_here(capsys, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """`cellserve serve ARGS` run in this process through cli.main (the entry point the script
    runs), for start-up failures only: its exit status (argparse's too) and what it printed.
    A process would spend seconds on imports to fail at once. Not for a failure after ports
    are bound: a gRPC port that cannot be bound ends the process (os._exit)."""
    from cellserve import cli

    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")  # serve sets it for itself; restored after the test
    capsys.readouterr()  # what came before is not this run's
    try:
        code = cli.main(["serve", *args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["cellserve", "serve", *args], code, out, err)
