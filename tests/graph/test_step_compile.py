"""The compiled decoder step (graph/step_compile.py, step_rewrite.py) computes what the
node-by-node interpreter computes: on the exported example decoders, on small hand-built
graphs exercising each rewrite in its variants, and on ops that have no specialised form."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cellserve.graph.decode_spec import MaxLength
from cellserve.graph.decoder_graph import device_constants, interpret_step_graph, load_decoder_step
from cellserve.graph.seq2seq_examples import (AdditiveSeq2Seq, ReverserEncoder, ReverserStep, additive_spec,
                                              load_additive)
from cellserve.graph.seq2seq_import import load_torch_seq2seq
from cellserve.graph.zoo import seq2seq

CPU = torch.device("cpu")


@functools.cache
def _reverser_graph():
    m = seq2seq.load_trained()
    spec = dataclasses.replace(additive_spec(MaxLength(absolute=13)), bos=seq2seq.BOS, eos=seq2seq.EOS,
                               output="reversed", states=(("h", "h_next"), ("c", "c_next")), init=(("h", "h0"), ("c", "c0")))
    model = load_torch_seq2seq(ReverserEncoder(m), ReverserStep(m), spec, "rev", (torch.zeros((1, 3), dtype=torch.long),),
                               ["digits"], ["memory", "h0", "c0"])
    return model.program[-1].graph, m.hidden, seq2seq.VOCAB


@functools.cache
def _additive_graph():
    torch.manual_seed(3)
    m = AdditiveSeq2Seq(vocab=20, embed=16, hidden=32).eval()
    model = load_additive(m)
    return model.program[-1].graph, 32, 20


def _feeds(graph, hidden: int, vocab: int, lengths: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, width = len(lengths), max(lengths)
    feeds = {"token": torch.randint(0, vocab, (b,), generator=g), "memory": torch.randn(b, width, hidden, generator=g),
             "memory_mask": (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()}
    for spec in graph.inputs:
        if spec.name not in feeds:
            feeds[spec.name] = torch.randn(b, hidden, generator=g)
    return feeds


def _same(graph, feeds, atol=1e-5):
    compiled = device_constants(graph, CPU)
    plain = device_constants(graph, CPU, compiled=False)
    assert compiled.compiled is not None and plain.compiled is None
    got = compiled.compiled(feeds)
    want = interpret_step_graph(graph, feeds, plain)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)
    return got, want, compiled.compiled


@pytest.mark.parametrize("make", [_reverser_graph, _additive_graph], ids=["reverser-lstm-dot", "additive-gru-feed"])
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=9), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_the_compiled_step_equals_the_interpreter_on_padded_masked_batches(make, lengths, seed):
    graph, hidden, vocab = make()
    got, want, _ = _same(graph, _feeds(graph, hidden, vocab, lengths, seed))
    assert torch.equal(torch.argmax(got["logits"], 1), torch.argmax(want["logits"], 1))


def test_the_reverser_step_folds_its_embedding_and_bias_and_drops_its_casts():
    graph, _, _ = _reverser_graph()
    before = [dataclasses.replace(n, inputs=list(n.inputs)) for n in graph.nodes]
    step = device_constants(graph, CPU).compiled
    assert graph.nodes == before  # the loaded graph is left as it was
    # the embedding Gather, its Gemm, the recurrent Gemm's Add, Not and Cast are gone
    assert step.nodes == len(graph.nodes) - 4
    assert "model.tgt_embedding.weight" not in step.source and "_OPS[" not in step.source
    assert step.source.count("torch.addmm(") == 3 and "torch.bmm(" in step.source


def test_the_compiled_step_shares_the_placed_weights_instead_of_copying_them():
    graph, _, _ = _reverser_graph()
    placed = device_constants(graph, CPU)
    tensors = [v for v in placed.compiled.fn.__globals__.values() if isinstance(v, torch.Tensor)]
    shared = {t.data_ptr() for t in tensors} & {t.data_ptr() for t in placed.values()}
    assert {placed[n].data_ptr() for n in ("model.out.weight", "model.combine.weight", "model.decoder.weight_hh")} <= shared
    made = [t for t in tensors if t.data_ptr() not in shared]
    assert sum(t.numel() for t in made) <= 13 * 256  # the folded table, nothing else


def test_the_input_feeding_concat_is_split_between_the_table_and_the_gemm():
    graph, _, _ = _additive_graph()
    step = device_constants(graph, CPU).compiled
    assert "torch.cat" in step.source  # only the attention's concat is left
    assert step.source.count("torch.cat") == 1


def _gemm_graph(side: str, trans_b: int, alpha: float, beta: float, bias: str, add_recurrent: bool) -> onnx.ModelProto:
    """token -> Gather(E) [-> Concat with x on `side`] -> Gemm(W, b) [+ Gemm(h, U, c)] -> y."""
    rng = np.random.default_rng(0)
    e, k, n, vocab = 4, 3, 5, 7
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, e)).astype(np.float32), "E")]
    width = e + (k if side != "none" else 0)
    w = rng.standard_normal((n, width) if trans_b else (width, n)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "W"))
    nodes = [helper.make_node("Gather", ["E", "token"], ["emb"], name="emb")]
    x = "emb"
    if side != "none":
        nodes.append(helper.make_node("Concat", ["emb", "x"] if side == "left" else ["x", "emb"], ["cat"], axis=1,
                                      name="cat"))
        x = "cat"
    gemm_inputs = [x, "W"]
    if bias != "none":
        shape = {"vector": (n,), "row": (1, n), "scalar": (1,)}[bias]
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "b"))
        gemm_inputs.append("b")
    out = "proj" if add_recurrent else "y"
    nodes.append(helper.make_node("Gemm", gemm_inputs, [out], transB=trans_b, alpha=alpha, beta=beta, name="gemm"))
    if add_recurrent:
        inits += [numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "U"),
                  numpy_helper.from_array(rng.standard_normal((n,)).astype(np.float32), "c")]
        nodes += [helper.make_node("Gemm", ["h", "U", "c"], ["rec"], transB=1, name="rec"),
                  helper.make_node("Add", ["rec", "proj"], ["y"], name="add")]
    inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, ["b"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k]),
              helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", k])]
    used = {i for node in nodes for i in node.input}
    graph = helper.make_graph(nodes, "g", [i for i in inputs if i.name in used],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@given(side=st.sampled_from(["none", "left", "right"]), trans_b=st.sampled_from([0, 1]),
       alpha=st.sampled_from([1.0, 0.5]), beta=st.sampled_from([1.0, 2.0]),
       bias=st.sampled_from(["none", "vector", "row", "scalar"]), add_recurrent=st.booleans())
@settings(max_examples=40, deadline=None)
def test_each_fold_variant_computes_what_the_graph_computes(side, trans_b, alpha, beta, bias, add_recurrent):
    graph = load_decoder_step(_gemm_graph(side, trans_b, alpha, beta, bias, add_recurrent))
    g = torch.Generator().manual_seed(1)
    feeds = {"token": torch.tensor([0, 6, 3, -1]), "x": torch.randn(4, 3, generator=g), "h": torch.randn(4, 3, generator=g)}
    feeds = {k: v for k, v in feeds.items() if graph.input(k)}
    _, _, step = _same(graph, feeds)
    placed = [v.shape for v in step.fn.__globals__.values() if isinstance(v, torch.Tensor)]
    assert (7, 4) not in placed  # the embedding table itself never reaches the device: its projection does
    assert step.nodes < len(graph.nodes)


def test_ops_without_a_special_form_run_through_step_ops_and_agree():
    """Shape-computed reshapes, Slice, Expand, LayerNormalization, a float64 Cast, Identity and
    a Where on a negated condition that is also a graph output."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "scale"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Shape", ["h"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Concat", ["batch", "two", "minus1"], ["new_shape"], axis=0),
             helper.make_node("Reshape", ["h", "new_shape"], ["r"]),
             helper.make_node("Slice", ["r", "zero", "two", "one"], ["s"]),  # the whole of axis 1: [b, 2, 3]
             helper.make_node("Identity", ["s"], ["s2"]),
             helper.make_node("Reshape", ["s2", "shape"], ["back"]),
             helper.make_node("LayerNormalization", ["back", "scale"], ["ln"], axis=-1),
             helper.make_node("Cast", ["ln"], ["ln64"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["ln64"], ["ln32"], to=TensorProto.FLOAT),
             helper.make_node("Greater", ["h", "half"], ["gt"]),
             helper.make_node("Not", ["gt"], ["le"]),
             helper.make_node("Where", ["le", "ln32", "h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6]),
                               helper.make_tensor_value_info("le", TensorProto.BOOL, ["b", 6])], inits)
    step_graph = load_decoder_step(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    got, _, step = _same(step_graph, {"h": torch.randn(5, 6, generator=torch.Generator().manual_seed(0))})
    assert "_OPS['Shape']" in step.source and "_OPS['Slice']" in step.source
    assert got["le"].dtype == torch.bool  # the Not stays: its output is a graph output


def test_a_failing_compiled_step_raises_naming_the_node():
    graph, hidden, vocab = _reverser_graph()
    feeds = _feeds(graph, hidden, vocab, [3, 4], 0)
    feeds["h"] = torch.randn(2, hidden + 1)  # the recurrent Gemm cannot take it
    with pytest.raises(RuntimeError, match=r"node 'decoder\.Gemm' \(Gemm\) failed"):
        device_constants(graph, CPU).compiled(feeds)
