"""The profiler's arithmetic, on given samples (no timing): the host-cost fit and how
serving's samples replace or scale the timings alone."""

from __future__ import annotations

import numpy as np
import pytest

from cellserve.bench.profiler import _buckets, _fit_host, _in_place, _plain_op
from cellserve.plan.profile import CellTypeProfile, IdleBucket, Timing


def test_the_host_fit_recovers_the_costs_that_made_the_samples():
    rng = np.random.default_rng(0)
    batch, started, finished = rng.integers(1, 64, 500), rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    taken = started + rng.integers(0, 3, 500)  # refusals: taken in, no lane started
    checked = rng.integers(0, 200, 500) * (rng.random(500) < 0.1)  # a drop check every tenth step
    y = 20e-6 + 1.5e-6 * batch + 80e-6 * started + 30e-6 * finished + 40e-6 * taken + 3e-6 * checked
    host = _fit_host(np.column_stack([y, batch, started, finished, taken, checked]).astype(float))
    assert host.step_s == pytest.approx(20e-6, rel=1e-6)
    assert host.step_s_per_lane == pytest.approx(1.5e-6, rel=1e-6)
    assert host.lane_start_s == pytest.approx(80e-6, rel=1e-6)
    assert host.lane_finish_s == pytest.approx(30e-6, rel=1e-6)
    assert host.request_s == pytest.approx(40e-6, rel=1e-6)
    assert host.check_s_per_run == pytest.approx(3e-6, rel=1e-6)


def test_the_host_fit_never_gives_a_negative_cost():
    rng = np.random.default_rng(1)
    batch = rng.integers(1, 64, 400)
    y = 50e-6 - 0.5e-6 * batch + rng.normal(0, 1e-7, 400)  # a falling trend: no cost per lane
    host = _fit_host(np.column_stack([y, batch] + [np.zeros(400)] * 4))
    assert min(host.step_s, host.step_s_per_lane, host.lane_start_s, host.lane_finish_s, host.request_s,
               host.check_s_per_run) >= 0.0


class Recorded:
    """What a RecordingExecutor holds after serving."""

    def __init__(self, steps, lone=(), starts=(), finishes=(), cold_steps=None, after_idle=()):
        self.after_idle = {"m/c": list(after_idle)}
        self.steps = {"m/c": steps}
        self.cold_steps = {"m/c": cold_steps or {}}
        self.lone = {"m/c": list(lone)}
        self.starts = {"m/c": list(starts)}
        self.finishes = {"m/c": list(finishes)}


def test_sizes_serving_showed_replace_the_timing_alone_and_the_rest_are_scaled():
    alone = CellTypeProfile("stack", 1, {b: Timing.fixed(b * 1e-4) for b in range(1, 9)}, Timing.fixed(1e-5),
                            1e-6, 2e-6)
    seen = {2: [4e-4] * 6, 4: [8e-4] * 6, 8: [9e-4] * 2}  # 2x the timing alone; batch 8 too rarely to count
    # 20 us a call, 30 us a step, 50 us more after other work
    lone = [(n, 2e-5 + 3e-5 * n + 5e-5 * c, c) for n in (1, 4, 16, 64, 8, 2) for c in (False, True)]
    cold = {2: [4e-4 + 1e-4] * 6}  # batched steps after other work: 100 us more
    cell = _in_place(alone, Recorded(seen, lone=lone, starts=[5e-6] * 3, cold_steps=cold), "m/c", lambda *_: None)
    assert cell.step_s[2].mean == pytest.approx(4e-4) and cell.step_s[4].mean == pytest.approx(8e-4)
    assert cell.step_s[8].mean == pytest.approx(2 * 8e-4)  # scaled by the median ratio, 2
    assert cell.step_s[1].mean == pytest.approx(2e-4)
    assert cell.lone_step_s.mean == pytest.approx(3e-5) and cell.lone_call_s == pytest.approx(2e-5)
    assert cell.lone_cold_s == pytest.approx(5e-5) and cell.cold_s == pytest.approx(1e-4)
    assert cell.start_s_per_token == pytest.approx(5e-6)
    assert cell.finish_s_per_token == pytest.approx(2e-6)  # nothing seen: the timing alone


def test_steps_after_idle_spells_give_buckets_of_extra_cost_over_the_warm_fit():
    alone = CellTypeProfile("stack", 1, {b: Timing.fixed(b * 1e-4) for b in range(1, 9)}, Timing.fixed(1e-5),
                            1e-6, 2e-6)
    seen = {2: [4e-4] * 6}
    lone = [(n, 2e-5 + 3e-5 * n + 5e-5 * c, c) for n in (1, 4, 16, 64, 8, 2) for c in (False, True)]
    # after idle spells: lone runs (cold, 10 lane-steps) and batched steps of 2 lanes (warm),
    # 100 us over the warm fit after 0.3-0.5 ms, 400 us after 3 ms; 2 steps after 40 ms and 1
    # after 100 ms (too few alone: they join the 3 ms bucket, the last, bounded by the longest)
    priced_lone, priced_2 = 2e-5 + 3e-5 * 10 + 5e-5, 4e-4
    after = ([(3e-4, True, 1, 10, True, priced_lone + 1e-4)] * 3 + [(4.5e-4, False, 2, 2, False, priced_2 + 1e-4)] * 3
             + [(3e-3, True, 1, 10, True, priced_lone + 4e-4)] * 5 + [(0.04, False, 2, 2, False, priced_2 + 4e-4)] * 2
             + [(0.1, False, 2, 2, False, priced_2 + 4e-4)])
    cell = _in_place(alone, Recorded(seen, lone=lone, after_idle=after), "m/c", lambda *_: None)
    assert cell.lone_step_s.mean == pytest.approx(3e-5)  # the warm fit is the runs' without idle spells
    assert [b.up_to_s for b in cell.idle_extra_s] == [2.5e-4, 5e-4, 0.1]
    assert [b.extra_s for b in cell.idle_extra_s] == pytest.approx([0.0, 1e-4, 4e-4])
    assert cell.idle_extra_s[0].draws_s == ()  # the warm bucket: nothing extra, ever
    assert cell.idle_extra_s[1].draws_s == pytest.approx([1e-4] * 20)  # every step cost the same
    assert cell.idle_extra(1e-4) == 0.0 and cell.idle_extra(1e-3) == pytest.approx(4e-4)
    assert cell.idle_extra(5.0) == pytest.approx(4e-4)  # beyond the last bound: the last bucket's
    assert _in_place(alone, Recorded(seen, lone=lone), "m/c", lambda *_: None).idle_extra_s == ()


