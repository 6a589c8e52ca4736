"""Triton's classification extension (server/classification.py), with tritonclient's
`class_count` over HTTP (JSON and binary outputs) and gRPC on the zoo server: each row's top
K classes as "value:index", largest first, as the model's own probabilities rank them; K past
the number of classes gives them all; bad requests are refused naming what is wrong. Labels
from a repository config's label_filename: tests/server/test_repository.py."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.server.classification import top_classes
from zoo_reference import token_reference

TOKENS = np.random.default_rng(5).integers(1, 5000, (3, 9)).astype(np.int64)


def classify(zoo_server, protocol: str, model: str, output: str, k: int, tokens=TOKENS) -> np.ndarray:
    """The output as classified by the server: a [rows, K] array of strings."""
    if protocol == "grpc":
        with grpcclient.InferenceServerClient(zoo_server.grpc) as client:
            tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
            tensor.set_data_from_numpy(tokens)
            result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(output, class_count=k)])
    else:
        with httpclient.InferenceServerClient(zoo_server.http) as client:
            tensor = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
            tensor.set_data_from_numpy(tokens, binary_data=protocol == "http-binary")
            asked = httpclient.InferRequestedOutput(output, binary_data=protocol == "http-binary", class_count=k)
            result = client.infer(model, [tensor], outputs=[asked])
    described = result.get_output(output)
    assert (described.datatype if protocol == "grpc" else described["datatype"]) == "BYTES"
    found = result.as_numpy(output)
    return np.vectorize(lambda s: s.decode() if isinstance(s, bytes) else s)(found)


@pytest.mark.parametrize("protocol", ["http-json", "http-binary", "grpc"])
def test_each_row_s_top_classes_as_the_model_ranks_them(zoo_server, protocol):
    probabilities = token_reference("lstm-512", TOKENS)["probabilities"]
    top = classify(zoo_server, protocol, "lstm-512", "probabilities", 2)
    assert top.shape == (3, 2)
    for row, classes in zip(probabilities, top):
        values, indices = zip(*[(float(c.split(":")[0]), int(c.split(":")[1])) for c in classes])
        assert list(indices) == np.argsort(-row, kind="stable")[:2].tolist()
        np.testing.assert_allclose(values, row[list(indices)], atol=2e-6)  # six decimals, as Triton writes
        assert all(len(c.split(":")[0].split(".")[1]) == 6 for c in classes)


def test_more_classes_than_the_model_has_gives_them_all(zoo_server):
    classes = token_reference("lstm-512", TOKENS)["probabilities"].shape[-1]
    top = classify(zoo_server, "http-json", "lstm-512", "probabilities", 10 * classes)
    assert top.shape == (3, classes)
    assert sorted(int(c.split(":")[1]) for c in top[0]) == list(range(classes))


@pytest.mark.parametrize("protocol", ["http-json", "grpc"])
def test_a_bad_class_count_is_refused_naming_it(zoo_server, protocol):
    if protocol == "grpc":
        with grpcclient.InferenceServerClient(zoo_server.grpc) as client:
            tensor = grpcclient.InferInput("tokens", [1, 2], "INT64")
            tensor.set_data_from_numpy(np.array([[1, 2]], np.int64))
            asked = grpcclient.InferRequestedOutput("probabilities")
            asked._output.parameters["classification"].string_param = "two"
            with pytest.raises(InferenceServerException) as err:
                client.infer("lstm-512", [tensor], outputs=[asked])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    else:
        with httpclient.InferenceServerClient(zoo_server.http) as client:
            tensor = httpclient.InferInput("tokens", [1, 2], "INT64")
            tensor.set_data_from_numpy(np.array([[1, 2]], np.int64), binary_data=False)
            asked = httpclient.InferRequestedOutput("probabilities", binary_data=False)
            asked._parameters["classification"] = 0
            with pytest.raises(InferenceServerException) as err:
                client.infer("lstm-512", [tensor], outputs=[asked])
        assert err.value.status() == "400"
    assert "output 'probabilities': parameter 'classification' must be an integer >= 1" in err.value.message()


def test_classification_on_an_input_is_refused(zoo_server):
    with httpclient.InferenceServerClient(zoo_server.http) as client:
        tensor = httpclient.InferInput("tokens", [1, 2], "INT64")
        tensor.set_data_from_numpy(np.array([[1, 2]], np.int64), binary_data=False)
        tensor._parameters["classification"] = 2
        with pytest.raises(InferenceServerException) as err:
            client.infer("lstm-512", [tensor])
    assert err.value.status() == "400"
    assert "input 'tokens': parameter 'classification' belongs to a requested output" in err.value.message()


def test_top_classes_ties_labels_and_integers():
    values = np.array([[0.5, 0.25, 0.5, 0.125]], np.float32)
    assert top_classes(values, 3).tolist() == [[b"0.500000:0", b"0.500000:2", b"0.250000:1"]]
    assert top_classes(values, 2, ["a", "b", "c"]).tolist() == [[b"0.500000:0:a", b"0.500000:2:c"]]
    assert top_classes(np.array([3, 9, 1], np.int64), 2).tolist() == [b"9:1", b"3:0"]
    assert top_classes(np.zeros((2, 3, 4)), 1).shape == (2, 3, 1)  # the last axis is the classes'
