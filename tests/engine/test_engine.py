"""Through the Engine: batching never changes what a request gets back."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellserve.engine.engine import Engine, EngineConfig
from cellserve.engine.request import Request, Status
from cellserve.graph.zoo.seq2seq import MAX_INPUT_DIGITS, PAD, encode_digits, reverse_task
from helpers_engine import (VOCAB, FakeClock, Responses, assert_same_outputs, make_request, run_alone,
                            seq2seq_reference)

SERVED = ["lstm", "gru", "tagger", "seq2seq-reverse"]


def _fused_default() -> bool:
    from cellserve.kernels.cell import default_backend

    return default_backend(torch.device("cpu")) == "fused"

# (policy, backend, max_batch): default backend is the best for the CPU (fused with AVX-512, else onednn or blas)
CONFIGS = [
    ("cellular", None, None),
    ("cellular", None, 2),
    ("cellular", "onednn", 3),
    ("cellular", "torch", None),
    ("cellular-edf", None, 3),
    ("padded", None, None),
    ("padded", "torch", 2),
    ("none", None, None),
]


@st.composite
def request_specs(draw):
    name = draw(st.sampled_from(SERVED))
    rows = draw(st.integers(1, 2))
    if name == "seq2seq-reverse":
        length, low, high, key = draw(st.integers(1, MAX_INPUT_DIGITS)), 3, 12, "digits"
    else:
        length, low, high, key = draw(st.integers(1, 9)), 0, VOCAB - 1, "tokens"
    ids = draw(st.lists(st.integers(low, high), min_size=rows * length, max_size=rows * length))
    steps_before = draw(st.integers(0, 3))  # engine.step() calls before this request is submitted
    priority = draw(st.integers(0, 2))  # decides which lanes run when a type has more than max_batch
    return name, {key: np.array(ids, np.int64).reshape(rows, length)}, steps_before, priority


def serve_mix(models, specs, config: EngineConfig, clock) -> list[dict]:
    """Submit the requests interleaved with engine steps; return each one's outputs."""
    engine = Engine([models.models[n] for n in SERVED], config, clock=clock)
    responses = Responses()
    for i, (name, inputs, steps_before, priority) in enumerate(specs):
        for _ in range(steps_before):
            engine.step()
        engine.submit(make_request(responses, i, name, inputs, priority=priority))
    engine.run_until_idle(timeout_s=30)
    assert engine.idle() and engine.active_requests == 0
    out = []
    for i in range(len(specs)):
        response = responses.one(i)  # exactly one response each
        assert response.status is Status.OK, f"request {i}: {response.status} {response.reason}"
        out.append(response.outputs)
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(request_specs(), min_size=1, max_size=6))
def test_every_request_gets_the_outputs_it_gets_alone_under_every_policy_and_backend(models, specs):
    alone = [run_alone(models, name, inputs) for name, inputs, _, _ in specs]
    for (name, inputs, _, _), want in zip(specs, alone):  # and "alone" is right
        if name == "seq2seq-reverse":
            np.testing.assert_array_equal(want["reversed"], seq2seq_reference(models, inputs["digits"]))
        else:
            assert_same_outputs(want, models.reference(name, inputs), f"{name} alone vs PyTorch")
    for policy, backend, max_batch in CONFIGS:
        config = EngineConfig(policy=policy, backend=backend, max_batch=max_batch, batch_timeout_s=0.0,
                              profile=False)
        got = serve_mix(models, specs, config, FakeClock())
        for i, ((name, *_), g, want) in enumerate(zip(specs, got, alone)):
            assert_same_outputs(g, want, f"{policy}/{backend}/{max_batch}: request {i} ({name})")


