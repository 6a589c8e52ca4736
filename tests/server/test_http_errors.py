"""Each class of bad HTTP request, sent raw (http.client): it gets the right 4xx and a JSON body
`{"error": "..."}` that names the problem, and a good request still succeeds afterwards."""

from __future__ import annotations

import gzip
import http.client
import json
import struct
import zlib

import pytest

from serverproc import early_server, take_server

GOOD = {"inputs": [{"name": "tokens", "shape": [2, 3], "datatype": "INT64", "data": [[1, 2, 3], [4, 5, 6]]}]}


def request(address: str, method: str, path: str, body=None, headers: dict | None = None,
            chunked: bool = False) -> tuple[int, dict, bytes]:
    """Send one request; return (status, lower-cased headers, body). `body` may be bytes, an
    iterable of byte chunks (with chunked=True) or anything JSON-serialisable."""
    if body is not None and not isinstance(body, bytes) and not chunked:
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection(address, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def infer(address: str, body, model: str = "lstm-512", version: str | None = None, **kw):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"
    return request(address, "POST", path, body, **kw)


def error_of(status: int, headers: dict, body: bytes, expected_status: int, *fragments: str) -> str:
    """Assert the answer is `expected_status` with `{"error": msg}` containing every fragment."""
    assert status == expected_status, f"got {status}, want {expected_status}: {body[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = json.loads(body)
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    message = doc["error"]
    assert isinstance(message, str) and message.strip(), doc
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


def assert_good(address: str) -> None:
    status, headers, body = infer(address, GOOD)
    assert status == 200, body
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert outputs["label"]["shape"] == [2] and outputs["probabilities"]["shape"] == [2, 8]


@pytest.fixture
def server(zoo_server):
    """The zoo server's address; after each test a good request must still succeed."""
    yield zoo_server.http
    assert_good(zoo_server.http)


def tokens(shape, data, datatype="INT64", name="tokens", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data, **extra}]}


# ---- the body is not an inference request ----

@pytest.mark.parametrize("raw", [b"{", b"{'inputs': []}", b"", b"\xff\xfe", b'{"inputs": [1, 2,]}'],
                         ids=["unterminated", "single-quotes", "empty", "not-utf8", "trailing-comma"])
def test_malformed_json(server, raw):
    error_of(*infer(server, raw), 400, "not valid JSON")


@pytest.mark.parametrize("doc, kind", [([GOOD], "list"), ("inputs", "str"), (3, "int"), (None, "NoneType")])
def test_body_not_an_object(server, doc, kind):
    error_of(*infer(server, json.dumps(doc).encode()), 400, "must be a JSON object", kind)


@pytest.mark.parametrize("doc", [{}, {"id": "x"}, {"inputs": []}, {"inputs": {"tokens": [1]}}, {"inputs": None}],
                         ids=["empty", "no-inputs", "empty-list", "dict", "null"])
def test_missing_or_empty_inputs(server, doc):
    error_of(*infer(server, doc), 400, "'inputs'")


def test_unknown_top_level_field(server):
    error_of(*infer(server, {**GOOD, "input": []}), 400, "unknown field", "'input'")


def test_unknown_tensor_field(server):
    error_of(*infer(server, tokens([1, 2], [1, 2], dtype="INT64")), 400, "unknown field", "dtype")


@pytest.mark.parametrize("field, value, fragment", [("id", 7, "'id'"), ("parameters", [1], "'parameters'"),
                                                   ("outputs", {"label": {}}, "'outputs'")])
def test_top_level_field_of_wrong_type(server, field, value, fragment):
    error_of(*infer(server, {**GOOD, field: value}), 400, fragment)


# ---- inputs and outputs that do not fit the model ----

def test_unknown_input_name(server):
    error_of(*infer(server, tokens([1, 2], [1, 2], name="words")), 400, "unknown input", "words", "tokens")


def test_input_of_another_model(server):
    error_of(*infer(server, tokens([1, 2], [4, 5], name="digits")), 400, "unknown input", "digits")


@pytest.mark.parametrize("shape, fragment", [([1, 30_000_000], "sequence length 30000000 exceeds the model's limit"),
                                             ([5000, 2], "5000 sequences (dimension 0) exceed the model's limit")])
def test_a_shape_past_the_models_limits_is_refused_before_its_data_is_read(server, shape, fragment):
    # three values for a shape of millions: the limits are checked on the declared shape, so
    # the answer names them (decoding first took seconds of the loop for such a body)
    error_of(*infer(server, tokens(shape, [1, 2, 3])), 400, fragment)


