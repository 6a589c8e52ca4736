"""What `serve --ray` adds at light load: the same request, one at a time, alternately to a
plain `cellserve serve --threads 1` and to `cellserve serve --ray --ray-workers 2` (workers of
one core), both on this machine; and Ray's own actor-call round trip, alone, for scale.

    python -m cellserve.cluster.ray_bench --requests 400 --json docs/results/ray/light-load-socket.json
    python -m cellserve.cluster.ray_bench --requests 400 --data-plane ray --json docs/results/ray/light-load.json

`--data-plane` is the Ray server's `--ray-data-plane` (socket: the direct data plane, the
default; ray: an actor call per request). Writes {"data_plane", "plain": {p50_ms, p90_ms,
mean_ms, n}, "ray": {...}, "added_p50_ms", "paired_median_added_ms", "ray_actor_call_p50_ms"}
("ray" is the `serve --ray` server, whichever its data plane). Measured, not modelled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _latencies(urls: dict[str, str], requests: int, model: str = "lstm-512") -> dict[str, list[float]]:
    import tritonclient.http as h

    x = np.random.default_rng(0).integers(0, 10000, (1, 25))
    clients = {k: h.InferenceServerClient(u) for k, u in urls.items()}

    def one(client) -> float:
        t = h.InferInput("tokens", [1, 25], "INT64")
        t.set_data_from_numpy(x)
        start = time.perf_counter()
        client.infer(model, [t])
        return time.perf_counter() - start

    for c in clients.values():
        for _ in range(30):  # warm: first steps, connections, the routers' cost tables
            one(c)
    out = {k: [] for k in clients}
    for _ in range(requests):  # alternate, so that the machine's drift hits both alike
        for k, c in clients.items():
            out[k].append(one(c))
            time.sleep(0.01)
    return out


def _actor_call_p50_ms(calls: int = 300) -> float:
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        async def echo(self, x):
            return x

    ray.init(include_dashboard=False, logging_level="WARNING")
    try:
        a = Echo.remote()
        x = {"tokens": np.zeros((1, 25), np.int64)}
        ray.get(a.echo.remote(x))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(a.echo.remote(x))
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from cellserve.server.launch import ServerProcess

    p = argparse.ArgumentParser(prog="python -m cellserve.cluster.ray_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400, help="requests to each server (default: 400)")
    p.add_argument("--json", type=Path, required=True, help="where to write the figures")
    p.add_argument("--data-plane", choices=("socket", "ray"), default="socket",
                   help="the Ray server's --ray-data-plane (default: socket)")
    p.add_argument("--no-actor-call", action="store_true", help="skip timing Ray's bare actor call")
    args = p.parse_args(argv)
    plain = ServerProcess("--threads", "1", "--model", "lstm-512")
    ray_server = ServerProcess("--ray", "--ray-workers", "2", "--ray-data-plane", args.data_plane,
                               "--model", "lstm-512")
    try:
        lat = _latencies({"plain": plain.http, "ray": ray_server.http}, args.requests)
    finally:
        plain.stop()
        ray_server.stop()
    out = {k: {"p50_ms": float(np.percentile(v, 50) * 1e3), "p90_ms": float(np.percentile(v, 90) * 1e3),
               "mean_ms": float(np.mean(v) * 1e3), "n": len(v)} for k, v in lat.items()}
    out = {"data_plane": args.data_plane, **out}
    out["added_p50_ms"] = out["ray"]["p50_ms"] - out["plain"]["p50_ms"]
    out["paired_median_added_ms"] = float(np.median(np.subtract(lat["ray"], lat["plain"])) * 1e3)
    out["ray_actor_call_p50_ms"] = None if args.no_actor_call else _actor_call_p50_ms()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
