"""TorchServe custom handler: the exported classifier on ONNX Runtime, one run per batch.

TorchServe's frontend routes POST /v2/models/{name}/infer (Open Inference Protocol) to this
handler and batches requests itself (batch_size, max_batch_delay). Its own `kservev2`
envelope reads only the first request of a batch, so this handler parses each request's
OIP JSON itself: it pads the batch's token rows with id 0 to the longest, runs the graph once
with the true lengths, and answers each request with its own row.

Self-contained (numpy, onnxruntime); the archive carries it with the ONNX file (its
serialized file) and `settings.json` ({"threads": N}).
"""

import json
import os

import numpy as np
import onnxruntime as ort


class OnnxClassifierHandler:
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "settings.json")) as f:
            settings = json.load(f)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(settings["threads"])
        options.inter_op_num_threads = 1
        onnx_file = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        self.session = ort.InferenceSession(onnx_file, options,
                                            providers=["CPUExecutionProvider"])
        self.model_name = context.manifest["model"]["modelName"]

    @staticmethod
    def _parse(request):
        """One request's OIP body -> (id, tokens [T] int64, true length)."""
        body = request.get("body") if request.get("body") is not None else request.get("data")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body.decode("utf-8"))
        inputs = {t["name"]: t for t in body["inputs"]}
        tokens = np.asarray(inputs["tokens"]["data"], dtype=np.int64).reshape(-1)
        length = int(np.asarray(inputs["lengths"]["data"]).reshape(-1)[0]) if "lengths" in inputs else tokens.size
        return body.get("id", ""), tokens, length

    def handle(self, data, context):
        replies = [None] * len(data)
        parsed = []  # (index in batch, id, tokens, length)
        for i, request in enumerate(data):
            try:
                parsed.append((i, *self._parse(request)))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                context.set_response_status(400, "Bad Request", idx=i)
                replies[i] = {"error": f"bad request: {exc}"}
        if parsed:
            tokens = np.zeros((len(parsed), max(p[2].size for p in parsed)), dtype=np.int64)
            for row, (_, _, t, _) in enumerate(parsed):
                tokens[row, :t.size] = t
            lengths = np.array([p[3] for p in parsed], dtype=np.int32)
            probabilities, labels = self.session.run(None, {"tokens": tokens, "lengths": lengths})
            for row, (i, request_id, _, _) in enumerate(parsed):
                replies[i] = {
                    "model_name": self.model_name, "id": request_id,
                    "outputs": [
                        {"name": "probabilities", "datatype": "FP32", "shape": [1, probabilities.shape[1]],
                         "data": probabilities[row].tolist()},
                        {"name": "label", "datatype": "INT64", "shape": [1], "data": [int(labels[row])]},
                    ],
                }
        return replies
