"""Ray Serve peer: one deployment answering Open Inference Protocol JSON, its model call a
`@serve.batch` method that pads the batch's rows with 0 to the longest and runs ONNX
Runtime once (what a Ray Serve user would write). Self-contained: ray[serve], numpy,
onnxruntime, run with the peer venv's python.

    python ray_serve_app.py --model-path M.onnx --model-name lstm-512 --port P --threads 2 \
        --max-batch 8 --max-wait-ms 2 --temp-dir /tmp/ray-xyz
"""

import argparse
import asyncio
import os
import signal
import threading

# Before ray is imported: no usage report (nothing outside is reachable) and no dashboard.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402


def build_app(model_path: str, model_name: str, threads: int, max_batch: int, max_wait_ms: float):
    # max_ongoing_requests (default 5) caps how many requests reach the replica, so it must
    # exceed max_batch_size or batches can never fill.
    @serve.deployment(num_replicas=1, max_ongoing_requests=max(2 * max_batch, 16),
                      ray_actor_options={"num_cpus": threads})
    class OipModel:
        def __init__(self):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000.0)
        async def classify(self, rows: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
            lengths = np.array([row.size for row in rows], dtype=np.int32)
            tokens = np.zeros((len(rows), lengths.max()), dtype=np.int64)
            for i, row in enumerate(rows):
                tokens[i, :row.size] = row
            # Off the event loop, so requests keep queueing for the next batch meanwhile.
            probabilities, label = await asyncio.to_thread(
                self.session.run, None, {"tokens": tokens, "lengths": lengths})
            return [(probabilities[i], int(label[i])) for i in range(len(rows))]

        async def __call__(self, request: Request) -> Response:
            path = request.url.path
            if request.method == "GET" and path in ("/v2/health/ready", "/v2/health/live"):
                return Response(status_code=200)
            if request.method != "POST" or path != f"/v2/models/{model_name}/infer":
                return JSONResponse({"error": f"no route {request.method} {path}"}, status_code=404)
            try:
                body = await request.json()
                inputs = {t["name"]: t for t in body["inputs"]}
                tokens = np.asarray(inputs["tokens"]["data"], dtype=np.int64).reshape(inputs["tokens"]["shape"])
                if tokens.ndim != 2 or tokens.shape[0] != 1:
                    raise ValueError(f"tokens must be [1, T], got {list(tokens.shape)}")
                row = tokens[0]
                if "lengths" in inputs:  # a client-padded row: keep only its true tokens
                    row = row[:int(np.asarray(inputs["lengths"]["data"]).reshape(-1)[0])]
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
            probabilities, label = await self.classify(row)
            outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [1, probabilities.size],
                        "data": probabilities.tolist()},
                       {"name": "label", "datatype": "INT64", "shape": [1], "data": [label]}]
            return JSONResponse({"model_name": model_name, "id": body.get("id", ""), "outputs": outputs})

    return OipModel.bind()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()

    # A private local cluster, as lean as Ray allows: no dashboard, a small object store
    # (requests never go through it), logs and sockets under --temp-dir.
    ray.init(num_cpus=args.threads, num_gpus=0, include_dashboard=False, _temp_dir=args.temp_dir,
             object_store_memory=100 * 1024 * 1024, log_to_driver=True, logging_level="WARNING")
    # After ray.init, which installs its own crash handler for SIGTERM: ours shuts down in order.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(args.model_path, args.model_name, args.threads, args.max_batch, args.max_wait_ms),
                  name=args.model_name, route_prefix="/", blocking=False)
        print("ray serve ready", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
