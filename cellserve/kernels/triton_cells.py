"""The persistent recurrent kernel in Triton's language (GRNN's design): one launch runs many
steps of the LSTM, GRU or Elman RNN cell for the lanes of a batch.

Contract of `recurrent_steps` (one launch; the host wrapper is kernels/triton_rnn.py):

- inputs: x [rows, G*H], each lane's input projections with the biases that add to them
  already in (cellserve hoists x @ W_ih^T + b out of the recurrence); W_hh read through two
  strides, so the caller's [H, G*H] transpose serves without a copy; for GRU the recurrent bias
  b_hh [G*H] (its n part sits inside r * (...), so it cannot be folded into x).
- state: h [slots, H] and, for LSTM, c [slots, H]: the lanes' arenas, indexed by slot.
- lane b: slot[b], first row row0[b], row step stride[b] (+1 forward, -1 a reverse direction),
  steps[b] <= n_steps. Step t of lane b reads x row row0[b] + t * stride[b] and writes its
  output h to the same row of out [rows, H]. A lane with t >= steps[b] has ended: its state
  stops changing and nothing more is written for it (lanes of different remaining lengths
  share a launch).
- after the launch h[slot[b]] and c[slot[b]] hold each lane's state after its own last step.

Tiling (output-oriented): the hidden units are cut into tiles of BU units; the program that
owns a tile computes all G gates of those units, so the gate math and the c update stay in
the program. h of the previous step is the only thing programs exchange: it goes through a
double-buffered scratch hbuf [2, lanes, H] (step t writes buffer t % 2 and reads the other),
with a grid-wide barrier after every step. One barrier per step suffices: a program writes
buffer t % 2 again only at step t + 2, after every program has passed the barrier that ends
step t + 1, so after every read of it at step t + 1.

RESIDENT (the GPU layout): one tile per program, grid = number of tiles, the program's slice
of W_hh (G x BU x H) loaded once before the step loop and kept across steps (in registers).
Not RESIDENT: each program loops over tiles pid, pid + grid, ... and reloads their weights at
every step (a streaming variant, for hidden sizes whose tiles outnumber the co-resident
programs, and the way one program covers several tiles under the interpreter).

The barrier: an int32 counter, zero at launch; after step t each program adds 1 and spins
until it reads (t + 1) * n_programs. It is correct only if all programs are resident at once:
the host keeps the grid within the SM count. Under TRITON_INTERPRET=1 programs run one after
another, so a spin that waits for a later program never ends: the host launches ONE program
there (which then passes every barrier at once). Everything but the multi-program barrier and
the L2-only loads of hbuf (cache_modifier ".cg", so that no SM reads a stale L1 line of another
SM's h) is therefore exercised by the interpreter tests; those two need a GPU.

`stack_steps` is the same for a stack of layers of one kind and size in one launch (a wavefront,
a barrier after each layer's step; see its docstring).

Import this module through kernels/triton_loader.py, which loads a compiled and an interpreted
copy of it as the device needs.
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_CODE = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: no overflow for large |x| (exp(-2x) -> inf gives -1, -> 0 gives 1)
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _load_gate(w_ptr, stride_wr, stride_wc, q, units, umask, cols, cmask, H):
    """Gate q's rows of W_hh for `units`: [BU, BH], zeros past H either way."""
    rows = q * H + units
    ptrs = w_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wc
    return tl.load(ptrs, mask=umask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _load_gates(w_ptr, stride_wr, stride_wc, units, umask, cols, cmask, H, G: tl.constexpr):
    """The G gates' rows of W_hh for `units` (unused gates repeat gate 0, never read)."""
    w0 = _load_gate(w_ptr, stride_wr, stride_wc, 0, units, umask, cols, cmask, H)
    w1 = w0
    w2 = w0
    w3 = w0
    if G > 1:
        w1 = _load_gate(w_ptr, stride_wr, stride_wc, 1, units, umask, cols, cmask, H)
        w2 = _load_gate(w_ptr, stride_wr, stride_wc, 2, units, umask, cols, cmask, H)
    if G > 3:
        w3 = _load_gate(w_ptr, stride_wr, stride_wc, 3, units, umask, cols, cmask, H)
    return w0, w1, w2, w3


@triton.jit
def _matvec(h, w):
    """h [LB, BH] @ w[BU, BH]^T -> [LB, BU].

    tl.sum's own body, written out: tl.sum is itself a @triton.jit function of Triton's, decorated
    in whichever mode triton was imported in, while tl.reduce is a builtin that both modes
    provide (the interpreter sums with numpy when it is given tl.standard._sum_combine). So this
    module works interpreted and compiled in one process whatever imported triton first (see
    kernels/triton_loader.py)."""
    return tl.reduce(h[:, None, :] * w[None, :, :], 2, tl.standard._sum_combine)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Wait until `target` arrivals have been counted, this program's included. The block-wide
    barriers around the counter make every thread's stores before it visible to the other
    programs after it (as a cooperative-groups grid sync does)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _x_gate(q, x_ptr, row, live, units, umask, H, GH, below, wi, xb_ptr, FED: tl.constexpr):
    """Gate q's input part for the tile's units: the lane's precomputed projection row, or (FED,
    an upper layer of a stack) the layer below's output this step @ W_ih^T + bias."""
    if FED:
        return _matvec(below, wi) + tl.load(xb_ptr + q * H + units, mask=umask, other=0.0)[None, :]
    else:
        return tl.load(x_ptr + row[:, None] * GH + q * H + units[None, :], mask=live, other=0.0)


@triton.jit
def _tile_step(t, units, umask, cols, cmask, w0, w1, w2, w3,
               x_ptr, out_ptr, h_ptr, c_ptr, hb_ptr, hbuf_ptr,
               slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, H,
               KIND: tl.constexpr, G: tl.constexpr, LB: tl.constexpr,
               below_ptr=None, wi0=None, wi1=None, wi2=None, wi3=None, xb_ptr=None, FED: tl.constexpr = False):
    """Step t of every lane for one tile of units. FED: the inputs come from the rows of
    below_ptr (the layer below's outputs, written this step by every program) through W_ih's
    gate tiles wi0..wi3 and the bias xb_ptr, instead of from x_ptr's projections."""
    GH = G * H
    prev_buf = hbuf_ptr + ((t + 1) % 2) * n_lanes * H  # written by step t - 1
    next_buf = hbuf_ptr + (t % 2) * n_lanes * H
    first = t == 0  # step 0 reads h from the lanes' slots, later steps from hbuf
    later = t > 0
    for b0 in range(0, n_lanes, LB):
        lanes = b0 + tl.arange(0, LB)
        lmask = lanes < n_lanes
        slot = tl.load(slot_ptr + lanes, mask=lmask, other=0)
        steps = tl.load(steps_ptr + lanes, mask=lmask, other=0)
        row = tl.load(row_ptr + lanes, mask=lmask, other=0) + t * tl.load(stride_ptr + lanes, mask=lmask, other=0)
        active = lmask & (t < steps)
        full = lmask[:, None] & cmask[None, :]
        own = lmask[:, None] & umask[None, :]
        hp = tl.load(h_ptr + slot[:, None] * H + cols[None, :], mask=full & first, other=0.0) \
            + tl.load(prev_buf + lanes[:, None] * H + cols[None, :], mask=full & later, other=0.0,
                      cache_modifier=".cg")
        h_old = tl.load(h_ptr + slot[:, None] * H + units[None, :], mask=own & first, other=0.0) \
            + tl.load(prev_buf + lanes[:, None] * H + units[None, :], mask=own & later, other=0.0,
                      cache_modifier=".cg")
        live = active[:, None] & umask[None, :]
        below = hp
        if FED:
            below = tl.load(below_ptr + row[:, None] * H + cols[None, :], mask=active[:, None] & cmask[None, :],
                            other=0.0, cache_modifier=".cg")
        x0 = _x_gate(0, x_ptr, row, live, units, umask, H, GH, below, wi0, xb_ptr, FED)
        g0 = _matvec(hp, w0)
        if KIND == 0:  # LSTM, gates i, f, g, o
            x1 = _x_gate(1, x_ptr, row, live, units, umask, H, GH, below, wi1, xb_ptr, FED)
            x2 = _x_gate(2, x_ptr, row, live, units, umask, H, GH, below, wi2, xb_ptr, FED)
            x3 = _x_gate(3, x_ptr, row, live, units, umask, H, GH, below, wi3, xb_ptr, FED)
            cptrs = c_ptr + slot[:, None] * H + units[None, :]
            c_old = tl.load(cptrs, mask=own, other=0.0)
            i = _sigmoid(x0 + g0)
            f = _sigmoid(x1 + _matvec(hp, w1))
            g = _tanh(x2 + _matvec(hp, w2))
            o = _sigmoid(x3 + _matvec(hp, w3))
            c_new = f * c_old + i * g
            h_new = o * _tanh(c_new)
            tl.store(cptrs, c_new, mask=live)
        elif KIND == 1:  # GRU, gates r, z, n; linear_before_reset: r scales (W_hn h + b_hn)
            x1 = _x_gate(1, x_ptr, row, live, units, umask, H, GH, below, wi1, xb_ptr, FED)
            x2 = _x_gate(2, x_ptr, row, live, units, umask, H, GH, below, wi2, xb_ptr, FED)
            b0_ = tl.load(hb_ptr + units, mask=umask, other=0.0)
            b1_ = tl.load(hb_ptr + H + units, mask=umask, other=0.0)
            b2_ = tl.load(hb_ptr + 2 * H + units, mask=umask, other=0.0)
            r = _sigmoid(x0 + g0 + b0_[None, :])
            z = _sigmoid(x1 + _matvec(hp, w1) + b1_[None, :])
            n = _tanh(x2 + r * (_matvec(hp, w2) + b2_[None, :]))
            h_new = n + z * (h_old - n)
        elif KIND == 2:
            h_new = _tanh(x0 + g0)
        else:
            h_new = tl.maximum(x0 + g0, 0.0)
        h_new = tl.where(live, h_new, h_old)  # an ended lane carries its h forward
        tl.store(next_buf + lanes[:, None] * H + units[None, :], h_new, mask=own)
        tl.store(out_ptr + row[:, None] * H + units[None, :], h_new, mask=live)


@triton.jit
def _write_back(units, umask, last_buf, h_ptr, slot_ptr, n_lanes, H, LB: tl.constexpr):
    """h after each lane's last step, from the last step's buffer, to the lanes' slots."""
    for b0 in range(0, n_lanes, LB):
        lanes = b0 + tl.arange(0, LB)
        lmask = lanes < n_lanes
        slot = tl.load(slot_ptr + lanes, mask=lmask, other=0)
        own = lmask[:, None] & umask[None, :]
        h = tl.load(last_buf + lanes[:, None] * H + units[None, :], mask=own, other=0.0, cache_modifier=".cg")
        tl.store(h_ptr + slot[:, None] * H + units[None, :], h, mask=own)


@triton.jit
def recurrent_steps(x_ptr, out_ptr, h_ptr, c_ptr, hb_ptr, w_ptr, stride_wr, stride_wc, hbuf_ptr, counter_ptr,
                    slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, n_steps, H, n_tiles,
                    KIND: tl.constexpr, G: tl.constexpr, BU: tl.constexpr, BH: tl.constexpr,
                    LB: tl.constexpr, RESIDENT: tl.constexpr):
    """See the module docstring. Grid: (n_programs,); RESIDENT needs n_programs == n_tiles."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BH)
    cmask = cols < H
    if RESIDENT:
        units = pid * BU + tl.arange(0, BU)
        umask = units < H
        # this program's slice of W_hh, loaded once and kept across the launch's steps
        w0, w1, w2, w3 = _load_gates(w_ptr, stride_wr, stride_wc, units, umask, cols, cmask, H, G)
        for t in range(0, n_steps):
            _tile_step(t, units, umask, cols, cmask, w0, w1, w2, w3, x_ptr, out_ptr, h_ptr, c_ptr, hb_ptr,
                       hbuf_ptr, slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, H, KIND, G, LB)
            _grid_barrier(counter_ptr, (t + 1) * n_programs)
        _write_back(units, umask, hbuf_ptr + ((n_steps - 1) % 2) * n_lanes * H, h_ptr, slot_ptr, n_lanes, H, LB)
    else:
        for t in range(0, n_steps):
            for tile in range(pid, n_tiles, n_programs):
                units = tile * BU + tl.arange(0, BU)
                umask = units < H
                w0, w1, w2, w3 = _load_gates(w_ptr, stride_wr, stride_wc, units, umask, cols, cmask, H, G)
                _tile_step(t, units, umask, cols, cmask, w0, w1, w2, w3, x_ptr, out_ptr, h_ptr, c_ptr, hb_ptr,
                           hbuf_ptr, slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, H, KIND, G, LB)
            _grid_barrier(counter_ptr, (t + 1) * n_programs)
        for tile in range(pid, n_tiles, n_programs):
            units = tile * BU + tl.arange(0, BU)
            _write_back(units, units < H, hbuf_ptr + ((n_steps - 1) % 2) * n_lanes * H, h_ptr, slot_ptr, n_lanes,
                        H, LB)


@triton.jit
def _stack_layer_step(t, cols, cmask, whh_ptr, wih_ptr, x_ptr, out_ptr, below_ptr, h_ptr, c_ptr, hb_ptr, xb_ptr,
                      hbuf_ptr, slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, H, n_tiles,
                      KIND: tl.constexpr, G: tl.constexpr, BU: tl.constexpr, LB: tl.constexpr,
                      FED: tl.constexpr):
    """Step t of one layer of a stack, this program's tiles (streaming: weights loaded here)."""
    GH = G * H
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        units = tile * BU + tl.arange(0, BU)
        umask = units < H
        w0, w1, w2, w3 = _load_gates(whh_ptr, 1, GH, units, umask, cols, cmask, H, G)
        wi0 = w0
        wi1 = w0
        wi2 = w0
        wi3 = w0
        if FED:
            wi0 = _load_gate(wih_ptr, 1, GH, 0, units, umask, cols, cmask, H)
            if G > 1:
                wi1 = _load_gate(wih_ptr, 1, GH, 1, units, umask, cols, cmask, H)
                wi2 = _load_gate(wih_ptr, 1, GH, 2, units, umask, cols, cmask, H)
            if G > 3:
                wi3 = _load_gate(wih_ptr, 1, GH, 3, units, umask, cols, cmask, H)
        _tile_step(t, units, umask, cols, cmask, w0, w1, w2, w3, x_ptr, out_ptr, h_ptr, c_ptr, hb_ptr,
                   hbuf_ptr, slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, H, KIND, G, LB,
                   below_ptr, wi0, wi1, wi2, wi3, xb_ptr, FED)


@triton.jit
def stack_steps(x_ptr, out_ptr, h_ptr, c_ptr, hb_ptr, xb_ptr, whh_ptr, wih_ptr, hbuf_ptr, counter_ptr,
                slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, n_steps, H, n_tiles, n_layers, slot_cap, row_cap,
                KIND: tl.constexpr, G: tl.constexpr, BU: tl.constexpr, BH: tl.constexpr, LB: tl.constexpr):
    """A stack of L layers of one kind and hidden size H (each upper layer's input is the output
    of the one below), many steps in one launch: step t runs layer 0, then 1, ... (a wavefront:
    L x T layer steps, one grid barrier after each). Lanes, masks and the h exchange as in
    recurrent_steps, per layer. Storage is per layer along a leading axis: h and c
    [L, slot_cap, H], out [L, row_cap, H], W_hh^T and W_ih^T [L, H, G*H] (layer 0's W_ih^T is
    unused: its projections are x's rows), the upper layers' folded input bias xb [L, G*H], GRU's
    recurrent bias hb [L, G*H], hbuf [L, 2, lanes, H]. Weights stream (reloaded every step): a
    program holding 2L-1 weight slices at once would rarely fit in registers."""
    cols = tl.arange(0, BH)
    cmask = cols < H
    GH = G * H
    n_programs = tl.num_programs(0)
    for t in range(0, n_steps):
        _stack_layer_step(t, cols, cmask, whh_ptr, wih_ptr, x_ptr, out_ptr, out_ptr, h_ptr, c_ptr, hb_ptr, xb_ptr,
                          hbuf_ptr, slot_ptr, row_ptr, stride_ptr, steps_ptr, n_lanes, H, n_tiles,
                          KIND, G, BU, LB, False)
        _grid_barrier(counter_ptr, (t * n_layers + 1) * n_programs)
        for layer in range(1, n_layers):
            _stack_layer_step(t, cols, cmask, whh_ptr + layer * H * GH, wih_ptr + layer * H * GH, x_ptr,
                              out_ptr + layer * row_cap * H, out_ptr + (layer - 1) * row_cap * H,
                              h_ptr + layer * slot_cap * H, c_ptr + layer * slot_cap * H, hb_ptr + layer * GH,
                              xb_ptr + layer * GH, hbuf_ptr + layer * 2 * n_lanes * H, slot_ptr, row_ptr,
                              stride_ptr, steps_ptr, n_lanes, H, n_tiles, KIND, G, BU, LB, True)
            _grid_barrier(counter_ptr, (t * n_layers + layer + 1) * n_programs)
    last = (n_steps - 1) % 2
    for layer in range(0, n_layers):
        for tile in range(tl.program_id(0), n_tiles, n_programs):
            units = tile * BU + tl.arange(0, BU)
            _write_back(units, units < H, hbuf_ptr + (layer * 2 + last) * n_lanes * H,
                        h_ptr + layer * slot_cap * H, slot_ptr, n_lanes, H, LB)
