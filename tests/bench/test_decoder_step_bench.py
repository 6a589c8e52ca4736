"""decoder_step_bench runs and reports what it says (no timing is asserted): every kernel at
every batch size, and the engine batch answering every request with the exact reversal."""

from __future__ import annotations

from cellserve.bench import decoder_step_bench


def test_the_step_bench_reports_both_kernels_at_every_batch():
    result = decoder_step_bench.run(threads=1, rounds=1, steps=2)
    assert set(result["step"]) == {"GraphDecoderKernel", "GraphDecoderKernel (interpreted)"}
    for by_batch in result["step"].values():
        assert set(by_batch) == {str(b) for b in decoder_step_bench.BATCHES}
        assert all(v["median_us"] > 0 for v in by_batch.values())


def test_the_engine_batch_answers_every_request_exactly():
    result = decoder_step_bench.engine_batch(16, rounds=1)
    assert result["requests"] == 16 and result["exact"] == 16 and result["median_s"] > 0
