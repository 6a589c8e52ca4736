"""Beam search's request parameters through the server: `beam_width` and `return_beams`
reach the engine, the k best come back as the outputs they name, and bad values get a 400
naming the parameter. Against the shared zoo server: its digit reverser is a graph decoder
whose spec allows width 1 only (beam search itself is tested in tests/engine/test_beam_search.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from zoo_reference import digits


def _infer(server, parameters: dict, outputs: list[str] | None = None):
    client = httpclient.InferenceServerClient(server.http)
    x = digits(["307", "125"])
    inp = httpclient.InferInput("digits", list(x.shape), "INT64")
    inp.set_data_from_numpy(x)
    requested = [httpclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer("seq2seq-reverse", [inp], outputs=requested, parameters=parameters)


def test_return_beams_gives_the_k_best_and_their_scores_beside_the_answer(zoo_server):
    plain = _infer(zoo_server, {}).as_numpy("reversed")
    result = _infer(zoo_server, {"beam_width": 1, "return_beams": True},
                    outputs=["reversed", "reversed_beams", "reversed_beam_scores"])
    beams, scores = result.as_numpy("reversed_beams"), result.as_numpy("reversed_beam_scores")
    assert beams.shape[:2] == (2, 1) and scores.shape == (2, 1)
    np.testing.assert_array_equal(result.as_numpy("reversed"), plain)
    np.testing.assert_array_equal(beams[:, 0, :plain.shape[1]], plain)  # width 1: the greedy answer
    assert np.all(np.isfinite(scores)) and np.all(scores <= 0)  # log-probabilities


@pytest.mark.parametrize("outputs", [["reversed_beams"], ["reversed", "reversed_beam_scores"]])
def test_asking_for_the_k_best_by_name_asks_for_them(zoo_server, outputs):
    """An output return_beams adds, asked for by name without return_beams, comes back (it
    was a 500 naming a KeyError, found by a sweep); over gRPC as over HTTP."""
    import tritonclient.grpc as grpcclient

    result = _infer(zoo_server, {}, outputs=outputs)
    got = {name: result.as_numpy(name) for name in outputs}
    with grpcclient.InferenceServerClient(zoo_server.grpc) as client:
        x = digits(["307", "125"])
        inp = grpcclient.InferInput("digits", list(x.shape), "INT64")
        inp.set_data_from_numpy(x)
        answer = client.infer("seq2seq-reverse", [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    for name in outputs:
        np.testing.assert_array_equal(answer.as_numpy(name), got[name])
    if "reversed_beams" in got:
        assert got["reversed_beams"].shape[:2] == (2, 1)
    else:
        assert got["reversed_beam_scores"].shape == (2, 1)


@pytest.mark.parametrize("parameters, message", [
    ({"beam_width": 4}, "'beam_width' 4 exceeds model 'seq2seq-reverse''s max_beam_width 1"),
    ({"beam_width": 0}, "'beam_width' must be an integer >= 1"),
    ({"beam_width": "wide"}, "'beam_width' must be an integer >= 1"),
    ({"return_beams": "yes"}, "'return_beams' must be a boolean"),
])
def test_bad_beam_parameters_get_a_400_naming_them(zoo_server, parameters, message):
    with pytest.raises(InferenceServerException) as err:
        _infer(zoo_server, parameters)
    assert err.value.status() == "400" and message in err.value.message()


def test_beam_parameters_on_a_model_without_a_decoder_are_refused(zoo_server):
    client = httpclient.InferenceServerClient(zoo_server.http)
    inp = httpclient.InferInput("tokens", [1, 3], "INT64")
    inp.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
    with pytest.raises(InferenceServerException) as err:
        client.infer("gru-256", [inp], parameters={"beam_width": 2})
    assert err.value.status() == "400" and "need an encoder-decoder" in err.value.message()
