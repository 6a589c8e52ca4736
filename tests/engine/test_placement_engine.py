"""Executing a partition: several real CPU executors running at once in one engine answer
exactly what one executor answers, with cellular batching mixing many requests of different
lengths on each executor, and count the tensors that cross between them."""

from __future__ import annotations

import os
import threading
from collections import Counter

import numpy as np
import pytest

from cellserve.engine.config import EngineConfig
from cellserve.engine.engine import Engine
from cellserve.graph.model import plain_group_key, plain_groups
from cellserve.engine.request import Request, Status
from cellserve.executor.kernel import KernelExecutor
from cellserve.graph import zoo
from cellserve.graph.zoo.seq2seq import encode_digits

CORES = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def tagger():
    return zoo.load("bilstm-tagger")


@pytest.fixture(scope="module")
def seq2seq():
    return zoo.load("seq2seq-reverse")


def two_executors() -> dict[str, KernelExecutor]:
    """Two single-core executors (on the first and last core this process may use)."""
    return {"cpu0": KernelExecutor("cpu", name="cpu0", cores=[CORES[0]]),
            "cpu1": KernelExecutor("cpu", name="cpu1", cores=[CORES[-1]])}


def tagger_requests(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        batch = int(rng.integers(1, 3))
        out.append({"tokens": rng.integers(0, 5000, (batch, int(rng.integers(1, 60))), dtype=np.int64)})
    return out


def digit_requests(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"digits": np.array([encode_digits("".join(map(str, rng.integers(0, 10, int(rng.integers(1, 13))))))],
                                np.int64)} for _ in range(n)]


def answer(engine: Engine, model: str, inputs: list[dict], **request) -> list:
    """Submit every request at once (so that they share batches), run until idle; the answers
    in order, each request answered exactly once."""
    answers: dict[int, list] = {i: [] for i in range(len(inputs))}
    for i, x in enumerate(inputs):
        engine.submit(Request(model, x, on_done=answers[i].append, **request))
    engine.run_until_idle(120)
    assert all(len(a) == 1 for a in answers.values()), {i: len(a) for i, a in answers.items() if len(a) != 1}
    return [answers[i][0] for i in range(len(inputs))]


def assert_same(ours: list, reference: list) -> None:
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert a.status is Status.OK and b.status is Status.OK, (i, a.reason, b.reason)
        assert a.outputs.keys() == b.outputs.keys()
        for name in a.outputs:
            np.testing.assert_array_equal(a.outputs[name], b.outputs[name], err_msg=f"request {i}, {name}")


def split_directions(model) -> dict[str, str]:
    """Direction 0 of every layer on cpu0, direction 1 on cpu1."""
    return {t: "cpu0" if t.endswith("/0") else "cpu1" for t in model.cell_types()}


CONFIG = EngineConfig(profile=False)


def test_bidirectional_directions_on_two_executors_answer_as_one(tagger):
    inputs = tagger_requests(120, seed=1)
    reference = answer(Engine([tagger], CONFIG), "bilstm-tagger", inputs)
    engine = Engine([tagger], CONFIG, executors=two_executors(), placement=split_directions(tagger))
    try:
        assert engine._concurrent
        ours = answer(engine, "bilstm-tagger", inputs)
        assert_same(ours, reference)
        # cellular batching on each executor: lanes of many requests shared its batches
        s = engine.stats
        assert s.batch_size_sum > s.cell_steps
        assert set(s.steps_by_type) == set(tagger.cell_types())
        # the second executor's direction outputs go back to the plain ops (on cpu0, the
        # first executor), and the plain ops' outputs feed cpu1's lanes: once per request each
        moved = s.transfers
        assert moved[("cpu1", "cpu0")][0] == 2 * len(inputs)  # both layers' backward outputs
        assert moved[("cpu0", "cpu1")][0] == 2 * len(inputs)  # both layers' backward inputs
        assert s.transfer_bytes > 0
    finally:
        engine.close()


