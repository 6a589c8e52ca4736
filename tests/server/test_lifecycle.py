"""The server's lifecycle, on real processes: SIGTERM/SIGINT with requests in flight (each one
answered, nothing new accepted, exit 0), and start-up failures (exit non-zero with one line on
stderr naming the problem).

Most start-up failures run in this process through cli.main, the entry point the `cellserve`
script runs (a process would spend seconds importing to fail at once); a garbage model file and
the ports in use fail in a real process (a gRPC port that cannot be bound ends the process).

The requests in flight must outlast the checks made while they run, on a fast machine as on
a loaded one: their length is sized to the machine (serverproc.sized_shape), not fixed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

import serverproc
from serverproc import ServerProcess, arrived, sized_shape, start_server, wait_until

# each test marked slow starts `cellserve serve` (requests in flight, or a start-up failure); the
# start-up failures run in this process are not

MODEL = "lstm-512"
LONG = (4, 500)  # 4 sentences (more on a fast machine) of 500 tokens: seconds of work when 20 run at once


# ---- requests in flight ----

class InFlight:
    """Requests sent from threads (each its own client and connection); what each got back."""

    def __init__(self, server: ServerProcess, n_http: int, n_grpc: int, shape: tuple[int, int]):
        self.server, self.shape = server, shape
        self.results: list[tuple] = [None] * (n_http + n_grpc)
        self.threads = [threading.Thread(target=self._http if i < n_http else self._grpc, args=(i,), daemon=True)
                        for i in range(n_http + n_grpc)]
        for thread in self.threads:
            thread.start()

    def _tokens(self, i: int) -> np.ndarray:
        return np.random.default_rng(i).integers(1, 10000, self.shape).astype(np.int64)

    def _http(self, i: int) -> None:
        try:
            with httpclient.InferenceServerClient(self.server.http, network_timeout=120) as client:
                tensor = httpclient.InferInput("tokens", list(self.shape), "INT64")
                tensor.set_data_from_numpy(self._tokens(i), binary_data=True)
                result = client.infer(MODEL, [tensor])
                self.results[i] = ("ok", result.as_numpy("label").shape)
        except InferenceServerException as exc:
            self.results[i] = ("error", str(exc.status()), exc.message())
        except Exception as exc:  # noqa: BLE001 - a reset connection, a timeout: what the test must not see
            self.results[i] = ("exception", repr(exc))

    def _grpc(self, i: int) -> None:
        try:
            with grpcclient.InferenceServerClient(self.server.grpc) as client:
                tensor = grpcclient.InferInput("tokens", list(self.shape), "INT64")
                tensor.set_data_from_numpy(self._tokens(i))
                result = client.infer(MODEL, [tensor], client_timeout=120)
                self.results[i] = ("ok", result.as_numpy("label").shape)
        except InferenceServerException as exc:
            self.results[i] = ("error", str(exc.status()), exc.message())
        except Exception as exc:  # noqa: BLE001
            self.results[i] = ("exception", repr(exc))

    def join(self, timeout: float) -> list[tuple]:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(end - time.monotonic(), 0))
        hung = [i for i, t in enumerate(self.threads) if t.is_alive()]
        assert not hung, f"requests {hung} got no answer within {timeout} s"
        return self.results


def send_in_flight(server: ServerProcess, n_http: int, n_grpc: int, shape: tuple[int, int]) -> InFlight:
    """InFlight, returned once all its requests reached the server."""
    before = arrived(server, MODEL)
    flight = InFlight(server, n_http, n_grpc, shape)
    wait_until(lambda: arrived(server, MODEL) >= before + n_http + n_grpc,
               f"{n_http + n_grpc} requests at the server")
    return flight


def http_ready(server: ServerProcess) -> bool | str:
    try:
        with urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 200
    except OSError as exc:
        return f"refused: {exc!r}"


def new_http_request(server: ServerProcess) -> tuple:
    try:
        with httpclient.InferenceServerClient(server.http, network_timeout=30) as client:
            tensor = httpclient.InferInput("tokens", [1, 3], "INT64")
            tensor.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
            client.infer(MODEL, [tensor])
            return ("ok",)
    except InferenceServerException as exc:
        return ("error", str(exc.status()), exc.message())
    except ConnectionRefusedError as exc:
        return ("refused", repr(exc))


def new_grpc_request(server: ServerProcess) -> tuple:
    try:
        with grpcclient.InferenceServerClient(server.grpc) as client:
            tensor = grpcclient.InferInput("tokens", [1, 3], "INT64")
            tensor.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
            client.infer(MODEL, [tensor], client_timeout=30)
            return ("ok",)
    except InferenceServerException as exc:
        return ("error", str(exc.status()), exc.message())


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones():
    # a grace period no loaded machine runs out of: on CI's, with its suite beside it, the 30 s
    # default did, and the engine rightly answered the unfinished requests 503
    server = start_server("--model", MODEL, "--grace-period", "600")
    try:
        # 20 of 0.25 s or more each: seconds in all, to outlast the checks below
        shape = sized_shape(server, MODEL, LONG, alone_s=0.25)
        flight = send_in_flight(server, n_http=14, n_grpc=6, shape=shape)
        server.proc.send_signal(signal.SIGTERM)

        # readiness turns false (503, then the listener closes); measured 0.5-0.8 s after the
        # signal on 2 loaded cores: the handler runs in the main thread, between engine steps
        wait_until(lambda: http_ready(server) is not True, "readiness false after SIGTERM")
        # new work is refused, over either protocol, while the old is still running
        got = new_http_request(server)
        assert got[0] == "refused" or got[:2] == ("error", "503"), got
        got = new_grpc_request(server)
        assert got[:2] == ("error", "StatusCode.UNAVAILABLE"), got
        assert any(t.is_alive() for t in flight.threads), "the requests finished before the checks: make them longer"

        results = flight.join(timeout=300)
        assert results == [("ok", (shape[0],))] * 20, results
        assert server.stop(timeout=30) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert "cellserve: SIGTERM: stopping" in server.output() and "cellserve: stopped" in server.output()
    assert "Traceback" not in server.output(), server.output()


@pytest.mark.slow
def test_sigint_exits_0_after_requests_in_flight():
    server = start_server("--model", MODEL, "--grace-period", "600")  # as above: not what is tested
    try:
        shape = sized_shape(server, MODEL, LONG, alone_s=0.5)
        flight = send_in_flight(server, n_http=2, n_grpc=1, shape=shape)
        server.proc.send_signal(signal.SIGINT)
        assert flight.join(timeout=300) == [("ok", (shape[0],))] * 3
        assert server.stop(timeout=30) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert "SIGINT: stopping" in server.output() and "Traceback" not in server.output(), server.output()


@pytest.mark.slow
def test_requests_cut_off_by_the_grace_period_get_503():
    server = start_server("--model", MODEL, "--grace-period", "0")
    try:
        flight = send_in_flight(server, n_http=16, n_grpc=4, shape=sized_shape(server, MODEL, (4, 1000), alone_s=0.25))
        server.proc.send_signal(signal.SIGTERM)
        results = flight.join(timeout=300)
        assert server.stop(timeout=30) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    for result in results[:16]:  # HTTP
        assert result[0] == "ok" or (result[:2] == ("error", "503") and "shutting down" in result[2]), results
    # and told why: the grace period ran out
    assert all("(--grace-period) ran out" in result[2]
               for result in results[:16] if result[0] == "error"), results
    for result in results[16:]:  # gRPC: grpc.aio's stop cancels what is left with UNAVAILABLE
        assert result[0] == "ok" or result[:2] == ("error", "StatusCode.UNAVAILABLE"), results
    # each request lasts longer alone than the signal takes to arrive: some were cut off
    assert any(result[0] == "error" for result in results), results
    assert "Traceback" not in server.output(), server.output()


# ---- start-up failures ----

def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    ports = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    given = {a for a in args if a.endswith("-port")}
    ports = [x for i in range(0, len(ports), 2) if ports[i] not in given for x in ports[i:i + 2]]
    return subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", *ports, *args], capture_output=True,
                          text=True, timeout=timeout)


def serve_here(capsys, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """serverproc.serve_here on ports 0: a start-up failure in this process."""
    return serverproc.serve_here(capsys, monkeypatch, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                                 *args)


def assert_failed_with(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0, f"it started:\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("cellserve: error: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "ready" not in result.stdout
    return lines[0]


def gru_onnx() -> bytes:
    """A valid, tiny ONNX GRU: x [time, batch, 3] -> y, y_h (hidden 4)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape).astype(np.float32), name)
               for name, shape in (("W", (1, 12, 3)), ("R", (1, 12, 4)), ("B", (1, 24)))]
    node = helper.make_node("GRU", ["x", "W", "R", "B"], ["y", "y_h"], name="rnn", hidden_size=4,
                            linear_before_reset=1)
    graph = helper.make_graph([node], "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["time", "batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", 1, "batch", 4]),
                               helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [1, "batch", 4])], weights)
    return _model_bytes(graph)


