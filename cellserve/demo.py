"""`cellserve demo`: start the server on the zoo, talk to it with tritonclient over HTTP and
gRPC (the trained encoder-decoder, a classifier, a streamed sequence, a bad request), show a
few metrics, stop it, then run the short engine benchmark."""

from __future__ import annotations

import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cellserve.graph.zoo.seq2seq import PAD, decode_digits, encode_digits
from cellserve.server.launch import ServerProcess

DIGITS = ["12345", "907", "31415926535", "2026", "8"]


def run() -> int:
    print("starting `cellserve serve` on the zoo ...", flush=True)
    server = ServerProcess()
    try:
        print(f"serving HTTP on {server.http}, gRPC on {server.grpc}, metrics on {server.metrics}\n")
        ok = _reverse_digits(server) & _classify(server) & _stream(server) & _bad_request(server)
        _metrics(server)
    finally:
        code = server.stop()
    print(f"\nserver stopped on SIGTERM with exit code {code}")
    return 0 if ok and code == 0 else 1


def _reverse_digits(server) -> bool:
    print("seq2seq-reverse over HTTP, all requests in flight at once (they share cell batches):")
    with httpclient.InferenceServerClient(server.http, concurrency=len(DIGITS)) as client:
        pending = []
        for text in DIGITS:
            tensor = httpclient.InferInput("digits", [1, len(text)], "INT64")
            tensor.set_data_from_numpy(np.array([encode_digits(text)], np.int64))
            pending.append(client.async_infer("seq2seq-reverse", [tensor]))
        answers = [p.get_result().as_numpy("reversed")[0] for p in pending]
    ok = True
    for text, tokens in zip(DIGITS, answers):
        out = decode_digits([t for t in tokens if t != PAD])
        ok &= out == text[::-1]
        print(f"  {text:>12} -> {out:<12} {'ok' if out == text[::-1] else 'WRONG'}")
    return ok


def _classify(server) -> bool:
    tokens = np.array([[17, 4, 933, 5, 2048, 77, 9]], np.int64)
    with grpcclient.InferenceServerClient(server.grpc) as client:
        tensor = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
        tensor.set_data_from_numpy(tokens)
        result = client.infer("lstm-512", [tensor])
    probabilities = result.as_numpy("probabilities")[0]
    print(f"\nlstm-512 over gRPC: label {int(result.as_numpy('label')[0])}, "
          f"probabilities {[round(float(p), 3) for p in probabilities]}")
    return bool(np.isclose(probabilities.sum(), 1.0, atol=1e-4))


def _stream(server) -> bool:
    tokens = np.random.default_rng(1).integers(0, 10000, (1, 30))
    with httpclient.InferenceServerClient(server.http) as client:
        def send(chunk, **kw):
            tensor = httpclient.InferInput("tokens", list(chunk.shape), "INT64")
            tensor.set_data_from_numpy(chunk)
            return client.infer("gru-256", [tensor], **kw).as_numpy("probabilities")

        whole = send(tokens)
        send(tokens[:, :10], sequence_id=42, sequence_start=True)
        send(tokens[:, 10:20], sequence_id=42)
        streamed = send(tokens[:, 20:], sequence_id=42, sequence_end=True)
    same = np.allclose(whole, streamed, rtol=1e-4, atol=1e-6)
    print(f"\ngru-256, 30 tokens sent whole and as a stream of 3 chunks (sequence_id 42): "
          f"{'same answer' if same else 'DIFFERENT answers'}")
    return same


def _bad_request(server) -> bool:
    with httpclient.InferenceServerClient(server.http) as client:
        tensor = httpclient.InferInput("tokens", [1, 2], "INT64")
        tensor.set_data_from_numpy(np.array([[5, 123456]], np.int64))
        try:
            client.infer("lstm-512", [tensor])
        except InferenceServerException as exc:
            print(f"\na bad request gets a clear error: HTTP {exc.status()}: {exc.message()}")
            return exc.status() == "400"
    return False


def _metrics(server) -> None:
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics").read().decode()
    wanted = ("cellserve_inference_request_success_total", "cellserve_inference_request_failure_total",
              "cellserve_inference_count_total", "cellserve_inference_exec_count_total")
    print("\nsome of its metrics:")
    for line in text.splitlines():
        if line.startswith(wanted):
            print(f"  {line}")
