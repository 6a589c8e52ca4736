"""`cellserve simulate` and `cellserve profile` as a user runs them: each command once in a
real process, its refusals (and profile's second run) in this process through cli.main, the
entry point the `cellserve` script runs (a process spends seconds on imports)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cellserve import cli
from cellserve.graph import zoo
from cellserve.plan.profile import ModelProfile, synthetic_profile


def cellserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def cellserve_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """cli.main(args) in this process: its exit status (argparse's exit too) and what it printed."""
    capsys.readouterr()  # what came before is not this run's
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["cellserve", *args], code, out, err)


@pytest.fixture(scope="module")
def gru_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "gru-256.json"
    synthetic_profile(zoo.load("gru-256"), lambda b: 2e-4 + 2e-5 * b, lone_lanes=1, lone_step_s=1e-4).to_json(path)
    return path


@pytest.mark.slow  # a real process
def test_simulate_writes_results_labelled_simulated(gru_profile, tmp_path):
    out = tmp_path / "sim.json"
    done = cellserve("simulate", "--profile", str(gru_profile), "--engines", "3", "--rates", "60,600",
                     "--seconds", "2", "--router", "round-robin", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "(simulated)" in done.stdout
    report = json.loads(out.read_text())
    assert report["simulated"] is True and report["label"] == "simulated"
    assert [r["rate_rps"] for r in report["runs"]] == [60.0, 600.0]
    light = report["runs"][0]
    assert light["counts"]["ok"] == light["requests"] > 0  # 60 req/s over three engines: all answered
    # what the 2 s trace offered, beside the rate asked for: its arrivals over their span
    assert light["realised_rps"] == pytest.approx(light["requests"] / 2.0, rel=0.25)
    assert "the trace's arrivals" in done.stdout
    assert report["profiles"][0]["modelled"] is True  # a given profile is not a measurement
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--engines", "0", "--rates", "10"], "--engines must be >= 1"),
    (["--workers", "0", "--rates", "10"], "--workers must be >= 1"),
    (["--rates", "10,x"], "--rates must be numbers"),
    (["--rates", "10", "--router", "random"], "unknown router 'random'"),
    (["--load", "inf"], "argument --load: must be a finite number > 0, got inf"),
    (["--load", "nan"], "argument --load: must be a finite number > 0, got nan"),
    (["--rates", "10,inf"], "--rates must be finite numbers > 0, got [10.0, inf]"),
])
def test_simulate_refuses_bad_arguments_naming_them(gru_profile, tmp_path, capsys, args, message):
    done = cellserve_here(capsys, "simulate", "--profile", str(gru_profile), *args, "--json", str(tmp_path / "x.json"))
    assert done.returncode == 2 and message in done.stderr


