"""The tiling model's rules (kernels/triton_tiling.py) on cases checked by hand. Plain Python:
no triton needed."""

from __future__ import annotations

import pytest

from cellserve.kernels import triton_tiling as tiling
from cellserve.kernels.triton_tiling import CHIPS, CellShape, TileConfig, choose, predict, rank, regs_per_thread

LSTM512 = CellShape("lstm", 512)
GRU256 = CellShape("gru", 256)


def test_registers_per_thread_by_hand():
    # lstm-32, 4 units, one warp, one lane: h 1x32 + product 1x4x32 + weights 4x4x32 = 672 floats
    # over 32 threads = 21, plus the fixed overhead
    cell = CellShape("lstm", 32)
    assert regs_per_thread(cell, TileConfig(4, 1, 1, True)) == tiling.REGS_OVERHEAD + 21
    # streaming holds the weights it loaded for the step as well: the same count
    assert regs_per_thread(cell, TileConfig(4, 1, 1, False)) == tiling.REGS_OVERHEAD + 21
    # an odd hidden size pads to the next power of two (33 -> 64): twice the floats of 32
    assert regs_per_thread(CellShape("lstm", 33), TileConfig(4, 1, 1, True)) == tiling.REGS_OVERHEAD + 42


def test_programs_cover_every_unit_with_a_partial_last_tile():
    p = predict(CHIPS["a100"], CellShape("gru", 33), 1, TileConfig(8, 1, 1, True))
    assert p.programs == 5  # 4 full tiles of 8 and one of 1


def test_a_tile_whose_weights_do_not_fit_on_chip_ranks_below_one_that_does():
    chip = CHIPS["a100"]
    spilling = predict(chip, LSTM512, 1, TileConfig(64, 1, 1, True))  # 4x64x512 floats on 32 threads
    fitting = predict(chip, LSTM512, 1, TileConfig(8, 4, 1, True))
    assert spilling.regs_per_thread > tiling.MAX_REGS_PER_THREAD and not spilling.weights_on_chip
    assert fitting.regs_per_thread <= tiling.MAX_REGS_PER_THREAD and fitting.weights_on_chip
    assert spilling.step_s > fitting.step_s
    ranked = [p.config for p in rank(chip, LSTM512, 1)]
    assert ranked.index(fitting.config) < ranked.index(spilling.config)


def test_a_grid_that_cannot_be_resident_at_once_is_never_ranked():
    # 4096 programs of one unit on 40 SMs: the grid barrier would wait for programs not yet started;
    # a resident grid is kept within the SM count
    chip, cell = CHIPS["t4"], CellShape("rnn_tanh", 4096)
    config = TileConfig(1, 8, 1, True)
    assert predict(chip, cell, 1, config) is None
    assert all(p.programs <= chip.sms for p in rank(chip, cell, 1))
    # streamed, the same tiles run on a grid capped at what fits, each program looping over tiles
    streamed = predict(chip, cell, 1, TileConfig(1, 8, 1, False))
    assert streamed.programs == chip.sms


@pytest.mark.parametrize("chip_name", ["t4", "a100", "h100"])
@pytest.mark.parametrize("cell", [LSTM512, GRU256], ids=["lstm-512", "gru-256"])
def test_a_bigger_batch_is_never_predicted_faster_per_step(chip_name, cell):
    chip = CHIPS[chip_name]
    configs = [TileConfig(8, 4, 4, True), TileConfig(4, 2, 1, False), TileConfig(16, 8, 2, True)]
    for config in configs:
        times = [p.step_s for b in range(1, 65) if (p := predict(chip, cell, b, config))]
        assert times == sorted(times), config
    best = [choose(chip, cell, b).step_s for b in range(1, 65)]
    assert best == sorted(best)


def test_more_programs_pay_more_barrier_and_streaming_pays_for_its_weights():
    chip = CHIPS["h100"]
    few = predict(chip, LSTM512, 1, TileConfig(16, 8, 1, True))
    many = predict(chip, LSTM512, 1, TileConfig(4, 4, 1, True))
    assert many.programs == 4 * few.programs
    assert many.terms["barrier"] > few.terms["barrier"]
    resident = predict(chip, GRU256, 1, TileConfig(8, 4, 1, True))
    streaming = predict(chip, GRU256, 1, TileConfig(8, 4, 1, False))
    assert resident.terms["weight_stream"] == 0.0
    # 3 x 256 x 256 floats from L2 every step
    assert streaming.terms["weight_stream"] == pytest.approx(4 * 3 * 256 * 256 / chip.l2_bandwidth)


def test_the_choice_is_the_first_of_the_ranking_and_fails_loudly_when_nothing_fits():
    chip = CHIPS["l4"]
    assert choose(chip, GRU256, 8) == rank(chip, GRU256, 8)[0]
    tiny = tiling.GpuChip(chip.gpu, sms=1, regs_per_sm=1024)  # not one warp of 40+ registers fits
    with pytest.raises(ValueError, match="no tile configuration"):
        choose(tiny, GRU256, 1)


def test_lane_blocks_wider_than_the_padded_batch_are_not_candidates():
    assert {c.lane_block for c in tiling.candidates(GRU256, 3)} == {1, 2, 4}
    assert predict(CHIPS["a100"], GRU256, 2, TileConfig(8, 4, 8, True)) is None
