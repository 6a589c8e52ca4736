"""`cellserve infer` as a user runs it: a child process against the session's zoo server, over
HTTP and gRPC; what it prints, and one line on stderr with exit 1 (server, network) or 2
(usage) when something is wrong."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from cellserve.client import TOKEN_ID_BOUND, token_ids
from zoo_reference import token_reference

pytestmark = pytest.mark.slow  # each test runs the `cellserve infer` CLI as a process: seconds each

PROTOCOLS = ["http", "grpc"]


def cellserve_infer(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellserve.cli", "infer", *args], capture_output=True, text=True,
                          timeout=timeout)


def url_args(server, protocol: str) -> list[str]:
    return ["--url", server.grpc if protocol == "grpc" else server.http, "--protocol", protocol]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def probabilities_and_label(stdout: str) -> tuple[np.ndarray, int]:
    label = re.search(r"^label: (\d+)", stdout, re.M)
    probs = re.search(r"^probabilities: (.*)$", stdout, re.M)
    assert label and probs, stdout
    return np.array([float(p) for p in probs.group(1).split()]), int(label.group(1))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_seq2seq_reverses_digits(zoo_server, protocol):
    result = cellserve_infer("seq2seq-reverse", "12345", *url_args(zoo_server, protocol))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "54321"
    assert result.stderr == ""


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classifier_from_text_matches_pytorch(zoo_server, protocol):
    text = "The cells batch themselves"
    result = cellserve_infer("gru-256", text, *url_args(zoo_server, protocol))
    assert result.returncode == 0, result.stderr
    probs, label = probabilities_and_label(result.stdout)
    want = token_reference("gru-256", np.array([token_ids(text)]))
    np.testing.assert_allclose(probs, want["probabilities"][0], atol=1e-4)  # printed to 4 decimals
    assert label == int(want["label"][0]) == int(np.argmax(probs))


def test_token_ids_are_stable_and_in_range():
    ids = token_ids("The the THE cells, batch")
    assert ids[0] == ids[1] == ids[2] and len(ids) == 5
    assert all(1 <= i < TOKEN_ID_BOUND for i in ids)
    # the same on every run and machine (crc32, not Python's salted hash)
    assert ids == token_ids("the the the cells, batch")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_json_input_to_the_tagger(zoo_server, protocol):
    tokens = [[5, 17, 42, 7], [1, 2, 3, 4]]
    result = cellserve_infer("bilstm-tagger", "--json", json.dumps({"tokens": tokens}),
                             *url_args(zoo_server, protocol))
    assert result.returncode == 0, result.stderr
    assert "tag_probabilities FP32 shape [2, 4, 16]" in result.stdout
    assert "tags INT64 shape [2, 4]" in result.stdout
    want = token_reference("bilstm-tagger", np.array(tokens))["tags"]
    printed = result.stdout.split("tags INT64 shape [2, 4]:", 1)[1]
    got = np.array([[int(v) for v in re.findall(r"\d+", row)] for row in printed.strip().splitlines()])
    np.testing.assert_array_equal(got, want)


def test_json_digits_and_explicit_version(zoo_server):
    result = cellserve_infer("seq2seq-reverse", "--json", '{"digits": [[4, 5, 6], [7, 8, 9]]}',
                             "--model-version", "1", "--timeout-ms", "5000", "--url", zoo_server.http)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["321", "654"]  # ids 3.. are the digits 0..


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_is_named(zoo_server, protocol):
    result = cellserve_infer("no-such-model", "hello", *url_args(zoo_server, protocol))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "no-such-model" in line and "lstm-512" in line  # and what the server does serve
    assert ("404" if protocol == "http" else "NOT_FOUND") in line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_version(zoo_server, protocol):
    result = cellserve_infer("lstm-512", "hello", "--model-version", "7", *url_args(zoo_server, protocol))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "version" in line and "'7'" in line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_rejection_carries_its_message(zoo_server, protocol):
    result = cellserve_infer("lstm-512", "--json", '{"tokens": [[1, 99999]]}', *url_args(zoo_server, protocol))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "tokens" in line and "99999" in line
    assert ("400" if protocol == "http" else "INVALID_ARGUMENT") in line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_is_sent_as_the_request_deadline(zoo_server, protocol):
    # 1 us cannot be met: the server's admission refuses it at once (429 / RESOURCE_EXHAUSTED),
    # or, on a machine loaded enough that the engine does not get to it within the server's
    # few milliseconds past the deadline, the server answers that the deadline passed (504 /
    # DEADLINE_EXCEEDED): either way the deadline reached the server
    result = cellserve_infer("lstm-512", "a few words", "--timeout-ms", "0.001", *url_args(zoo_server, protocol))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "deadline" in line
    expected = ("429", "504") if protocol == "http" else ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
    assert any(status in line for status in expected), line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server(protocol):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cellserve_infer("lstm-512", "hello", "--url", f"127.0.0.1:{port}", "--protocol", protocol)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "cannot reach the server" in line and str(port) in line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_address_without_a_port_names_the_port_it_tried(protocol):
    """tritonclient goes to the protocol's own port (80, 443), not cellserve's: the error says so."""
    result = cellserve_infer("lstm-512", "hello", "--url", "127.0.0.1", "--protocol", protocol)
    assert result.returncode == 1
    line = one_error_line(result)
    tried, served = ("443", "8001") if protocol == "grpc" else ("80", "8000")
    assert f"cannot reach the server at 127.0.0.1 ({protocol}, port {tried}: the address names no port; " \
           f"cellserve serves {protocol} on {served}" in line, line


@pytest.mark.parametrize("url", ["127.0.0.1:99999", "127.0.0.1:x"])
def test_a_bad_port_is_one_error_line(url):
    result = cellserve_infer("lstm-512", "hello", "--url", url)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"cellserve infer: error: cannot use server address {url!r}: port {url.rpartition(':')[2]!r} is not 1 to 65535"]


def test_a_url_with_a_scheme_is_one_error_line():
    result = cellserve_infer("lstm-512", "hello", "--url", "https://127.0.0.1:8000")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "cellserve infer: error: cannot use server address 'https://127.0.0.1:8000': give host:port, without a "
        "scheme (https://)"]


@pytest.mark.parametrize("args, message", [
    (["lstm-512"], "give the input"),
    (["lstm-512", "words", "--json", '{"tokens": [[1]]}'], "not both"),
    (["lstm-512", "--json", '{"tokens": [[1, 2]'], "not valid JSON"),
    (["lstm-512", "--json", "[1, 2]"], "must be an object"),
    (["lstm-512", "--json", '{"words": [[1, 2]]}'], "'words'"),
    (["lstm-512", "--json", '{"tokens": [[1, 2], [3]]}'], "ragged"),
    (["lstm-512", "--json", '{"tokens": [[1.5, 2]]}'], "non-integers"),
    (["lstm-512", "--json", '{"tokens": [1, 2]}'], "rank 1"),
    (["seq2seq-reverse", "12a4"], "not a digit: 'a'"),
    (["seq2seq-reverse", "  "], "empty"),
    (["lstm-512", "hello", "--timeout-ms", "-5"], "--timeout-ms"),
])
def test_usage_errors(zoo_server, args, message):
    result = cellserve_infer(*args, "--url", zoo_server.http)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert message in line
    assert result.stdout == ""
