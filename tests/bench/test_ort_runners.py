import numpy as np
import onnxruntime as ort
import pytest
import torch

from cellserve.bench.ort_runners import OrtRunner, export_classifier_onnx
from cellserve.bench.traces import TraceRequest, make_trace
from cellserve.graph.zoo.modules import RNNClassifier, seeded
from feature_model import export_frames

VOCAB, EMBED, HIDDEN, CLASSES = 50, 12, 16, 5


def _classifier(kind: str, layers: int) -> RNNClassifier:
    return seeded(RNNClassifier(kind, vocab=VOCAB, embed=EMBED, hidden=HIDDEN, layers=layers,
                                classes=CLASSES), seed=1)


def _torch_outputs(module: RNNClassifier, tokens: np.ndarray) -> tuple[np.ndarray, int]:
    with torch.no_grad():
        probabilities, label = module(torch.from_numpy(tokens)[None])
    return probabilities.numpy()[0], int(label[0])


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=0)


@pytest.fixture(params=[("lstm", 1), ("lstm", 2), ("gru", 1), ("gru", 3)], ids=str)
def exported(request, tmp_path):
    module = _classifier(*request.param)
    path = tmp_path / "model.onnx"
    export_classifier_onnx(module, path)
    return module, path


def test_exported_model_matches_torch_on_single_requests(exported):
    module, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for length in (1, 2, 9, 40):
        tokens = rng.integers(0, VOCAB, size=length, dtype=np.int64)
        probabilities, label = session.run(None, {"tokens": tokens[None],
                                                  "lengths": np.array([length], dtype=np.int32)})
        expected_probabilities, expected_label = _torch_outputs(module, tokens)
        _assert_close(probabilities[0], expected_probabilities)
        assert label.dtype == np.int64 and label[0] == expected_label


def test_padded_batch_rows_equal_each_request_alone(exported):
    module, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    lengths = np.array([3, 17, 1, 30, 8], dtype=np.int32)
    # Pad with random ids, not zeros, so a leak of padded positions would show.
    batch = rng.integers(0, VOCAB, size=(lengths.size, lengths.max()), dtype=np.int64)
    probabilities, labels = session.run(None, {"tokens": batch, "lengths": lengths})
    for row, length in enumerate(lengths):
        expected_probabilities, expected_label = _torch_outputs(module, batch[row, :length])
        _assert_close(probabilities[row], expected_probabilities)
        assert labels[row] == expected_label


def test_export_rejects_bidirectional_and_plain_rnn(tmp_path):
    bidirectional = RNNClassifier("lstm", VOCAB, EMBED, HIDDEN, 1, CLASSES, bidirectional=True)
    with pytest.raises(ValueError):
        export_classifier_onnx(bidirectional, tmp_path / "bi.onnx")
    with pytest.raises(ValueError):
        export_classifier_onnx(RNNClassifier("rnn_tanh", VOCAB, EMBED, HIDDEN, 1, CLASSES),
                               tmp_path / "rnn.onnx")


@pytest.fixture(scope="module")
def lstm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ort") / "lstm.onnx"
    export_classifier_onnx(_classifier("lstm", 2), path)
    return path


@pytest.mark.parametrize("padded", [False, True])
def test_runner_completes_every_request_of_a_trace_exactly_once(lstm_path, padded):
    trace = make_trace(np.random.default_rng(2), rate_rps=400.0, n=40, vocab=VOCAB)
    stats = OrtRunner(lstm_path, padded=padded).run(trace)
    assert stats.policy == ("ort-padded" if padded else "ort")
    assert sorted(o.request_id for o in stats.outcomes) == list(range(40))
    assert all(o.status == "ok" and o.finish_s >= o.arrival_s for o in stats.outcomes)
    assert stats.batch_size_sum == 40
    assert (1 <= stats.cell_steps <= 40) if padded else stats.cell_steps == 40
    assert len(stats.overhead_us_per_step) == stats.cell_steps
    assert 0 < stats.busy_s <= stats.duration_s
    assert stats.duration_s >= trace[-1].arrival_s


def test_runner_replays_in_real_time(lstm_path):
    trace = [TraceRequest(0, 0.0, np.ones(3, dtype=np.int64)),
             TraceRequest(1, 0.2, np.ones(3, dtype=np.int64))]
    stats = OrtRunner(lstm_path, padded=False).run(trace)
    finish = {o.request_id: o.finish_s for o in stats.outcomes}
    assert finish[1] >= 0.2  # not served before it arrives
    assert finish[0] < 0.2


def test_padded_runner_fills_batches_and_counts_padded_flops(lstm_path):
    lengths = [3, 5, 2, 7, 4, 4, 1, 6, 2, 9]  # all queued at once: batches of 4, 4, 2
    trace = [TraceRequest(i, 0.0, np.zeros(n, dtype=np.int64)) for i, n in enumerate(lengths)]
    stats = OrtRunner(lstm_path, padded=True, max_batch=4).run(trace)
    assert stats.cell_steps == 3 and stats.batch_size_sum == 10
    per_token = 2 * 4 * HIDDEN * ((EMBED + HIDDEN) + (HIDDEN + HIDDEN))  # two LSTM layers
    head = 2 * HIDDEN * CLASSES
    expected = sum(len(b) * (max(b) * per_token + head) for b in (lengths[:4], lengths[4:8], lengths[8:]))
    assert stats.executed_flops == expected


# ---- a repository model's own ONNX file ----

@pytest.mark.parametrize("padded", [False, True])
def test_runner_drives_a_models_own_onnx_file_in_its_layout(tmp_path, padded):
    """A repository model runs as exported: its own input (feature rows, time-major here), each
    request alone exactly as ONNX Runtime answers it, or padded with zeros to the batch's longest;
    a bidirectional layer's FLOPs count both directions."""
    from cellserve.bench.traces import SequenceInput

    path = tmp_path / "frames.onnx"
    export_frames(path, bidirectional=True)
    sequence = SequenceInput("features", True, None, (6,), "float32")
    runner = OrtRunner(path, padded=padded, max_batch=4, sequence=sequence)
    x = [np.ones((3, 6), np.float32), np.zeros((5, 6), np.float32)]
    feeds = runner._feeds(x)
    assert list(feeds) == ["features"] and feeds["features"].shape == (5, 2, 6)  # [time, batch, 6]
    assert np.array_equal(feeds["features"][:3, 0], x[0]) and not feeds["features"][3:, 0].any()
    trace = make_trace(np.random.default_rng(2), 400.0, 30, 0, inputs=sequence.sampler())
    stats = runner.run(trace)
    assert sorted(o.request_id for o in stats.outcomes) == list(range(30))
    assert all(o.status == "ok" for o in stats.outcomes) and stats.batch_size_sum == 30
    per_token = 2 * 2 * 3 * 8 * (6 + 8)  # two directions, three gates of 8, inputs 6 and hidden 8
    assert runner._flops_per_token == per_token


def test_bench_engine_runs_onnx_runtime_on_a_repository_models_own_file(tmp_path):
    """`bench engine --model-repository` compares with ONNX Runtime on the model's own file:
    no policy skipped."""
    from cellserve.bench.engine_bench import BenchConfig, _ort_runners
    from cellserve.server.repository import load_model

    export_frames(tmp_path / "repo" / "frames" / "1" / "model.onnx", bidirectional=True)
    cfg = BenchConfig(model="frames", model_repository=tmp_path / "repo", quick=True)
    runners, skipped = _ort_runners(cfg, load_model("frames", tmp_path / "repo"))
    assert sorted(runners) == ["ort", "ort-padded"] and skipped == {}
