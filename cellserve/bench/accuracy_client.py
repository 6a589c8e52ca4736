"""Driving `serve --ray --accuracy-scaling` from outside: the server as a process, its plans
and capacities read from its log, and an open-loop client of a variant family that records
which variant answered each request. Used by `bench accuracy-serve` (accuracy_serve.py) and
the real-Ray test (tests/cluster/test_ray_accuracy.py).

Contracts:
- `FamilyClient` sends one family's requests of `rows_per_request` typical rows each (JSON
  tensors, over the lean keep-alive HttpPool), open loop: a request is sent at its time
  whether or not earlier ones were answered. Every request sent gets exactly one `Outcome`
  (a connection failure or no answer within the client timeout is status 0 with the
  reason, never lost). Latency counts from the scheduled send. Each run closes its
  connections when it ends (a client is run once, on one event loop).
- `ServerProcess` starts `cellserve serve` with the given flags on a free port, collects its
  output lines, and returns once /v2/health/ready answers 200 (RuntimeError with the output
  otherwise).
- `plans(lines)` parses the accuracy plans' log lines (ray_accuracy_loop.plan_applied's
  format): placement, demand and the capacity per worker of each variant.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from cellserve.bench.http_pool import HttpPool, error_message
from cellserve.bench.peers.base import free_port

_PLAN = re.compile(r"accuracy plan (\d+) \(([^)]*)\): (.*?); demand (.*?); effective accuracy ([0-9.]+); "
                   r"capacity per worker (.*?)(?:; unserved .*)?$")


@dataclass(frozen=True)
class Outcome:
    sent_s: float  # scheduled send, seconds from the run's start
    latency_s: float | None  # scheduled send to answer (None: no answer)
    status: int  # HTTP status; 0: no answer (connection failure, client timeout)
    variant: str | None  # the `variant` response parameter of a 200
    rows: int
    reason: str = ""


@dataclass(frozen=True)
class PlanLine:
    epoch: int
    reason: str
    placement: dict[str, str | None]  # worker -> variant (None: '-')
    demand_rps: dict[str, float]
    effective_accuracy: float
    capacity_rps: dict[str, float]


def plans(lines: list[str]) -> list[PlanLine]:
    """The plan lines among `lines`, in order (a line another process's output broke into is
    skipped: Ray forwards its workers' output to the same stream)."""
    out = []
    for line in lines:
        m = _PLAN.search(line)
        if m is None:
            continue
        try:
            placement = {w: (None if v == "-" else v) for w, v in (p.split(": ") for p in m.group(3).split("; "))}
            demand = {f: float(r.removesuffix("/s")) for f, r in (d.rsplit(" ", 1) for d in m.group(4).split(", "))}
            capacity = {v: float(c.removesuffix("/s"))
                        for v, c in (d.rsplit(" ", 1) for d in m.group(6).split(", "))}
        except ValueError:
            continue
        out.append(PlanLine(int(m.group(1)), m.group(2), placement, demand, float(m.group(5)), capacity))
    return out


class FamilyClient:
    def __init__(self, address: str, family: str, input_name: str, rows: list[np.ndarray], rows_per_request: int,
                 timeout_s: float = 30.0, bodies: int = 32):
        """`rows`: token rows of one length; request i carries rows_per_request of them,
        cycling through `bodies` prepared requests."""
        if rows_per_request < 1:
            raise ValueError(f"rows_per_request must be >= 1, got {rows_per_request}")
        self.pool, self.k, self.timeout_s = HttpPool(address), rows_per_request, timeout_s
        self.outcomes: list[Outcome] = []
        self.requests = []
        for i in range(bodies):
            batch = np.stack([rows[(i * rows_per_request + j) % len(rows)] for j in range(rows_per_request)])
            body = json.dumps({"inputs": [{"name": input_name, "shape": list(batch.shape), "datatype": "INT64",
                                           "data": batch.ravel().tolist()}]}, separators=(",", ":")).encode()
            self.requests.append(self.pool.post(f"/v2/models/{family}/infer", body))

    async def _one(self, i: int, start: float, at: float) -> None:
        try:
            status, body = await asyncio.wait_for(self.pool.request(self.requests[i % len(self.requests)]),
                                                  self.timeout_s)
        except asyncio.TimeoutError:
            self.outcomes.append(Outcome(at, None, 0, None, self.k, f"no answer within {self.timeout_s:g} s"))
            return
        except Exception as exc:  # noqa: BLE001 - a connection failure: counted, never lost
            self.outcomes.append(Outcome(at, None, 0, None, self.k, f"{type(exc).__name__}: {exc}"))
            return
        latency = time.perf_counter() - start - at
        if status == 200:
            variant = json.loads(body).get("parameters", {}).get("variant")
            self.outcomes.append(Outcome(at, latency, 200, variant, self.k))
        else:
            self.outcomes.append(Outcome(at, latency, status, None, self.k, error_message(body)))

    async def run_schedule(self, times: list[float]) -> list[Outcome]:
        """Send request i at times[i] seconds from now; every outcome once all are answered."""
        start = time.perf_counter()
        tasks = []
        try:
            for i, at in enumerate(times):
                delay = at - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(i, start, at)))
            await asyncio.gather(*tasks)
        finally:
            self.pool.close()  # on the loop that opened its connections
        return self.outcomes

    async def run_rate(self, rows_per_s, stop: threading.Event) -> None:
        """Send at `rows_per_s()` rows/s (read at each send; <= 0 pauses) until `stop` is set,
        then wait for every answer."""
        start = time.perf_counter()
        tasks, at, i = [], 0.0, 0
        try:
            while not stop.is_set():
                rate = rows_per_s() / self.k
                if rate <= 0:
                    await asyncio.sleep(0.05)
                    at = time.perf_counter() - start
                    continue
                at += 1.0 / rate
                delay = at - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(i, start, at)))
                i += 1
            await asyncio.gather(*tasks)
        finally:
            self.pool.close()  # on the loop that opened its connections


class ServerProcess:
    def __init__(self, args: list[str], ready_timeout_s: float = 300.0):
        # A port picked here and polled for readiness, rather than port 0 and the ready line:
        # Ray forwards its workers' output into the same stream, and a line of it can land in
        # the middle of the server's (print writes the text and the newline separately).
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "cellserve.cli", "serve", "--http-port", str(port), "--grpc-port", "-1",
               "--metrics-port", "-1", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + ready_timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.stop()
                why = f"exited with {code}" if time.monotonic() <= deadline else \
                    f"not ready within {ready_timeout_s:g} s"
                raise RuntimeError(f"`cellserve serve {' '.join(args)}` {why}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def plans(self) -> list[PlanLine]:
        return plans(list(self.lines))

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
