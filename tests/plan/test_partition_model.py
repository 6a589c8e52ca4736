"""The graph built from a model and its profiles: the engine's cell types and plain-op groups
as nodes, costs scaled by the request's length, edges with the bytes the tensors carry, a
modelled GPU said to be modelled; and `plan partition --model NAME --profiles P.json`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cellserve import cli
from cellserve.graph import zoo
from cellserve.graph.stacking import stack_layers
from cellserve.plan.gpu_model import gpu_class, modelled_gpu_profile
from cellserve.plan.partition_graph import PartitionError
from cellserve.plan.partition_io import load_graph, load_plan
from cellserve.plan.partition_model import build_graph, pinned
from cellserve.plan.profile import Machine, synthetic_profile


def _cpu_profile(model):
    p = synthetic_profile(model, 1e-4, max_batch=4, plain_op_s=2e-5)
    return dataclasses.replace(p, machine=Machine("cpu", "test cpu", 1, "torch"))


@pytest.fixture(scope="module")
def tagger():
    model = zoo.load("bilstm-tagger")
    cpu = _cpu_profile(model)
    return model, cpu, modelled_gpu_profile(stack_layers(model), cpu, gpu_class("t4"))


def test_nodes_are_the_engines_cell_types_and_plain_op_groups(tagger):
    model, cpu, gpu = tagger
    g = build_graph(model, {"cpu": cpu, "gpu": gpu}, 20, gpu_class("t4"))
    ids = g.node_ids()
    for cell_type in stack_layers(model).cell_types():
        assert cell_type in ids
    groups = g.source["groups"]
    assert groups and all(gid in ids for gid in groups)
    assert ids[0] == "bilstm-tagger/input" and ids[-1] == "bilstm-tagger/output"
    assert g.nodes[0].cost_ms == {"cpu": 0.0} and g.nodes[-1].cost_ms == {"cpu": 0.0}
    both = [e for e in g.edges if e.dst == "bilstm-tagger/rnn.LSTM_1/0"]
    assert both and all(e.mb > 0 for e in both)
    # the two directions of a layer read the same input and neither waits for the other
    assert not any(e.src == "bilstm-tagger/rnn.LSTM/0" and e.dst == "bilstm-tagger/rnn.LSTM/1" for e in g.edges)
    assert set(g.links) == {("cpu", "gpu"), ("gpu", "cpu")}


def test_costs_and_edges_scale_with_the_length(tagger):
    model, cpu, gpu = tagger
    short = build_graph(model, {"cpu": cpu, "gpu": gpu}, 10, gpu_class("t4"))
    long = build_graph(model, {"cpu": cpu, "gpu": gpu}, 20, gpu_class("t4"))
    cell = "bilstm-tagger/rnn.LSTM/0"
    c10 = {n.id: n for n in short.nodes}[cell].cost_ms["cpu"]
    c20 = {n.id: n for n in long.nodes}[cell].cost_ms["cpu"]
    assert c10 == pytest.approx(1.0, rel=1e-9)  # 10 steps of 0.1 ms (the synthetic profile)
    assert c20 == pytest.approx(2 * c10, rel=1e-9)
    mb = {(e.src, e.dst): e.mb for e in short.edges}
    mb2 = {(e.src, e.dst): e.mb for e in long.edges}
    assert mb2[(cell, "bilstm-tagger/ops/1")] == pytest.approx(2 * mb[(cell, "bilstm-tagger/ops/1")])


def test_single_device_baseline_pins_what_it_can(tagger):
    model, cpu, gpu = tagger
    g = pinned(build_graph(model, {"cpu": cpu, "gpu": gpu}, 10, gpu_class("t4")), "gpu")
    for n in g.nodes:
        assert set(n.cost_ms) == ({"cpu"} if n.id.endswith(("/input", "/output")) else {"gpu"})


def test_a_length_beyond_the_model_is_refused():
    model = zoo.load("seq2seq-reverse")
    with pytest.raises(PartitionError, match="--length must be 1 to model 'seq2seq-reverse'"):
        build_graph(model, {"cpu": _cpu_profile(model)}, 40, None)


def test_cli_model_form(tmp_path, capsys):
    model = zoo.load("seq2seq-reverse")
    _cpu_profile(model).to_json(tmp_path / "cpu.json")
    out, graph = tmp_path / "plan.json", tmp_path / "graph.json"
    code = cli.main(["plan", "partition", "--model", "seq2seq-reverse", "--profiles", str(tmp_path / "cpu.json"),
                     "--length", "8", "--mode", "latency", "--write-graph", str(graph), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    plan, g = load_plan(out), load_graph(graph)
    assert set(plan.assignment) == set(g.node_ids())
    assert plan.source["profiles"]["gpu"]["modelled"] is True
    assert plan.source["profiles"]["cpu"]["modelled"] is True  # a synthetic profile says so
    assert plan.source["length_tokens"] == 8
    assert json.loads(out.read_text())["solver"] == "milp"


def test_cli_model_form_needs_a_cpu_profile(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "partition", "--model", "gru-256", "--mode", "latency", "--json", str(tmp_path / "p.json")])
    assert exc.value.code == 2
    assert "--model needs --profiles" in capsys.readouterr().err


def test_a_layer_fed_by_an_embedding_holds_its_projected_table_too(tagger):
    """The kernel keeps the embedding table projected through W_ih (vocabulary x gates floats)
    beside the weights: the node's memory counts it, as the profile's weight_bytes do."""
    model, cpu, gpu = tagger
    g = build_graph(model, {"cpu": cpu, "gpu": gpu}, 20, gpu_class("t4"))
    first = stack_layers(model).recurrent_steps()[0]
    d = first.directions[0]
    own = sum(a.nbytes for a in (d.w_ih, d.w_hh, d.b_ih, d.b_hh)) + first.token_table.nbytes
    projected = first.token_table.shape[0] * 4 * first.hidden * 4  # LSTM: 4 gates, float32
    assert first.projected_table_bytes() == projected > 0
    node = next(n for n in g.nodes if n.id == "bilstm-tagger/rnn.LSTM/0")
    assert node.memory_mb["cpu"] == pytest.approx((own + projected) / 1e6)
