"""Triton Python-backend model: the exported ONNX graph run by ONNX Runtime, one run per batch
that Triton's dynamic batcher hands over. Copied into the model repository as
`<model>/1/model.py`; self-contained (numpy, onnxruntime, Triton's own `triton_python_backend_utils`).

Config parameters: `onnx_path` (the graph) and `threads` (ONNX Runtime's intra-op threads).
Each request carries `tokens` INT64 [n, T] (padded by the client to a length bucket) and
`lengths` INT32 [n, 1]; it gets `probabilities` FP32 [n, classes] and `label` INT64 [n].
"""

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["threads"]["string_value"])
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(params["onnx_path"]["string_value"], options,
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests):
        tokens = [pb_utils.get_input_tensor_by_name(r, "tokens").as_numpy() for r in requests]
        lengths = [pb_utils.get_input_tensor_by_name(r, "lengths").as_numpy().reshape(-1) for r in requests]
        # With allow_ragged_batch the dynamic batcher joins different buckets: pad to the
        # longest. Padding never changes an answer (the graph reads each row's state at its
        # own length).
        width = max(t.shape[1] for t in tokens)
        batch = np.zeros((sum(t.shape[0] for t in tokens), width), dtype=np.int64)
        row = 0
        for t in tokens:
            batch[row:row + t.shape[0], :t.shape[1]] = t
            row += t.shape[0]
        probabilities, label = self.session.run(
            None, {"tokens": batch, "lengths": np.concatenate(lengths).astype(np.int32)})
        responses, row = [], 0
        for t in tokens:
            rows = slice(row, row + t.shape[0])
            row += t.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("probabilities", probabilities[rows].copy()),
                pb_utils.Tensor("label", label[rows].astype(np.int64))]))
        return responses
