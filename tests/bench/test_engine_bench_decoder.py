"""`bench engine` on an encoder-decoder: requests drawn from the model's own task inputs,
every request asking the beam width given, ONNX Runtime skipped with the reason in the JSON,
and the flag refused where it makes no sense. The zoo's trained digit reverser is served for
real (no timing is asserted)."""

import json

import numpy as np
import pytest

from cellserve import cli
from cellserve.bench import engine_bench
from cellserve.bench.decoder_workload import allow_beam_width, decoder_inputs, decoder_of, workload
from cellserve.bench.engine_bench import closed_loop_capacity
from cellserve.bench.traces import trace_at_rate
from cellserve.engine.engine import Engine, EngineConfig
from cellserve.errors import InvalidInput
from cellserve.graph import zoo
from cellserve.graph.zoo import seq2seq


@pytest.fixture(scope="module")
def reverser():
    return zoo.load("seq2seq-reverse")


@pytest.mark.slow  # three policies really served, the roofline measured: ~15 s a width
@pytest.mark.parametrize("width", [1, 2])
def test_bench_engine_serves_a_decoder_end_to_end_and_records_the_beam_width(tmp_path, width):
    cfg = engine_bench.BenchConfig(model="seq2seq-reverse", slo_ms=200, quick=True, json_path=tmp_path / "d.json",
                                   seconds_per_run=0.3, load_fractions=(0.5,), repeats=1, capacity_requests=24,
                                   min_requests=12, beam_width=width)
    report = engine_bench.run(cfg, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "d.json").read_text())
    assert on_disk["beam_width"] == width
    assert set(on_disk["policies"]) == {"cellular", "padded", "none"}
    assert set(on_disk["skipped_policies"]) == {"ort", "ort-padded"}
    assert all("encoder-decoder" in why for why in on_disk["skipped_policies"].values())
    dec = on_disk["decoder"]
    assert dec["task"] == "reverse-digits" and dec["cell_type"] == "seq2seq-reverse/decoder"
    assert dec["max_beam_width_configured"] == 1 and dec["max_beam_width_served"] == max(1, width)
    # outputs vary in length as the inputs do (the reverser answers as many digits as it is given)
    assert 1 <= dec["input_tokens"]["min"] < dec["input_tokens"]["max"] <= seq2seq.MAX_INPUT_DIGITS
    assert 1 <= dec["output_tokens"]["min"] < dec["output_tokens"]["max"] <= seq2seq.MAX_INPUT_DIGITS + 1
    for policy, d in on_disk["policies"].items():
        (light,) = d["runs"]
        assert sum(light["counts"].values()) == light["requests"] >= 12, policy
        assert light["counts"]["error"] == 0 and light["counts"]["ok"] > 0, policy
    text = engine_bench.table(report)
    assert f"seq2seq-reverse, beam {width}," in text and "ort-padded: skipped (an encoder-decoder" in text


def test_the_reversers_requests_are_its_training_distribution(reverser):
    inputs = decoder_inputs(reverser)
    assert inputs.task == "reverse-digits"
    rows = inputs.draw(np.random.default_rng(3), 2000)
    lengths = np.array([r.size for r in rows])
    assert set(lengths.tolist()) == set(range(1, seq2seq.MAX_INPUT_DIGITS + 1))  # 1-12 digits, all seen
    assert abs(lengths.mean() - 6.5) < 0.3  # uniform lengths
    ids = np.concatenate(rows)
    assert ids.dtype == np.int64 and ids.min() == seq2seq.DIGIT_OFFSET and ids.max() == seq2seq.VOCAB - 1
    # a trace at a rate is the same requests whoever asks, as for classifiers
    a = trace_at_rate(5, 100.0, 1.0, 13, inputs=inputs.draw)
    b = trace_at_rate(5, 100.0, 1.0, 13, inputs=inputs.draw)
    assert len(a) == 100 and all(np.array_equal(x.sequence, y.sequence) for x, y in zip(a, b))


def test_an_unknown_decoders_inputs_are_uniform_tokens_and_say_so(reverser):
    other = zoo.load("seq2seq-reverse")
    other.semantics["digits"].vocab = 11  # no zoo task has these vocabularies
    inputs = decoder_inputs(other)
    assert inputs.task is None and "not the model's real input distribution" in inputs.description
    rows = inputs.draw(np.random.default_rng(0), 500)
    assert min(r.size for r in rows) >= 1 and max(r.size for r in rows) <= other.max_sequence_length
    assert np.concatenate(rows).min() >= 1 and np.concatenate(rows).max() <= 10


def test_every_request_asks_the_width_given(reverser):
    """Without the bench widening the spec, the reverser (max_beam_width 1) refuses width 2:
    the burst names the refusal instead of reporting a capacity."""
    model = zoo.load("seq2seq-reverse")
    engine = Engine([model], EngineConfig(policy="cellular", device="cpu"))
    draw = decoder_inputs(model).draw
    with pytest.raises(InvalidInput, match="max_beam_width 1"):
        closed_loop_capacity(engine, model.name, "digits", 13, 0, n=4, inputs=draw, beam_width=2)
    assert allow_beam_width(model, 2) == 1 and decoder_of(model).spec.max_beam_width == 2
    answers = []
    assert closed_loop_capacity(engine, model.name, "digits", 13, 0, n=4, inputs=draw, beam_width=2,
                                responses=answers) > 0
    assert len(answers) == 4 and all(r.outputs["reversed"].shape[0] == 1 for r in answers)


def test_a_beam_width_needs_an_encoder_decoder():
    model = zoo.load("gru-256")
    assert workload(model, 1).decoder is None and workload(model, 1).beam_width is None
    with pytest.raises(InvalidInput, match="--beam-width 2 needs an encoder-decoder; model 'gru-256'"):
        workload(model, 2)


def _cli(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["engine", "--slo-ms", "-5"], "argument --slo-ms: must be a finite number > 0, got -5"),
    (["engine", "--max-batch", "0"], "argument --max-batch: must be > 0, got 0"),
    (["server", "--repeats", "0"], "argument --repeats: must be > 0, got 0"),
    (["server", "--model", "nope"], "model 'nope' is not a zoo model"),
])
def test_the_bench_cli_names_the_bad_flag_or_model_in_one_line(capsys, tmp_path, argv, message):
    code, err = _cli(capsys, "bench", *argv, "--quick", "--json", str(tmp_path / "x.json"))
    assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_refuses_a_bad_beam_width_with_exit_2(capsys, tmp_path):
    code, err = _cli(capsys, "bench", "engine", "--model", "seq2seq-reverse", "--beam-width", "0",
                     "--json", str(tmp_path / "x.json"))
    assert code == 2 and "argument --beam-width: must be > 0, got 0" in err
    code, err = _cli(capsys, "bench", "engine", "--model", "gru-256", "--beam-width", "4",
                     "--json", str(tmp_path / "x.json"))
    assert code == 2 and "needs an encoder-decoder; model 'gru-256'" in err
    assert not (tmp_path / "x.json").exists()
