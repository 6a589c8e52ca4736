"""Random ModelInferRequest messages, sent with the raw generated stub: every one is answered
OK or with a non-INTERNAL error that says something, and the server keeps serving."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cellserve.server.codec import DATATYPES
from zoo_reference import token_reference

NAMES = st.one_of(st.sampled_from(["tokens", "digits", "probabilities", "label", "reversed", ""]),
                  st.text(max_size=12))
DATATYPE_NAMES = st.one_of(st.sampled_from([*DATATYPES, "BYTES", "", "int64"]), st.text(max_size=6))
SHAPES = st.lists(st.integers(-2, 5), max_size=4)
CONTENT_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(1 << 31), (1 << 31) - 1),
    "int64_contents": st.integers(-(1 << 63), (1 << 63) - 1),
    "uint_contents": st.integers(0, (1 << 32) - 1),
    "uint64_contents": st.integers(0, (1 << 64) - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
}
# sequence ids apart from those other server tests use
PARAM_VALUES = {
    "bool_param": st.booleans(),
    "int64_param": st.one_of(st.integers(-3, 3), st.integers(1_000_000, 1_000_005),
                             st.integers(-(1 << 63), (1 << 63) - 1)),
    "uint64_param": st.one_of(st.integers(0, 3), st.integers(0, (1 << 64) - 1)),
    "string_param": st.one_of(st.sampled_from(["", "fuzz-1", "fuzz-2"]), st.text(max_size=8)),
    "double_param": st.floats(),
}
PARAM_NAMES = st.one_of(st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "priority", "timeout"]),
                        st.text(max_size=8))


MODELS = {"lstm-512": "tokens", "gru-256": "tokens", "bilstm-tagger": "tokens", "seq2seq-reverse": "digits"}
# integer datatypes the engine converts to its INT64 tokens, and their typed contents fields
VALID_TYPES = {"INT64": "int64_contents", "INT32": "int_contents", "INT16": "int_contents",
               "UINT8": "uint_contents"}
MUTATIONS = ["model", "version", "name", "datatype", "shape", "raw", "raw_count", "typed", "parameters",
             "outputs", "another_input", "no_inputs"]


@st.composite
def infer_requests(draw) -> service_pb2.ModelInferRequest:
    """A valid request with 0 to 3 random mutations: near-valid requests reach every check,
    and the unmutated ones are answered OK."""
    model = draw(st.sampled_from(list(MODELS)))
    datatype = draw(st.sampled_from(list(VALID_TYPES)))
    shape = [draw(st.integers(1, 3)), draw(st.integers(1, 6))]
    values = np.array(draw(st.lists(st.integers(3, 12), min_size=math.prod(shape), max_size=math.prod(shape))))
    request = service_pb2.ModelInferRequest(model_name=model, model_version=draw(st.sampled_from(["", "1"])),
                                            id=draw(st.text(max_size=8)))
    tensor = request.inputs.add(name=MODELS[model], datatype=datatype, shape=shape)
    if draw(st.booleans()):
        request.raw_input_contents.append(values.astype(DATATYPES[datatype]).tobytes())
    else:
        getattr(tensor.contents, VALID_TYPES[datatype]).extend(values.tolist())
    if model in ("lstm-512", "gru-256") and draw(st.booleans()):
        request.parameters["sequence_id"].int64_param = draw(st.integers(1_000_000, 1_000_005))
        request.parameters["sequence_start"].bool_param = True

    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "model":
            request.model_name = draw(st.text(max_size=10))
        elif mutation == "version":
            request.model_version = draw(st.sampled_from(["2", "x", "0", "-1", "1 "]))
        elif mutation == "name":
            tensor.name = draw(NAMES)
        elif mutation == "datatype":
            tensor.datatype = draw(DATATYPE_NAMES)
        elif mutation == "shape":
            tensor.ClearField("shape")
            tensor.shape.extend(draw(SHAPES))
        elif mutation == "raw":  # random bytes, usually the wrong length
            request.ClearField("raw_input_contents")
            request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), min_size=1, max_size=2)))
        elif mutation == "raw_count":
            request.raw_input_contents.append(draw(st.binary(max_size=16)))
        elif mutation == "typed":  # any field, any values (possibly beside raw contents)
            field = draw(st.sampled_from(list(CONTENT_FIELDS)))
            getattr(tensor.contents, field).extend(draw(st.lists(CONTENT_FIELDS[field], max_size=12)))
        elif mutation == "parameters":
            for name in draw(st.lists(PARAM_NAMES, min_size=1, max_size=3, unique=True)):
                kind = draw(st.sampled_from([*PARAM_VALUES, None]))  # None: a parameter with no value
                param = request.parameters[name]
                param.Clear()
                if kind is not None:
                    setattr(param, kind, draw(PARAM_VALUES[kind]))
        elif mutation == "outputs":
            for name in draw(st.lists(NAMES, min_size=1, max_size=3)):
                request.outputs.add(name=name)
        elif mutation == "another_input":
            request.inputs.add(name=draw(NAMES), datatype=draw(DATATYPE_NAMES), shape=draw(SHAPES))
            if request.raw_input_contents:
                request.raw_input_contents.append(draw(st.binary(max_size=64)))
        elif mutation == "no_inputs":
            request.ClearField("inputs")
    return request


@pytest.fixture(scope="module")
def stub(zoo_server):
    with grpc.insecure_channel(zoo_server.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=infer_requests())
def test_random_requests_get_a_clear_answer(stub, request):
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or request.parameters, exc  # not a hang
        assert exc.details(), exc


def test_still_serving_after_the_fuzz(stub):
    # runs after the fuzz test (pytest keeps file order)
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
    tokens = np.array([[3, 1, 4, 1, 5]])
    request = service_pb2.ModelInferRequest(model_name="lstm-512", raw_input_contents=[tokens.tobytes()])
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, 5])
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, timeout=30)
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(got, token_reference("lstm-512", tokens)["probabilities"], rtol=1e-4, atol=1e-6)
