"""StackKernel: stacked layers stepped together give what PyTorch's multi-layer RNN gives, on
every backend, whether lanes step batched (joining mid-way) or alone with run_lane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellserve.graph.model import DirectionWeights, LayerStack, RecurrentLayer
from cellserve.graph.zoo.modules import make_rnn
from cellserve.kernels.cell import _pointwise
from cellserve.kernels.stack import LANE_PIECE, StackKernel

CPU = torch.device("cpu")
BACKENDS = ["fused", "blas", "torch"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])
RUN_LANE_BACKENDS = [b for b in BACKENDS if b != "torch"]
# (backend, device) of the batched step: the torch backend on a GPU too, where there is one
STEPPERS = [(b, "cpu") for b in BACKENDS] + ([("torch", "cuda")] if torch.cuda.is_available() else [])
INPUT, HIDDEN, LAYERS = 5, 6, 3
_AVX512 = _pointwise is not None and _pointwise.has_avx512()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    torch.set_num_threads(1)


def torch_rnn(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    rnn = make_rnn(kind, INPUT, HIDDEN, LAYERS, False).eval()
    with torch.no_grad():
        for p in rnn.parameters():
            p.uniform_(-0.6, 0.6)
    return rnn


def stack_of(kind: str, rnn) -> LayerStack:
    def weights(layer: int) -> DirectionWeights:
        get = lambda n: getattr(rnn, f"{n}_l{layer}").detach().numpy().astype(np.float32)  # noqa: E731
        return DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))
    return LayerStack("stack", [RecurrentLayer(f"l{i}", kind, HIDDEN, [weights(i)]) for i in range(LAYERS)])


def reference(rnn, kind: str, x: np.ndarray, states) -> list[tuple]:
    """PyTorch's (outputs of the top layer, h and c of each layer) for one sequence."""
    h0 = torch.as_tensor(np.stack([h for h, _ in states]))[:, None]
    state = (h0, torch.as_tensor(np.stack([c for _, c in states]))[:, None]) if kind == "lstm" else h0
    with torch.no_grad():
        y, final = rnn(torch.as_tensor(x)[None], state)
    h = final[0] if kind == "lstm" else final
    return y[0].numpy(), [(h[i, 0].numpy(), final[1][i, 0].numpy() if kind == "lstm" else None)
                          for i in range(LAYERS)]


def random_lanes(kind: str, count: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, count)
    xs = [rng.standard_normal((int(n), INPUT)).astype(np.float32) for n in lengths]
    states = [[(rng.standard_normal(HIDDEN).astype(np.float32) * 0.5,
                rng.standard_normal(HIDDEN).astype(np.float32) * 0.5 if kind == "lstm" else None)
               for _ in range(LAYERS)] for _ in lengths]
    return xs, states


def check(results, rnn, kind, xs, states, where):
    for lane, (x, state) in enumerate(zip(xs, states)):
        y_ref, finals_ref = reference(rnn, kind, x, state)
        got = results[lane]
        np.testing.assert_allclose(got[-1][0], y_ref, atol=1e-5, err_msg=f"{where} lane {lane}: top outputs")
        for layer, ((_, h, c), (h_ref, c_ref)) in enumerate(zip(got, finals_ref)):
            np.testing.assert_allclose(h, h_ref, atol=1e-5, err_msg=f"{where} lane {lane} layer {layer}: h")
            assert (c is None) == (kind != "lstm")
            if c is not None:
                np.testing.assert_allclose(c, c_ref, atol=1e-5, err_msg=f"{where} lane {lane} layer {layer}: c")


@pytest.mark.parametrize("backend, device", STEPPERS)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_batched_steps_with_lanes_joining_mid_way_equal_pytorch(kind, backend, device):
    rnn = torch_rnn(kind, seed=3)
    kernel = StackKernel(stack_of(kind, rnn), torch.device(device), backend)
    xs, states = random_lanes(kind, 6, seed=4)
    joins = [0, 0, 1, 3, 3, 6]  # lanes join while others are mid-sequence
    active, results, t = {}, {}, 0
    while len(results) < len(xs):
        for lane, when in enumerate(joins):
            if when == t:
                active[lane] = [kernel.start(xs[lane], states[lane]), 0]
        if active:
            lanes = sorted(active)
            slots = np.array([active[i][0].slot for i in lanes], np.int64)
            rows = np.array([active[i][0].base + active[i][1] for i in lanes], np.int64)
            kernel.step(slots, rows, rows)
            for i in lanes:
                active[i][1] += 1
                if active[i][1] == active[i][0].length:
                    results[i] = kernel.finish(active.pop(i)[0])
        t += 1
    check(results, rnn, kind, xs, states, f"{backend} on {device}")
    assert kernel.slots.in_use == 0


