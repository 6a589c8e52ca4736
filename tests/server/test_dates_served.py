"""The zoo's `dates` model served by a real `cellserve serve --model dates`: its vocabularies
published in the model configuration (HTTP and gRPC, as tritonclient's get_model_config reads
them), tritonclient sending dates and getting the reference's answers (greedy, beam 4 with the
beams), the generate and streaming endpoints, and `cellserve infer --model dates --text ...`
end to end: text in, text out, beams with scores, a character outside the vocabulary refused
before anything is sent."""

from __future__ import annotations

import http.client
import json
import queue
import re
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from cellserve.graph.zoo import dates
from cellserve.text_vocab import TextVocabulary
from serverproc import early_server, take_server

pytestmark = pytest.mark.slow  # its own server (seconds to start) and CLI processes

PROTOCOLS = ["http", "grpc"]
DATES = early_server(__name__, "server", "--model", "dates")
TEXTS = ["3 March 2021", "the third of march, nineteen ninety-eight", "Tue 3 Mar 98", "19980303",
         "March 3rd, 1998", "31/12/49", "1 Jan. '50", "the twenty-ninth of february, two thousand"]


@pytest.fixture(scope="module")
def server():
    proc = take_server(DATES)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def trained():
    return dates.load_trained()


def client(server, protocol):
    return grpcclient.InferenceServerClient(server.grpc) if protocol == "grpc" \
        else httpclient.InferenceServerClient(server.http)


def published(server, protocol) -> TextVocabulary:
    with client(server, protocol) as c:
        config = c.get_model_config("dates", as_json=True)["config"] if protocol == "grpc" \
            else c.get_model_config("dates")
    return TextVocabulary.from_parameters({k: v["string_value"] for k, v in config["parameters"].items()})


def infer(server, protocol, ids: list[int], parameters: dict | None = None):
    module = grpcclient if protocol == "grpc" else httpclient
    x = module.InferInput("source", [1, len(ids)], "INT64")
    x.set_data_from_numpy(np.array([ids], np.int64))
    with client(server, protocol) as c:
        return c.infer("dates", [x], parameters=parameters)


def tokens(row) -> list[int]:
    return [int(t) for t in np.asarray(row).reshape(-1) if int(t) != dates.PAD]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_config_publishes_the_vocabularies(server, protocol):
    vocab = published(server, protocol)
    assert (vocab.input, vocab.output) == ("source", "date")
    assert vocab.input_tokens == (None, *dates.SOURCE_CHARS)
    assert vocab.output_tokens == (None, None, None, *dates.TARGET_CHARS)


