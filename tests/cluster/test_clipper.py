"""Clipper's AIMD, by hand: the cap grows by one per batch of answers within the SLO and is
cut by 10% on a miss, once per batch of answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cellserve.cluster.clipper import Aimd, attach_aimd
from cellserve.engine.request import Request, Response, Status


def test_additive_increase_under_the_slo():
    aimd = Aimd(cap=1, max_cap=64)
    assert aimd.observe(True) == 2  # one answer = a batch of one, met
    assert aimd.observe(True) == 2  # a batch of two needs two answers
    assert aimd.observe(True) == 3
    for _ in range(3):
        cap = aimd.observe(True)
    assert cap == 4 and aimd.increases == 3 and aimd.cuts == 0


def test_multiplicative_decrease_on_a_miss_once_per_batch():
    aimd = Aimd(cap=20, max_cap=64)
    assert aimd.observe(False) == 18  # floor(20 * 0.9)
    assert aimd.observe(False) == 18  # the rest of the old batch: no second cut
    for _ in range(16):
        aimd.observe(False)
    assert aimd.cap == 18  # 18 answers since the cut
    assert aimd.observe(False) == 16  # floor(18 * 0.9), a batch later
    assert aimd.cuts == 2


def test_bounds():
    aimd = Aimd(cap=1, max_cap=2)
    assert aimd.observe(False) == 1  # never below one
    for _ in range(10):
        aimd.observe(True)
    assert aimd.cap == 2  # never above the profile's cap
    with pytest.raises(ValueError):
        Aimd(cap=0)


def test_attach_sets_the_policy_cap_from_answers_and_passes_them_on():
    submitted = []
    engine = SimpleNamespace(policy=SimpleNamespace(max_batch=64), submit=submitted.append)
    attach_aimd(engine, Aimd(cap=3, max_cap=64), slo_s=0.1)
    assert engine.policy.max_batch == 3
    seen = []
    request = Request("m", {}, on_done=seen.append)
    engine.submit(request)
    assert submitted == [request]
    late = Response(request.request_id, Status.OK, arrival=0.0, finish=0.25)  # 250 ms > 100 ms SLO
    request.on_done(late)
    assert seen == [late] and engine.policy.max_batch == 2  # floor(3 * 0.9)