def test_input_given_twice(server):
    doc = {"inputs": GOOD["inputs"] * 2}
    error_of(*infer(server, doc), 400, "'tokens'", "twice")


@pytest.mark.parametrize("tensor, fragment", [({"shape": [1, 2], "datatype": "INT64", "data": [1, 2]}, "name"),
                                              ({"name": "", "shape": [1], "datatype": "INT64", "data": [1]}, "name"),
                                              ("tokens", "inputs[0]")],
                         ids=["no-name", "empty-name", "not-an-object"])
def test_input_without_a_name(server, tensor, fragment):
    error_of(*infer(server, {"inputs": [tensor]}), 400, fragment)


def test_input_without_data(server):
    error_of(*infer(server, {"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64"}]}), 400,
             "'tokens'", "data")


def test_unknown_output_name(server):
    error_of(*infer(server, {**GOOD, "outputs": [{"name": "logits"}]}), 400, "unknown output", "logits")


def test_output_requested_twice(server):
    error_of(*infer(server, {**GOOD, "outputs": [{"name": "label"}, {"name": "label"}]}), 400, "'label'", "twice")


# ---- shapes ----

@pytest.mark.parametrize("shape", [[6], [1, 2, 3]], ids=["rank-1", "rank-3"])
def test_wrong_rank(server, shape):
    error_of(*infer(server, tokens(shape, [1, 2, 3, 4, 5, 6])), 400, "'tokens'", "rank 2")


@pytest.mark.parametrize("shape", [[0, 4], [2, 0], [-1, 4], [2, -3]])
def test_zero_or_negative_dimension(server, shape):
    error_of(*infer(server, tokens(shape, [1, 2, 3, 4])), 400, "'tokens'", "positive")


@pytest.mark.parametrize("shape", [None, "2x3", [2, "3"], [2.0, 3], [True, 3], {"0": 2}])
def test_shape_not_a_list_of_integers(server, shape):
    error_of(*infer(server, tokens(shape, [1, 2, 3, 4, 5, 6])), 400, "'tokens'", "shape must be a list of integers")


def test_huge_shape_refused_before_allocation(server):
    error_of(*infer(server, tokens([1 << 20, 1 << 20], [1])), 400, "'tokens'", "more than")


def test_sequence_longer_than_the_model_allows(server):
    error_of(*infer(server, tokens([1, 13], [4] * 13, name="digits"), model="seq2seq-reverse"), 400,
             "'digits'", "sequence length 13", "12")


# ---- data against shape and datatype ----

@pytest.mark.parametrize("data, got", [([1, 2, 3], 3), ([1, 2, 3, 4, 5, 6, 7], 7), ([[1, 2, 3], [4, 5]], 5), ([], 0)])
def test_data_length_does_not_match_shape(server, data, got):
    error_of(*infer(server, tokens([2, 3], data)), 400, "'tokens'", "needs 6 values", f"got {got}")


@pytest.mark.parametrize("data", [{"0": 1}, "12", 7, None])
def test_data_not_a_list(server, data):
    error_of(*infer(server, tokens([1, 2], data)), 400, "'tokens'", "data must be a list")


@pytest.mark.parametrize("data, bad", [(["1", "2"], "'1'"), ([1, "2"], "'2'"), ([1, None], "None"),
                                       ([1.5, 2], "1.5"), ([True, 2], "True"), ([1, {"v": 2}], "'v'")],
                         ids=["strings", "one-string", "null", "float", "bool", "object"])
def test_non_integers_in_integer_data(server, data, bad):
    error_of(*infer(server, tokens([1, 2], data)), 400, "'tokens'", "INT64 data must be integers", bad)


def test_strings_in_float_data(server):
    error_of(*infer(server, tokens([1, 2], ["0.5", 1.0], datatype="FP32")), 400, "'tokens'", "must be numbers")


def test_numbers_in_bool_data(server):
    error_of(*infer(server, tokens([1, 2], [0, 1], datatype="BOOL")), 400, "'tokens'", "must be booleans")


@pytest.mark.parametrize("datatype", ["BYTES", "int64", "INT128", "", None, 64])
def test_unsupported_datatype(server, datatype):
    error_of(*infer(server, tokens([1, 2], [1, 2], datatype=datatype)), 400, "'tokens'", "unsupported datatype")


