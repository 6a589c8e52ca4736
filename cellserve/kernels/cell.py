"""How one batched cell step runs on one device.

A `CellKernel` owns one direction of one recurrent layer: its weights, the state slots and
row blocks of the lanes running through it, and `step()`, which advances any set of its
lanes by one time step each, whatever their positions. Implementations of the step:

- "fused" (CPU, the default where the CPU has AVX-512): the whole step in one C call, GEMM
  included, on weights packed once into panels of hidden units (see _pointwise.c): threads take
  panels from a shared counter, so a core that another process holds up leaves its share to
  the other, where oneDNN's even split waits for it.
- "onednn" (CPU, the default elsewhere where torch has oneDNN): gather h, then the GEMM
  h @ W_hh^T by oneDNN with W_hh reordered once into its blocked layout (faster at these
  shapes than OpenBLAS or torch.mm; figures in docs/performance.md), then the C kernel in `_pointwise.c` adds the input projections, applies the gates, and
  updates the state and output rows in place, in one pass.
- "blas" (CPU): the same, with the GEMM in numpy's BLAS.
- "torch" (any torch device, CUDA included): the same math in torch ops.

Never mix "onednn" and "blas" in one process: OpenMP's and OpenBLAS's thread pools each spin
waiting for work and starve the other (a step ran about 80x slower). So the first
"onednn" kernel limits numpy's BLAS to one thread for the rest of the process; what numpy
still does (the plain ops of a model) works on tiny matrices.

Input projections x @ W_ih^T + b for all of a lane's steps are computed when it starts, as
one GEMM (or, for a layer fed by an embedding, as row lookups in a table projected once at
load), and kept in the lane's row block. A stack's upper layers take their inputs row by row
from the layer below instead (see stack.py and step_rows): a batched step projects its rows
and then steps, as a lane alone does with its piece's rows, so that batching never changes a
lane's answer, to the last bit.
"""

from __future__ import annotations

import functools

import numpy as np
import threadpoolctl
import torch

from cellserve.graph.model import GATES, DirectionWeights
from cellserve.graph.model import MAX_PROJECTED_TABLE_BYTES as MODEL_PROJECTED_TABLE_BYTES
from cellserve.kernels.arena import LaneStorage, RowPool, SlotPool, new_lane  # noqa: F401 - LaneStorage re-exported

try:
    from cellserve.kernels import _pointwise
except ImportError:  # not built (e.g. an install without a compiler): the torch step still works
    _pointwise = None

_KIND_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


@functools.cache
def _single_threaded_numpy_blas() -> None:
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")


CPU_BACKENDS = ("fused", "onednn", "blas")
BACKENDS = CPU_BACKENDS + ("torch",)
# Hidden units per panel of the fused step's packed weights: panels of 64 (or GRU's 48) columns
PANEL_UNITS = {"lstm": 16, "gru": 16, "rnn_tanh": 64, "rnn_relu": 64}
# the largest projected embedding table a layer keeps (graph/model.py says why)
MAX_PROJECTED_TABLE_BYTES = MODEL_PROJECTED_TABLE_BYTES


def default_backend(device: torch.device) -> str:
    if device.type != "cpu" or _pointwise is None:
        return "torch"
    if _pointwise.has_avx512():
        return "fused"
    return _gemm_backend()


def _gemm_backend() -> str:
    """Where a CPU kernel's other GEMMs (input projections) run."""
    return "onednn" if torch.backends.mkldnn.is_available() else "blas"


