import numpy as np
import pytest

from cellserve.bench.traces import (SequenceInput, TraceRequest, burst_path, bursty_arrivals, make_trace,
                                    modulated_arrivals, one_sequence, poisson_arrivals, sentence_lengths)


def _index_of_dispersion(arrivals: np.ndarray, window_s: float) -> float:
    counts = np.bincount((arrivals // window_s).astype(np.int64))
    return float(counts.var() / counts.mean())


def test_sentence_lengths_are_integers_from_1_to_100():
    lengths = sentence_lengths(np.random.default_rng(0), 50_000)
    assert lengths.dtype.kind == "i"
    assert lengths.min() == 1 and lengths.max() == 100


def test_sentence_lengths_have_mean_about_25_and_a_long_right_tail():
    lengths = sentence_lengths(np.random.default_rng(1), 200_000)
    assert 23 <= lengths.mean() <= 28
    assert np.median(lengths) < lengths.mean()  # right-skewed
    assert 60 <= np.percentile(lengths, 99) < 100
    assert 0.001 < np.mean(lengths >= 100) < 0.02  # a thin tail reaches the clip


def test_poisson_arrivals_start_at_zero_and_increase():
    arrivals = poisson_arrivals(np.random.default_rng(2), 10.0, 1000)
    assert arrivals[0] == 0.0
    assert np.all(np.diff(arrivals) >= 0)


def test_poisson_mean_interarrival_is_one_over_rate_and_exponential():
    gaps = np.diff(poisson_arrivals(np.random.default_rng(3), 50.0, 200_000))
    assert abs(gaps.mean() - 1 / 50.0) < 0.02 * (1 / 50.0)  # std of the mean is ~0.2%
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.02  # exponential gaps: CV = 1


def test_bursty_long_run_rate_equals_rate():
    # Short sojourns give many burst/calm cycles, so the long-run rate estimate is tight (~1%).
    arrivals = bursty_arrivals(np.random.default_rng(4), 100.0, 200_000, mean_burst_s=0.1,
                               mean_calm_s=0.4)
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert abs((arrivals.size - 1) / arrivals[-1] - 100.0) < 4.0


def test_bursty_arrivals_are_burstier_than_poisson():
    rng = np.random.default_rng(5)
    bursty = bursty_arrivals(rng, 100.0, 50_000)
    poisson = poisson_arrivals(rng, 100.0, 50_000)
    assert abs(_index_of_dispersion(poisson, 1.0) - 1.0) < 0.3
    assert _index_of_dispersion(bursty, 1.0) > 10.0


def test_make_trace_orders_requests_and_draws_tokens_in_vocab():
    trace = make_trace(np.random.default_rng(6), 20.0, 500, vocab=37)
    assert [r.request_id for r in trace] == list(range(500))
    assert all(isinstance(r, TraceRequest) for r in trace)
    assert np.all(np.diff([r.arrival_s for r in trace]) >= 0)
    tokens = np.concatenate([r.sequence for r in trace])
    assert tokens.dtype == np.int64 and tokens.min() == 0 and tokens.max() == 36
    assert all(1 <= r.sequence.size <= 100 for r in trace)


def test_make_trace_is_reproducible_from_the_seed_in_both_modes():
    for bursty in (False, True):
        a = make_trace(np.random.default_rng(7), 20.0, 100, vocab=10, bursty=bursty)
        b = make_trace(np.random.default_rng(7), 20.0, 100, vocab=10, bursty=bursty)
        assert [r.arrival_s for r in a] == [r.arrival_s for r in b]
        assert all(np.array_equal(x.sequence, y.sequence) for x, y in zip(a, b))


def test_burst_path_covers_the_window_and_averages_one():
    edges, multipliers = burst_path(np.random.default_rng(8), 2_000.0, 3.0, 0.25, 1.0)
    assert edges[0] == 0.0 and edges[-1] == 2_000.0 and np.all(np.diff(edges) > 0)
    assert multipliers.size == edges.size - 1
    calm = 1.0 / (1.0 + 0.2 * 2.0)
    assert set(np.round(multipliers, 12)) == {round(calm, 12), round(3.0 * calm, 12)}
    assert np.all(multipliers[1:] != multipliers[:-1])  # the states alternate
    mean = float(np.sum(multipliers * np.diff(edges)) / edges[-1])
    assert abs(mean - 1.0) < 0.05  # ~1,600 cycles: the time-weighted mean is within a few %


def test_modulated_arrivals_follow_the_path_at_the_rate():
    edges, multipliers = burst_path(np.random.default_rng(9), 500.0, 3.0, 0.25, 1.0)
    arrivals = modulated_arrivals(np.random.default_rng(10), 200.0, edges, multipliers)
    assert arrivals.min() >= 0.0 and arrivals.max() < 500.0 and np.all(np.diff(arrivals) >= 0)
    expected = 200.0 * float(np.sum(multipliers * np.diff(edges)))
    assert abs(arrivals.size - expected) < 4 * np.sqrt(expected)
    segment = np.searchsorted(edges, arrivals, side="right") - 1
    burst = multipliers[segment] > 1.0
    burst_time = float(np.sum(np.diff(edges)[multipliers > 1.0]))
    calm_time = 500.0 - burst_time
    assert abs((burst.sum() / burst_time) / ((~burst).sum() / calm_time) - 3.0) < 0.2


def test_modulated_arrivals_at_a_higher_rate_scale_one_draw():
    edges, multipliers = burst_path(np.random.default_rng(11), 3.0, 3.0, 0.25, 1.0)
    slow = modulated_arrivals(np.random.default_rng(12), 1_000.0, edges, multipliers)
    fast = modulated_arrivals(np.random.default_rng(12), 2_500.0, edges, multipliers)
    assert fast.size > 2 * slow.size  # crosses a chunk of unit points, so later draws matter too
    assert np.all(fast[:slow.size] < slow)  # the same arrivals, each earlier
    with pytest.raises(ValueError, match="rate must be > 0"):
        modulated_arrivals(np.random.default_rng(12), 0.0, edges, multipliers)


# ---- what a request's sequence is: token ids or feature rows ----

def test_a_token_inputs_sampler_draws_what_make_trace_draws_by_itself():
    """The traces of token models are the same whether drawn by make_trace or by the input's
    sampler: figures measured before sequence inputs stay comparable."""
    own = make_trace(np.random.default_rng(5), 100.0, 200, 1000)
    sampled = make_trace(np.random.default_rng(5), 100.0, 200, 0, inputs=SequenceInput("tokens", False, 1000).sampler())
    assert [r.arrival_s for r in own] == [r.arrival_s for r in sampled]
    assert all(np.array_equal(a.sequence, b.sequence) and b.sequence.dtype == np.int64 for a, b in zip(own, sampled))


@pytest.mark.parametrize("time_major", [False, True])
def test_feature_rows_are_drawn_at_the_inputs_shape_and_sent_as_a_batch_of_one(time_major):
    seq = SequenceInput("features", time_major, None, (5, 2), "float16")
    trace = make_trace(np.random.default_rng(0), 50.0, 60, 0, inputs=seq.sampler())
    for r in trace:
        T = r.sequence.shape[0]
        assert r.sequence.shape == (T, 5, 2) and r.sequence.dtype == np.float16 and 1 <= T <= 100
        assert seq.request_inputs(r.sequence)["features"].shape == ((T, 1, 5, 2) if time_major else (1, T, 5, 2))
    assert np.std(np.concatenate([r.sequence.ravel() for r in trace]).astype(np.float64)) == pytest.approx(1.0, rel=0.1)


def test_one_sequence_keeps_token_rows_as_before():
    tokens = np.arange(4, dtype=np.int64)
    assert one_sequence(tokens).shape == (1, 4) and one_sequence(tokens, time_major=True).shape == (4, 1)
    assert one_sequence(tokens, True)[:, 0].tolist() == [0, 1, 2, 3]


def test_sequences_longer_than_the_model_takes_are_cut_from_the_same_draw():
    cut = make_trace(np.random.default_rng(3), 10.0, 300, 0, inputs=SequenceInput("t", False, 50, longest=12).sampler())
    whole = make_trace(np.random.default_rng(3), 10.0, 300, 50)
    assert max(len(r.sequence) for r in whole) > 12 >= max(len(r.sequence) for r in cut)
    assert all(np.array_equal(c.sequence, w.sequence[:12]) for c, w in zip(cut, whole))