def test_config_of_an_unknown_model_is_404_and_the_extension_is_listed(server):
    with pytest.raises(urllib.request.HTTPError) as err:
        urllib.request.urlopen(f"{server.http_url}/v2/models/nope/config", timeout=10)
    assert err.value.code == 404 and "nope" in json.loads(err.value.read())["error"]
    with urllib.request.urlopen(f"{server.http_url}/v2", timeout=10) as response:
        assert "model_configuration" in json.loads(response.read())["extensions"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tritonclient_sends_dates_and_gets_the_reference_answers(server, protocol, trained):
    vocab = published(server, protocol)
    for text in TEXTS:
        answer = infer(server, protocol, vocab.encode(text)).as_numpy("date")
        want = dates.normalise(trained, text)
        assert tokens(answer) == list(want[1].best.tokens), text
        assert vocab.decode(answer[0]) == want[0]
    assert vocab.decode(infer(server, protocol, vocab.encode("3 March 2021")).as_numpy("date")[0]) == "2021-03-03"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_beam_parameters_give_the_reference_beams(server, protocol, trained):
    vocab = published(server, protocol)
    text = "the third of march, nineteen ninety-eight"
    result = infer(server, protocol, vocab.encode(text), {"beam_width": 4, "return_beams": True})
    want = dates.normalise(trained, text, beam_width=4)[1]
    assert tokens(result.as_numpy("date")) == list(want.best.tokens)
    beams, scores = result.as_numpy("date_beams")[0], result.as_numpy("date_beam_scores")[0]
    assert [tokens(b) for b in beams] == [list(h.tokens) for h in want.beams]
    np.testing.assert_allclose(scores, [h.score for h in want.beams], rtol=0, atol=1e-5)


def post(server, path: str, doc: dict) -> http.client.HTTPResponse:
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", path, json.dumps(doc))
    return conn.getresponse()


def test_generate_and_generate_stream(server, trained):
    text = "Tue 3 Mar 98"
    ids = dates.encode_source(text)
    want = list(dates.normalise(trained, text)[1].best.tokens)
    whole = json.loads(post(server, "/v2/models/dates/generate", {"source": ids}).read())
    assert whole == {"model_name": "dates", "model_version": "1", "date": want}
    response = post(server, "/v2/models/dates/generate_stream", {"source": ids})
    events = [json.loads(line[len(b"data: "):]) for line in response.read().splitlines() if line.startswith(b"data: ")]
    *streamed, final = events
    assert [e["date"] for e in streamed] == want and [e["position"] for e in streamed] == list(range(len(want)))
    assert final == {**whole, "triton_final_response": True}
    # a beam request streams nothing: its answer comes whole
    beam = post(server, "/v2/models/dates/generate_stream", {"source": ids, "parameters": {"beam_width": 4}})
    [only] = [json.loads(line[6:]) for line in beam.read().splitlines() if line.startswith(b"data: ")]
    assert only["triton_final_response"] is True
    assert only["date"] == list(dates.normalise(trained, text, 4)[1].best.tokens)


def test_grpc_stream_sends_each_character_then_the_answer(server, trained):
    text = "3 March 2021"
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        x = grpcclient.InferInput("source", [1, len(text)], "INT64")
        x.set_data_from_numpy(np.array([dates.encode_source(text)], np.int64))
        c.async_stream_infer("dates", [x], request_id="d1", enable_empty_final_response=True)
        got = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
    *streamed, final = got
    assert dates.decode_target([int(r.as_numpy("date")[0, 0]) for r in streamed]) == "2021-03-03"
    assert dates.decode_target(final.as_numpy("date")[0]) == "2021-03-03"


# ---- `cellserve infer --text` as a user runs it ----

def cellserve_infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellserve.cli", "infer", *args], capture_output=True, text=True,
                          timeout=60)


def url_args(server, protocol: str) -> list[str]:
    return ["--url", server.grpc if protocol == "grpc" else server.http, "--protocol", protocol]


def dates_requests(server) -> float:
    """Requests the server has counted for `dates`, answered or failed (its metrics)."""
    with urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r'^cellserve_inference_request_(?:success|failure)_total\{[^}]*model="dates"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_text_prints_the_iso_date(server, protocol):
    result = cellserve_infer("--model", "dates", "--text", "3 March 2021", *url_args(server, protocol))
    assert (result.returncode, result.stdout, result.stderr) == (0, "2021-03-03\n", "")
    # the model and the text as positionals, as for the other zoo models
    result = cellserve_infer("dates", "19980303", *url_args(server, protocol))
    assert (result.returncode, result.stdout) == (0, "1998-03-03\n")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_text_prints_the_beams_and_their_scores(server, protocol, trained):
    text = "the third of march, nineteen ninety-eight"
    result = cellserve_infer("--model", "dates", "--text", text, "--beam-width", "4", "--return-beams",
                             *url_args(server, protocol))
    assert result.returncode == 0, result.stderr
    want = dates.normalise(trained, text, beam_width=4)[1]
    best, *beams = result.stdout.splitlines()
    assert best == dates.decode_target(want.best.tokens) == "1998-03-03"
    assert beams == [f"beam {rank}  {dates.decode_target(h.tokens)}  score {h.score:.4f}"
                     for rank, h in enumerate(want.beams, start=1)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_character_outside_the_vocabulary_is_refused_before_sending(server, protocol):
    before = dates_requests(server)
    result = cellserve_infer("--model", "dates", "--text", "3 März 2021", *url_args(server, protocol))
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "character 'ä' at position 3 of '3 März 2021'" in line and "nothing was sent" in line
    assert dates_requests(server) == before


@pytest.mark.parametrize("args, code, message", [
    (["--text", "3 March 2021", "--beam-width", "9"], 1, "'beam_width' 9 exceeds model 'dates''s max_beam_width 8"),
    (["--text", "3 March 2021", "--beam-width", "0"], 2, "--beam-width must be at least 1, got 0"),
    (["--text", "3 March", "1998"], 2, "give the text once"),
    (["--text", ""], 2, "the text is empty"),
])
def test_infer_refusals_name_what_is_wrong(server, args, code, message):
    result = cellserve_infer("--model", "dates", *args, "--url", server.http)
    assert result.returncode == code, (result.stdout, result.stderr)
    [line] = result.stderr.strip().splitlines()
    assert message in line
