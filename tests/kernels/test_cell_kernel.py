"""The cell kernels: the C pointwise step and its tanh, and the blas and torch backends of
CellKernel agreeing with each other and with PyTorch's own layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.graph.model import GATES, DirectionWeights
from cellserve.graph.zoo.modules import make_rnn
from cellserve.kernels import _pointwise
from cellserve.kernels.cell import CellKernel, LaneStorage, pack_panels

CPU = torch.device("cpu")
KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
KIND_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
# fused (the default with AVX-512; elsewhere its portable build runs), blas and torch everywhere; onednn where
# torch has it
BACKENDS = ["fused", "blas", "torch"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    torch.set_num_threads(1)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- tanh


def test_pointwise_tanh_is_within_1e_6_of_numpy_over_minus_20_to_20():
    xs = np.concatenate([np.linspace(-20.0, 20.0, 40001), [0.0, -0.0, 1e-8, -1e-8, 7.9, 7.91, 8.0, -7.91]])
    approx = np.array([_pointwise.tanh(float(x)) for x in xs])
    exact = np.tanh(xs.astype(np.float32).astype(np.float64))
    err = np.abs(approx - exact)
    assert err.max() <= 1e-6, f"max error {err.max():.3g} at x = {xs[err.argmax()]}"
    assert np.all(np.abs(approx) <= 1.0)
    assert _pointwise.tanh(0.0) == 0.0


def test_pointwise_tanh_is_odd_and_monotonic_up_to_float_rounding():
    xs = np.linspace(0.0, 20.0, 2001)
    pos = np.array([_pointwise.tanh(float(x)) for x in xs])
    neg = np.array([_pointwise.tanh(float(-x)) for x in xs])
    np.testing.assert_array_equal(neg, -pos)
    assert np.all(np.diff(pos) >= -2.5e-7)  # a float32 ulp near 1 is 6e-8


# ---------------------------------------------------------------- CellKernel: backends agree


def torch_layer(kind: str, input_size: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = make_rnn(kind, input_size, hidden, 1, False).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.6, 0.6)
    return layer


def weights_of(layer) -> DirectionWeights:
    get = lambda n: getattr(layer, n + "_l0").detach().numpy().astype(np.float32)  # noqa: E731
    return DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))


# (lane, stride, length, step at which it joins): lanes join while others are mid-sequence, and
# reverse lanes walk their rows backwards, as the engine runs bidirectional layers
SCHEDULE = [(0, 1, 5, 0), (1, -1, 3, 1), (2, 1, 1, 2), (3, -1, 6, 2), (4, 1, 4, 4)]


def run_schedule(kernel: CellKernel, xs, h0s, c0s):
    """Drive the kernel as the engine would; return each lane's (y, h, c)."""
    active, out, t = {}, {}, 0
    while len(out) < len(SCHEDULE):
        for lane, stride, length, joins in SCHEDULE:
            if joins == t:
                storage = kernel.start(xs[lane], h0s[lane], c0s[lane])
                row = storage.base + (length - 1 if stride < 0 else 0)
                active[lane] = [storage, row, stride, 0]
        if active:
            lanes = sorted(active)
            slots = np.array([active[i][0].slot for i in lanes], np.int64)
            rows = np.array([active[i][1] for i in lanes], np.int64)
            kernel.step(slots, rows, rows)
            for i in lanes:
                active[i][1] += active[i][2]
                active[i][3] += 1
                if active[i][3] == active[i][0].length:
                    # copied at once, as the engine does (see test_finish_returns_copies_...)
                    out[i] = tuple(None if a is None else np.array(a) for a in kernel.finish(active.pop(i)[0]))
        t += 1
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_blas_and_torch_backends_agree_with_each_other_and_with_pytorch(kind):
    input_size, hidden = 5, 7
    layer = torch_layer(kind, input_size, hidden, seed=KINDS.index(kind))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((length, input_size)).astype(np.float32) for _, _, length, _ in SCHEDULE]
    h0s = [rng.standard_normal(hidden).astype(np.float32) * 0.5 for _ in SCHEDULE]
    c0s = [rng.standard_normal(hidden).astype(np.float32) * 0.5 if kind == "lstm" else None for _ in SCHEDULE]
    results = {backend: run_schedule(CellKernel(kind, hidden, weights_of(layer), CPU, backend=backend), xs, h0s, c0s)
               for backend in BACKENDS}
    for lane, stride, _, _ in SCHEDULE:
        yb, hb, cb = results["blas"][lane]
        for other in BACKENDS[1:]:
            yt, ht, ct = results[other][lane]
            where = f"{kind} lane {lane}, blas vs {other}"
            np.testing.assert_allclose(yb, yt, atol=1e-5, err_msg=f"{where}: outputs")
            np.testing.assert_allclose(hb, ht, atol=1e-5, err_msg=f"{where}: final h")
            assert (cb is None) == (ct is None) == (kind != "lstm")
            if kind == "lstm":
                np.testing.assert_allclose(cb, ct, atol=1e-5, err_msg=f"{where}: final c")
        # and both are PyTorch's layer (a reverse lane is the layer on the reversed sequence)
        x = xs[lane][::-1] if stride < 0 else xs[lane]
        state = torch.as_tensor(h0s[lane])[None, None]
        if kind == "lstm":
            state = (state, torch.as_tensor(c0s[lane])[None, None])
        with torch.no_grad():
            y_ref, state_ref = layer(torch.as_tensor(x.copy())[None], state)
        y_ref = y_ref[0].numpy()
        if stride < 0:
            y_ref = y_ref[::-1]
        h_ref = (state_ref[0] if kind == "lstm" else state_ref)[0, 0].numpy()
        np.testing.assert_allclose(yb, y_ref, atol=1e-5, err_msg=f"{kind} lane {lane} vs PyTorch")
        np.testing.assert_allclose(hb, h_ref, atol=1e-5)
        if kind == "lstm":
            np.testing.assert_allclose(cb, state_ref[1][0, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backends_agree_for_token_table_layers_and_survive_arena_growth(kind):
    hidden, embed, vocab = 6, 4, 11
    layer = torch_layer(kind, embed, hidden, seed=7)
    table = np.random.default_rng(2).standard_normal((vocab, embed)).astype(np.float32)
    rng = np.random.default_rng(3)
    lengths = [2100, 2100] + rng.integers(1, 9, size=78).tolist()  # 4200+ rows: more than the initial 4095
    sequences = [rng.integers(0, vocab, size=int(n)) for n in lengths]
    finals = {}
    for backend in BACKENDS:
        kernel = CellKernel(kind, hidden, weights_of(layer), CPU, token_table=table, backend=backend)
        lanes = [kernel.start(seq) for seq in sequences]  # 80 lanes: more than the 63 initial slots
        assert kernel.slots.capacity > 64 and kernel.rows.capacity > 4096
        pos = [0] * len(lanes)
        while any(p < l.length for p, l in zip(pos, lanes)):
            live = [i for i, l in enumerate(lanes) if pos[i] < l.length]
            slots = np.array([lanes[i].slot for i in live], np.int64)
            rows = np.array([lanes[i].base + pos[i] for i in live], np.int64)
            kernel.step(slots, rows, rows)
            for i in live:
                pos[i] += 1
        finals[backend] = [kernel.finish(l) for l in lanes]
        assert kernel.slots.in_use == 0
    for other in BACKENDS[1:]:
        for (yb, hb, _), (yt, ht, _) in zip(finals["blas"], finals[other]):
            np.testing.assert_allclose(yb, yt, atol=1e-5, err_msg=f"blas vs {other}")
            np.testing.assert_allclose(hb, ht, atol=1e-5, err_msg=f"blas vs {other}")
    for i in (1, 2, 79):
        with torch.no_grad():
            y_ref, _ = layer(torch.as_tensor(table[sequences[i]])[None])
        np.testing.assert_allclose(finals["blas"][i][0], y_ref[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_a_token_id_outside_the_table_is_refused_naming_it_and_frees_the_lane(backend):
    hidden, embed, vocab = 6, 4, 11
    layer = torch_layer("gru", embed, hidden, seed=7)
    table = np.random.default_rng(2).standard_normal((vocab, embed)).astype(np.float32)
    kernel = CellKernel("gru", hidden, weights_of(layer), CPU, token_table=table, backend=backend)
    for bad, ids in ((11, np.array([0, 11, 3])), (-1, np.array([2, -1], np.int32)), (300, np.array([300], np.uint16))):
        with pytest.raises(IndexError, match=f"token id {bad} is outside the projection table's 11 rows"):
            kernel.start(ids)
        assert kernel.slots.in_use == 0  # nothing held by the lane that did not start
    for dtype in (np.int64, np.int32, np.uint8):  # the rows of the table, whatever the ids' integer type
        lane = kernel.start(np.array([10, 0, 4], dtype))
        np.testing.assert_array_equal(kernel.x[lane.base:lane.base + 3], kernel.projected_table[[10, 0, 4]])
        kernel.release(lane)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_finish_returns_copies_that_a_later_lane_reusing_the_storage_does_not_overwrite(kind, backend):
    layer = torch_layer(kind, 3, 4, seed=5)
    kernel = CellKernel(kind, 4, weights_of(layer), CPU, backend=backend)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    first = kernel.start(x)
    for t in range(2):
        kernel.step(np.array([first.slot]), np.array([first.base + t]), np.array([first.base + t]))
    y, h, c = kernel.finish(first)
    kept = [a.copy() for a in (y, h) + ((c,) if c is not None else ())]
    second = kernel.start(-x)  # takes the freed slot and rows
    assert (second.slot, second.base) == (first.slot, first.base)
    for t in range(2):
        kernel.step(np.array([second.slot]), np.array([second.base + t]), np.array([second.base + t]))
    for got, want in zip((y, h, c), kept):
        np.testing.assert_array_equal(got, want, err_msg=f"{backend}: a finished lane's result changed")


def test_run_lane_refuses_a_stop_flag_that_is_not_one_int64():
    layer = torch_layer("lstm", 3, 4, seed=6)
    kernel = CellKernel("lstm", 4, weights_of(layer), CPU, backend="blas")
    lane = kernel.start(np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="stop must hold int64"):
        kernel.run_lane(lane.slot, lane.base, 1, 3, np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="stop holds no flag"):
        kernel.run_lane(lane.slot, lane.base, 1, 3, np.zeros(0, np.int64))
    assert kernel.run_lane(lane.slot, lane.base, 1, 3, np.zeros(1, np.int64)) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_fused_step_on_two_threads_matches_blas_at_sizes_that_split_panels_and_tiles(kind):
    """Big enough for the parallel region (threads taking panels in turn); H = 72 leaves the
    last panel part empty (16 units a panel, 64 for Elman); 13 lanes are register tiles of
    6, 6 and 1. An upper layer's step (inputs gathered from rows below) is checked too."""
    input_size, hidden, lanes, steps = 40, 72, 13, 4
    layer = torch_layer(kind, input_size, hidden, seed=11)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((steps, input_size)).astype(np.float32) for _ in range(lanes)]
    below = rng.standard_normal((lanes * steps + 3, input_size)).astype(np.float32)  # a layer below's rows
    results = {}
    torch.set_num_threads(2)
    try:
        for backend in ("blas", "fused"):
            for fed_by_rows in (False, True):  # a first layer, or an upper one fed the rows below
                kernel = CellKernel(kind, hidden, weights_of(layer), CPU, backend=backend)
                stored = [_upper_lane(kernel, steps) if fed_by_rows else kernel.start(x) for x in xs]
                slots = np.array([s.slot for s in stored], np.int64)
                for t in range(steps):
                    rows = np.array([s.base + t for s in stored], np.int64)
                    if fed_by_rows:
                        kernel.step_rows(below, np.arange(lanes, dtype=np.int64) * steps + t, slots, rows)
                    else:
                        kernel.step(slots, rows, rows)
                results[backend, fed_by_rows] = [kernel.finish(s) for s in stored]
    finally:
        torch.set_num_threads(1)
    for fed_by_rows in (False, True):
        for lane, (want, got) in enumerate(zip(results["blas", fed_by_rows], results["fused", fed_by_rows])):
            for name, a, b in zip(("outputs", "h", "c"), want, got):
                if a is not None:
                    np.testing.assert_allclose(b, a, atol=2e-5, err_msg=f"{kind} lane {lane} {name}, "
                                               f"{'upper layer' if fed_by_rows else 'first layer'}")


def _upper_lane(kernel: CellKernel, length: int):
    """A lane of a stack's upper layer: state only, its inputs come step by step."""
    lane = LaneStorage(kernel.slots.take(), kernel.rows.take(length), length)
    kernel.load(lane, None)
    return lane


def test_fused_kernels_refuse_weights_packed_for_another_shape_and_a_gru_given_input_rows():
    hidden = 20
    w = np.zeros((4 * hidden, hidden), np.float32)
    packed = pack_panels(w, 4, 16)
    h, c = np.zeros((3, hidden), np.float32), np.zeros((3, hidden), np.float32)
    x, one = np.zeros((2, 4 * hidden), np.float32), np.zeros(1, np.int64)
    _pointwise.fused_step(0, hidden, 16, packed, None, None, one, h, c, x, one, None, None, None)
    with pytest.raises(ValueError, match="packed holds"):
        _pointwise.fused_step(0, hidden, 16, packed[:-1], None, None, one, h, c, x, one, None, None, None)
    with pytest.raises(ValueError, match="panels of 48 or 64"):
        _pointwise.fused_step(0, hidden, 8, packed, None, None, one, h, c, x, one, None, None, None)
    with pytest.raises(ValueError, match="without xrows"):
        _pointwise.fused_step(0, hidden, 16, packed, None, None, one, h, c, x[:0], None, None, None, None)
    with pytest.raises(IndexError, match="slots"):
        _pointwise.fused_step(0, hidden, 16, packed, None, None, one + 3, h, c, x, one, None, None, None)
    g, out = np.zeros(4 * hidden, np.float32), np.zeros((2, hidden), np.float32)
    with pytest.raises(ValueError, match="not W_hh packed"):
        _pointwise.run_lane(0, hidden, packed[:-16], g, x, 0, 1, 1, 0, h, c, None, out, None, 16)
    assert _pointwise.run_lane(0, hidden, packed, g, x, 0, 1, 2, 0, h, c, None, out, None, 16) == 2
    gru = pack_panels(np.zeros((3 * hidden, 2 * hidden), np.float32), 3, 16)
    with pytest.raises(TypeError, match="gru takes no src"):
        _pointwise.fused_step(1, hidden, 16, gru, h, one, one, h, None, x, one, np.zeros(3 * hidden, np.float32),
                              None, None)


def test_cell_kernel_rejects_an_unknown_backend():
    layer = torch_layer("gru", 3, 4, seed=0)
    with pytest.raises(ValueError, match="backend"):
        CellKernel("gru", 4, weights_of(layer), CPU, backend="cuda-magic")


# ---------------------------------------------------------------- _pointwise.step directly


def buffers(kind: str, hidden: int = 4, batch: int = 2, rows: int = 6, slots: int = 5, seed: int = 0):
    """Valid arguments for _pointwise.step, as a dict in its argument order."""
    rng = np.random.default_rng(seed)
    G = GATES[kind] * hidden
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {
        "kind": KIND_CODE[kind], "H": hidden, "g": f(batch, G), "x": f(rows, G),
        "xrows": np.array([1, 4], np.int64)[:batch], "slots": np.array([2, 3], np.int64)[:batch],
        "h": f(slots, hidden), "c": f(slots, hidden) if kind == "lstm" else None,
        "bias": f(G) if kind == "gru" else None, "out": np.zeros((rows, hidden), np.float32),
        "orows": np.array([1, 4], np.int64)[:batch],
    }


def call(args: dict):
    return _pointwise.step(*args.values())


def expected_step(a: dict) -> np.ndarray:
    """The new h of each lane, computed with numpy from the same buffers."""
    H = a["H"]
    pre = a["g"] + a["x"][a["xrows"]]
    h = a["h"][a["slots"]]
    if a["kind"] == 0:
        i, f, g, o = (pre[:, k * H:(k + 1) * H] for k in range(4))
        c = sigmoid(f) * a["c"][a["slots"]] + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c), c
    if a["kind"] == 1:
        g = a["g"] + a["bias"]
        x = a["x"][a["xrows"]]
        r = sigmoid(x[:, :H] + g[:, :H])
        z = sigmoid(x[:, H:2 * H] + g[:, H:2 * H])
        n = np.tanh(x[:, 2 * H:] + r * g[:, 2 * H:])
        return (1 - z) * n + z * h, None
    return (np.maximum(pre, 0) if a["kind"] == 3 else np.tanh(pre)), None


@pytest.mark.parametrize("kind", KINDS)
def test_pointwise_step_updates_only_the_named_slots_and_rows(kind):
    a = buffers(kind)
    h_before, c_before = a["h"].copy(), None if a["c"] is None else a["c"].copy()
    want_h, want_c = expected_step(a)
    assert call(a) is None
    np.testing.assert_allclose(a["h"][a["slots"]], want_h, atol=1e-5)
    np.testing.assert_allclose(a["out"][a["orows"]], want_h, atol=1e-5)
    others = np.setdiff1d(np.arange(len(h_before)), a["slots"])
    np.testing.assert_array_equal(a["h"][others], h_before[others])
    np.testing.assert_array_equal(np.delete(a["out"], a["orows"], axis=0), 0.0)
    if kind == "lstm":
        np.testing.assert_allclose(a["c"][a["slots"]], want_c, atol=1e-5)
        np.testing.assert_array_equal(a["c"][others], c_before[others])


def test_pointwise_step_without_output_rows_updates_only_the_state():
    a = buffers("rnn_tanh")
    a["out"], a["orows"] = None, None
    want_h, _ = expected_step(a)
    call(a)
    np.testing.assert_allclose(a["h"][a["slots"]], want_h, atol=1e-5)


OUT_OF_RANGE = [
    ("slots", 5), ("slots", -1), ("slots", 2**40),
    ("xrows", 6), ("xrows", -3),
    ("orows", 6), ("orows", -1),
]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("which, bad", OUT_OF_RANGE)
def test_pointwise_step_raises_index_error_for_out_of_range_indices_and_writes_nothing(kind, which, bad):
    a = buffers(kind)
    a[which] = a[which].copy()
    a[which][1] = bad
    before = {k: v.copy() for k, v in a.items() if isinstance(v, np.ndarray)}
    with pytest.raises(IndexError, match=which):
        call(a)
    for k, v in before.items():
        np.testing.assert_array_equal(a[k], v, err_msg=f"{k} changed by a failed call")


MISSING = [
    ("lstm", "g"), ("lstm", "x"), ("lstm", "xrows"), ("lstm", "slots"), ("lstm", "h"),
    ("lstm", "c"),  # lstm needs its cell state
    ("gru", "bias"),  # gru needs b_hh
    ("gru", "orows"),  # out without orows
]


@pytest.mark.parametrize("kind, which", MISSING)
def test_pointwise_step_raises_type_error_for_a_missing_buffer_and_writes_nothing(kind, which):
    a = buffers(kind)
    a[which] = None
    before = {k: v.copy() for k, v in a.items() if isinstance(v, np.ndarray)}
    with pytest.raises(TypeError):
        call(a)
    for k, v in before.items():
        np.testing.assert_array_equal(a[k], v)


@pytest.mark.parametrize("kind, which", [("rnn_tanh", "c"), ("lstm", "bias"), ("rnn_relu", "bias")])
def test_pointwise_step_raises_type_error_for_a_buffer_the_kind_does_not_take(kind, which):
    a = buffers(kind)
    a[which] = np.zeros((5, 4 * 4), np.float32)
    with pytest.raises(TypeError):
        call(a)


def test_pointwise_step_refuses_read_only_and_non_contiguous_state():
    a = buffers("gru")
    a["h"].flags.writeable = False
    with pytest.raises(TypeError, match="h must be"):
        call(a)
    a = buffers("gru")
    a["h"] = np.zeros((5, 8), np.float32)[:, ::2]
    with pytest.raises(TypeError, match="h must be"):
        call(a)
    a = buffers("gru")
    a["out"] = np.zeros((6, 8), np.float32)[:, :4]
    with pytest.raises(TypeError, match="out must be"):
        call(a)


def test_pointwise_step_refuses_short_index_arrays_and_buffers():
    a = buffers("lstm")
    a["slots"] = np.array([2], np.int64)  # two lanes in g, one slot
    with pytest.raises(ValueError, match="slots"):
        call(a)
    a = buffers("lstm")
    a["c"] = a["c"][:3].copy()
    with pytest.raises(ValueError, match="c has fewer slots"):
        call(a)
    a = buffers("gru")
    a["bias"] = a["bias"][:5].copy()
    with pytest.raises(ValueError, match="bias"):
        call(a)


@pytest.mark.parametrize("name, value", [("xrows", np.array([1, 2], np.int32)),
                                         ("h", np.zeros((5, 4), np.float64))])
def test_pointwise_step_refuses_buffers_of_the_wrong_element_type(name, value):
    a = buffers("lstm")
    a[name] = value
    with pytest.raises(TypeError, match=f"{name} must hold"):
        call(a)


@pytest.mark.parametrize("kind, hidden", [(7, 4), (-1, 4), (0, 0), (1, -2)])
def test_pointwise_step_refuses_a_bad_kind_or_hidden_size(kind, hidden):
    a = buffers("lstm")
    a["kind"], a["H"] = kind, hidden
    with pytest.raises(ValueError, match="bad kind or hidden size"):
        call(a)


@pytest.mark.parametrize("kind", KINDS)
def test_an_upper_layer_s_packed_projection_is_the_gemm_s_and_the_same_alone_or_in_a_batch(kind):
    """fused_project (a stack's upper layer on the fused backend): x . W_ih^T + bias to float32
    rounding of numpy's, with H = 72 leaving a panel part empty; and each row's result the same
    to the bit whether it is projected alone, in a batch, or in another order."""
    layer = torch_layer(kind, 40, 72, seed=12)
    kernel = CellKernel(kind, 72, weights_of(layer), CPU, backend="fused", fed_by_rows=True)
    w = weights_of(layer)
    bias = w.b_ih if kind == "gru" else w.b_ih + w.b_hh
    src = np.random.default_rng(9).standard_normal((20, 40)).astype(np.float32)
    batch = np.zeros((20, kernel.gates), np.float32)
    kernel.project_rows(src, np.arange(20, dtype=np.int64), batch, np.arange(20, dtype=np.int64))
    np.testing.assert_allclose(batch, src @ w.w_ih.T + bias, rtol=1e-5, atol=1e-5)
    order = np.random.default_rng(10).permutation(20).astype(np.int64)
    shuffled = np.zeros_like(batch)
    kernel.project_rows(src, order[:7], shuffled, order[:7])
    kernel.project_rows(src, order[7:], shuffled, order[7:])
    np.testing.assert_array_equal(shuffled, batch)
    for i in range(20):
        one = np.zeros((1, kernel.gates), np.float32)
        kernel.project_rows(src, np.array([i], np.int64), one, np.zeros(1, np.int64))
        np.testing.assert_array_equal(one[0], batch[i])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN projections need torch's mkldnn")
def test_a_small_lane_start_projection_takes_numpy_blas_and_a_large_one_onednn():
    """On the fused backend a lane's input projection under SMALL_PROJECTION_MACS runs through
    numpy's BLAS (oneDNN's fixed cost per call dominates small ones), a longer lane's through
    oneDNN; both are PyTorch's projection, and a layer too large for one row keeps no copy."""
    from cellserve.kernels import cell

    layer = torch_layer("lstm", 20, 16, seed=5)
    kernel = CellKernel("lstm", 16, weights_of(layer), CPU, backend="fused")
    w = weights_of(layer)
    assert kernel.project._small_w is not None  # 64 x 20 weights: small for up to 409 rows
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        calls.append(args[0].shape[0])
        return onednn(*args)

    rng = np.random.default_rng(0)
    for rows in (3, 400, 420):  # 420 x 20 x 64 multiply-adds pass 2^19
        x = rng.standard_normal((rows, 20)).astype(np.float32)
        torch.ops.mkldnn._linear_pointwise = counted
        try:
            got = kernel.project(x)
        finally:
            torch.ops.mkldnn._linear_pointwise = onednn
        np.testing.assert_allclose(got, x @ w.w_ih.T + w.b_ih + w.b_hh, rtol=1e-5, atol=1e-5)
    assert calls == [420] and 420 * 20 * 64 >= cell.SMALL_PROJECTION_MACS > 400 * 20 * 64
    big = CellKernel("lstm", 512, weights_of(torch_layer("lstm", 512, 512, seed=1)), CPU, backend="fused")
    assert big.project._small_w is None  # 2048 x 512 weights: no call is small
