"""The zoo's variant families (cellserve/graph/zoo/families.py): trained weights checked in,
accuracies re-measured on fresh inputs against each variant's floor, and their order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.graph.zoo import families
from cellserve.graph.zoo.seq2seq import (MAX_INPUT_DIGITS, decode_digits, encode_digits, greedy_decode,
                                         reverse_task)

# A stream neither training (seed 0, [0, 1]) nor the recorded measurement (ACCURACY_SEED) used.
FRESH_SEED = [families.ACCURACY_SEED, 7]
FRESH_INPUTS = 1000


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fresh_accuracy() -> dict[str, float]:
    return {name: families.measure(name, FRESH_INPUTS, FRESH_SEED) for name in families.VARIANTS}


def test_weights_are_checked_in_as_plain_npz():
    for spec in families.VARIANTS.values():
        assert spec.path.is_file(), spec.path
        with np.load(spec.path, allow_pickle=False) as z:  # no pickled objects in it
            assert int(z["config_hidden"]) == spec.hidden and int(z["config_embed"]) == spec.embed


@pytest.mark.parametrize("name", list(families.VARIANTS))
def test_each_variant_holds_its_floor_on_fresh_inputs(fresh_accuracy, name):
    spec = families.variant(name)
    assert fresh_accuracy[name] >= spec.floor, f"{name}: {fresh_accuracy[name]:.4f} < floor {spec.floor}"
    # the recorded figure is what the measurement gives (within ~4 standard errors of 1000 inputs)
    err = max(4 * (spec.accuracy * (1 - spec.accuracy) / FRESH_INPUTS) ** 0.5, 0.005)
    assert abs(fresh_accuracy[name] - spec.accuracy) <= err, (name, fresh_accuracy[name], spec.accuracy)


def test_bigger_variants_are_more_accurate_and_materially_so(fresh_accuracy):
    for fam in families.FAMILIES.values():
        accs = [fresh_accuracy[v.name] for v in fam.variants]
        recorded = [v.accuracy for v in fam.variants]
        assert accs == sorted(accs) and recorded == sorted(recorded), (fam.name, accs, recorded)
        assert accs[-1] - accs[0] >= 0.2, accs  # something for the planner to trade
        widths = [v.hidden for v in fam.variants]
        assert widths == sorted(set(widths))


def test_the_recorded_accuracy_is_the_measurement_it_names():
    spec = families.variant("reverse-h32")
    got = families.measure(spec.name, families.ACCURACY_INPUTS, families.ACCURACY_SEED)
    assert got == pytest.approx(spec.accuracy, abs=0.003)  # thread counts may flip a near tie or two


def test_batched_greedy_gives_the_reference_decode():
    srcs, _ = reverse_task(np.random.default_rng(99), 120, 1, MAX_INPUT_DIGITS)
    for name in ("reverse-h16", "reverse-h32"):  # h16 errs often: its wrong answers must agree too
        model = families.load_reference(name)
        one_by_one = []
        for s in srcs:
            ids = greedy_decode(model, encode_digits(s), MAX_INPUT_DIGITS + 1)
            one_by_one.append(decode_digits(ids) if all(t >= 3 for t in ids) else "?")
        with torch.no_grad():
            assert families.batched_greedy(model, srcs, chunk=50) == one_by_one


def test_served_variant_answers_as_its_reference():
    from cellserve.engine.engine import Engine, EngineConfig
    from cellserve.engine.request import Request, Status

    name = "reverse-h16"
    model = families.load(name)
    assert model.name == name
    engine = Engine([model], EngineConfig(max_batch=8, profile=False))
    srcs, _ = reverse_task(np.random.default_rng(5), 16, 1, MAX_INPUT_DIGITS)
    done = {}
    for i, s in enumerate(srcs):
        engine.submit(Request(name, {model.inputs[0].name: np.array([encode_digits(s)], dtype=np.int64)},
                              on_done=lambda r, i=i: done.__setitem__(i, r)))
    engine.run_until_idle()
    ref = families.load_reference(name)
    with torch.no_grad():
        expected = families.batched_greedy(ref, srcs)
    for i, s in enumerate(srcs):
        assert done[i].status is Status.OK, done[i].reason
        ids = [int(t) for t in np.asarray(done[i].outputs["reversed"]).ravel() if int(t) != 0]
        got = decode_digits(ids) if all(t >= 3 for t in ids) else "?"
        assert got == expected[i], (s, got, expected[i])


def test_families_of_and_unknown_names():
    assert families.families_of(["reverse-h128", "lstm-512", "reverse-h16"]) == {
        "reverse": ["reverse-h16", "reverse-h128"]}
    assert families.families_of(["lstm-512"]) == {}
    with pytest.raises(KeyError, match="no variant 'reverse-h99'.*reverse-h16"):
        families.variant("reverse-h99")
    assert families.family_of("reverse-h32").name == "reverse"