def pack_panels(w: np.ndarray, gates: int, units: int) -> np.ndarray:
    """W [gates * H, K] (PyTorch's layout) packed for the fused step (see _pointwise.c): panel
    p holds, for each input k, gate q of hidden units p * units ... in column q * units + u,
    zeros past H; 64-byte aligned, so that each packed row starts a cache line."""
    hidden, k = w.shape[0] // gates, w.shape[1]
    panels = -(-hidden // units)
    padded = np.zeros((gates, panels * units, k), np.float32)
    padded[:, :hidden] = w.reshape(gates, hidden, k)
    flat = padded.reshape(gates, panels, units, k).transpose(1, 3, 0, 2).reshape(-1)
    buf = np.empty(flat.size + 16, np.float32)
    start = (-buf.ctypes.data % 64) // 4
    packed = buf[start:start + flat.size]
    packed[:] = flat
    return packed


_UNSIGNED = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def _look_up(table: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out[i] = table[ids[i]], an IndexError naming the id when one is outside the table.
    Why not np.take's own check: with `out` given, its default mode ('raise') gathers into a
    temporary and copies that into `out`; the range is checked here in one reduction (signed
    ids read as unsigned: a negative one reads as more than any row), then gathered straight
    into `out`."""
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind in "iu":
        wide = ids.view(_UNSIGNED[ids.itemsize]) if ids.dtype.kind == "i" else ids
        if np.maximum.reduce(wide, axis=None) >= len(table):
            bad = next(int(i) for i in ids.ravel() if not 0 <= i < len(table))
            raise IndexError(f"token id {bad} is outside the projection table's {len(table)} rows")
        np.take(table, ids, axis=0, out=out, mode="clip")  # every id checked above: clip never clips
    else:
        np.take(table, ids, axis=0, out=out)


# A oneDNN projection smaller than this (rows x inputs x outputs multiply-adds) runs through
# numpy's BLAS instead, where `_Linear` is asked to (small_by_blas): oneDNN's fixed cost per
# call outweighs its speed on small ones, and numpy's BLAS (one thread here) slows down at 2
# rows of the larger ones (docs/performance.md, "Small input projections").
SMALL_PROJECTION_MACS = 1 << 19


class _Linear:
    """y = x @ W^T (+ b) for float32 x [N, in]: by oneDNN with W prepacked (numpy in and
    out), by numpy's BLAS, or by torch on the backend's device (tensor out). `small_by_blas`
    (oneDNN only): a call under SMALL_PROJECTION_MACS takes numpy's BLAS. Its rounding differs
    from oneDNN's, so only a projection whose rows do not depend on what else is batched (a
    lane's own inputs at its start) may ask for it: a lane's results stay the same in any mix."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, backend: str, device: torch.device,
                 batch_hint: int = 64, small_by_blas: bool = False):
        self.backend, self.device = backend, device
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self._small_w = None  # W^T for small calls, when small_by_blas and one row is small
        if backend == "onednn":
            _single_threaded_numpy_blas()
            self.w = torch.ops.mkldnn._reorder_linear_weight(torch.from_numpy(weight), batch_hint)
            self.b = None if bias is None else torch.from_numpy(bias)
            if small_by_blas and weight.size < SMALL_PROJECTION_MACS:
                self._small_w, self._small_b = np.ascontiguousarray(weight.T), bias
        elif backend == "blas":
            self.w, self.b = np.ascontiguousarray(weight.T), bias
        else:
            self.w = torch.as_tensor(weight.T.copy(), device=device)
            self.b = None if bias is None else torch.as_tensor(bias, device=device)

    def __call__(self, x):
        """x: a numpy array, or for the torch backend also a tensor on its device."""
        if isinstance(x, torch.Tensor):
            y = x @ self.w
            return y if self.b is None else y.add_(self.b)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:  # torch.from_numpy wants writable memory
            x = x.copy()
        b = self.b
        if self._small_w is not None and x.shape[0] * self._small_w.size < SMALL_PROJECTION_MACS:
            y, b = x @ self._small_w, self._small_b
        elif self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(torch.from_numpy(x), self.w, self.b, "none", [], "").numpy()
        elif self.backend == "blas":
            y = x @ self.w
        else:
            y = torch.as_tensor(x, device=self.device) @ self.w
        if b is not None:
            y += b
        return y


class CellKernel:
    def __init__(self, kind: str, hidden: int, weights: DirectionWeights, device: torch.device,
                 token_table: np.ndarray | None = None, backend: str | None = None,
                 pools: tuple[SlotPool, RowPool] | None = None, fed_by_rows: bool = False):
        """`pools`: slot and row pools shared with other kernels (a stack's layers), so that
        a lane has the same slot and rows in each; by default the kernel has its own.
        `fed_by_rows`: a stack's upper layer, which projects the rows of the layer below as
        its lanes reach them (project_rows)."""
        self.kind, self.hidden, self.device = kind, hidden, device
        self.backend = backend or default_backend(device)
        if self.backend in CPU_BACKENDS and (device.type != "cpu" or _pointwise is None):
            raise ValueError(f"the {self.backend} backend needs the CPU and the built _pointwise extension")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose fused, onednn, blas or torch")
        gemm = _gemm_backend() if self.backend == "fused" else self.backend
        self.gates = GATES[kind] * hidden
        # Biases that only add to the input projection are folded into it; GRU's b_hn sits
        # inside r * (...) and stays separate.
        x_bias = weights.b_ih if kind == "gru" else weights.b_ih + weights.b_hh
        self.h_bias = weights.b_hh.astype(np.float32) if kind == "gru" else None
        # (an upper layer of a stack on the fused backend projects on packed_ih, below, instead)
        upper_fused = fed_by_rows and self.backend == "fused"
        # on the fused backend this projection runs once per lane, at its start (small_by_blas)
        self.project = None if upper_fused else _Linear(weights.w_ih, x_bias, gemm, device,
                                                        small_by_blas=self.backend == "fused")
        # A layer fed by an embedding looks its projections up: table @ W_ih^T + bias, once
        # (unless that table would be too large: then its embeddings, projected per lane).
        self.token_table = token_table
        self.projected_table = None
        if token_table is not None and token_table.shape[0] * self.gates * 4 <= MAX_PROJECTED_TABLE_BYTES:
            self.projected_table = self.project(token_table)
        self.slots, self.rows = pools or (SlotPool(), RowPool())
        self.packed_ih = None  # W_ih in panels, for an upper layer's projections on the fused backend
        if self.backend == "fused":
            self.units = PANEL_UNITS[kind]
            self.packed = pack_panels(weights.w_hh, GATES[kind], self.units)
            if fed_by_rows:
                self.packed_ih = pack_panels(weights.w_ih, GATES[kind], self.units)
                self._ih_bias = np.ascontiguousarray(x_bias, dtype=np.float32)
                self._proj = np.zeros((64, self.gates), np.float32)
        elif self.backend in CPU_BACKENDS:
            self.recurrent = _Linear(weights.w_hh, None, gemm, device)
            self._hbuf = np.zeros((64, hidden), np.float32)
            self.w_hh = np.ascontiguousarray(weights.w_hh, dtype=np.float32)  # for run_lane
        if self.backend in CPU_BACKENDS:
            self.bias_vec = self.h_bias
            self._g = np.zeros(self.gates, np.float32)
            self.h = np.zeros((self.slots.capacity, hidden), np.float32)
            self.c = np.zeros_like(self.h) if kind == "lstm" else None
            self.x = np.zeros((self.rows.capacity, self.gates), np.float32)
            self.out = np.zeros((self.rows.capacity, hidden), np.float32)
        self._arange = np.arange(64, dtype=np.int64)
        if self.backend not in CPU_BACKENDS:
            self.w_hh_t = torch.as_tensor(np.ascontiguousarray(weights.w_hh.T, dtype=np.float32), device=device)
            self.bias_vec = None if self.h_bias is None else torch.as_tensor(self.h_bias, device=device)
            self.h = torch.zeros((self.slots.capacity, hidden), device=device)
            self.c = torch.zeros_like(self.h) if kind == "lstm" else None
            self.x = torch.zeros((self.rows.capacity, self.gates), device=device)
            self.out = torch.zeros((self.rows.capacity, hidden), device=device)

    # ---- lanes ----

    def start(self, x: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None) -> LaneStorage:
        """Admit a lane. x: [T, I] float inputs, or [T] token ids if the layer has a table."""
        with new_lane(self.slots, self.rows, int(x.shape[0]), self.release) as lane:
            self.load(lane, x, h0, c0)
        return lane

    def load(self, lane: LaneStorage, x: np.ndarray | None, h0: np.ndarray | None = None,
             c0: np.ndarray | None = None) -> None:
        """Fill a lane's initial state, and its input projections unless x is None (a stack's
        upper layer gets them step by step, see step_from)."""
        self._fit_capacity()
        rows = slice(lane.base, lane.base + lane.length)
        if x is not None and self.projected_table is None and self.token_table is not None:
            x = self.token_table[np.asarray(x, np.int64)]  # token ids: their embeddings, projected below
        if self.backend == "torch":
            if x is not None:
                ids = torch.as_tensor(x, device=self.device) if self.projected_table is not None else None
                self.x[rows] = self.projected_table[ids] if ids is not None else self.project(x)
            self.h[lane.slot] = 0.0 if h0 is None else torch.as_tensor(h0, device=self.device)
            if self.c is not None:
                self.c[lane.slot] = 0.0 if c0 is None else torch.as_tensor(c0, device=self.device)
            return
        if x is not None and self.projected_table is not None:
            _look_up(self.projected_table, x, self.x[rows])
        elif x is not None:
            self.x[rows] = self.project(x)
        self.h[lane.slot] = 0.0 if h0 is None else h0
        if self.c is not None:
            self.c[lane.slot] = 0.0 if c0 is None else c0

    def finish(self, lane: LaneStorage) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Read a lane's outputs [T, H], final h [H] and c [H] (or None), and free it."""
        result = self.read(lane)
        self.release(lane)
        return result

    def read(self, lane: LaneStorage) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Copies of a lane's outputs [T, H], h [H] and c [H] (or None)."""
        rows = slice(lane.base, lane.base + lane.length)
        y, h = self._read(self.out[rows]), self._read(self.h[lane.slot])
        c = self._read(self.c[lane.slot]) if self.c is not None else None
        return y, h, c

    def release(self, lane: LaneStorage) -> None:
        self.slots.give(lane.slot)
        self.rows.give(lane.base, lane.length)

    # ---- the batched step ----

    def step(self, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        """Advance a batch of lanes one step: lane i reads input row xrows[i], updates state
        slot slots[i] and writes its output to row orows[i] (int64 arrays)."""
        self.step_from(self.x, slots, xrows, orows)

    def step_from(self, x, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        """`step`, with the input projections (bias included) read from rows of x instead of
        the kernel's own: a numpy array for the CPU backends, a tensor on the device for torch."""
        if self.backend == "torch":
            self._step_torch(x, slots, xrows, orows)
        else:
            self._step_cpu(x, slots, xrows, orows)

    def step_rows(self, source, rows: np.ndarray, slots: np.ndarray, orows: np.ndarray) -> None:
        """`step`, with lane i's input (unprojected) in row rows[i] of `source` (a numpy array
        for the CPU backends, a tensor on the device for torch): the output rows of the layer
        below, in a stack. The batch's rows are projected (one GEMM), then stepped on: the
        same two halves, in the same order, as a lane alone (the stack's run_lane projects
        its piece's rows, then steps), so that a lane's answer does not depend on whether it
        ran alone or with others (the projection's rows do not depend on how many there are:
        tests/kernels/test_stack_kernel.py)."""
        n = len(slots)
        if len(self._arange) < n:
            self._arange = np.arange(2 * n, dtype=np.int64)
        if self.packed_ih is not None:
            if len(self._proj) < n:
                self._proj = np.zeros((2 * n, self.gates), np.float32)
            self.project_rows(source, rows, self._proj, self._arange[:n])
            self.step_from(self._proj, slots, self._arange[:n], orows)
            return
        if self.backend == "torch":
            fresh = source.index_select(0, torch.from_numpy(rows).to(self.device))
        else:
            fresh = source[rows]
        self.step_from(self.project(fresh), slots, self._arange[:n], orows)

    def project_rows(self, source: np.ndarray, rows: np.ndarray, out: np.ndarray, orows: np.ndarray) -> None:
        """out[orows[i]] = the projection (bias included) of source[rows[i]]: on the packed
        W_ih of an upper layer on the fused backend (each row summed alike however many are
        projected), else by the layer's GEMM."""
        if self.packed_ih is not None:
            _pointwise.fused_project(_KIND_CODE[self.kind], self.hidden, self.units, self.packed_ih, source, rows,
                                     self._ih_bias, out, orows)
        else:
            out[orows] = self.project(source[rows])

    @property
    def lone_lanes(self) -> int:
        """Batches of up to this many lanes run each lane alone with run_lane (CPU backends):
        one lane's run_lane step takes about half the time of a batched step of one lane,
        two lanes' break even (docs/performance.md, "Kernels")."""
        return 0 if self.backend == "torch" else 1

    def run_lane(self, slot: int, row: int, stride: int, steps: int, stop: np.ndarray | None = None) -> int:
        """Advance one lane up to `steps` steps in one call (CPU backends): its rows are
        row, row + stride, ... Returns the steps run: fewer once another thread sets the
        int64 flag `stop` (see _pointwise.run_lane); at least one."""
        if self.backend == "fused":  # the panels, which a worker still waking after an idle spell cannot hold up
            return _pointwise.run_lane(_KIND_CODE[self.kind], self.hidden, self.packed, self._g, self.x, row, stride,
                                       steps, slot, self.h, self.c, self.bias_vec, self.out, stop, self.units)
        return _pointwise.run_lane(_KIND_CODE[self.kind], self.hidden, self.w_hh, self._g, self.x, row, stride,
                                   steps, slot, self.h, self.c, self.bias_vec, self.out, stop)

    def _step_cpu(self, x: np.ndarray, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        if self.backend == "fused":
            _pointwise.fused_step(_KIND_CODE[self.kind], self.hidden, self.units, self.packed, None, None, slots,
                                  self.h, self.c, x, xrows, self.bias_vec, self.out, orows)
            return
        n = len(slots)
        if n > len(self._hbuf):
            self._hbuf = np.zeros((2 * n, self.hidden), np.float32)
        hb = self._hbuf[:n]
        np.take(self.h, slots, axis=0, out=hb)
        gb = self.recurrent(hb)
        _pointwise.step(_KIND_CODE[self.kind], self.hidden, gb, x, xrows, slots,
                        self.h, self.c, self.bias_vec, self.out, orows)

    def _step_torch(self, x_all: torch.Tensor, slots: np.ndarray, xrows: np.ndarray, orows: np.ndarray) -> None:
        dev = self.device
        s, xr, orr = (torch.from_numpy(a).to(dev, non_blocking=True) for a in (slots, xrows, orows))
        g = self.h.index_select(0, s) @ self.w_hh_t
        x = x_all.index_select(0, xr)
        if self.kind == "lstm":
            h, c = lstm_pointwise(x + g, self.c.index_select(0, s))
            self.c.index_copy_(0, s, c)
        elif self.kind == "gru":
            g = g + self.bias_vec
            xr_, xz, xn = x.chunk(3, 1)
            gr, gz, gn = g.chunk(3, 1)
            r, z = torch.sigmoid(xr_ + gr), torch.sigmoid(xz + gz)
            n = torch.tanh(xn + r * gn)
            h = torch.lerp(n, self.h.index_select(0, s), z)
        else:
            h = torch.relu(x + g) if self.kind == "rnn_relu" else torch.tanh(x + g)
        self.h.index_copy_(0, s, h)
        self.out.index_copy_(0, orr, h)

    # ---- the RecurrentKernel protocol (see protocol.py) ----

    def start_lane(self, x: np.ndarray, states: list[tuple] | None = None) -> LaneStorage:
        h0, c0 = states[0] if states else (None, None)
        return self.start(x, h0, c0)

    def step_batch(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.step(slots, rows, rows)

    def finish_lane(self, lane: LaneStorage) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        return [self.finish(lane)]

    def weight_bytes(self) -> int:
        names = ("packed", "packed_ih", "w_hh", "w_hh_t", "projected_table")
        arrays = [getattr(self, n, None) for n in names]
        if self.project is not None:
            arrays += [self.project.w, self.project.b]
        linear = getattr(self, "recurrent", None)
        if linear is not None:
            arrays += [linear.w, linear.b]
        return sum(_nbytes(a) for a in arrays if a is not None)

    # ---- storage helpers: numpy arrays for "blas", tensors for "torch" ----

    def _fit_capacity(self) -> None:
        """Grow the arenas after the pools grew."""
        grow = lambda a, n: a if a is None or a.shape[0] >= n else self._resized(a, n)  # noqa: E731
        self.h, self.c = grow(self.h, self.slots.capacity), grow(self.c, self.slots.capacity)
        self.x, self.out = grow(self.x, self.rows.capacity), grow(self.out, self.rows.capacity)

    def _resized(self, a, n):
        bigger = np.zeros((n, a.shape[1]), np.float32) if isinstance(a, np.ndarray) else a.new_zeros((n, a.shape[1]))
        bigger[: a.shape[0]] = a
        return bigger

    @staticmethod
    def _read(a) -> np.ndarray:
        return a.copy() if isinstance(a, np.ndarray) else a.detach().cpu().numpy().copy()


def _nbytes(a) -> int:
    if isinstance(a, torch.Tensor):
        try:
            return a.numel() * a.element_size()
        except RuntimeError:  # an opaque (oneDNN-reordered) weight: report its plain size
            return 0
    return int(np.asarray(a).nbytes)


def lstm_pointwise(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM gate math on pre-activations [B, 4H] (order i, f, g, o); returns (h, c)."""
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c
