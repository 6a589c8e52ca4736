"""Runs KServe's SDK in a process of its own and prints what it got, as JSON.

kserve's gRPC stubs and tritonclient's both register the protocol's `inference.*` messages in
protobuf's one descriptor pool, and the second to load fails ("duplicate symbol"). The suite
imports tritonclient everywhere, so the kserve tests drive the SDK from here:
`python kserve_driver.py '{"command": ..., ...}'`.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _request(model: str, tokens: list, binary: bool, **kw) -> InferRequest:
    array = np.asarray(tokens, np.int64)
    tensor = InferInput("tokens", list(array.shape), "INT64")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], **kw)


def _outputs(response) -> dict:
    return {o.name: o.as_numpy().tolist() for o in response.outputs}


async def rest_health(a: dict):
    async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
        return [await client.is_server_live(a["url"]), await client.is_server_ready(a["url"]),
                await client.is_model_ready(a["url"], a["model"]),
                await client.is_model_ready(a["url"], "no-such-model")]


async def rest_infer(a: dict):
    async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
        try:
            response = await client.infer(a["url"], _request(a["model"], a["tokens"], a["binary"],
                                                             request_id=a.get("request_id")),
                                          model_name=a.get("url_model", a["model"]))
        except Exception as exc:  # the caller checks what was raised
            return {"raised": type(exc).__name__, "message": str(exc)}
        return {"model_name": response.model_name, "id": response.id, "outputs": _outputs(response)}


async def grpc(a: dict):
    client = InferenceGRPCClient(a["address"])
    try:
        health = [await client.is_server_live(), await client.is_server_ready(), await client.is_model_ready(a["model"])]
        response = await client.infer(_request(a["model"], a["tokens"], True))
        return {"health": health, "model_name": response.model_name, "outputs": _outputs(response)}
    finally:
        await client.close()


COMMANDS = {f.__name__: f for f in (rest_health, rest_infer, grpc)}

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(COMMANDS[args["command"]](args))))