def erf_onnx() -> bytes:
    """A valid ONNX graph with an operator cellserve does not run (Erf), in a node named 'gelu_erf'."""
    node = helper.make_node("Erf", ["x"], ["y"], name="gelu_erf")
    graph = helper.make_graph([node], "erf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    return _model_bytes(graph)


def _model_bytes(graph) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def repository(root: Path, model_bytes: bytes, config: str | None = None) -> Path:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(model_bytes)
    if config is not None:
        (root / "m" / "config.pbtxt").write_text(config)
    return root


@pytest.mark.slow
def test_a_valid_repository_starts(tmp_path):
    """The control for the failures below: the same layout with a good model serves."""
    server = start_server("--model-repository", str(repository(tmp_path, gru_onnx())))
    try:
        assert "serving m (v1)" in server.output()
    finally:
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.slow
def test_garbage_model_file(tmp_path):
    repo = repository(tmp_path, b"\x08\xff\xfe this is not a protobuf \x00" * 20)
    assert_failed_with(serve("--model-repository", str(repo)), "'m'", "model.onnx")


def test_unsupported_operator(tmp_path, capsys, monkeypatch):
    repo = repository(tmp_path, erf_onnx())
    assert_failed_with(serve_here(capsys, monkeypatch, "--model-repository", str(repo)), "'m'", "Erf", "gelu_erf")


@pytest.mark.parametrize("config, words", [
    ('name: "m"\nversion_policy: { bogus {} }\n', ["config.pbtxt", "bogus"]),
    ('name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, -1, 3 ] ', ["config.pbtxt"]),
    ('name: "other"\n', ["'other'", "directory"]),
    ('platform: "tensorflow_graphdef"\n', ["tensorflow_graphdef"]),
    ('input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, -1 ] } ]\n', ["'tokens'", "'x'"]),
    ('input [ { name: "x" data_type: TYPE_INT64 dims: [ -1, -1, 3 ] } ]\n', ["'x'", "TYPE_INT64", "FP32"]),
    ('version_policy: { specific { versions: [ 1, 3 ] } }\n', ["[3]"]),
    ('parameters { key: "slo_ms" value: { string_value: "fast" } }\n', ["slo_ms", "fast"]),
], ids=["unknown-field", "truncated", "name-mismatch", "platform", "unknown-input", "wrong-type",
        "missing-version", "bad-slo"])
def test_bad_config(tmp_path, capsys, monkeypatch, config, words):
    repo = repository(tmp_path, gru_onnx(), config)
    assert_failed_with(serve_here(capsys, monkeypatch, "--model-repository", str(repo)), *words)


def test_empty_repository(tmp_path, capsys, monkeypatch):
    assert_failed_with(serve_here(capsys, monkeypatch, "--model-repository", str(tmp_path)), str(tmp_path), "no models")


def test_model_without_versions(tmp_path, capsys, monkeypatch):
    (tmp_path / "m").mkdir()
    assert_failed_with(serve_here(capsys, monkeypatch, "--model-repository", str(tmp_path)), "'m'", "version")


def test_missing_repository(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    assert_failed_with(serve_here(capsys, monkeypatch, "--model-repository", str(missing)), str(missing),
                       "not a directory")


@pytest.mark.slow
@pytest.mark.parametrize("flag", [
    "--http-port",
    "--grpc-port",
    "--metrics-port",
])
def test_port_in_use(tmp_path, flag):
    repo = repository(tmp_path, gru_onnx())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--model-repository", str(repo), flag, str(port))
    line = assert_failed_with(result, str(port))
    assert "in use" in line