def test_padded_policy_with_a_timeout_serves_requests_that_never_fill_a_batch(models, clock):
    # fewer requests than max_batch: the cohort forms once the clock passes the timeout
    engine = Engine([models.models["gru"]], EngineConfig(policy="padded", max_batch=8, batch_timeout_s=0.01,
                                                         profile=False), clock=clock)
    responses = Responses()
    tokens = np.array([[1, 2, 3]])
    engine.submit(make_request(responses, 0, "gru", {"tokens": tokens}))
    assert not engine.step() and not engine.step()  # waiting for company
    clock.advance(0.02)
    engine.run_until_idle(timeout_s=10)
    assert responses.one(0).status is Status.OK
    assert_same_outputs(responses.one(0).outputs, models.reference("gru", {"tokens": tokens}))


def test_seq2seq_reverses_fresh_digit_strings_through_the_cellular_engine(models):
    srcs, targets = reverse_task(np.random.default_rng(2024), 200)
    engine = Engine([models.models["seq2seq-reverse"]], EngineConfig(policy="cellular", profile=False))
    responses = Responses()
    for i, s in enumerate(srcs):
        engine.submit(make_request(responses, i, "seq2seq-reverse", {"digits": np.array([encode_digits(s)])}))
    engine.run_until_idle(timeout_s=30)
    assert engine.stats.batch_size_sum / engine.stats.cell_steps > 8  # it really batched
    right = 0
    for i, target in enumerate(targets):
        response = responses.one(i)
        assert response.status is Status.OK, response.reason
        tokens = [t for t in response.outputs["reversed"][0].tolist() if t != PAD]
        right += tokens == encode_digits(target)
    assert right >= 198, f"only {right}/200 reversed"


def test_abort_all_answers_every_queued_and_running_request_once(models):
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False))
    responses = Responses()
    for i in range(3):
        engine.submit(make_request(responses, i, "lstm", {"tokens": np.array([[1, 2, 3, 4, 5]])}))
    engine.submit(make_request(responses, 3, "lstm", {"tokens": np.array([[1]])}))
    engine.step()  # admits all four and steps them until the one-token request is done
    assert responses.one(3).status is Status.OK
    assert engine.active_requests == 3
    engine.submit(make_request(responses, 4, "lstm", {"tokens": np.array([[1]])}))  # still queued
    engine.abort_all("shutting down")
    assert engine.idle()
    for i in (0, 1, 2, 4):
        assert responses.one(i).status is Status.ERROR and "shutting down" in responses.one(i).reason


def test_a_step_admits_only_the_requests_waiting_when_it_began_so_a_flood_cannot_stall_it(models):
    engine = Engine([models.models["lstm"]], EngineConfig(profile=False))
    responses = Responses()
    arrivals = iter(range(3, 1000))
    admit = engine._admit

    def admit_then_another_arrives(request, now):  # arrivals as fast as admissions: a flood
        admit(request, now)
        engine.submit(make_request(responses, next(arrivals), "lstm", {"tokens": np.array([[1, 2]])}))

    engine._admit = admit_then_another_arrives
    for i in range(3):
        engine.submit(make_request(responses, i, "lstm", {"tokens": np.array([[1, 2, 3]])}))
    assert engine.step()  # returns, having run a batch of the three
    assert engine.active_requests == 3 and len(engine._inbox) == 3
    assert engine.stats.cell_steps >= 1


def test_a_failing_on_done_callback_does_not_stop_the_engine(models):
    engine = Engine([models.models["gru"]], EngineConfig(profile=False))
    responses = Responses()

    def explode(_response):
        raise RuntimeError("client bug")

    engine.submit(make_request(responses, 0, "gru", {"tokens": np.array([[1, 2]])}))
    engine.submit(Request("gru", {"tokens": np.array([[3]])}, on_done=explode))
    engine.submit(make_request(responses, 2, "gru", {"tokens": np.array([[4, 5, 6]])}))
    engine.run_until_idle(timeout_s=10)
    assert responses.one(0).status is Status.OK and responses.one(2).status is Status.OK