@pytest.mark.parametrize("datatype, data", [("FP32", [1.0, 2.0]), ("FP64", [1, 2]), ("BOOL", [True, False])])
def test_datatype_the_model_does_not_take(server, datatype, data):
    error_of(*infer(server, tokens([1, 2], data, datatype=datatype)), 400, "'tokens'",
             f"has datatype {datatype}; the model expects INT64")


@pytest.mark.parametrize("datatype, value", [("INT8", 300), ("UINT8", -1), ("INT64", 1 << 63), ("UINT64", -5)])
def test_value_does_not_fit_datatype(server, datatype, value):
    error_of(*infer(server, tokens([1, 2], [1, value], datatype=datatype)), 400, "'tokens'", "fit")


def test_uint64_too_big_for_int64_tokens(server):
    error_of(*infer(server, tokens([1, 1], [(1 << 64) - 1], datatype="UINT64")), 400, "'tokens'", "fit")


@pytest.mark.parametrize("model, name, bad, vocab", [("lstm-512", "tokens", 10000, 10000),
                                                     ("lstm-512", "tokens", -1, 10000),
                                                     ("gru-256", "tokens", 123456, 10000),
                                                     ("bilstm-tagger", "tokens", 5000, 5000),
                                                     ("seq2seq-reverse", "digits", 13, 13)])
def test_token_id_out_of_range(server, model, name, bad, vocab):
    error_of(*infer(server, tokens([1, 3], [3, bad, 4], name=name), model=model), 400,
             f"'{name}'", f"token id {bad}", f"[0, {vocab})")


# ---- parameters ----

@pytest.mark.parametrize("params, fragment", [({"priority": -1}, "'priority'"), ({"priority": "high"}, "'priority'"),
                                              ({"timeout": -5}, "'timeout'"), ({"timeout": 1.5}, "'timeout'"),
                                              ({"timeout": "1s"}, "'timeout'"),
                                              ({"sequence_id": 1.5}, "'sequence_id'"),
                                              ({"sequence_id": -1}, "'sequence_id'"),
                                              ({"sequence_id": 5, "sequence_start": "yes"}, "'sequence_start'"),
                                              ({"sequence_start": True}, "sequence_id"),
                                              ({"sequence_id": 0, "sequence_start": True},
                                               "'sequence_id' 0 means no sequence (as Triton reads it)"),
                                              ({"binary_data_output": 1}, "binary_data_output")])
def test_bad_parameters(server, params, fragment):
    error_of(*infer(server, {**GOOD, "parameters": params}), 400, fragment)


def test_sequence_never_started(server):
    doc = {**GOOD, "parameters": {"sequence_id": 987654321}}
    error_of(*infer(server, doc), 400, "987654321")


def test_sequence_on_a_model_that_cannot_stream(server):
    doc = {**tokens([1, 2], [1, 2]), "parameters": {"sequence_id": 987654322, "sequence_start": True}}
    error_of(*infer(server, doc, model="bilstm-tagger"), 400, "bilstm-tagger", "sequences")


# ---- unknown models and versions ----

@pytest.mark.parametrize("model", ["no-such-model", "LSTM-512", "lstm-512 ", "lstm"])
def test_unknown_model(server, model):
    path_model = model.replace(" ", "%20")
    error_of(*infer(server, GOOD, model=path_model), 404, "unknown model", repr(model))
    for suffix in ("", "/ready", "/versions/1", "/versions/1/ready"):
        error_of(*request(server, "GET", f"/v2/models/{path_model}{suffix}"), 404, "unknown model", repr(model))


@pytest.mark.parametrize("version", ["2", "0", "01", "x", "-1"])
def test_unknown_version(server, version):
    error_of(*infer(server, GOOD, version=version), 404, "unknown version", repr(version), "lstm-512")
    for suffix in ("", "/ready"):
        error_of(*request(server, "GET", f"/v2/models/lstm-512/versions/{version}{suffix}"), 404,
                 "unknown version", repr(version))


def test_known_version_works(server):
    status, _, body = infer(server, GOOD, version="1")
    assert status == 200 and json.loads(body)["model_version"] == "1"


def test_unknown_route_and_wrong_method(server):
    error_of(*request(server, "GET", "/v2/models/lstm-512/infer"), 405, "GET")
    error_of(*request(server, "POST", "/v2/models/lstm-512/statistics"), 404, "no route")
    error_of(*request(server, "POST", "/v2/models/lstm-512/stats"), 405, "POST")


