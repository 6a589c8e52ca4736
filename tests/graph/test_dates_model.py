"""The dates model (zoo/dates.py): the task's generator and vocabularies, the checked-in weights'
accuracy on fresh inputs, the contract's two modules (masking, GRU cell arithmetic), and their
ONNX export run by onnxruntime."""

import collections
import datetime as dt
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cellserve.graph.zoo import dates
from cellserve.graph.zoo.date_formats import (FORMATS, add_typo, ordinal, ordinal_words, write_date,
                                              year_words)
from cellserve.graph.zoo.dates import (BOS, DECODE_SPEC, EOS, SOURCE_CHARS, TARGET_VOCAB, GRUCellOps, accuracy,
                                       date_task, decode_target, encode_source, encode_target, load_trained,
                                       normalise)

# Measured on these 500 fresh inputs (seed 20240): greedy 0.992, beam 4 0.996 (docs/zoo_dates.md,
# "Measured"); the floors sit 3 points below.
GREEDY_FLOOR, BEAM4_FLOOR = 0.962, 0.966
STEP_OPS = {"Add", "Sub", "Mul", "MatMul", "Gemm", "Tanh", "Sigmoid", "Softmax", "Concat", "Gather",
            "Unsqueeze", "Squeeze", "Constant"}
ENCODER_OPS = {"GRU", "Gather", "Gemm", "Tanh", "Concat", "Transpose", "Reshape", "Unsqueeze", "Constant",
               "Shape", "ConstantOfShape"}


@pytest.fixture(scope="module")
def model():
    return load_trained()


@pytest.fixture(scope="module")
def fresh():
    return date_task(np.random.default_rng(20240), 500)  # training uses seeds 0 and [0, 1]


def test_greedy_accuracy_on_fresh_inputs(model, fresh):
    assert accuracy(model, *fresh, beam_width=1) >= GREEDY_FLOOR


def test_beam4_accuracy_on_fresh_inputs(model, fresh):
    assert accuracy(model, *fresh, beam_width=4) >= BEAM4_FLOOR


def test_beam_one_equals_greedy_on_dates(model, fresh):
    for text in fresh[0][:40]:
        one, greedy = normalise(model, text, 1)[1], normalise(model, text)[1]
        assert one == greedy and len(one.beams) == 1


@pytest.mark.parametrize("text, iso", [("3rd of March 1998", "1998-03-03"), ("03/03/98", "1998-03-03"),
                                       ("March 3, 1998", "1998-03-03"), ("1998.3.3", "1998-03-03"),
                                       ("Tue 3 Mar 98", "1998-03-03"), ("31/12/49", "2049-12-31"),
                                       ("1 Jan. '50", "1950-01-01")])
def test_examples_from_the_brief(model, text, iso):
    assert normalise(model, text, 4)[0] == iso


def test_generator_is_seeded_and_covers_every_format():
    a, b = date_task(np.random.default_rng(7), 300), date_task(np.random.default_rng(7), 300)
    assert a == b
    srcs, tgts = date_task(np.random.default_rng(8), 2000)
    assert all(set(s) <= set(SOURCE_CHARS) for s in srcs)
    assert all(dt.date.fromisoformat(t) for t in tgts)
    assert len(set(tgts)) > 1900
    day = dt.date(1998, 3, 3)
    written = {write_date(day, k, np.random.default_rng(0)) for k in range(len(FORMATS))}
    for example in ["3rd of March 1998", "03/03/98", "March 3, 1998", "1998.3.3", "Tue 3 Mar 98",
                    "Tuesday, March 3rd, 1998", "19980303", "1998-03-03", "3 Mar. '98"]:
        assert example in written
    with pytest.raises(ValueError, match=f"date format {len(FORMATS)} does not exist"):
        write_date(day, len(FORMATS), np.random.default_rng(0))


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def test_number_words():
    assert [ordinal_words(n) for n in (1, 3, 12, 20, 23, 30, 31)] == \
        ["first", "third", "twelfth", "twentieth", "twenty-third", "thirtieth", "thirty-first"]
    assert [year_words(y) for y in (1950, 1998, 2000, 2004, 2017, 2049)] == \
        ["nineteen fifty", "nineteen ninety-eight", "two thousand", "two thousand and four",
         "twenty seventeen", "twenty forty-nine"]