@pytest.mark.parametrize("policy", ["cellular", "padded"])
def test_kernel_storage_is_released_after_every_request(models, policy):
    engine = Engine([models.models["tagger"]], EngineConfig(policy=policy, batch_timeout_s=0.0, profile=False))
    responses = Responses()
    for i, n in enumerate([3, 1, 5, 2]):
        engine.submit(make_request(responses, i, "tagger", {"tokens": np.ones((2, n), np.int64)}))
    engine.run_until_idle(timeout_s=10)
    for kernel in engine.executors["default"].kernels.values():
        assert kernel.slots.in_use == 0
        assert kernel.rows._starts == [1] and kernel.rows._lengths == [kernel.rows.capacity - 1]


def test_serve_forever_answers_requests_submitted_from_another_thread(models):
    engine = Engine([models.models["gru"], models.models["seq2seq-reverse"]], EngineConfig(profile=False))
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    worker.start()
    responses, all_done = Responses(), threading.Event()
    lock = threading.Lock()
    rng = np.random.default_rng(5)
    specs = [("gru", {"tokens": rng.integers(0, VOCAB, size=(1, int(n)))}) for n in rng.integers(1, 9, size=12)]
    specs += [("seq2seq-reverse", {"digits": rng.integers(3, 13, size=(1, int(n)))}) for n in rng.integers(1, 13, 6)]

    def on_done(i):
        def callback(response):
            with lock:
                responses.by_index[i].append(response)
                if len(responses.by_index) == len(specs):
                    all_done.set()
        return callback

    try:
        for i, (name, inputs) in enumerate(specs):
            engine.submit(Request(name, inputs, on_done=on_done(i)))
        assert all_done.wait(timeout=20), "not every request was answered"
    finally:
        stop.set()
        worker.join(timeout=5)
    assert not worker.is_alive()
    for i, (name, inputs) in enumerate(specs):
        response = responses.one(i)
        assert response.status is Status.OK, response.reason
        if name == "gru":
            assert_same_outputs(response.outputs, models.reference(name, inputs))
        else:
            np.testing.assert_array_equal(response.outputs["reversed"], seq2seq_reference(models, inputs["digits"]))


@pytest.mark.parametrize("name", ["", "a/b"])
def test_engine_refuses_a_model_name_that_is_empty_or_contains_a_slash(models, name):
    model = models.models["gru"]
    renamed = type(model)(name, model.inputs, model.outputs, model.constants, model.program, model.semantics,
                          model.max_sequence_length)
    with pytest.raises(ValueError, match="model name"):
        Engine([renamed], EngineConfig(profile=False))


def test_a_model_added_like_one_of_its_shape_takes_its_costs_instead_of_measuring_them(models, monkeypatch):
    """add_model(like=...) for a reload: cell types of the same kinds and sizes start from the
    served model's learnt tables, with no start-up measuring (which holds up every model's
    steps); a model of another shape is measured as any other."""
    import dataclasses

    engine = Engine([models.models["lstm"]], EngineConfig(profile=True, pin_threads=False))
    measured = []
    executor = engine.executors["default"]
    real = executor.startup_costs
    monkeypatch.setattr(executor, "startup_costs", lambda cell_type, sizes: measured.append(cell_type)
                        or real(cell_type, sizes))
    (old_type,) = engine.cell_types
    engine.add_model(dataclasses.replace(models.models["lstm"], name="lstm#1"), like="lstm")
    new_type = old_type.replace("lstm/", "lstm#1/", 1)
    assert measured == [] and engine.costs.costs[new_type](8) == engine.costs.costs[old_type](8)
    assert engine.costs.costs[new_type] is not engine.costs.costs[old_type]  # its own table from now on
    engine.add_model(dataclasses.replace(models.models["gru"], name="gru#1"), like="lstm")  # not alike: measured
    assert measured and all(t.startswith("gru#1/") for t in measured)


