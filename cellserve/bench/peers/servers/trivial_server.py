"""A trivial Open Inference Protocol endpoint: answers every inference with the same small
response and no model, so the load generator's own ceiling can be measured against it.
HTTP is a bare ASGI app on uvicorn (httptools, uvloop); gRPC is grpc.aio with the
protocol's generated stubs.

    python trivial_server.py --http-port P --grpc-port Q
"""

import argparse
import asyncio
import json

import grpc
import uvicorn
from tritonclient.grpc import service_pb2, service_pb2_grpc

_ANSWER = json.dumps({"model_name": "trivial", "outputs": [
    {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}]}).encode()
_JSON = [(b"content-type", b"application/json")]


async def http_app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the body
        message = await receive()
        more = message.get("more_body", False)
    body = _ANSWER if scope["method"] == "POST" else b"{}"
    await send({"type": "http.response.start", "status": 200,
                "headers": _JSON + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class TrivialService(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        output = response.outputs.add(name="label", datatype="INT64", shape=[1])
        output.contents.int64_contents.append(0)
        return response


async def main(http_port: int, grpc_port: int) -> None:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(TrivialService(), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    config = uvicorn.Config(http_app, host="127.0.0.1", port=http_port, log_level="warning",
                            access_log=False, http="httptools", loop="none")
    await uvicorn.Server(config).serve()
    await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.run(main(args.http_port, args.grpc_port))
    except ImportError:
        asyncio.run(main(args.http_port, args.grpc_port))
