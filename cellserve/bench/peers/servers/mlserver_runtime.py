"""An MLServer custom runtime that serves the exported ONNX classifier with ONNX Runtime.
Self-contained (mlserver, numpy, onnxruntime): the MLServer peer copies it next to
model-settings.json, whose `parameters.extra` holds `onnx_path`, `threads` and `buckets`.

MLServer's adaptive batcher merges requests by concatenating their flat `data` lists and
keeping the first request's shape with the batch sizes summed, so a merged batch whose rows
were padded to different buckets arrives with a shape that does not match its data. Each
row's width is recovered from its `lengths` entry (clients pad to the smallest bucket that
holds the sentence), and the rows are padded again here to the batch's widest.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


def _flat(request_input, dtype) -> np.ndarray:
    data = getattr(request_input.data, "root", request_input.data)
    return np.asarray(data, dtype=dtype).reshape(-1)


def _bucket(length: int, buckets: list) -> int:
    return next((b for b in buckets if b >= length), length)


def batch_rows(tokens: np.ndarray, shape: list, lengths, buckets: list):
    """Flat merged `tokens` -> (tokens int64 [n, T], lengths int32 [n])."""
    n = shape[0]
    if lengths is None:  # no lengths: every row is full, so all must share the first's width
        if tokens.size != n * shape[1]:
            raise MLServerError("requests of different lengths need a `lengths` input", status_code=400)
        return tokens.reshape(n, -1), np.full(n, shape[1], dtype=np.int32)
    if lengths.size != n:
        raise MLServerError(f"`lengths` has {lengths.size} entries for {n} rows", status_code=400)
    for widths in ([_bucket(int(x), buckets) for x in lengths], lengths.tolist(), [shape[1]] * n):
        if sum(widths) == tokens.size:
            break
    else:
        raise MLServerError("tokens do not split into rows padded to their buckets", status_code=400)
    batch = np.zeros((n, max(widths)), dtype=np.int64)  # pad id 0; `lengths` keeps it out
    start = 0
    for i, width in enumerate(widths):
        batch[i, :width] = tokens[start:start + width]
        start += width
    return batch, lengths.astype(np.int32)


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra["threads"])
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(extra["onnx_path"], options, providers=["CPUExecutionProvider"])
        self._buckets = sorted(int(b) for b in extra["buckets"])
        # One ORT run at a time, off the event loop, so it keeps taking requests and filling
        # the next batch meanwhile (the batcher starts each batch's predict() as its own task).
        self._runner = ThreadPoolExecutor(max_workers=1)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: i for i in payload.inputs}
        if "tokens" not in inputs:
            raise MLServerError("input `tokens` is missing", status_code=400)
        lengths = _flat(inputs["lengths"], np.int32) if "lengths" in inputs else None
        tokens, lengths = batch_rows(_flat(inputs["tokens"], np.int64), inputs["tokens"].shape,
                                     lengths, self._buckets)
        feeds = {"tokens": tokens, "lengths": lengths}
        probabilities, label = await asyncio.get_running_loop().run_in_executor(
            self._runner, self._session.run, None, feeds)
        # Built by hand, not with NumpyCodec: it would give `label` a [n, 1] shape.
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
            ResponseOutput(name="probabilities", datatype="FP32", shape=list(probabilities.shape),
                           data=probabilities.reshape(-1).tolist()),
            ResponseOutput(name="label", datatype="INT64", shape=[label.shape[0]], data=label.tolist()),
        ])
