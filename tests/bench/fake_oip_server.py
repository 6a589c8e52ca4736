"""A fake Open Inference Protocol server with known behaviour, for testing the load
generator's statistics: each request to .../infer is answered after `--ms-per-token` times
its token count milliseconds (concurrently, so nothing queues), and by its first token id:
1 -> 429 (rejected), 2 -> 500 (error), 3 -> 504 (dropped), anything else -> 200. Any other
request (a health check) is answered 200 after `--health-ms`."""

import argparse
import asyncio
import json

import uvicorn

_STATUS = {1: 429, 2: 500, 3: 504}


def make_app(ms_per_token: float, health_ms: float = 0.0):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        status, answer = 200, {"ready": True}
        if scope["method"] != "POST":
            await asyncio.sleep(health_ms / 1e3)
        else:
            tokens = json.loads(body)["inputs"][0]["data"]
            await asyncio.sleep(ms_per_token * len(tokens) / 1e3)
            status = _STATUS.get(tokens[0], 200)
            answer = ({"model_name": "fake", "outputs": [{"name": "n", "datatype": "INT64", "shape": [1],
                                                          "data": [len(tokens)]}]}
                      if status == 200 else {"error": f"fake status {status}"})
        payload = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ms-per-token", type=float, default=1.0)
    parser.add_argument("--health-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(make_app(args.ms_per_token, args.health_ms), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)