def test_a_stopping_engine_does_not_run_a_stable_batch_again(models):
    """A batch the policy would run again unchanged (no lane finished, nothing arrived) runs
    step after step inside one Engine.step; once serve_forever's stop is set, each step
    returns after one run, so a SIGTERM's grace period is not outlasted by a long request.
    (No drop check, whose turn would also end the run: the count of steps is exact.)"""
    tokens = np.random.default_rng(4).integers(0, VOCAB, (16, 300))  # 16 lanes: a batched, stable step
    steps = {}
    for stopping in (False, True):
        engine = Engine([models.models["gru"]], EngineConfig(profile=False, pin_threads=False, drop_late=False))
        engine.submit(make_request(Responses(), 0, "gru", {"tokens": tokens}))
        if stopping:
            engine._stopping.set()
        engine.step()
        steps[stopping] = engine.stats.cell_steps
    assert steps == {False: 300, True: 1}


@pytest.mark.skipif(not _fused_default(), reason="bitwise batch invariance is the fused backend's (AVX-512)")
def test_a_stacked_lstm_answers_to_the_last_bit_as_alone_and_a_sequence_as_whole():
    """The default backend, a 2-layer LSTM wide enough for its GEMMs' blocking to matter,
    layers stacked (the default): requests mixed in batches with others joining and leaving
    answer bit for bit as each alone, and a sequence sent in chunks (its state carried)
    answers bit for bit as sent whole. (A sweep found 2e-8 differences in lstm-512's outputs
    and carried states when a stack's batched step fused projection and recurrence.)"""
    from cellserve.graph import load_torch
    from cellserve.graph.zoo.modules import RNNClassifier, seeded

    module = seeded(RNNClassifier("lstm", vocab=50, embed=72, hidden=136, layers=2, classes=5), 4)
    model = load_torch(module, "wide", (torch.zeros((1, 3), dtype=torch.long),), ["tokens"], ["probabilities", "label"],
                       {"tokens": {0: "batch", 1: "time"}, "probabilities": {0: "batch"}, "label": {0: "batch"}})
    rng = np.random.default_rng(5)
    inputs = [{"tokens": rng.integers(0, 50, (1, int(n)))} for n in rng.integers(1, 45, 14)]

    def answers(config: EngineConfig, requests, stagger: bool, **kw) -> list:
        engine = Engine([model], config)
        responses = Responses()
        for i, x in enumerate(requests):
            if stagger:
                for _ in range(i % 3):
                    engine.step()
            engine.submit(make_request(responses, i, "wide", x, **kw))
        engine.run_until_idle(timeout_s=60)
        return [responses.one(i) for i in range(len(requests))]

    alone = [answers(EngineConfig(policy="none", profile=False), [x], False)[0] for x in inputs]
    for config in (EngineConfig(profile=False), EngineConfig(profile=False, max_batch=3)):
        for got, want in zip(answers(config, inputs, True), alone):
            assert got.status is Status.OK
            for name in want.outputs:
                np.testing.assert_array_equal(got.outputs[name], want.outputs[name], err_msg=name)
    tokens = np.concatenate([x["tokens"] for x in inputs[:4]], axis=1)[:, :60]
    whole = answers(EngineConfig(profile=False), [{"tokens": tokens}], False, return_state=True)[0]
    state = None
    for cut in ((0, 7), (7, 30), (30, 60)):
        config = EngineConfig(profile=False)
        chunk = answers(config, [{"tokens": tokens[:, cut[0]:cut[1]]}] + inputs[4:8], True,
                        initial_state=state, return_state=True)[0]
        state = chunk.state
    for name in whole.outputs:
        np.testing.assert_array_equal(chunk.outputs[name], whole.outputs[name], err_msg=name)
    for layer, (h, c) in whole.state.items():
        np.testing.assert_array_equal(state[layer][0], h, err_msg=f"{layer} h")
        np.testing.assert_array_equal(state[layer][1], c, err_msg=f"{layer} c")
