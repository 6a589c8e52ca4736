"""Stateful sequences over HTTP (tritonclient's sequence_id / sequence_start / sequence_end):
a stream sent in chunks answers as the whole sequence would, the state lives between chunks
and is released at the end or after the idle timeout, with a clear error afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serverproc import start_server
from zoo_reference import token_reference


@pytest.fixture(scope="module")
def client(zoo_server):
    with httpclient.InferenceServerClient(zoo_server.http) as c:
        yield c


def send(client, model, tokens, **kw):
    tensor = httpclient.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens)
    return client.infer(model, [tensor], **kw).as_numpy("probabilities")


def stream(client, model, tokens, cuts, sequence_id):
    bounds = [0, *cuts, tokens.shape[1]]
    answers = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        answers.append(send(client, model, tokens[:, a:b], sequence_id=sequence_id, sequence_start=i == 0,
                            sequence_end=b == tokens.shape[1]))
    return answers


@pytest.mark.parametrize("model,sequence_id", [("lstm-512", 101), ("gru-256", "user-7/stream-1")])
def test_chunks_answer_as_the_whole_sequence(client, model, sequence_id):
    tokens = np.random.default_rng(3).integers(0, 10000, (1, 23))
    answers = stream(client, model, tokens, [5, 6, 15], sequence_id)
    for end, got in zip([5, 6, 15, 23], answers):  # each chunk answers for the prefix so far
        np.testing.assert_allclose(got, token_reference(model, tokens[:, :end])["probabilities"],
                                   rtol=1e-4, atol=1e-6)


def test_many_concurrent_sequences_share_the_batch(zoo_server):
    rng = np.random.default_rng(4)
    streams = {1000 + i: rng.integers(0, 10000, (1, int(rng.integers(4, 30)))) for i in range(24)}
    cuts = {i: sorted(set(rng.integers(1, t.shape[1], 3).tolist())) for i, t in streams.items()}

    def run(item):
        sequence_id, tokens = item
        with httpclient.InferenceServerClient(zoo_server.http) as client:  # one per thread: not thread-safe
            return sequence_id, stream(client, "gru-256", tokens, cuts[sequence_id], sequence_id)[-1]

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(run, streams.items()))
    for sequence_id, tokens in streams.items():
        np.testing.assert_allclose(results[sequence_id], token_reference("gru-256", tokens)["probabilities"],
                                   rtol=1e-4, atol=1e-6, err_msg=f"sequence {sequence_id}")


def test_a_failed_chunk_leaves_the_state_as_it_was(client):
    tokens = np.random.default_rng(5).integers(0, 10000, (1, 12))
    send(client, "lstm-512", tokens[:, :4], sequence_id=201, sequence_start=True)
    with pytest.raises(InferenceServerException) as err:
        send(client, "lstm-512", np.array([[1, 99999]]), sequence_id=201)
    assert err.value.status() == "400" and "out of range" in err.value.message()
    got = send(client, "lstm-512", tokens[:, 4:], sequence_id=201, sequence_end=True)
    np.testing.assert_allclose(got, token_reference("lstm-512", tokens)["probabilities"], rtol=1e-4, atol=1e-6)


def test_after_sequence_end_the_state_is_gone(client):
    send(client, "gru-256", np.array([[1, 2, 3]]), sequence_id=301, sequence_start=True, sequence_end=True)
    with pytest.raises(InferenceServerException) as err:
        send(client, "gru-256", np.array([[4]]), sequence_id=301)
    assert err.value.status() == "400" and "ended by sequence_end" in err.value.message()


def test_a_sequence_never_started_is_an_error(client):
    with pytest.raises(InferenceServerException) as err:
        send(client, "gru-256", np.array([[4]]), sequence_id=999_999)
    assert err.value.status() == "400" and "not active" in err.value.message()


def test_models_that_need_the_whole_input_refuse_sequences(client):
    with pytest.raises(InferenceServerException) as err:
        send(client, "bilstm-tagger", np.array([[4, 5]]), sequence_id=5, sequence_start=True)
    assert err.value.status() == "400" and "backwards" in err.value.message()


def test_idle_sequences_are_released_with_a_clear_error():
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--sequence-idle-timeout", "0.5")
    try:
        with httpclient.InferenceServerClient(server.http) as client:
            send(client, "gru-256", np.array([[1, 2]]), sequence_id=1, sequence_start=True)
            send(client, "gru-256", np.array([[3]]), sequence_id=1)  # in time: goes on
            time.sleep(1.6)
            with pytest.raises(InferenceServerException) as err:
                send(client, "gru-256", np.array([[4]]), sequence_id=1)
            assert err.value.status() == "400" and "released after 0.5 s idle" in err.value.message()
            # starting it again is allowed, and starts from a fresh state
            got = send(client, "gru-256", np.array([[4]]), sequence_id=1, sequence_start=True)
            np.testing.assert_allclose(got, token_reference("gru-256", np.array([[4]]))["probabilities"],
                                       rtol=1e-4, atol=1e-6)
    finally:
        assert server.stop() == 0