def test_simulate_refuses_an_unwritable_plot_before_it_runs(gru_profile, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    done = cellserve_here(capsys, "simulate", "--profile", str(gru_profile), "--rates", "10", "--json",
                          str(tmp_path / "x.json"), "--plot", str(tmp_path / "a-file" / "p.png"))
    assert done.returncode == 2 and f"cannot write '{tmp_path / 'a-file' / 'p.png'}'" in done.stderr
    assert "offering" not in done.stdout and not (tmp_path / "x.json").exists()  # refused before the run


def test_simulate_refuses_a_broken_profile_naming_the_field(gru_profile, tmp_path, capsys):
    d = json.loads(gru_profile.read_text())
    d["host"]["step_s"] = -1
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(d))
    done = cellserve_here(capsys, "simulate", "--profile", str(broken), "--rates", "10",
                          "--json", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "profile.host.step_s must be >= 0" in done.stderr


@pytest.mark.slow
def test_profile_measures_a_zoo_model_and_models_a_gpu(tmp_path, capsys):
    out = tmp_path / "gru.json"
    done = cellserve("profile", "--model", "gru-256", "--quick", "--max-batch", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    profile = ModelProfile.from_json(out)
    assert profile.model == "gru-256" and profile.max_batch == 4 and not profile.modelled
    (cell,) = profile.cell_types.values()  # two GRU layers stepped as one stack
    assert cell.kind == "stack" and sorted(cell.step_s) == [1, 2, 3, 4]
    assert all(t.mean > 0 and t.p99 >= t.mean for t in cell.step_s.values())
    assert profile.plain_ops_s and profile.weight_bytes["cpu"] > 0
    gpu = tmp_path / "gru-h100.json"
    done = cellserve_here(capsys, "profile", "--model", "gru-256", "--max-batch", "4", "--gpu", "h100",
                          "--json", str(gpu))
    assert done.returncode == 0, done.stderr
    modelled = ModelProfile.from_json(gpu)
    assert modelled.modelled and "modelled" in modelled.machine.name
    assert modelled.host == ModelProfile.from_json(gpu).host  # host costs come from this machine


def test_profile_refuses_an_unknown_model(tmp_path, capsys):
    done = cellserve_here(capsys, "profile", "--model", "nope", "--json", str(tmp_path / "p.json"))
    assert done.returncode == 2 and "'nope' is not a zoo model" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--device", "cudax"], "--device 'cudax' is not a torch device"),
    (["--device", "meta"], "--device meta: cellserve runs cells on cpu or cuda"),
    (["--backend", "triton"], "--backend triton: the triton backend needs a CUDA device"),
])
def test_profile_refuses_a_device_or_backend_it_cannot_run_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    done = cellserve_here(capsys, "profile", "--model", "gru-256", *args, "--json", str(tmp_path / "p.json"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_profile_refuses_a_deadline_that_is_not_positive(tmp_path, capsys):
    done = cellserve_here(capsys, "profile", "--model", "gru-256", "--slo-ms", "0", "--json", str(tmp_path / "p.json"))
    assert done.returncode == 2 and "--slo-ms" in done.stderr and not (tmp_path / "p.json").exists()


def _export_tagger(path, batch_first: bool) -> None:
    """A small token model (embedding, GRU, a head per position) as a user would export it."""
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(30, 8)
            self.rnn = torch.nn.GRU(8, 8, batch_first=batch_first)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(self.rnn(self.embedding(tokens))[0])

    torch.manual_seed(0)
    path.parent.mkdir(parents=True)
    axes = {0: "batch", 1: "time"} if batch_first else {0: "time", 1: "batch"}
    torch.onnx.export(Tagger().eval(), (torch.randint(0, 30, (1, 5) if batch_first else (5, 1)),), str(path),
                      input_names=["tokens"], output_names=["tags"], opset_version=17, dynamo=False,
                      dynamic_axes={"tokens": axes, "tags": axes})


def _export_features(path, batch_first: bool, features_dynamic: bool = False) -> None:
    """A small feature model (float rows of 6, as from a speech front end: GRU, a head per
    position) as a user would export it."""
    import torch

    class Frames(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(6, 8, batch_first=batch_first)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, features):
            return self.head(self.rnn(features)[0])

    torch.manual_seed(0)
    path.parent.mkdir(parents=True)
    axes = {0: "batch", 1: "time"} if batch_first else {0: "time", 1: "batch"}
    torch.onnx.export(Frames().eval(), (torch.zeros((1, 5, 6) if batch_first else (5, 1, 6)),), str(path),
                      input_names=["features"], output_names=["scores"], opset_version=17, dynamo=False,
                      dynamic_axes={"features": {**axes, **({2: "width"} if features_dynamic else {})},
                                    "scores": axes})


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_feature_models_traces_are_float_rows_one_sequence_per_request(tmp_path, batch_first):
    """A model of float feature rows (no vocabulary) is driven as a token model is: WMT-like
    lengths, one sequence of rows per request, in its own layout."""
    from cellserve.bench.engine_runner import replay
    from cellserve.bench.profiler import model_trace
    from cellserve.bench.traces import SequenceInput, sequence_input
    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.repository import load_model
    from cellserve.sim.run import arrivals

    _export_features(tmp_path / "repo" / "frames" / "1" / "model.onnx", batch_first)
    model = load_model("frames", tmp_path / "repo")
    assert sequence_input(model) == SequenceInput("features", not batch_first, None, (6,), "float32",
                                                  longest=model.max_sequence_length)
    trace = model_trace(model, 0, 50.0, 0.5)
    assert all(r.sequence.dtype == np.float32 and r.sequence.shape[1:] == (6,) for r in trace)
    want = [(1, len(r.sequence), 6) if batch_first else (len(r.sequence), 1, 6) for r in trace]
    assert [a.inputs["features"].shape for a in arrivals(trace, model, None)] == want
    engine = Engine([model], EngineConfig())
    stats = replay(engine, "frames", "features", trace, "cellular", 50.0, None)
    assert [o.status for o in stats.outcomes] == ["ok"] * len(trace)
    assert engine.stats.lanes_started == len(trace)


def test_a_feature_model_whose_row_width_is_unknown_is_refused_naming_it(tmp_path):
    from cellserve.bench.traces import sequence_input
    from cellserve.server.repository import load_model

    _export_features(tmp_path / "repo" / "wide" / "1" / "model.onnx", True, features_dynamic=True)
    with pytest.raises(ValueError, match=r"model 'wide' takes 'features' as float32 of shape \[-1, -1, -1\]; .*fixed"):
        sequence_input(load_model("wide", tmp_path / "repo"))


@pytest.mark.slow  # profiles a model (about 10 s)
def test_profile_and_simulate_a_feature_model_of_a_repository(tmp_path, capsys):
    _export_features(tmp_path / "repo" / "frames" / "1" / "model.onnx", batch_first=False)
    repo = str(tmp_path / "repo")
    done = cellserve_here(capsys, "profile", "--model", "frames", "--model-repository", repo, "--quick",
                          "--max-batch", "4", "--json", str(tmp_path / "frames.json"))
    assert done.returncode == 0, done.stderr
    assert ModelProfile.from_json(tmp_path / "frames.json").model == "frames"
    done = cellserve_here(capsys, "simulate", "--profile", str(tmp_path / "frames.json"), "--model-repository", repo,
                          "--max-batch", "4", "--rates", "100", "--seconds", "1", "--json", str(tmp_path / "sim.json"))
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "sim.json").read_text())["runs"][0]
    assert run["counts"]["ok"] == run["requests"] > 0


