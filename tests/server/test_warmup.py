"""Triton's model warm-up (cellserve/server/warmup.py): a config's `model_warmup` samples are
made and checked at load, run through the engine before the model is served (at start and on
a load while serving), leave the arenas grown to their sizes, are echoed in the published
config and are not counted; a sample that is wrong or that the engine fails fails the load,
naming it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.errors import ModelLoadError
from cellserve.server.repository import load_repository
from cellserve.server.warmup import warm_up_before_serving
from serverproc import start_server
from test_repository import LSTM_VOCAB, add_model, lstm_onnx

HEAD = ('name: "clf"\nmax_batch_size: 8\n'
        'input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]\n')


def warmup(name: str = "long", batch: int = 4, dims: str = "600", source: str = "random_data: true",
           count: int = 0, data_type: str = "TYPE_INT64", key: str = "tokens") -> str:
    return (f'model_warmup [ {{ name: "{name}" batch_size: {batch} count: {count} inputs {{ key: "{key}" '
            f'value {{ data_type: {data_type} dims: [ {dims} ] {source} }} }} }} ]\n')


def repo_with(root: Path, config: str) -> Path:
    add_model(root, "clf", {1: lstm_onnx(1)}, config)
    return root


def samples(root: Path):
    [entry] = load_repository(root)
    return entry


def test_samples_are_made_as_triton_describes_them(tmp_path):
    """batch_size rows of one row's data (dims leave the batch out when max_batch_size > 0);
    random token ids stay inside the input's vocabulary; a file's raw bytes, first row used;
    count 0 is one request."""
    (tmp_path / "clf" / "warmup").mkdir(parents=True)
    row = np.arange(5, dtype=np.int64) % LSTM_VOCAB
    (tmp_path / "clf" / "warmup" / "row.bin").write_bytes(row.tobytes() + b"extra bytes past the row")
    config = HEAD + ('model_warmup [\n'
                     '  { name: "zeros" batch_size: 3 inputs { key: "tokens" value { data_type: TYPE_INT64 '
                     'dims: [ 7 ] zero_data: true } } },\n'
                     '  { name: "random" batch_size: 8 count: 2 inputs { key: "tokens" value { data_type: TYPE_INT64 '
                     'dims: [ 300 ] random_data: true } } },\n'
                     '  { name: "file" batch_size: 2 inputs { key: "tokens" value { data_type: TYPE_INT64 '
                     'dims: [ 5 ] input_data_file: "row.bin" } } } ]\n')
    entry = samples(repo_with(tmp_path, config))
    zeros, random, from_file = entry.warmup
    assert (zeros.name, zeros.count) == ("zeros", 1)
    assert zeros.inputs["tokens"].shape == (3, 7) and not zeros.inputs["tokens"].any()
    tokens = random.inputs["tokens"]
    assert random.count == 2 and tokens.shape == (8, 300) and tokens.dtype == np.int64
    assert tokens.min() >= 0 and tokens.max() < LSTM_VOCAB and len(np.unique(tokens)) > 10
    assert (tokens == tokens[0]).all()  # one row, repeated batch_size times
    np.testing.assert_array_equal(from_file.inputs["tokens"], np.stack([row, row]))
    assert [w["name"] for w in entry.warmup_config] == ["zeros", "random", "file"]
    assert entry.warmup_config[2]["inputs"]["tokens"] == {"data_type": "TYPE_INT64", "dims": [5],
                                                          "input_data_file": "row.bin"}


@pytest.mark.parametrize("config, message", [
    (HEAD + warmup(key="words"), r"inputs \['words'\] are not the model's"),
    (HEAD + 'model_warmup [ { name: "empty" batch_size: 1 } ]\n', r"gives no data for inputs \['tokens'\]"),
    (HEAD + warmup(data_type="TYPE_FP32"), "data_type TYPE_FP32; the model's input is TYPE_INT64"),
    (HEAD + warmup(data_type="TYPE_INVALID"), "no data_type"),
    (HEAD + warmup(source=""), "set zero_data, random_data or input_data_file"),
    (HEAD + warmup(dims="-1"), r"dims \[-1\] must all be sizes of 1 or more"),
    (HEAD + warmup(batch=9), "batch_size 9 is more than max_batch_size 8"),
    (HEAD.replace("max_batch_size: 8", "max_batch_size: 0").replace("[ -1 ]", "[ -1, -1 ]")
     + warmup(dims="2, 5"), "batch_size 4 needs a model that batches"),
    (HEAD + warmup(dims="2000"), "sequence length 2000 exceeds the model's limit of 1024"),
    (HEAD + warmup(dims="3, 4"), r"shape \[4, 3, 4\] \(dims \[3, 4\] after batch_size 4\) does not fit the input.s \[-1, -1\]"),
    (HEAD + warmup(source='input_data_file: "nothing.bin"'), "cannot read input_data_file"),
    (HEAD + warmup(source='input_data_file: "../config.pbtxt"'), "must name a file in the model's warmup/ folder"),
    (HEAD + warmup(dims="100000000000"), "sequence length 100000000000 exceeds the model's limit of 1024"),
    (HEAD + warmup(source='input_data_file: ""'), "input_data_file is empty"),
    (HEAD + warmup(name="", dims="2000"), "model_warmup '#0': .*sequence length 2000"),
])
def test_a_wrong_sample_fails_the_load_naming_it(tmp_path, config, message):
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_repository(repo_with(tmp_path, config))
    assert "model 'clf' version 1: model_warmup '" in str(caught.value)


def test_as_triton_a_sample_of_batch_0_is_skipped_and_sequence_control_inputs_are_ignored(tmp_path):
    """Triton skips a sample of batch_size 0, and a sample may give the sequence batcher's
    control tensors (START, ...), which are no input of the model."""
    control = ('sequence_batching { control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START '
               'int32_false_true: [ 0, 1 ] } ] } ] }\n')
    sample = ('model_warmup [ { name: "seq" batch_size: 1 inputs [ { key: "tokens" value { data_type: TYPE_INT64 '
              'dims: [ 5 ] zero_data: true } }, { key: "START" value { data_type: TYPE_INT32 dims: [ 1 ] '
              'zero_data: true } } ] }, { name: "none" batch_size: 0 } ]\n')
    entry = samples(repo_with(tmp_path, HEAD + control + sample))
    assert [(w.name, sorted(w.inputs)) for w in entry.warmup] == [("seq", ["tokens"])]


def test_a_file_shorter_than_a_row_is_refused_with_the_bytes_it_needs(tmp_path):
    (tmp_path / "clf" / "warmup").mkdir(parents=True)
    (tmp_path / "clf" / "warmup" / "short.bin").write_bytes(np.zeros(3, np.int64).tobytes())
    with pytest.raises(ModelLoadError, match="holds 24 bytes; dims \\[5\\] of INT64 need 40"):
        load_repository(repo_with(tmp_path, HEAD + warmup(dims="5", source='input_data_file: "short.bin"')))


def test_a_token_id_outside_the_vocabulary_in_a_file_is_refused(tmp_path):
    (tmp_path / "clf" / "warmup").mkdir(parents=True)
    (tmp_path / "clf" / "warmup" / "bad.bin").write_bytes(np.full(4, LSTM_VOCAB, np.int64).tobytes())
    with pytest.raises(ModelLoadError, match=f"model_warmup 'long': input 'tokens': token id {LSTM_VOCAB} is out"):
        load_repository(repo_with(tmp_path, HEAD + warmup(dims="4", source='input_data_file: "bad.bin"')))


def _row_capacity(engine: Engine) -> int:
    [executor] = engine.executors.values()
    return sum(kernel.rows.capacity for kernel in executor.kernels.values() if hasattr(kernel, "rows"))


def test_warming_up_grows_the_arenas_so_a_first_request_of_that_size_grows_nothing(tmp_path):
    """In process: the sample's requests run through the engine; afterwards a request of the
    sample's size finds its rows already there, where a cold engine grows its arenas for it."""
    entry = samples(repo_with(tmp_path, HEAD + warmup(batch=8, dims="900", count=2)))
    [sample] = entry.warmup

    def engine() -> Engine:
        return Engine([entry.model], EngineConfig(profile=False, pin_threads=False))

    cold, warm = engine(), engine()
    before = _row_capacity(warm)
    assert warm_up_before_serving(warm, entry.engine_name, entry.warmup, "clf") == 2
    grown = _row_capacity(warm)
    assert grown > before and grown >= 8 * 900  # the lanes of all 8 rows at once

    from cellserve.engine.request import Request, Status

    for eng in (cold, warm):
        answers = []
        eng.submit(Request(entry.engine_name, dict(sample.inputs), on_done=answers.append))
        eng.run_until_idle()
        assert answers[0].status is Status.OK
    assert _row_capacity(warm) == grown  # nothing grown for the first "real" request
    assert _row_capacity(cold) > before  # where a cold engine had to