def test_typos_touch_only_long_words():
    rng = np.random.default_rng(5)
    digits = lambda t: [c for c in t if c.isdigit()]  # noqa: E731
    for text in date_task(np.random.default_rng(6), 300, typo_rate=0.0)[0]:
        typo = add_typo(text, rng)
        long_words = [w for w in text.replace("-", " ").replace(",", " ").split() if len(w) >= 5 and w.isalpha()]
        if not long_words:
            assert typo == text
            continue
        assert digits(typo) == digits(text)
        assert len(text) - 1 <= len(typo) <= len(text)
        short = [w for w in text.split() if len(w) < 5 and w.isalpha()]
        assert all(w in typo.split() for w in short)


def test_vocabularies_round_trip_and_name_bad_characters():
    assert decode_target(encode_target("2049-12-31") + [EOS, 5]) == "2049-12-31"
    assert (BOS, EOS, TARGET_VOCAB) == (1, 2, 14)
    assert len(set(encode_source(SOURCE_CHARS))) == len(SOURCE_CHARS) and 0 not in encode_source(SOURCE_CHARS)
    with pytest.raises(ValueError, match="'#' at position 1 in '3#4'"):
        encode_source("3#4")
    with pytest.raises(ValueError, match="empty date string"):
        encode_source("")
    with pytest.raises(ValueError, match="'/' at position 4"):
        encode_target("1998/03/03")
    with pytest.raises(ValueError, match="not a target character id: 1"):
        decode_target([3, BOS])


def test_gru_cell_ops_equal_torch_gru_cell():
    torch.manual_seed(0)
    ops, ref = GRUCellOps(5, 4), torch.nn.GRUCell(5, 4)
    w_ih, w_hh, b_ih, b_hh = (t.chunk(3) for t in (ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh))
    with torch.no_grad():
        for i, (ig, hg) in enumerate([(ops.ir, ops.hr), (ops.iz, ops.hz), (ops.in_, ops.hn)]):
            ig.weight.copy_(w_ih[i]), ig.bias.copy_(b_ih[i]), hg.weight.copy_(w_hh[i]), hg.bias.copy_(b_hh[i])
        x, h = torch.randn(3, 5), torch.randn(3, 4)
        torch.testing.assert_close(ops(x, h), ref(x, h))