@pytest.mark.parametrize("method, path", [("POST", "/v2/models/lstm-512%2Finfer"),
                                          ("POST", "/v2/models/lstm-512%2fversions%2F1/infer"),
                                          ("GET", "/v2/models/lstm-512%2Fready")])
def test_an_encoded_slash_is_no_route(server, method, path):
    """Decoded, it would reach another route: a model name cannot hold '/' (Triton: 404)."""
    body = json.dumps(GOOD).encode() if method == "POST" else None
    error_of(*request(server, method, path, body), 404, "no route", "%2F")


# ---- the binary tensor extension ----

def binary_body(json_part: dict, raw: bytes) -> tuple[bytes, int]:
    header = json.dumps(json_part).encode()
    return header + raw, len(header)


def binary_tokens(values: list[int], shape: list[int], size: int | None = None) -> tuple[bytes, int]:
    raw = struct.pack(f"<{len(values)}q", *values)
    doc = {"inputs": [{"name": "tokens", "shape": shape, "datatype": "INT64",
                       "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
    return binary_body(doc, raw)


def binary_infer(address, body: bytes, header_length) -> tuple[int, dict, bytes]:
    return infer(address, body, headers={"Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(header_length)})


def test_binary_request_is_served(server):
    body, length = binary_tokens([1, 2, 3, 4], [1, 4])
    status, _, answer = binary_infer(server, body, length)
    assert status == 200, answer


@pytest.mark.parametrize("delta", [1, 1000])
def test_binary_header_length_past_the_body(server, delta):
    body, length = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*binary_infer(server, body, len(body) + delta), 400, "Inference-Header-Content-Length",
             str(len(body) + delta), f"{len(body)} bytes")


@pytest.mark.parametrize("value", ["-1", "abc", "12.5", "0x10", ""])
def test_binary_header_length_not_an_integer(server, value):
    body, _ = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*binary_infer(server, body, value), 400, "Inference-Header-Content-Length", "integer")


@pytest.mark.parametrize("delta", [-5, 5])
def test_binary_header_length_off_the_json(server, delta):
    """Shorter cuts the JSON; longer takes raw bytes into it: neither parses."""
    body, length = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*binary_infer(server, body, length + delta), 400, "not valid JSON")


def test_binary_header_length_zero(server):
    body, _ = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*binary_infer(server, body, 0), 400, "not valid JSON")


def test_binary_size_does_not_match_shape(server):
    body, length = binary_tokens([1, 2, 3, 4], [1, 5])
    error_of(*binary_infer(server, body, length), 400, "'tokens'", "needs 40 bytes", "got 32")


def test_binary_size_runs_past_the_body(server):
    body, length = binary_tokens([1, 2, 3, 4], [1, 4], size=64)
    error_of(*binary_infer(server, body, length), 400, "'tokens'", "binary_data_size 64", "32 bytes left")


def test_binary_bytes_left_over(server):
    body, length = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*binary_infer(server, body + b"\0" * 8, length), 400, "8 bytes", "belong to no input")


def test_binary_data_without_the_header(server):
    """Without Inference-Header-Content-Length the whole body is JSON: the raw bytes break it."""
    body, _ = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*infer(server, body, headers={"Content-Type": "application/octet-stream"}), 400, "not valid JSON")


def test_binary_size_and_data_together(server):
    doc = tokens([1, 2], [1, 2], parameters={"binary_data_size": 16})
    body, length = binary_body(doc, struct.pack("<2q", 1, 2))
    error_of(*binary_infer(server, body, length), 400, "'tokens'", "both")


@pytest.mark.parametrize("size", [-8, "16", 1.5, True])
def test_binary_size_not_a_count(server, size):
    body, length = binary_tokens([1, 2], [1, 2], size=size)
    error_of(*binary_infer(server, body, length), 400, "'tokens'", "binary_data_size")


def test_binary_token_out_of_range(server):
    body, length = binary_tokens([1, 20000], [1, 2])
    error_of(*binary_infer(server, body, length), 400, "'tokens'", "token id 20000")


# ---- content encoding ----

def test_gzip_request_is_served(server):
    status, _, body = infer(server, gzip.compress(json.dumps(GOOD).encode()), headers={"Content-Encoding": "gzip"})
    assert status == 200, body