def test_a_sample_the_engine_refuses_names_it(tmp_path):
    entry = samples(repo_with(tmp_path, HEAD + warmup(batch=8, dims="1000")))
    engine = Engine([entry.model], EngineConfig(profile=False, pin_threads=False, max_lane_memory_mb=0.5))
    with pytest.raises(ModelLoadError, match="model_warmup 'long' failed: needs 2.4 MiB of lane storage"):
        warm_up_before_serving(engine, entry.engine_name, entry.warmup, "model 'clf'")


def test_a_server_warms_up_before_it_is_ready_and_publishes_the_samples(tmp_path):
    """A real server: the start says so before `ready`; the published config (HTTP and gRPC)
    holds the samples as declared; the warm-up is not in the model's statistics."""
    repo_with(tmp_path, HEAD + warmup(batch=2, dims="50", count=3))
    proc = start_server("--model-repository", str(tmp_path))
    try:
        assert any("model 'clf' version 1 warmed up: 3 request(s) of 1 model_warmup sample(s)" in line
                   for line in proc.lines)
        with httpclient.InferenceServerClient(proc.http) as http:
            [declared] = http.get_model_config("clf")["model_warmup"]
            stats = http.get_inference_statistics("clf")["model_stats"][0]
        assert declared == {"name": "long", "batch_size": 2, "count": 3,
                            "inputs": {"tokens": {"data_type": "TYPE_INT64", "dims": [50], "random_data": True}}}
        assert stats["inference_count"] == 0 and stats["inference_stats"]["success"]["count"] == 0
        with grpcclient.InferenceServerClient(proc.grpc) as grpc:
            [message] = grpc.get_model_config("clf").config.model_warmup
        assert (message.name, message.batch_size, message.count, list(message.inputs["tokens"].dims)) == (
            "long", 2, 3, [50])
    finally:
        assert proc.stop() == 0


