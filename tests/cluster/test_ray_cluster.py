"""`cellserve serve --ray ADDRESS` on a real multi-node Ray cluster on this machine
(ray.cluster_utils.Cluster: a head and two more nodes of one core each, one worker per node),
with real clients (tritonclient): the same answers, errors and sequences as a plain server,
metrics per worker and node; then faults under load: a worker killed and a node removed,
every request answered exactly once, a sequence whose state died told so by name.

One cluster and one server for the whole module (starting them takes most of its time); the
fault test runs last and leaves one worker alive."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ray_utils = pytest.importorskip("ray.cluster_utils")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from serverproc import scrape, start_server, wait_until  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402
from zoo_reference import token_reference  # noqa: E402

pytestmark = pytest.mark.slow
WORKER_LINE = re.compile(r"cellserve: ray: worker (w\d) \(node (\w+)\), pid (\d+): (.*)")


@pytest.fixture(scope="module")
def cluster():
    c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()


@pytest.fixture(scope="module")
def server(cluster):
    c, _ = cluster
    s = start_server("--ray", c.address, "--ray-workers", "3", "--model", "lstm-512", "--model", "gru-256",
                     "--sequence-idle-timeout", "60", timeout=240)
    s.workers = {m.group(1): (m.group(2), int(m.group(3))) for m in map(WORKER_LINE.search, s.lines) if m}
    yield s
    s.stop()


def death_lines(server) -> list[str]:
    return [line for line in server.lines if re.match(r"cellserve: ray: worker \S+ \(node \S+\) died: ", line)]


def tokens_input(module, tokens):
    tensor = module.InferInput("tokens", list(tokens.shape), "INT64")
    tensor.set_data_from_numpy(tokens)
    return tensor


def test_three_workers_one_per_node(server, cluster):
    c, nodes = cluster
    assert sorted(server.workers) == ["w0", "w1", "w2"]
    node_ids = {n.node_id[:12] for n in [c.head_node, *nodes]}
    assert {node for node, _ in server.workers.values()} == node_ids  # SPREAD: each worker on its own node


def test_answers_over_http_and_grpc_are_the_models(server):
    tokens = np.random.default_rng(1).integers(0, 10000, (2, 17))
    with httpclient.InferenceServerClient(server.http) as client:
        got = client.infer("lstm-512", [tokens_input(httpclient, tokens)]).as_numpy("probabilities")
    np.testing.assert_allclose(got, token_reference("lstm-512", tokens)["probabilities"], rtol=1e-4, atol=1e-6)
    client = grpcclient.InferenceServerClient(server.grpc)
    got = client.infer("gru-256", [tokens_input(grpcclient, tokens)]).as_numpy("probabilities")
    np.testing.assert_allclose(got, token_reference("gru-256", tokens)["probabilities"], rtol=1e-4, atol=1e-6)
    assert client.is_server_ready() and client.get_model_metadata("gru-256").name == "gru-256"


def test_statistics_count_the_drivers_answers_and_the_workers_steps(server):
    tokens = np.random.default_rng(4).integers(0, 10000, (3, 9))
    with httpclient.InferenceServerClient(server.http) as client:
        client.infer("gru-256", [tokens_input(httpclient, tokens)])

        def stats():
            (found,) = client.get_inference_statistics("gru-256")["model_stats"]
            return found
        assert stats()["inference_stats"]["success"]["count"] >= 1 and stats()["inference_count"] >= 3
        # the workers' step counts reach the driver with its poll (twice a second)
        wait_until(lambda: stats()["execution_count"] >= 9, "the workers' steps in the statistics", poll=0.1)


def test_errors_are_a_plain_servers(server):
    with httpclient.InferenceServerClient(server.http) as client:
        with pytest.raises(InferenceServerException) as err:
            client.infer("nope", [tokens_input(httpclient, np.zeros((1, 3), np.int64))])
        assert err.value.status() == "404" and "unknown model 'nope'" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            client.infer("lstm-512", [tokens_input(httpclient, np.array([[1, 99999]]))])
        assert err.value.status() == "400" and "out of range" in err.value.message()


def send(client, tokens, **kw):
    return client.infer("lstm-512", [tokens_input(httpclient, tokens)], **kw).as_numpy("probabilities")


def holders(server) -> dict[str, int]:
    """worker -> sequence states it holds, from the metrics."""
    found = re.findall(r'cellserve_worker_sequences\{node="\w+",worker="(w\d)"\} (\S+)', scrape(server))
    return {w: int(float(n)) for w, n in found}


def test_a_sequence_streams_on_the_worker_holding_its_state(server):
    tokens = np.random.default_rng(2).integers(0, 10000, (1, 20))
    with httpclient.InferenceServerClient(server.http) as client:
        send(client, tokens[:, :7], sequence_id=11, sequence_start=True)
        # the driver polls the workers' counters (twice a second): wait until it has seen the state
        wait_until(lambda: sum(holders(server).values()) >= 1, "a worker reported holding the state", poll=0.1)
        held = {w: n for w, n in holders(server).items() if n}
        assert list(held.values()) == [1]  # on exactly one worker
        send(client, tokens[:, 7:12], sequence_id=11)
        got = send(client, tokens[:, 12:], sequence_id=11, sequence_end=True)
        # every state the chunks left there (each keeps its own until the next) goes at the end
        wait_until(lambda: sum(holders(server).values()) == 0, "the worker let the states go", poll=0.1)
    np.testing.assert_allclose(got, token_reference("lstm-512", tokens)["probabilities"], rtol=1e-4, atol=1e-6)


def test_metrics_are_labelled_by_worker_and_node(server):
    text = scrape(server)
    for w, (node, _) in server.workers.items():
        assert re.search(rf'cellserve_worker_up\{{node="{node}\w*",worker="{w}"\}} 1.0', text), w
    assert re.search(r'cellserve_cell_steps_total\{cell_type="lstm-512:1/[^"]+",node="\w+",worker="w\d"\} [1-9]',
                     text)
    assert 'cellserve_inference_request_success_total{model="lstm-512",version="1"}' in text


def test_a_worker_and_a_node_die_under_load_and_every_request_gets_one_answer(server, cluster):
    c, nodes = cluster
    rng = np.random.default_rng(3)
    seq_tokens = rng.integers(0, 10000, (1, 12))
    with httpclient.InferenceServerClient(server.http) as client:
        send(client, seq_tokens[:, :4], sequence_id="doomed", sequence_start=True)
    wait_until(lambda: any(holders(server).values()), "a worker reported holding the state", poll=0.1)
    holder = next(w for w, n in holders(server).items() if n)
    answers: list[tuple[int, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def answered() -> int:
        with lock:
            return len(answers)

    def more_answers(n: int, what: str) -> None:
        """Wait for n more answers: the faults come under load, judged by answers, not seconds."""
        target = answered() + n
        wait_until(lambda: answered() >= target, what, timeout=180, poll=0.05)

    def load(k: int) -> None:
        r = np.random.default_rng(100 + k)
        with httpclient.InferenceServerClient(server.http) as client:
            i = 0
            while not stop.is_set():
                x = r.integers(0, 10000, (1, int(r.integers(5, 40))))
                try:
                    out = send(client, x)
                    ok = np.allclose(out, token_reference("lstm-512", x)["probabilities"], rtol=1e-4, atol=1e-6)
                    result = "ok" if ok else "wrong"
                except InferenceServerException as exc:
                    result = f"{exc.status()} {exc.message()}"
                with lock:
                    answers.append((k * 100000 + i, result))
                i += 1

    with ThreadPoolExecutor(6) as pool:
        running = [pool.submit(load, k) for k in range(6)]
        try:
            more_answers(30, "30 answers under load before the kill")
            os.kill(server.workers[holder][1], signal.SIGKILL)  # the worker holding the sequence's state
            more_answers(30, "30 answers after the worker was killed")
            holder_node = server.workers[holder][0]
            doomed = next(n for n in nodes if n.node_id[:12] != holder_node)  # a node with a live worker
            c.remove_node(doomed, allow_graceful=False)
            more_answers(30, "30 answers after the node was removed")
        finally:
            stop.set()
            for f in running:
                f.result()
    ids = [i for i, _ in answers]
    assert len(ids) == len(set(ids)) and len(ids) > 20  # one answer per request, and a real load
    failures = [r for _, r in answers if r != "ok"]
    assert failures == [], failures[:5]
    # the driver marks a worker down when a call or its counters' poll (twice a second) fails
    wait_until(lambda: len(re.findall(r"cellserve_worker_up\{[^}]*\} 0.0", scrape(server))) >= 2,
               "the driver to mark both dead workers down", poll=0.1)
    text = scrape(server)
    assert len(re.findall(r"cellserve_worker_up\{[^}]*\} 0.0", text)) == 2
    dead = re.findall(r'cellserve_worker_up\{node="\w+",worker="(w\d)"\} 0.0', text)
    for worker in dead:  # what a dead worker held went with it: its gauges say so
        assert re.search(rf'cellserve_worker_active_requests\{{node="\w+",worker="{worker}"\}} 0.0', text), worker
        assert re.search(rf'cellserve_worker_sequences\{{node="\w+",worker="{worker}"\}} 0.0', text), worker
    # each death logged once, whoever found it (a call, its socket, the poll)
    wait_until(lambda: len(death_lines(server)) >= 2, "both deaths in the log", poll=0.1)
    assert len(death_lines(server)) == 2, death_lines(server)
    retries = float(re.search(r"^cellserve_cluster_retries_total (\S+)", text, re.M).group(1))
    success = float(re.search(r'cellserve_inference_request_success_total\{model="lstm-512",version="1"\} (\S+)',
                              text).group(1))
    assert success >= len(answers)  # every load request was answered by a worker, retried or not
    # six clients keep requests in flight on every worker: the kill catches some of them
    assert retries >= 1, f"{len(answers)} requests, none in flight on the dead workers"
    with httpclient.InferenceServerClient(server.http) as client:
        with pytest.raises(InferenceServerException) as err:
            send(client, seq_tokens[:, 4:], sequence_id="doomed")
    assert err.value.status() == "400"
    assert f"sequence 'doomed' of model 'lstm-512' was lost when worker {holder}" in err.value.message()
