"""MAP validation, Poisson, and the 2-state MMPP fit of a trace (plan/batching_map.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.plan.batching_des import sample_arrivals
from cellserve.plan.batching_map import BatchingError, Map, fit_mmpp2


def test_a_valid_map_and_its_rate():
    m = Map.of([[-1220.0, 20.0], [5.0, -105.0]], [[1200.0, 0.0], [0.0, 100.0]])
    # time in the burst phase: 5 / 25; rate = 0.2 * 1200 + 0.8 * 100
    assert m.rate_rps == pytest.approx(320.0)
    assert Map.poisson(250.0).rate_rps == pytest.approx(250.0)


@pytest.mark.parametrize("d0,d1,message", [
    ([[-2.0, 1.0], [1.0, -2.0]], [[1.0, 0.0], [0.0, 2.0]], "row 1 of D0 + D1 must sum to 0"),
    ([[-2.0, 1.0], [1.0, -2.0]], [[2.0, -1.0], [0.0, 1.0]], "map.D1[0][1] must be >= 0"),
    ([[-2.0, -1.0], [1.0, -2.0]], [[3.0, 0.0], [0.0, 1.0]], "map.D0[0][1] must be >= 0"),
    ([[0.0]], [[0.0]], "map.D0[0][0] must be < 0"),
    ([[-1.0, 1.0], [1.0, -1.0]], [[0.0, 0.0], [0.0, 0.0]], "map.D1 is all zero"),
    ([[-1.0]], [[1.0, 0.0]], "map.D1[0] has 2 entries"),
    ([[-1.0, 1.0]], [[1.0]], "map.D0[0] has 2 entries"),
    ([["x"]], [[1.0]], "map.D0[0][0] must be a finite number"),
    ([], [[1.0]], "map.D0 must be a non-empty list"),
])
def test_invalid_maps_are_refused_naming_the_entry(d0, d1, message):
    with pytest.raises(BatchingError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        Map.of(d0, d1)


def test_poisson_rate_must_be_positive():
    with pytest.raises(BatchingError, match="poisson_rps must be a finite number > 0"):
        Map.poisson(0.0)


def test_a_poisson_trace_fits_a_poisson_process():
    times = np.cumsum(np.random.default_rng(3).exponential(1 / 200.0, 20_000))
    fit = fit_mmpp2(times)
    assert fit.phases == 1
    assert fit.rate_rps == pytest.approx(200.0, rel=0.03)


def test_a_bursty_trace_fits_an_mmpp_with_its_rate_and_dispersion():
    true = Map.of([[-1220.0, 20.0], [5.0, -105.0]], [[1200.0, 0.0], [0.0, 100.0]])
    times = sample_arrivals(true, 100_000, np.random.default_rng(4)) / 1000.0  # seconds
    fit = fit_mmpp2(times)
    assert fit.phases == 2
    assert fit.rate_rps == pytest.approx((len(times) - 1) / (times[-1] - times[0]), rel=1e-9)
    rates = sorted(np.diag(fit.D1))
    assert rates[1] > 3 * rates[0]  # a burst phase and a quiet one
    # the fit reproduces the trace's dispersion of counts over 50 ms windows (within 15%)
    def idc(t, w):
        c = np.diff(np.searchsorted(t, np.arange(t[0], t[-1], w)))
        return c.var() / c.mean()
    fitted = sample_arrivals(fit, 100_000, np.random.default_rng(5)) / 1000.0
    assert idc(fitted, 0.05) == pytest.approx(idc(times, 0.05), rel=0.15)


def test_a_trace_too_short_is_refused():
    with pytest.raises(BatchingError, match="at least 100 arrival timestamps"):
        fit_mmpp2([0.0, 1.0, 2.0])