def test_a_server_whose_sample_fails_does_not_start(tmp_path):
    repo_with(tmp_path, HEAD + warmup(batch=8, dims="1000"))
    done = subprocess.run([sys.executable, "-m", "cellserve.cli", "serve", "--model-repository", str(tmp_path),
                           "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                           "--max-lane-memory", "0.5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "cellserve: error: model 'clf' version 1: model_warmup 'long' failed:" in done.stderr
    assert "ready" not in done.stdout


def test_a_load_while_serving_warms_up_first_and_a_failed_one_leaves_nothing(tmp_path):
    """In process, model control: a load runs the samples before the model is served; one the
    engine refuses fails the load naming the sample, and the engine holds no trace of it."""
    from cellserve.server.core import Core
    from cellserve.server.errors import BadRequest
    from cellserve.server.metrics import Metrics
    from inprocess import PausableEngine

    repo_with(tmp_path, HEAD + warmup(batch=8, dims="1000"))
    engine = Engine([], EngineConfig(profile=False, pin_threads=False, max_lane_memory_mb=0.5))
    core = Core([], engine, Metrics(engine), repository=tmp_path)
    worker = PausableEngine(engine)
    worker.start()

    async def go():
        with pytest.raises(BadRequest, match="cannot load model 'clf': version 1: model_warmup 'long' failed"):
            await core.load_model("clf")
        failed = (core.repository_index(), sorted(engine.models))
        (tmp_path / "clf" / "config.pbtxt").write_text(HEAD + warmup(batch=2, dims="40", count=2))
        await core.load_model("clf")
        return failed, core.repository_index(), core.model_statistics("clf")

    try:
        (failed_index, failed_models), index, stats = asyncio.run(go())
    finally:
        worker.stop.set()
    assert failed_index[0]["state"] == "UNAVAILABLE" and "model_warmup 'long' failed" in failed_index[0]["reason"]
    assert failed_models == []
    assert index == [{"name": "clf", "version": "1", "state": "READY", "reason": ""}]
    assert stats["model_stats"][0]["inference_count"] == 0


def test_a_ray_worker_warms_up_at_start_and_a_load_whose_sample_fails_leaves_nothing(tmp_path):
    """A cluster's engine worker (in process, without Ray): its models' samples run before it
    serves; a model added later whose sample the engine refuses is not added."""
    from cellserve.cluster.ray_worker import EngineWorker, WorkerSpec

    repo_with(tmp_path, HEAD + warmup(batch=2, dims="900"))
    add_model(tmp_path, "big", {1: lstm_onnx(2)}, HEAD.replace('"clf"', '"big"') + warmup(batch=8, dims="1000"))
    config = EngineConfig(profile=False, pin_threads=False, max_lane_memory_mb=1.0)
    worker = EngineWorker(WorkerSpec("w0", ("clf",), config, 1, str(tmp_path)))
    try:
        assert _row_capacity(worker.engine) >= 2 * 900
        with pytest.raises(ModelLoadError, match="model 'big' version 1: model_warmup 'long' failed: needs"):
            asyncio.run(worker.load(["big"]))
        assert sorted(worker.engine.models) == ["clf:1"] and worker.changes["load"] == 0
    finally:
        worker.stop()