def test_an_idle_bucket_keeps_rare_stalls_rare_in_its_draws():
    # 200 steps after spells of 1-2 ms: 180 cost 10 us over the warm price, 20 (10%) 3 ms
    # (the machine's stalls), and two 50 ms (the top 1%, left out). The draws keep the mean
    # (about 0.31 ms, for capacity) and the median (10 us, for latency).
    extras = [(1.5e-3, 1e-5)] * 178 + [(1.5e-3, 3e-3)] * 20 + [(1.5e-3, 0.05)] * 2
    warm, bucket = _buckets(extras)
    assert warm.extra_s == 0.0 and bucket.up_to_s == 2e-3
    assert len(bucket.draws_s) == 20 and np.all(np.diff(bucket.draws_s) >= -1e-15)  # ascending
    assert bucket.extra_s == pytest.approx((178 * 1e-5 + 20 * 3e-3) / 198)
    assert np.mean(bucket.draws_s) == pytest.approx(bucket.extra_s)
    assert np.median(bucket.draws_s) == pytest.approx(1e-5)
    assert bucket.draws_s[-2:] == pytest.approx([3e-3, 3e-3])  # two draws in twenty: the stalls' tenth
    # a bucket whose steps ran no slower than warm ones costs nothing, and draws nothing
    (_, quiet) = _buckets([(1.5e-3, -2e-5)] * 10 + [(1.5e-3, 1e-5)] * 10)
    assert quiet.extra_s == 0.0 and quiet.draws_s == ()


def test_a_batch_size_dearer_than_a_larger_one_takes_the_larger_ones_cost():
    # serving caught stalls at batch 3 (0.5 ms, dearer than batch 4's 0.3) and at batch 6
    # (dearer than 7 and 8: it takes 7's, the cheapest larger one); batch 1 is 5% dearer than
    # batch 2, within the machine's noise: left as measured
    alone = CellTypeProfile("stack", 0, {b: Timing.fixed(b * 1e-4) for b in range(1, 9)}, None, 1e-6, 2e-6)
    means = {1: 2.1e-4, 2: 2e-4, 3: 5e-4, 4: 3e-4, 5: 4e-4, 6: 9e-4, 7: 6e-4, 8: 8e-4}
    cell = _in_place(alone, Recorded({b: [m] * 6 for b, m in means.items()}), "m/c", lambda *_: None)
    capped = [2.1e-4, 2e-4, 3e-4, 3e-4, 4e-4, 6e-4, 6e-4, 8e-4]
    assert [cell.step_s[b].mean for b in range(1, 9)] == pytest.approx(capped)
    assert cell.suspect_steps() == []


def test_the_nonnegative_fit_drops_a_column_the_samples_run_against():
    from cellserve.bench.profiler import _nonnegative_lstsq
    rng = np.random.default_rng(2)
    x = np.column_stack([np.ones(200), rng.uniform(0, 10, 200), rng.uniform(0, 10, 200)])
    y = 3.0 + 2.0 * x[:, 1] - 0.5 * x[:, 2]
    coef = _nonnegative_lstsq(x, y)
    assert coef[2] == 0.0 and (coef >= 0).all()
    assert _nonnegative_lstsq(x[:, :2], 3.0 + 2.0 * x[:, 1]) == pytest.approx([3.0, 2.0])


def test_a_plain_op_is_priced_warm_with_buckets_for_its_runs_after_a_spell():
    # warm runs (within 0.25 ms of the op's last run) of 10 us; after 1-2 ms, 14 us; after
    # 50 ms, 40 us; the op's first run (no spell: infinite) counts in no bucket
    calls = [(1e-4, 10e-6)] * 20 + [(1.5e-3, 14e-6)] * 10 + [(5e-2, 40e-6)] * 10 + [(float("inf"), 1e-3)]
    timing, buckets = _plain_op(calls)
    assert timing.mean == pytest.approx(10e-6)
    assert buckets[0] == IdleBucket(2.5e-4, 0.0)
    assert [b.up_to_s for b in buckets[1:]] == [0.002, 0.064]
    assert [b.extra_s for b in buckets[1:]] == pytest.approx([4e-6, 30e-6])
    # too few warm runs: all of them, no buckets
    assert _plain_op([(1e-2, 20e-6)] * 10) == (Timing(20e-6, 0.0, 20e-6, 10), ())