def test_simulate_runs_a_profile_of_a_repository_model(tmp_path, capsys):
    """A profile of a repository model names it as `cellserve profile --model NAME` did (the
    engine calls it NAME:VERSION): simulate finds it there."""
    from cellserve.server.repository import load_model

    _export_tagger(tmp_path / "repo" / "tiny" / "1" / "model.onnx", batch_first=True)
    model = load_model("tiny", tmp_path / "repo")
    profile = tmp_path / "tiny.json"
    synthetic_profile(model, lambda b: 1e-4 + 1e-6 * b).to_json(profile)
    assert ModelProfile.from_json(profile).model == "tiny"
    done = cellserve_here(capsys, "simulate", "--profile", str(profile), "--model-repository", str(tmp_path / "repo"),
                          "--rates", "100", "--seconds", "1", "--json", str(tmp_path / "sim.json"))
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "sim.json").read_text())["runs"][0]
    assert run["counts"]["ok"] == run["requests"] > 0


def test_a_time_major_models_traces_are_one_sequence_per_request(tmp_path, capsys):
    """The benchmarks send a time-major model ([time, batch]) each sequence as [T, 1]: one
    lane per request, not T sequences of one token; and `profile` refuses a model the traces
    cannot drive before it times anything."""
    from cellserve.bench.engine_runner import replay
    from cellserve.bench.profiler import model_trace
    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.server.repository import load_model
    from cellserve.sim.run import arrivals

    _export_tagger(tmp_path / "repo" / "tm" / "1" / "model.onnx", batch_first=False)
    model = load_model("tm", tmp_path / "repo")
    assert (model.semantics["tokens"].time_axis, model.semantics["tokens"].batch_axis) == (0, 1)
    trace = model_trace(model, 0, 50.0, 0.5)
    assert all(a.inputs["tokens"].shape == (len(r.sequence), 1) for a, r in zip(arrivals(trace, model, None), trace))
    engine = Engine([model], EngineConfig())
    stats = replay(engine, "tm", "tokens", trace, "cellular", 50.0, None)
    assert [o.status for o in stats.outcomes] == ["ok"] * len(trace)
    assert engine.stats.lanes_started == len(trace)  # one sequence each

    (tmp_path / "repo" / "two" / "1").mkdir(parents=True)
    import torch

    class TwoInputs(torch.nn.Module):
        def forward(self, tokens, scale):
            return tokens.float() * scale

    torch.onnx.export(TwoInputs(), (torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)),
                      str(tmp_path / "repo" / "two" / "1" / "model.onnx"), input_names=["tokens", "scale"],
                      output_names=["y"], opset_version=17, dynamo=False)
    done = cellserve_here(capsys, "profile", "--model", "two", "--model-repository", str(tmp_path / "repo"),
                          "--json", str(tmp_path / "two.json"))
    assert done.returncode != 0
    assert "takes 2 inputs ('tokens', 'scale')" in done.stderr and "timing" not in done.stdout


def test_a_run_shorter_than_its_minimum_trace_says_so(gru_profile, tmp_path, capsys):
    """A trace holds at least MIN_REQUESTS requests per model: asked for fewer (1 req/s for a
    tenth of a second), the run spans longer than --seconds, and the command says why."""
    from cellserve.bench.traces import MIN_REQUESTS

    done = cellserve_here(capsys, "simulate", "--profile", str(gru_profile), "--rates", "1", "--seconds", "0.1",
                          "--json", str(tmp_path / "short.json"))
    assert done.returncode == 0, done.stderr
    assert f"fewer than {MIN_REQUESTS} requests per model" in done.stdout
    run = json.loads((tmp_path / "short.json").read_text())["runs"][0]
    assert run["requests"] == MIN_REQUESTS
    done = cellserve_here(capsys, "simulate", "--profile", str(gru_profile), "--rates", "100", "--seconds", "1",
                          "--json", str(tmp_path / "long.json"))
    assert "fewer than" not in done.stdout
