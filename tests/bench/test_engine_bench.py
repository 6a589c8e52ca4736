"""`bench engine` end to end on a small zoo model and a short ramp: the JSON holds every
policy with the documented fields, each max goodput with its bracket, and the plot is written.
(The ramp's search itself is tested on synthetic systems in test_ramp.py.)"""

import json
import math

import pytest

from cellserve.bench import engine_bench
from cellserve.bench.ramp import Bracket


@pytest.mark.slow  # every policy really served, for seconds
def test_engine_bench_ramps_every_policy_and_brackets_its_max_goodput(tmp_path):
    cfg = engine_bench.BenchConfig(model="gru-256", slo_ms=200, quick=True, json_path=tmp_path / "out.json",
                                   seconds_per_run=0.4, ramp_factor=4.0, refine_steps=1, repeats=1)
    report = engine_bench.run(cfg, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.png").stat().st_size > 1000
    assert on_disk["roofline_gflops"] > 0 and on_disk["capacity_estimate_rps"] > 0
    assert set(on_disk["policies"]) == {"cellular", "padded", "none", "ort", "ort-padded"}
    light = on_disk["ramp"]["start_rps"]
    assert math.isclose(light, round(0.1 * on_disk["capacity_estimate_rps"], 1))
    for policy, d in on_disk["policies"].items():
        for key in ("max_goodput_rps", "light_load_p50_ms", "saturation_gflops", "overhead_us_per_step"):
            assert isinstance(d[key], float) and not math.isnan(d[key]), (policy, key)
        runs = d["runs"]
        rates = [r["rate_rps"] for r in runs]
        assert rates == sorted(rates) and rates[0] == light and set(rates) <= set(on_disk["rates_rps"])
        assert all(sum(r["counts"].values()) == r["requests"] for r in runs)
        assert d["max_goodput_rps"] == max(r["goodput_rps"] for r in runs)
        # the verdict agrees with the runs it was drawn from
        low, high = d["capacity_bracket_rps"]
        passed = [r["rate_rps"] for r in runs if r["passed"]]
        assert d["capacity_below_start"] == (not runs[0]["passed"])
        assert low == (max(passed) if passed else None)
        if d["bracketed"]:
            assert low < high and not next(r for r in runs if r["rate_rps"] == high)["passed"]
        elif not d["capacity_below_start"]:
            assert high is None and low == rates[-1]
    text = engine_bench.table(report)
    assert "cellular" in text
    marked = [Bracket.from_dict(d).marker for d in on_disk["policies"].values()]
    assert (">= no rate above it failed" in text) == (">=" in marked)
    assert ("*  the lowest rate offered already failed" in text) == ("*" in marked)


def test_fixed_rates_are_bracketed_too(tmp_path):
    cfg = engine_bench.BenchConfig(model="gru-256", quick=True, load_fractions=(0.1, 0.5), repeats=1)
    plan = cfg.plan(1000.0)
    assert plan.rates == (100.0, 500.0) and plan.tries == 1
    full = engine_bench.BenchConfig(model="gru-256").plan(1000.0)
    assert (full.start_rps, full.factor, full.refine_steps, full.max_rps, full.tries) == (100.0, 1.25, 3, 3000.0, 2)


def _repository(root, time_major: bool, two_inputs: bool = False):
    """A user's model repository: an embedding, a GRU and a head, exported as users do."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.rnn = torch.nn.Embedding(60, 16), torch.nn.GRU(16, 16, batch_first=not time_major)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, tokens, *extra):
            y = self.head(self.rnn(self.embedding(tokens))[0])
            return y * extra[0] if extra else y

    torch.manual_seed(0)
    axes = {0: "time", 1: "batch"} if time_major else {0: "batch", 1: "time"}
    names = ["tokens", "scale"] if two_inputs else ["tokens"]
    example = (torch.zeros((3, 1) if time_major else (1, 3), dtype=torch.long),) + ((torch.ones(1),) if two_inputs else ())
    (root / "mine" / "1").mkdir(parents=True)
    torch.onnx.export(Net().eval(), example, str(root / "mine" / "1" / "model.onnx"), input_names=names,
                      output_names=["y"], dynamic_axes={"tokens": axes, "y": axes}, opset_version=17, dynamo=False)
    return root


@pytest.mark.slow  # every policy really served, for seconds
def test_engine_bench_runs_a_repository_model_laid_out_time_major(tmp_path):
    repo = _repository(tmp_path / "repo", time_major=True)
    cfg = engine_bench.BenchConfig(model="mine", model_repository=repo, slo_ms=200, quick=True,
                                   json_path=tmp_path / "out.json", seconds_per_run=0.4, ramp_factor=4.0,
                                   refine_steps=1, repeats=1)
    report = engine_bench.run(cfg, log=lambda *_: None)
    # ONNX Runtime runs the model's own file beside the policies
    assert set(report["policies"]) == {"cellular", "padded", "none", "ort", "ort-padded"}
    assert report["skipped_policies"] == {}
    for policy in ("cellular", "ort"):
        light = report["policies"][policy]["runs"][0]
        assert light["counts"]["ok"] == light["requests"] > 0 and report["policies"][policy]["max_goodput_rps"] > 0


def test_engine_bench_refuses_a_model_its_traces_cannot_drive(tmp_path, capsys):
    from cellserve import cli

    repo = _repository(tmp_path / "repo", time_major=False, two_inputs=True)
    code = cli.main(["bench", "engine", "--model", "mine", "--model-repository", str(repo), "--quick",
                     "--json", str(tmp_path / "out.json")])
    assert code == 2
    assert ("takes input 'scale' of shape [1] beside its sequence; the benchmarks fill in only a recurrent layer's "
            "initial state or its sequence lengths, and 'scale' feeds neither") in capsys.readouterr().err