def test_corrupt_gzip(server):
    error_of(*infer(server, b"\x1f\x8b not gzip at all", headers={"Content-Encoding": "gzip"}), 400, "gzip")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_cut_short_is_refused(server, encoding):
    whole = json.dumps(GOOD).encode()
    packed = gzip.compress(whole) if encoding == "gzip" else zlib.compress(whole)
    error_of(*infer(server, packed[:-6], headers={"Content-Encoding": encoding}), 400,
             f"cut short: its {encoding} data does not end")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_bytes_after_the_compressed_data_are_refused(server, encoding):
    whole = json.dumps(GOOD).encode()
    packed = gzip.compress(whole) if encoding == "gzip" else zlib.compress(whole)
    error_of(*infer(server, packed + b"garbage", headers={"Content-Encoding": encoding}), 400,
             f"7 byte(s) after the end of its {encoding} data")


def test_a_gzip_body_of_several_members_is_served(server):
    """gzip may write a stream as members one after another (gzip -c a b): one body."""
    whole = json.dumps(GOOD).encode()
    packed = gzip.compress(whole[:20]) + gzip.compress(whole[20:])
    status, _, body = infer(server, packed, headers={"Content-Encoding": "gzip"})
    assert status == 200, body


def test_unsupported_content_encoding(server):
    error_of(*infer(server, GOOD, headers={"Content-Encoding": "br"}), 400, "Content-Encoding", "'br'")


# ---- bodies over the size limit ----

LIMIT = 1024


SMALL = early_server(__name__, "small_server", "--max-request-size", str(LIMIT), "--model", "lstm-512")


@pytest.fixture(scope="module")
def small_server():
    server = take_server(SMALL)
    yield server.http
    assert_good(server.http)  # still serving after every refusal
    server.stop()


def big_request(size: int) -> bytes:
    """A valid request whose JSON body is exactly `size` bytes (padding in the id)."""
    doc = {"id": "", **GOOD}
    pad = size - len(json.dumps(doc).encode())
    assert pad >= 0
    doc["id"] = "x" * pad
    body = json.dumps(doc).encode()
    assert len(body) == size
    return body


def test_body_at_the_limit_is_served(small_server):
    status, _, body = infer(small_server, big_request(LIMIT))
    assert status == 200, body


@pytest.mark.parametrize("size", [LIMIT + 1, 4 * LIMIT, 200 * LIMIT])
def test_body_over_the_limit(small_server, size):
    error_of(*infer(small_server, big_request(size)), 413, f"{LIMIT} bytes")


def test_chunked_body_over_the_limit(small_server):
    """No Content-Length: the limit is enforced while reading."""
    body = big_request(3 * LIMIT)
    chunks = (body[i:i + 256] for i in range(0, len(body), 256))
    error_of(*infer(small_server, chunks, chunked=True), 413, f"{LIMIT} bytes")


def test_chunked_body_under_the_limit_is_served(small_server):
    body = json.dumps(GOOD).encode()
    status, _, answer = infer(small_server, iter([body[:10], body[10:]]), chunked=True)
    assert status == 200, answer


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_body_over_the_limit_once_inflated(small_server, encoding):
    inflated = big_request(50 * LIMIT)
    body = gzip.compress(inflated) if encoding == "gzip" else zlib.compress(inflated)
    assert len(body) < LIMIT
    error_of(*infer(small_server, body, headers={"Content-Encoding": encoding}), 413, "decompressed", f"{LIMIT} bytes")


def test_over_the_limit_for_an_unknown_model_is_404(small_server):
    """The model is checked before the body is read."""
    error_of(*infer(small_server, big_request(2 * LIMIT), model="gru-256"), 404, "unknown model")


# ---- inputs that trip Python's JSON and int parsing ----

@pytest.mark.parametrize("where", ["inputs", "data"])
def test_deeply_nested_json(server, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "inputs":
        body = b'{"inputs": ' + deep + b"}"
    else:
        body = b'{"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": ' + deep + b"}]}"
    error_of(*infer(server, body), 400, "JSON")


def test_integer_literal_with_too_many_digits(server):
    body = b'{"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [' + b"9" * 5000 + b"]}]}"
    error_of(*infer(server, body), 400)


def test_binary_header_length_with_too_many_digits(server):
    body, _ = binary_tokens([1, 2, 3, 4], [1, 4])
    error_of(*binary_infer(server, body, "9" * 5000), 400, "Inference-Header-Content-Length")
