"""Stateful sequences over HTTP (tritonclient's sequence_id / sequence_start / sequence_end):
a stream sent in chunks answers as the whole sequence would, the state lives between chunks
and is released at the end or after the idle timeout, with a clear error afterwards.

The idle timeout's rules are tested on the SequenceStore with a clock the tests move; the
server test only checks that a real server applies them, waiting on its gauge, not a timer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.server.errors import Overloaded, SequenceError
from cellserve.server.sequences import SequenceStore
from serverproc import metric, start_server, wait_until
from zoo_reference import token_reference


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# ---- the store's rules, on a fake clock ----

KEY = ("gru-256", "1", 7)


def test_an_idle_sequence_is_released_past_its_timeout_not_before():
    clock = FakeClock()
    store = SequenceStore(clock=clock)
    store.get(KEY, start=True, idle_timeout_s=0.5)
    clock.advance(0.5)
    assert store.expire() == 0 and len(store) == 1  # exactly the timeout: still held
    clock.advance(0.001)
    assert store.expire() == 1 and len(store) == 0
    with pytest.raises(SequenceError, match="released after 0.5 s idle; start a new one with sequence_start"):
        store.get(KEY, start=False, idle_timeout_s=0.5)


def test_each_use_restarts_the_idle_time():
    clock = FakeClock()
    store = SequenceStore(clock=clock)
    first = store.get(KEY, start=True, idle_timeout_s=1.0)
    for _ in range(5):  # 4 s in all, never 1 s idle
        clock.advance(0.8)
        assert store.expire() == 0
        assert store.get(KEY, start=False, idle_timeout_s=1.0) is first
    sequence = store.get(KEY, start=False, idle_timeout_s=1.0)
    clock.advance(0.8)
    store.touch(sequence)  # what the core does when a chunk finishes
    clock.advance(0.8)
    assert store.expire() == 0
    clock.advance(0.3)
    assert store.expire() == 1


def test_a_sequence_with_a_chunk_in_flight_is_not_released():
    clock = FakeClock()
    store = SequenceStore(clock=clock)
    sequence = store.get(KEY, start=True, idle_timeout_s=0.5)
    sequence.users = 1  # a chunk holds or awaits its lock
    clock.advance(60)
    assert store.expire() == 0 and store.get(KEY, start=False, idle_timeout_s=0.5) is sequence
    sequence.users = 0
    clock.advance(0.6)
    assert store.expire() == 1


def test_each_sequence_keeps_its_own_timeout():
    clock = FakeClock()
    store = SequenceStore(clock=clock)
    store.get(("a", "1", 1), start=True, idle_timeout_s=1.0)
    store.get(("b", "1", 1), start=True, idle_timeout_s=5.0)
    clock.advance(2.0)
    assert store.expire() == 1
    assert store.count("a") == 0 and store.count("b") == 1
    clock.advance(3.5)
    assert store.expire() == 1 and len(store) == 0


def test_a_sequence_continued_on_another_version_is_told_which_it_runs_on():
    store = SequenceStore(clock=FakeClock())
    store.get(("cls", "1", 10), start=True, idle_timeout_s=5.0)
    with pytest.raises(SequenceError, match="sequence 10 of model 'cls' is not active on version 3: it runs on "
                                            "version 1; send its requests to that version"):
        store.get(("cls", "3", 10), start=False, idle_timeout_s=5.0)
    with pytest.raises(SequenceError, match="sequence 11 of model 'cls' is not active: its first request must set"):
        store.get(("cls", "3", 11), start=False, idle_timeout_s=5.0)


def test_a_released_sequence_starts_again_fresh():
    clock = FakeClock()
    store = SequenceStore(clock=clock)
    old = store.get(KEY, start=True, idle_timeout_s=0.5)
    old.state = {"layer": "h, c"}
    clock.advance(1.0)
    assert store.expire() == 1
    new = store.get(KEY, start=True, idle_timeout_s=0.5)
    assert new is not old and new.state is None
    assert store.get(KEY, start=False, idle_timeout_s=0.5) is new  # active again, no "released" error


def test_the_store_refuses_more_than_max_sequences_until_one_expires():
    clock = FakeClock()
    store = SequenceStore(max_sequences=2, clock=clock)
    store.get(("m", "1", 1), start=True, idle_timeout_s=1.0)
    clock.advance(0.5)
    store.get(("m", "1", 2), start=True, idle_timeout_s=1.0)
    with pytest.raises(Overloaded, match="too many active sequences"):
        store.get(("m", "1", 3), start=True, idle_timeout_s=1.0)
    clock.advance(0.6)  # the first has been idle 1.1 s, the second 0.6 s
    assert store.expire() == 1
    store.get(("m", "1", 3), start=True, idle_timeout_s=1.0)
    assert len(store) == 2


# ---- over HTTP, on the zoo server ----


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


@pytest.mark.slow
def test_the_server_releases_idle_sequences_with_a_clear_error():
    """The server's sweeper applies the idle timeout: once the sequence gauge drops to 0, a
    late chunk is told why, and the sequence may start again from a fresh state."""
    server = start_server("--model", "gru-256", "--grpc-port", "-1", "--sequence-idle-timeout", "0.5")
    try:
        with httpclient.InferenceServerClient(server.http) as client:
            send(client, "gru-256", np.array([[1, 2]]), sequence_id=1, sequence_start=True)
            wait_until(lambda: metric(server, "cellserve_sequences_active", model="gru-256") == 0,
                       "the idle sequence released (cellserve_sequences_active back to 0)")
            with pytest.raises(InferenceServerException) as err:
                send(client, "gru-256", np.array([[4]]), sequence_id=1)
            assert err.value.status() == "400" and "released after 0.5 s idle" in err.value.message()
            # starting it again is allowed, and starts from a fresh state
            got = send(client, "gru-256", np.array([[4]]), sequence_id=1, sequence_start=True)
            np.testing.assert_allclose(got, token_reference("gru-256", np.array([[4]]))["probabilities"],
                                       rtol=1e-4, atol=1e-6)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_config_tells_which_models_take_sequences_and_their_idle_timeout(zoo_server, protocol):
    import tritonclient.grpc as grpcclient

    if protocol == "grpc":
        with grpcclient.InferenceServerClient(zoo_server.grpc) as c:
            configs = {m: c.get_model_config(m, as_json=True)["config"] for m in ("gru-256", "bilstm-tagger")}
    else:
        with httpclient.InferenceServerClient(zoo_server.http) as c:
            configs = {m: c.get_model_config(m) for m in ("gru-256", "bilstm-tagger")}
    # the zoo server runs with --sequence-idle-timeout 30
    assert configs["gru-256"]["sequence_batching"] == {"max_sequence_idle_microseconds": "30000000"}
    assert "sequence_batching" not in configs["bilstm-tagger"]  # runs backwards: refuses sequence_id
