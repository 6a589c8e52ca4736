"""The unbatched baseline: a plain Starlette app on uvicorn that answers each Open Inference
Protocol request with its own ONNX Runtime run, one run at a time (what a user who wraps a
model in a web framework gets). Self-contained: starlette, uvicorn, numpy, onnxruntime.

    python unbatched_server.py --model-path M.onnx --model-name lstm-512 --port P --threads 2
"""

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def build_app(model_path: str, model_name: str, threads: int) -> Starlette:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    runner = ThreadPoolExecutor(max_workers=1)  # one run at a time: no oversubscribed cores

    async def ready(_: Request) -> Response:
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        if request.path_params["model"] != model_name:
            return JSONResponse({"error": f"unknown model {request.path_params['model']!r}"}, status_code=404)
        try:
            body = await request.json()
            inputs = {t["name"]: t for t in body["inputs"]}
            tokens = np.asarray(inputs["tokens"]["data"], dtype=np.int64).reshape(inputs["tokens"]["shape"])
            if "lengths" in inputs:
                lengths = np.asarray(inputs["lengths"]["data"], dtype=np.int32).reshape(-1)
            else:
                lengths = np.full(tokens.shape[0], tokens.shape[1], dtype=np.int32)
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
        feeds = {"tokens": tokens, "lengths": lengths}
        probabilities, label = await asyncio.get_running_loop().run_in_executor(runner, session.run, None, feeds)
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
                    "data": probabilities.reshape(-1).tolist()},
                   {"name": "label", "datatype": "INT64", "shape": list(label.shape), "data": label.tolist()}]
        return JSONResponse({"model_name": model_name, "id": body.get("id", ""), "outputs": outputs})

    return Starlette(routes=[Route("/v2/health/ready", ready), Route("/v2/health/live", ready),
                             Route("/v2/models/{model}/infer", infer, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    app = build_app(args.model_path, args.model_name, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
