"""The measured batching benchmark's bookkeeping (bench/batching_measured.py): cohorts rebuilt
from a run's outcomes and each request's first step, and the service calibrated from them.
(The benchmark itself runs in tests/plan/test_bench_plan_cli.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cellserve.bench.batching_measured import calibrated_service, cohorts
from cellserve.bench.results import RequestOutcome
from cellserve.plan.batching_map import BatchingError


def test_cohorts_take_their_dispatch_from_the_policys_rule_and_the_servers_end():
    """B = 2, T = 5 ms: a full pair; a lone request whose timer fires after the server freed;
    a pair filled while the server was busy, dispatched when it freed."""
    outcomes = [RequestOutcome(0, 0.000, 0.0040, "ok"), RequestOutcome(1, 0.001, 0.0042, "ok"),
                RequestOutcome(2, 0.003, 0.0100, "ok"),
                RequestOutcome(3, 0.0095, 0.0130, "ok"), RequestOutcome(4, 0.0096, 0.0130, "ok")]
    first = {i: SimpleNamespace(step=s) for i, s in ((0, 0), (1, 0), (2, 16), (3, 32), (4, 32))}
    a, b, c = cohorts(outcomes, first, 2, 5.0)
    assert (a.size, a.dispatch_s) == (2, 0.001) and a.service_ms == pytest.approx(3.1)
    assert a.latency_ms == pytest.approx((4.0, 3.2))
    assert (b.size, b.dispatch_s) == (1, 0.008) and b.service_ms == pytest.approx(2.0)  # timer: 3 + 5 ms
    assert (c.size, c.dispatch_s) == (2, 0.010) and c.service_ms == pytest.approx(3.0)  # waited for the server


def test_calibration_scales_one_pooled_spread_per_size():
    samples = {1: [1.0, 1.0, 2.0, 1.0, 1.0], 2: [2.0, 2.0, 2.0, 4.0, 2.0], 3: [9.0]}
    service = calibrated_service(samples, 4)
    # medians 1 and 2; ratios pooled from both sizes: eight 1s and two 2s
    assert service.ms(1) == pytest.approx(1.2) and service.ms(2) == pytest.approx(2.4)
    # sizes 3 and 4 have too few samples: the line through the medians (n), same spread
    assert service.ms(3) == pytest.approx(3.6) and service.ms(4) == pytest.approx(4.8)
    assert service.bins(4, 5) == pytest.approx([4.0, 4.0, 4.0, 4.0, 8.0])
    with pytest.raises(BatchingError, match="no batch size has 5 calibration cohorts"):
        calibrated_service({1: [1.0]}, 2)