class ThreadNoting(KernelExecutor):
    """A real CPU executor that notes the thread each batch ran on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: set[str] = set()

    def execute(self, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        return super().execute(*args, **kwargs)


def test_the_first_executor_runs_on_the_engine_thread_and_the_others_on_workers(tagger):
    """Two single-core executors take two threads: the engine's own runs the first executor's
    batches (no hand-off, no third thread on the cores); the engine thread's cores are its
    own again once the loop ends."""
    executors = {"cpu0": ThreadNoting("cpu", name="cpu0", cores=[CORES[0]]),
                 "cpu1": ThreadNoting("cpu", name="cpu1", cores=[CORES[-1]])}
    engine = Engine([tagger], CONFIG, executors=executors, placement=split_directions(tagger))
    affinity = os.sched_getaffinity(0)
    try:
        answers = answer(engine, "bilstm-tagger", tagger_requests(20, seed=4))
        assert all(a.status is Status.OK for a in answers)
        assert executors["cpu0"].threads == {threading.current_thread().name}
        assert executors["cpu1"].threads == {"cellserve-executor-cpu1"}
        assert os.sched_getaffinity(0) == affinity
    finally:
        engine.close()


def test_encoder_and_decoder_on_two_executors_answer_as_one(seq2seq):
    inputs = digit_requests(80, seed=2)
    reference = answer(Engine([seq2seq], CONFIG), "seq2seq-reverse", inputs)
    placement = {"seq2seq-reverse/encoder/0": "cpu0", "seq2seq-reverse/decoder": "cpu1"}
    engine = Engine([seq2seq], CONFIG, executors=two_executors(), placement=placement)
    try:
        assert_same(answer(engine, "seq2seq-reverse", inputs), reference)
        # the decoder reads the encoder's outputs and states through plain ops on cpu0
        assert engine.stats.transfers[("cpu0", "cpu1")][0] >= len(inputs)
    finally:
        engine.close()


def test_plain_op_groups_placed_apart_answer_as_one(tagger):
    """Every plain-op group on the other executor from the cell types around it."""
    inputs = tagger_requests(30, seed=3)
    reference = answer(Engine([tagger], CONFIG), "bilstm-tagger", inputs)
    placement = {t: "cpu0" for t in tagger.cell_types()}
    placement.update({plain_group_key("bilstm-tagger", k): "cpu1" for k in range(len(plain_groups(tagger)))})
    engine = Engine([tagger], CONFIG, executors=two_executors(), placement=placement)
    try:
        assert_same(answer(engine, "bilstm-tagger", inputs), reference)
        # each layer's outputs (both directions) go to the groups on cpu1, whose outputs come back
        assert engine.stats.transfers[("cpu0", "cpu1")][0] == 2 * len(inputs)
        assert engine.stats.transfers[("cpu1", "cpu0")][0] == 2 * len(inputs)
    finally:
        engine.close()


@pytest.mark.parametrize("policy", ["cellular-edf", "padded", "none"])
def test_other_policies_split_answer_as_one(tagger, policy):
    inputs = tagger_requests(20, seed=4)
    config = EngineConfig(profile=False, policy=policy)
    reference = answer(Engine([tagger], config), "bilstm-tagger", inputs)
    engine = Engine([tagger], config, executors=two_executors(), placement=split_directions(tagger))
    try:
        assert_same(answer(engine, "bilstm-tagger", inputs), reference)
    finally:
        engine.close()


def test_two_models_split_and_unsplit_share_the_executors(tagger, seq2seq):
    """A model the placement leaves out runs on the first executor beside the split one."""
    tags, digits = tagger_requests(30, seed=5), digit_requests(30, seed=6)
    ref_engine = Engine([tagger, seq2seq], CONFIG)
    ref = answer(ref_engine, "bilstm-tagger", tags), answer(ref_engine, "seq2seq-reverse", digits)
    engine = Engine([tagger, seq2seq], CONFIG, executors=two_executors(), placement=split_directions(tagger))
    try:
        answers: dict[tuple, list] = {}
        for model, inputs in (("bilstm-tagger", tags), ("seq2seq-reverse", digits)):
            for i, x in enumerate(inputs):  # interleaved in one submission: they share the loop
                answers[model, i] = []
                engine.submit(Request(model, x, on_done=answers[model, i].append))
        engine.run_until_idle(120)
        assert all(len(a) == 1 for a in answers.values())
        assert_same([answers["bilstm-tagger", i][0] for i in range(len(tags))], ref[0])
        assert_same([answers["seq2seq-reverse", i][0] for i in range(len(digits))], ref[1])
    finally:
        engine.close()


def test_every_request_answered_once_while_serving_with_drops_and_bad_inputs(tagger):
    """serve_forever in this thread, submitters in others: valid requests of many lengths,
    some with deadlines too short to make (dropped or refused), some invalid; each answered
    exactly once, and the valid ones that ran exactly as one executor answers them."""
    inputs = tagger_requests(150, seed=7)
    reference = answer(Engine([tagger], CONFIG), "bilstm-tagger", inputs)
    config = EngineConfig(profile=False, admission=True, drop_late=True)
    engine = Engine([tagger], config, executors=two_executors(), placement=split_directions(tagger))
    answers: dict[int, list] = {}
    lock = threading.Lock()
    stop = threading.Event()
    expected = 0

    def submitter(part: int) -> None:
        for i in range(part, len(inputs) + 40, 3):
            with lock:
                answers[i] = []
            if i >= len(inputs):  # invalid: a token id out of range
                request = Request("bilstm-tagger", {"tokens": np.full((1, 5), 10 ** 6, np.int64)},
                                  on_done=answers[i].append)
            else:
                timeout = 1e-5 if i % 7 == 0 else None  # far too short to make
                request = Request("bilstm-tagger", inputs[i], on_done=answers[i].append, timeout_s=timeout)
            engine.submit(request)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()

    def stopper() -> None:
        for t in threads:
            t.join()
        while True:  # until every request submitted has its answer
            with lock:
                if sum(len(a) for a in answers.values()) >= len(answers):
                    break
            stop.wait(0.01)
        stop.set()

    watcher = threading.Thread(target=stopper)
    watcher.start()
    engine.serve_forever(stop)
    watcher.join()
    expected = len(inputs) + 40
    assert len(answers) == expected
    counts = Counter(len(a) for a in answers.values())
    assert counts == Counter({1: expected}), counts
    statuses = Counter(a[0].status for a in answers.values())
    assert statuses[Status.INVALID] == 40
    for i in range(len(inputs)):
        got = answers[i][0]
        if i % 7 == 0:
            assert got.status in (Status.REJECTED, Status.DROPPED), got
        elif got.status is Status.OK:
            assert_same([got], [reference[i]])
    assert statuses[Status.OK] > 0
    assert engine.stats.requests_answered == expected
    assert not engine._busy and not engine._workers  # serve_forever took every batch back and stopped