def test_padded_encoder_batch_equals_each_row_alone(model):
    texts = ["1998.3.3", "Tuesday, March 3rd, 1998", "3/3/1998"]
    ids = [encode_source(t) for t in texts]
    src = torch.zeros(3, max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        src[i, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        memory, h, att = model.encoder(src, torch.tensor([len(r) for r in ids]))
        for i, row in enumerate(ids):
            m1, h1, a1 = model.encoder(torch.tensor([row]))
            torch.testing.assert_close(memory[i, :len(row)], m1[0])
            torch.testing.assert_close((h[i], att[i]), (h1[0], a1[0]))


def test_step_logits_do_not_depend_on_padding(model):
    with torch.no_grad():
        memory, h, att = model.encoder(torch.tensor([encode_source("March 3, 1998")]))
        alone = model.step(torch.tensor([BOS]), memory, torch.ones(1, memory.shape[1]), h, att)
        junk = torch.randn(1, 7, memory.shape[2]) * 100  # padding holds anything finite
        padded = torch.cat([memory, junk], dim=1)
        mask = torch.cat([torch.ones(1, memory.shape[1]), torch.zeros(1, 7)], dim=1)
        together = model.step(torch.tensor([BOS]), padded, mask, h, att)
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_missing_weight_array_is_named(tmp_path):
    with np.load(dates.WEIGHTS_PATH, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "step.out.bias"}
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(ValueError, match="missing weight arrays \\['step.out.bias'\\]"):
        load_trained(tmp_path / "broken.npz")


def test_onnx_export_uses_plain_ops_and_matches_torch(model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc_path, step_path = dates.export_onnx(model, tmp_path)
    step_ops = collections.Counter(n.op_type for n in onnx.load(step_path).graph.node)
    enc_ops = collections.Counter(n.op_type for n in onnx.load(enc_path).graph.node)
    assert set(step_ops) <= STEP_OPS, set(step_ops) - STEP_OPS
    assert set(enc_ops) <= ENCODER_OPS, set(enc_ops) - ENCODER_OPS
    assert step_ops["Softmax"] == 1 and "GRU" not in step_ops  # the cell is written out
    enc = ort.InferenceSession(str(enc_path), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(step_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in step.get_inputs()] == dates.STEP_INPUTS
    assert [o.name for o in step.get_outputs()] == dates.STEP_OUTPUTS
    # Two requests of different lengths, each encoded alone, then one batched step over both.
    rows = [encode_source("Wed 12 Jul 67"), encode_source("the 21st of november, 2003")]
    memories, h0, att0 = [], [], []
    for row in rows:
        source = np.array([row], dtype=np.int64)
        m, h, a = enc.run(None, {"source": source})
        with torch.no_grad():
            tm, th, ta = model.encoder(torch.from_numpy(source))
        np.testing.assert_allclose(m, tm.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.concatenate([h, a]), torch.cat([th, ta]).numpy(), atol=1e-5)
        memories.append(m[0]), h0.append(h[0]), att0.append(a[0])
    S = max(len(r) for r in rows)
    memory = np.zeros((2, S, memories[0].shape[1]), np.float32)
    mask = np.zeros((2, S), np.float32)
    for i, m in enumerate(memories):
        memory[i, :len(m)], mask[i, :len(m)] = m, 1.0
    feeds = {"token": np.array([BOS, 7], np.int64), "memory": memory, "memory_mask": mask,
             "h": np.stack(h0), "att": np.stack(att0)}
    got = step.run(None, feeds)
    with torch.no_grad():
        want = model.step(*(torch.from_numpy(feeds[n]) for n in dates.STEP_INPUTS))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)


def test_decode_spec_names_the_exported_tensors():
    assert DECODE_SPEC.memory in dates.ENCODER_OUTPUTS
    assert {e for _, e in DECODE_SPEC.init} <= set(dates.ENCODER_OUTPUTS)
    assert DECODE_SPEC.state_inputs == dates.STEP_INPUTS[3:]
    assert DECODE_SPEC.state_outputs == dates.STEP_OUTPUTS[1:]
    assert (DECODE_SPEC.token_input, DECODE_SPEC.memory_input, DECODE_SPEC.mask_input) == tuple(dates.STEP_INPUTS[:3])
    assert DECODE_SPEC.logits_output == dates.STEP_OUTPUTS[0]
    assert 0 <= DECODE_SPEC.eos < TARGET_VOCAB and 0 <= DECODE_SPEC.bos < TARGET_VOCAB
    assert DECODE_SPEC.max_length.limit(5) == dates.MAX_OUTPUT_STEPS
    assert type(DECODE_SPEC).from_dict(DECODE_SPEC.to_dict()) == DECODE_SPEC


def test_engine_serves_it_greedily_as_the_reference_decodes(model):
    """Through the decoder-step path (load_torch_seq2seq, GraphDecoder): 40 requests of mixed
    lengths in one engine answer token for token as the reference greedy search."""
    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.engine.request import Request
    from cellserve.graph.seq2seq_import import load_torch_seq2seq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = load_torch_seq2seq(model.encoder, model.step, DECODE_SPEC, "dates",
                                    example=(torch.tensor([encode_source("3 March 1998")]),),
                                    encoder_inputs=dates.ENCODER_INPUTS, encoder_outputs=dates.ENCODER_OUTPUTS)
    srcs, _ = date_task(np.random.default_rng(99), 40)
    engine, answers = Engine([served], EngineConfig()), collections.defaultdict(list)
    for i, text in enumerate(srcs):
        engine.submit(Request("dates", {"source": np.array([encode_source(text)])},
                              on_done=lambda r, i=i: answers[i].append(r)))
    engine.run_until_idle(timeout_s=60)
    for i, text in enumerate(srcs):
        assert len(answers[i]) == 1
        tokens = [int(t) for t in np.asarray(answers[i][0].outputs["date"]).reshape(-1) if int(t) != dates.PAD]
        assert tokens == list(normalise(model, text)[1].best.tokens), text