@pytest.mark.parametrize("backend", RUN_LANE_BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_run_lane_in_chunks_mixed_with_batched_steps_equals_pytorch(kind, backend):
    rnn = torch_rnn(kind, seed=5)
    kernel = StackKernel(stack_of(kind, rnn), CPU, backend)
    assert kernel.lone_lanes == (1 if backend == "fused" else 2)  # see StackKernel.lone_lanes
    xs, states = random_lanes(kind, 4, seed=6)
    results = {}
    for lane, (x, state) in enumerate(zip(xs, states)):
        storage, done = kernel.start(x, state), 0
        while done < storage.length:
            chunk = min(1 + (done + lane) % 4, storage.length - done)
            if chunk == 1 and lane % 2:  # some single steps go through the batched path
                row = np.array([storage.base + done], np.int64)
                kernel.step(np.array([storage.slot], np.int64), row, row)
            else:
                kernel.run_lane(storage.slot, storage.base + done, 1, chunk)
            done += chunk
        results[lane] = kernel.finish(storage)
    check(results, rnn, kind, xs, states, backend)


@pytest.mark.parametrize("backend", RUN_LANE_BACKENDS)
def test_run_lane_runs_long_lanes_in_pieces_and_stops_early_when_asked(backend):
    rnn = torch_rnn("lstm", seed=9)
    kernel = StackKernel(stack_of("lstm", rnn), CPU, backend)
    rng = np.random.default_rng(10)
    length = 2 * LANE_PIECE + 5
    xs = [rng.standard_normal((length, INPUT)).astype(np.float32) for _ in range(2)]
    zeros = [(np.zeros(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32))] * LAYERS
    results = {}
    whole = kernel.start(xs[0])
    assert kernel.run_lane(whole.slot, whole.base, 1, length, np.zeros(1, np.int64)) == length
    results[0] = kernel.finish(whole)
    # a raised flag (a request arrived) lets each call run one step of every layer, no more
    stopped, done = kernel.start(xs[1]), 0
    while done < length:
        assert kernel.run_lane(stopped.slot, stopped.base + done, 1, length - done, np.ones(1, np.int64)) == 1
        done += 1
    results[1] = kernel.finish(stopped)
    check(results, rnn, "lstm", xs, [zeros, zeros], backend)


def test_lanes_that_start_without_state_start_from_zeros():
    rnn = torch_rnn("lstm", seed=7)
    kernel = StackKernel(stack_of("lstm", rnn), CPU, "blas")
    x = np.random.default_rng(8).standard_normal((4, INPUT)).astype(np.float32)
    storage = kernel.start(x)
    kernel.run_lane(storage.slot, storage.base, 1, 4)
    zeros = [(np.zeros(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32))] * LAYERS
    check({0: kernel.finish(storage)}, rnn, "lstm", [x], [zeros], "zero state")


@pytest.mark.skipif(not _AVX512, reason="the fused backend needs AVX-512")
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_a_lane_s_answer_is_the_same_to_the_last_bit_alone_or_batched(kind):
    """The fused backend (the default where the CPU has AVX-512), bit for bit: a lane run
    alone (run_lane's pieces) and the same lane stepped in batches with others joining and
    leaving, or in a mix of both. A stack's upper layers project their rows and then step
    either way (a sweep found 2e-8 differences in a 2-layer LSTM's outputs when the batched
    step fused the two). The other backends agree to float32 rounding, not to the bit: their
    batched steps are a GEMM, their lone runs a loop of their own (docs/architecture.md)."""
    backend = "fused"
    torch.manual_seed(7)
    width, hidden = 96, 200  # wide enough for a GEMM's blocking to matter; not a multiple of a panel
    rnn = make_rnn(kind, width, hidden, 2, False).eval()

    def weights(layer: int) -> DirectionWeights:
        get = lambda n: getattr(rnn, f"{n}_l{layer}").detach().numpy().astype(np.float32)  # noqa: E731
        return DirectionWeights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))
    stack = LayerStack("stack", [RecurrentLayer(f"l{i}", kind, hidden, [weights(i)]) for i in range(2)])
    kernel = StackKernel(stack, CPU, backend)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2 * LANE_PIECE + 5, width)).astype(np.float32)
    others = [rng.standard_normal((int(n), width)).astype(np.float32) for n in rng.integers(3, 30, 6)]

    def alone():
        lane = kernel.start(x)
        kernel.run_lane(lane.slot, lane.base, 1, lane.length)
        return kernel.finish(lane)

    def batched(lone_first: int):
        lane = kernel.start(x)
        done = kernel.run_lane(lane.slot, lane.base, 1, lone_first) if lone_first else 0
        running = []  # [storage, steps done]
        waiting = list(others)
        while done < lane.length:
            if waiting and done % 3 == 0:  # others join every third step
                running.append([kernel.start(waiting.pop()), 0])
            members = [(lane.slot, lane.base + done)] + [(s.slot, s.base + d) for s, d in running]
            slots = np.array([m[0] for m in members], np.int64)
            rows = np.array([m[1] for m in members], np.int64)
            kernel.step(slots, rows, rows)
            done += 1
            for entry in running:
                entry[1] += 1
            for entry in [e for e in running if e[1] == e[0].length]:
                kernel.release(entry[0])
                running.remove(entry)
        for storage, _ in running:
            kernel.release(storage)
        return kernel.finish(lane)

    want = alone()
    for lone_first in (0, 7, LANE_PIECE + 1):
        got = batched(lone_first)
        for layer, (w, g) in enumerate(zip(want, got)):
            for name, a, b in zip(("outputs", "h", "c"), w, g):
                if a is not None:
                    np.testing.assert_array_equal(b, a, err_msg=f"{kind}/{backend}: layer {layer} {name}, "
                                                                f"{lone_first} steps alone first")
