/* Batched recurrent cell steps for the CPU.
 *
 * step(): the pointwise half of a step whose GEMM (h @ W_hh^T) ran in oneDNN or BLAS, in one
 * pass per lane: add the lane's precomputed input projection row, apply the gate
 * nonlinearities, update the lane's state slot in place and write its output row.  Doing
 * this in a dozen separate tensor ops costs more than the GEMM itself at small batches.
 * fused_step(): the whole step, GEMM included, on weights packed in panels (see below).
 * run_lane(): many steps of one lane per call, for light load.
 *
 * tanh is a rational approximation (the one Eigen uses for float; max error ~1e-7 over the
 * whole line), written as plain arithmetic so that the compiler vectorises the loops;
 * sigmoid(x) = 0.5 * tanh(x / 2) + 0.5.  Each loop body is compiled for AVX-512, AVX2 and
 * baseline x86-64, picked at load time (target_clones); `restrict` tells the compiler the
 * lane's rows do not overlap, without which it does not vectorise at all (8x slower here).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define HAVE_ELASTIC 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline float tanh_approx(float x) {
    const float clamp = 7.90531110763549805f;
    x = x > clamp ? clamp : (x < -clamp ? -clamp : x);
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * x;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p / q;
}

static inline float sigmoid_approx(float x) { return 0.5f * tanh_approx(0.5f * x) + 0.5f; }

/* The gate math of one lane for n hidden units, j = 0 .. n-1: gate q of unit j is g[q * gs + j]
 * in the GEMM's output and x[q * xs + j] in the input projection. A whole lane is n = gs =
 * xs = H; the fused step's panels pass a slice of units (gs: the panel's units, xs: H). */

/* LSTM. x: the input projection with both biases folded in. Gate order i, f, g, o (PyTorch's). */
CLONES static void lstm_units(const float *restrict g, Py_ssize_t gs, const float *restrict x, Py_ssize_t xs,
                              float *restrict h, float *restrict c, float *restrict out, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) {
        float i = sigmoid_approx(g[j] + x[j]);
        float f = sigmoid_approx(g[gs + j] + x[xs + j]);
        float m = tanh_approx(g[2 * gs + j] + x[2 * xs + j]);
        float o = sigmoid_approx(g[3 * gs + j] + x[3 * xs + j]);
        float cn = f * c[j] + i * m;
        c[j] = cn;
        h[j] = o * tanh_approx(cn);
    }
    if (out) memcpy(out, h, (size_t)n * sizeof(float));
}

/* GRU (linear_before_reset, PyTorch's form). g: from h @ W_hh^T without bias; b: b_hh, laid
 * out as x; x: the input projection with b_ih. Gate order r, z, n. */
CLONES static void gru_units(const float *restrict g, Py_ssize_t gs, const float *restrict b,
                             const float *restrict x, Py_ssize_t xs, float *restrict h, float *restrict out,
                             Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < n; j++) {
        float r = sigmoid_approx(x[j] + g[j] + b[j]);
        float z = sigmoid_approx(x[xs + j] + g[gs + j] + b[xs + j]);
        float m = tanh_approx(x[2 * xs + j] + r * (g[2 * gs + j] + b[2 * xs + j]));
        h[j] = (1.0f - z) * m + z * h[j];
    }
    if (out) memcpy(out, h, (size_t)n * sizeof(float));
}

/* Elman RNN: h = act(x + g), both biases folded into x. */
CLONES static void rnn_units(const float *restrict g, const float *restrict x, float *restrict h,
                             float *restrict out, Py_ssize_t n, int relu) {
    if (relu) {
        for (Py_ssize_t j = 0; j < n; j++) {
            float v = g[j] + x[j];
            h[j] = v > 0.0f ? v : 0.0f;
        }
    } else {
        for (Py_ssize_t j = 0; j < n; j++) h[j] = tanh_approx(g[j] + x[j]);
    }
    if (out) memcpy(out, h, (size_t)n * sizeof(float));
}

/* One lane's gates for units [0, n): dispatches on the cell kind (0 lstm, 1 gru, 2 rnn_tanh,
 * 3 rnn_relu); c is for lstm, b for gru. */
static inline void lane_units(int kind, const float *g, Py_ssize_t gs, const float *b, const float *x,
                              Py_ssize_t xs, float *h, float *c, float *out, Py_ssize_t n) {
    if (kind == 0) lstm_units(g, gs, x, xs, h, c, out, n);
    else if (kind == 1) gru_units(g, gs, b, x, xs, h, out, n);
    else rnn_units(g, x, h, out, n, kind == 3);
}

/* ---- argument handling: every buffer is checked for size and every index for range, so a
 * caller's mistake raises instead of writing outside an arena. ---- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

/* index: the buffer holds int64 indices, else float32 values. */
static int get_buf(PyObject *obj, int writable, int index, Buf *b, const char *name) {
    b->held = 0;
    if (obj == Py_None) return 0;
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    b->held = 1;
    const char *f = b->view.format ? b->view.format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    int ok = index ? (b->view.itemsize == 8 && (f[0] == 'q' || f[0] == 'l')) : (b->view.itemsize == 4 && f[0] == 'f');
    if (!ok || f[1] != 0) {
        PyErr_Format(PyExc_TypeError, "%s must hold %s, not format '%s'", name, index ? "int64" : "float32",
                     b->view.format ? b->view.format : "B");
        return -1;
    }
    return 0;
}

static void release(Buf *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].held) PyBuffer_Release(&bufs[i].view);
}

static int check_rows(const Buf *idx, Py_ssize_t B, Py_ssize_t limit, const char *name) {
    if (idx->view.len < B * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "%s holds fewer than %zd int64 indices", name, B);
        return -1;
    }
    const int64_t *p = (const int64_t *)idx->view.buf;
    for (Py_ssize_t i = 0; i < B; i++) {
        if (p[i] < 0 || p[i] >= limit) {
            PyErr_Format(PyExc_IndexError, "%s[%zd] = %lld is outside [0, %zd)", name, i,
                         (long long)p[i], limit);
            return -1;
        }
    }
    return 0;
}

static Py_ssize_t nrows(const Buf *b, Py_ssize_t width) {
    return b->view.len / (Py_ssize_t)sizeof(float) / width;
}

/* step(kind, H, g, x, xrows, slots, h, c, bias, out, orows)
 *   kind: 0 lstm, 1 gru, 2 rnn_tanh, 3 rnn_relu; G = gates * H
 *   g [B, G] from BLAS; x [R, G] input projections; xrows [B] rows of x;
 *   slots [B] rows of the state arenas h [S, H] and c [S, H] (c: None unless lstm);
 *   bias [G] (gru only, else None); out [R2, H] and orows [B] (both None to skip). */
static PyObject *step(PyObject *self, PyObject *args) {
    int kind;
    Py_ssize_t H;
    PyObject *og, *ox, *oxr, *osl, *oh, *oc, *ob, *oo, *oor;
    if (!PyArg_ParseTuple(args, "inOOOOOOOOO", &kind, &H, &og, &ox, &oxr, &osl, &oh, &oc, &ob,
                          &oo, &oor))
        return NULL;
    if (kind < 0 || kind > 3 || H <= 0) {
        PyErr_SetString(PyExc_ValueError, "step: bad kind or hidden size");
        return NULL;
    }
    const Py_ssize_t G = (kind == 0 ? 4 : kind == 1 ? 3 : 1) * H;
    Buf b[9];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (get_buf(og, 0, 0, &b[0], "g") || get_buf(ox, 0, 0, &b[1], "x") ||
        get_buf(oxr, 0, 1, &b[2], "xrows") || get_buf(osl, 0, 1, &b[3], "slots") ||
        get_buf(oh, 1, 0, &b[4], "h") || get_buf(oc, 1, 0, &b[5], "c") ||
        get_buf(ob, 0, 0, &b[6], "bias") || get_buf(oo, 1, 0, &b[7], "out") ||
        get_buf(oor, 0, 1, &b[8], "orows"))
        goto done;
    if (!b[0].held || !b[1].held || !b[2].held || !b[3].held || !b[4].held) {
        PyErr_SetString(PyExc_TypeError, "step: g, x, xrows, slots and h are required");
        goto done;
    }
    if ((kind == 0) != b[5].held || (kind == 1) != b[6].held || b[7].held != b[8].held) {
        PyErr_SetString(PyExc_TypeError, "step: c is for lstm, bias for gru, out needs orows");
        goto done;
    }
    const Py_ssize_t B = nrows(&b[0], G);
    const Py_ssize_t S = nrows(&b[4], H);
    if (check_rows(&b[2], B, nrows(&b[1], G), "xrows") || check_rows(&b[3], B, S, "slots"))
        goto done;
    if (kind == 0 && nrows(&b[5], H) < S) {
        PyErr_SetString(PyExc_ValueError, "step: c has fewer slots than h");
        goto done;
    }
    if (kind == 1 && b[6].view.len < G * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "step: bias is shorter than the gates");
        goto done;
    }
    if (b[7].held && check_rows(&b[8], B, nrows(&b[7], H), "orows")) goto done;

    const float *g = b[0].view.buf, *x = b[1].view.buf, *bias = b[6].held ? b[6].view.buf : NULL;
    const int64_t *xr = b[2].view.buf, *sl = b[3].view.buf, *orr = b[8].held ? b[8].view.buf : NULL;
    float *h = b[4].view.buf, *c = b[5].held ? b[5].view.buf : NULL;
    float *out = b[7].held ? b[7].view.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    /* lanes are independent (distinct slots and rows; padding lanes share the scratch slot and
     * row, whose contents are garbage by design); split big batches over the cores */
#pragma omp parallel for schedule(static) if (B * H >= 8192)
    for (Py_ssize_t i = 0; i < B; i++) {
        lane_units(kind, g + i * G, H, bias, x + xr[i] * G, H, h + sl[i] * H, c ? c + sl[i] * H : NULL,
                   out ? out + orr[i] * H : NULL, H);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release(b, 9);
    return result;
}

/* ---- the fused step: a whole batched step, GEMM included, in one call ----
 *
 * step() above takes the GEMM's output from oneDNN, whose threads split the work evenly up
 * front: when another thread of the machine (the HTTP front end, the network stack) holds
 * one core for a while, the other core finishes its half and waits. Here the weights are
 * packed once into panels of U hidden units with all their gates, and the threads take
 * panels one at a time from a shared counter, so a core that is held up leaves its panels
 * to the other. A panel's GEMM is followed at once by the gates of its units, which no
 * other panel touches: one parallel region does the whole step.
 *
 * Packed layout (CellKernel packs it): panel p is K rows of NR = gates * U floats; row k,
 * column q * U + u holds the weight of input k for gate q of hidden unit p * U + u (zero
 * past H). The GEMM's rows are h, or [input row, h] given src (a joint step: the kernels no
 * longer take it, since a stack's upper layer projects with fused_project, then steps, as a
 * lone lane does, so that a lane sums alike in a batch and alone). */

#define TILE_M 6 /* lanes per register tile: 6 x 4 vectors of 16 accumulators, 4 for weights */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* C[m][0, 16 nv) = A[m] . P for m < mr: each packed row of P is loaded once per tile and
 * used by all of its lanes. */
static inline __attribute__((always_inline)) void tile(const int mr, const int nv, Py_ssize_t K,
                                                       const float *A, const float *P, float *C) {
    v16 acc[TILE_M][4];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nv; j++) acc[m][j] = (v16){0};
    for (Py_ssize_t k = 0; k < K; k++) {
        v16 w[4];
        for (int j = 0; j < nv; j++) w[j] = *(const v16 *)(P + (k * nv + j) * 16);
        for (int m = 0; m < mr; m++) {
            const float a = A[m * K + k];
            for (int j = 0; j < nv; j++) acc[m][j] += w[j] * a;
        }
    }
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nv; j++) *(v16 *)(C + (m * nv + j) * 16) = acc[m][j];
}

typedef struct {
    int kind, nv; /* nv: 16-float vectors in a panel row */
    Py_ssize_t H, U, K, G, B;
    const float *P, *A, *x, *bias;
    const int64_t *xr, *sl, *orr;
    float *h, *c, *out;
    int project; /* fused_project: write A . P + bias to out's rows [G] and stop there */
} Fused;

#define TILES(nv)                                                          \
    switch (mr) {                                                          \
        case 1: tile(1, nv, f->K, A, P, gates); break;                     \
        case 2: tile(2, nv, f->K, A, P, gates); break;                     \
        case 3: tile(3, nv, f->K, A, P, gates); break;                     \
        case 4: tile(4, nv, f->K, A, P, gates); break;                     \
        case 5: tile(5, nv, f->K, A, P, gates); break;                     \
        default: tile(TILE_M, nv, f->K, A, P, gates); break;               \
    }

CLONES static void fused_panel(const Fused *f, Py_ssize_t p) {
    float gates[TILE_M * 64];
    const Py_ssize_t NR = 16 * f->nv, base = p * f->U, H = f->H;
    const Py_ssize_t n = H - base < f->U ? H - base : f->U;
    const float *P = f->P + p * f->K * NR;
    for (Py_ssize_t m0 = 0; m0 < f->B; m0 += TILE_M) {
        const int mr = f->B - m0 < TILE_M ? (int)(f->B - m0) : TILE_M;
        const float *A = f->A + m0 * f->K;
        if (f->nv == 4) TILES(4) else TILES(3)
        if (f->project) {
            const Py_ssize_t ngates = NR / f->U;
            for (int m = 0; m < mr; m++) {
                float *o = f->out + f->orr[m0 + m] * f->G + base;
                for (Py_ssize_t q = 0; q < ngates; q++)
                    for (Py_ssize_t u = 0; u < n; u++)
                        o[q * H + u] = gates[m * NR + q * f->U + u] + f->bias[q * H + base + u];
            }
            continue;
        }
        for (int m = 0; m < mr; m++) {
            const Py_ssize_t i = m0 + m, s = f->sl[i];
            const float *x = f->x + (f->xr ? f->xr[i] : 0) * f->G + base;
            lane_units(f->kind, gates + m * NR, f->U, f->bias ? f->bias + base : NULL, x, H, f->h + s * H + base, f->c ? f->c + s * H + base : NULL,
                       f->out ? f->out + f->orr[i] * H + base : NULL, n);
        }
    }
}

/* ---- the elastic team: panels shared with workers the master never waits to start ----
 *
 * An OpenMP region ends at a barrier that every thread of the team must reach, so a step waits
 * for a worker that another process keeps off its core even when the master took every panel
 * itself. A calling thread may instead lead an elastic team (elastic_team(cores)): workers
 * pinned to the other cores, woken per step, taking panels from the same kind of counter. The
 * master takes panels too and, once none is left, waits only for panels a worker claimed and
 * is still computing; a worker that wakes after that finds the step over and goes back to
 * waiting. Each panel is computed whole by one thread, so the answers are the same to the bit
 * whoever computes what.
 *
 * The claim word holds (step generation << 32 | panels << 16 | next panel): a claim is a
 * compare-and-swap that fails once the step is over or a new one began, so a late worker can
 * never take a panel of the wrong step, and a worker reads the step's job only after its claim
 * succeeded (the master cannot begin another step while a claimed panel is unfinished). */

#ifdef HAVE_ELASTIC

typedef struct {
    _Atomic uint64_t claim;
    _Atomic uint32_t gen;  /* the step generation, what sleeping workers wait on */
    _Atomic int done;      /* panels finished of this step */
    _Atomic int sleepers;
    _Atomic int stop;
    const Fused *job;      /* the step's, read after a successful claim */
    uint32_t seen;         /* the master's last generation */
    int nworkers;
    uint64_t spin_ns;      /* a worker spins this long for the next step, then sleeps */
    pthread_t *threads;
    int *cores;
} Team;

static __thread Team *elastic = NULL; /* the calling thread's team, or none */
static __thread int elastic_on = 0;    /* whether its steps run on it (else OpenMP's team) */
static pthread_key_t elastic_key;      /* frees a thread's team when the thread ends */
static pthread_once_t elastic_once = PTHREAD_ONCE_INIT;

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

/* Take and compute panels of generation g until none is left; panels computed. */
static int take_panels(Team *t, uint32_t g) {
    int taken = 0;
    for (;;) {
        uint64_t w = atomic_load_explicit(&t->claim, memory_order_acquire);
        if ((uint32_t)(w >> 32) != g) return taken;
        const uint32_t next = (uint32_t)(w & 0xffff), panels = (uint32_t)((w >> 16) & 0xffff);
        if (next >= panels) return taken;
        if (!atomic_compare_exchange_weak_explicit(&t->claim, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        fused_panel(t->job, (Py_ssize_t)next);
        atomic_fetch_add_explicit(&t->done, 1, memory_order_release);
        taken++;
    }
}

typedef struct { Team *team; int index; } WorkerArg;

static void *worker_main(void *arg) {
    WorkerArg *a = arg;
    Team *t = a->team;
    const int core = t->cores[a->index + 1];
    free(a);
    if (core >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(core, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set); /* refused: it runs where it may */
    }
    uint32_t seen = atomic_load_explicit(&t->gen, memory_order_acquire);
    while (!atomic_load_explicit(&t->stop, memory_order_acquire)) {
        uint32_t g = atomic_load_explicit(&t->gen, memory_order_acquire);
        if (g == seen) {
            const uint64_t until = now_ns() + t->spin_ns;
            int spins = 0;
            while ((g = atomic_load_explicit(&t->gen, memory_order_acquire)) == seen &&
                   !atomic_load_explicit(&t->stop, memory_order_relaxed)) {
                cpu_relax();
                if (++spins % 64 == 0 && now_ns() > until) {
                    atomic_fetch_add(&t->sleepers, 1);
                    if (atomic_load(&t->gen) == seen && !atomic_load(&t->stop)) futex(&t->gen, FUTEX_WAIT_PRIVATE, seen);
                    atomic_fetch_sub(&t->sleepers, 1);
                    spins = 0;
                }
            }
            continue;
        }
        seen = g;
        take_panels(t, g);
    }
    return NULL;
}

static void team_free(Team *t) {
    if (!t) return;
    atomic_store(&t->stop, 1);
    atomic_fetch_add(&t->gen, 1);
    futex(&t->gen, FUTEX_WAKE_PRIVATE, INT32_MAX);
    for (int i = 0; i < t->nworkers; i++) pthread_join(t->threads[i], NULL);
    free(t->threads);
    free(t->cores);
    free(t);
}

static void team_free_at_exit(void *t) { team_free(t); }

/* A forked child has none of the parent's workers: its thread forgets the team (not freed:
 * its workers cannot be joined there) and steps on OpenMP's. */
static void forget_team_in_child(void) { elastic = NULL, elastic_on = 0; }

static void elastic_init(void) {
    pthread_key_create(&elastic_key, team_free_at_exit);
    pthread_atfork(NULL, NULL, forget_team_in_child);
}

/* elastic_team(cores, spin_us=100): the calling thread leads an elastic team of len(cores)
 * threads, worker i pinned to cores[i + 1] (a negative core: unpinned), each spinning spin_us
 * for the next step before it sleeps; cores[0] is the master's, which the caller pins. Its
 * steps run on the team while elastic_use(True). elastic_team(None) or fewer than two cores:
 * no team (workers stopped), steps on OpenMP's. Returns the team's size (1: none). */
static PyObject *elastic_team(PyObject *self, PyObject *args) {
    Py_ssize_t n = 0;
    int *cores = NULL;
    PyObject *arg;
    double spin_us = 100.0;
    if (!PyArg_ParseTuple(args, "O|d", &arg, &spin_us)) return NULL;
    if (!(spin_us >= 0 && spin_us <= 1e6)) {
        PyErr_SetString(PyExc_ValueError, "elastic_team: spin_us must be within 0..1e6");
        return NULL;
    }
    if (arg != Py_None) {
        PyObject *seq = PySequence_Fast(arg, "elastic_team: cores must be a list of ints or None");
        if (!seq) return NULL;
        n = PySequence_Fast_GET_SIZE(seq);
        if (n > 1024) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "elastic_team: at most 1024 threads");
            return NULL;
        }
        cores = malloc((size_t)(n > 0 ? n : 1) * sizeof(int));
        for (Py_ssize_t i = 0; cores && i < n; i++) {
            long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
            if (c == -1 && PyErr_Occurred()) {
                free(cores);
                Py_DECREF(seq);
                return NULL;
            }
            cores[i] = (int)c;
        }
        Py_DECREF(seq);
        if (!cores) return PyErr_NoMemory();
    }
    pthread_once(&elastic_once, elastic_init);
    Team *old = elastic;
    elastic = NULL, elastic_on = 0;
    pthread_setspecific(elastic_key, NULL);
    Py_BEGIN_ALLOW_THREADS
    team_free(old);
    Py_END_ALLOW_THREADS
    if (n < 2) {
        free(cores);
        return PyLong_FromLong(1);
    }
    Team *t = calloc(1, sizeof(Team));
    pthread_t *threads = calloc((size_t)(n - 1), sizeof(pthread_t));
    if (!t || !threads) {
        free(t), free(threads), free(cores);
        return PyErr_NoMemory();
    }
    t->threads = threads, t->cores = cores, t->spin_ns = (uint64_t)(spin_us * 1e3);
    for (int i = 0; i < n - 1; i++) {
        WorkerArg *a = malloc(sizeof(WorkerArg));
        if (!a || (a->team = t, a->index = i, pthread_create(&threads[i], NULL, worker_main, a) != 0)) {
            free(a);
            t->nworkers = i;
            team_free(t);
            PyErr_SetString(PyExc_OSError, "elastic_team: could not start a worker thread");
            return NULL;
        }
        t->nworkers = i + 1;
    }
    elastic = t;
    pthread_setspecific(elastic_key, t);
    return PyLong_FromSsize_t(n);
}

/* elastic_use(on): whether the calling thread's steps run on its elastic team (if it has one). */
static PyObject *elastic_use(PyObject *self, PyObject *arg) {
    const int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    elastic_on = on && elastic != NULL;
    return PyBool_FromLong(elastic_on);
}

static void elastic_run(Team *t, const Fused *f, int panels) {
    const uint32_t g = ++t->seen;
    t->job = f;
    atomic_store_explicit(&t->done, 0, memory_order_relaxed);
    atomic_store_explicit(&t->claim, ((uint64_t)g << 32) | ((uint64_t)panels << 16), memory_order_release);
    /* sequentially consistent, as the workers' count of sleepers and their read of gen: a
     * worker going to sleep either sees this generation or is counted here and woken */
    atomic_store(&t->gen, g);
    if (atomic_load(&t->sleepers) > 0) futex(&t->gen, FUTEX_WAKE_PRIVATE, INT32_MAX);
    take_panels(t, g);
    /* every panel is claimed: wait for those a worker is still computing */
    while (atomic_load_explicit(&t->done, memory_order_acquire) < panels) cpu_relax();
}
#else
static PyObject *elastic_team(PyObject *self, PyObject *args) {
    PyErr_SetString(PyExc_OSError, "elastic_team: only on Linux");
    return NULL;
}

static PyObject *elastic_use(PyObject *self, PyObject *arg) { Py_RETURN_FALSE; }
#endif

static void fused_run(const Fused *f, int panels) {
    const int parallel = panels > 1 && f->B * f->K * f->G >= 65536;
#ifdef HAVE_ELASTIC
    if (elastic_on && parallel && panels < 0xffff) {
        elastic_run(elastic, f, panels);
        return;
    }
#endif
    int next = 0;
#pragma omp parallel if (parallel)
    for (;;) {
        int p;
#pragma omp atomic capture
        p = next++;
        if (p >= panels) break;
        fused_panel(f, p);
    }
}

/* The gates' and a panel's widths for `kind` (0 lstm, 1 gru, 2/3 Elman) and panels of U
 * units, into *G and *NR; -1 with ValueError naming `fn` for a kind, hidden size or U that
 * makes no panel of 48 or 64 columns. */
static int panel_widths(const char *fn, int kind, Py_ssize_t H, Py_ssize_t U, Py_ssize_t *G, Py_ssize_t *NR) {
    const Py_ssize_t ngates = kind == 0 ? 4 : kind == 1 ? 3 : 1;
    *G = ngates * H, *NR = ngates * U;
    if (kind < 0 || kind > 3 || H <= 0 || U <= 0 || (*NR != 48 && *NR != 64)) {
        PyErr_Format(PyExc_ValueError, "%s: bad kind or hidden size, or U does not make panels of 48 or 64 columns",
                     fn);
        return -1;
    }
    return 0;
}

/* fused_step(kind, H, U, packed, src, srows, slots, h, c, x, xrows, bias, out, orows)
 *   packed: the weights, panels of U units (see above); K = its size / (panels * NR).
 *   src [R, K - H] and srows [B]: lane i's input row (a joint step; unused now), or both None
 *   when K = H; slots [B]: state rows of h [S, H] and c (lstm, else None); x [R2, G] and
 *   xrows [B]: what to add to the gates (input projection and biases), or xrows None: every
 *   lane adds row 0 (an upper layer's biases); bias [G]: b_hh (gru only); out [R3, H],
 *   orows [B]: outputs, or None. */
static PyObject *fused_step(PyObject *self, PyObject *args) {
    int kind;
    Py_ssize_t H, U;
    PyObject *op, *osrc, *osr, *osl, *oh, *oc, *ox, *oxr, *ob, *oo, *oor;
    if (!PyArg_ParseTuple(args, "innOOOOOOOOOOO", &kind, &H, &U, &op, &osrc, &osr, &osl, &oh, &oc, &ox, &oxr, &ob,
                          &oo, &oor))
        return NULL;
    Py_ssize_t G, NR;
    if (panel_widths("fused_step", kind, H, U, &G, &NR)) return NULL;
    Buf b[11];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    float *A = NULL;
    if (get_buf(op, 0, 0, &b[0], "packed") || get_buf(osrc, 0, 0, &b[1], "src") ||
        get_buf(osr, 0, 1, &b[2], "srows") || get_buf(osl, 0, 1, &b[3], "slots") ||
        get_buf(oh, 1, 0, &b[4], "h") || get_buf(oc, 1, 0, &b[5], "c") || get_buf(ox, 0, 0, &b[6], "x") ||
        get_buf(oxr, 0, 1, &b[7], "xrows") || get_buf(ob, 0, 0, &b[8], "bias") ||
        get_buf(oo, 1, 0, &b[9], "out") || get_buf(oor, 0, 1, &b[10], "orows"))
        goto done;
    if (!b[0].held || !b[3].held || !b[4].held || !b[6].held) {
        PyErr_SetString(PyExc_TypeError, "fused_step: packed, slots, h and x are required");
        goto done;
    }
    if ((kind == 0) != b[5].held || (kind == 1) != b[8].held || b[9].held != b[10].held ||
        b[1].held != b[2].held || (kind == 1 && b[1].held)) {
        PyErr_SetString(PyExc_TypeError, "fused_step: c is for lstm, bias for gru, out needs orows, src needs "
                                         "srows (and a gru takes no src: its candidate gate keeps the halves apart)");
        goto done;
    }
    const Py_ssize_t panels = (H + U - 1) / U, floats = b[0].view.len / (Py_ssize_t)sizeof(float);
    const Py_ssize_t K = floats / (panels * NR), Kx = K - H;
    if (floats != K * panels * NR || Kx < 0 || (Kx > 0) != b[1].held) {
        PyErr_Format(PyExc_ValueError, "fused_step: packed holds %zd floats, not %zd panels of K x %zd with K = H%s",
                     floats, panels, NR, b[1].held ? " + the width of src" : "");
        goto done;
    }
    const Py_ssize_t B = b[3].view.len / (Py_ssize_t)sizeof(int64_t), S = nrows(&b[4], H);
    if (!b[7].held && nrows(&b[6], G) < 1) {
        PyErr_SetString(PyExc_ValueError, "fused_step: without xrows, x needs a row of the gates' width");
        goto done;
    }
    if (check_rows(&b[3], B, S, "slots") || (b[7].held && check_rows(&b[7], B, nrows(&b[6], G), "xrows")) ||
        (b[1].held && check_rows(&b[2], B, nrows(&b[1], Kx), "srows")) ||
        (b[9].held && check_rows(&b[10], B, nrows(&b[9], H), "orows")))
        goto done;
    if ((kind == 0 && nrows(&b[5], H) < S) || (kind == 1 && b[8].view.len < G * (Py_ssize_t)sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "fused_step: c has fewer slots than h, or bias is shorter than the gates");
        goto done;
    }
    if (B > 0 && !(A = malloc((size_t)(B * K) * sizeof(float)))) {
        PyErr_NoMemory();
        goto done;
    }
    const float *src = b[1].held ? b[1].view.buf : NULL;
    const int64_t *sr = b[2].held ? b[2].view.buf : NULL;
    Fused f = {kind, (int)(NR / 16), H, U, K, G, B, b[0].view.buf, A, b[6].view.buf,
               b[8].held ? b[8].view.buf : NULL, b[7].held ? b[7].view.buf : NULL, b[3].view.buf, b[10].held ? b[10].view.buf : NULL,
               b[4].view.buf, b[5].held ? b[5].view.buf : NULL, b[9].held ? b[9].view.buf : NULL};
    Py_BEGIN_ALLOW_THREADS
    /* gather first: the panels overwrite h in place */
    for (Py_ssize_t i = 0; i < B; i++) {
        if (src) memcpy(A + i * K, src + sr[i] * Kx, (size_t)Kx * sizeof(float));
        memcpy(A + i * K + Kx, f.h + f.sl[i] * H, (size_t)H * sizeof(float));
    }
    if (B > 0) fused_run(&f, (int)panels);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(A);
    release(b, 11);
    return result;
}

/* fused_project(kind, H, U, packed, src, srows, bias, out, orows)
 *   The input projection of a stack's upper layer, on W_ih packed in panels as the fused
 *   step packs W_hh (K = the width of src): out[orows[i]] = src[srows[i]] . W_ih^T + bias,
 *   bias [G]. Each row's sums run in the same order whatever else is projected with it, so
 *   a lane's projection is the same to the bit whether its rows were projected in a batch's
 *   step or in a lone lane's piece. */
static PyObject *fused_project(PyObject *self, PyObject *args) {
    int kind;
    Py_ssize_t H, U;
    PyObject *op, *osrc, *osr, *ob, *oo, *oor;
    if (!PyArg_ParseTuple(args, "innOOOOOO", &kind, &H, &U, &op, &osrc, &osr, &ob, &oo, &oor)) return NULL;
    Py_ssize_t G, NR;
    if (panel_widths("fused_project", kind, H, U, &G, &NR)) return NULL;
    Buf b[6];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    float *A = NULL;
    if (get_buf(op, 0, 0, &b[0], "packed") || get_buf(osrc, 0, 0, &b[1], "src") ||
        get_buf(osr, 0, 1, &b[2], "srows") || get_buf(ob, 0, 0, &b[3], "bias") ||
        get_buf(oo, 1, 0, &b[4], "out") || get_buf(oor, 0, 1, &b[5], "orows"))
        goto done;
    if (!b[0].held || !b[1].held || !b[2].held || !b[3].held || !b[4].held || !b[5].held) {
        PyErr_SetString(PyExc_TypeError, "fused_project: every argument is required");
        goto done;
    }
    const Py_ssize_t panels = (H + U - 1) / U, floats = b[0].view.len / (Py_ssize_t)sizeof(float);
    const Py_ssize_t K = floats / (panels * NR), B = b[2].view.len / (Py_ssize_t)sizeof(int64_t);
    if (K < 1 || floats != K * panels * NR) {
        PyErr_Format(PyExc_ValueError, "fused_project: packed holds %zd floats, not %zd panels of K x %zd",
                     floats, panels, NR);
        goto done;
    }
    if (b[3].view.len < G * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "fused_project: bias is shorter than the gates");
        goto done;
    }
    if (b[5].view.len / (Py_ssize_t)sizeof(int64_t) != B || check_rows(&b[2], B, nrows(&b[1], K), "srows") ||
        check_rows(&b[5], B, nrows(&b[4], G), "orows"))
        goto done;
    if (B > 0 && !(A = malloc((size_t)(B * K) * sizeof(float)))) {
        PyErr_NoMemory();
        goto done;
    }
    const float *src = b[1].view.buf;
    const int64_t *sr = b[2].view.buf;
    Fused f = {kind, (int)(NR / 16), H, U, K, G, B, b[0].view.buf, A, NULL, b[3].view.buf, NULL, NULL,
               b[5].view.buf, NULL, NULL, b[4].view.buf, 1};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < B; i++) memcpy(A + i * K, src + sr[i] * K, (size_t)K * sizeof(float));
    if (B > 0) fused_run(&f, (int)panels);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(A);
    release(b, 6);
    return result;
}

/* ---- a lone lane, several steps per call ----
 * When one lane runs alone (light load), a step is a GEMV that BLAS libraries do no faster
 * than a plain loop, plus Python's per-step cost, which this path removes: run_lane does
 * `nsteps` whole steps in C. Its OpenMP threads are torch's (the extension links libgomp.so.1,
 * which torch loaded first), so they do not fight torch's pool for the cores. */

CLONES static void dot_rows(const float *restrict W, const float *restrict v, float *restrict y,
                            Py_ssize_t rows, Py_ssize_t H) {
    Py_ssize_t r = 0;
    for (; r + 8 <= rows; r += 8) {  /* eight rows share each load of v: 8 independent FMA chains */
        const float *w = W + r * H;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f, s5 = 0.0f, s6 = 0.0f, s7 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
        for (Py_ssize_t k = 0; k < H; k++) {
            const float x = v[k];
            s0 += w[k] * x, s1 += w[H + k] * x, s2 += w[2 * H + k] * x, s3 += w[3 * H + k] * x;
            s4 += w[4 * H + k] * x, s5 += w[5 * H + k] * x, s6 += w[6 * H + k] * x, s7 += w[7 * H + k] * x;
        }
        y[r] = s0, y[r + 1] = s1, y[r + 2] = s2, y[r + 3] = s3;
        y[r + 4] = s4, y[r + 5] = s5, y[r + 6] = s6, y[r + 7] = s7;
    }
    for (; r < rows; r++) {
        const float *w = W + r * H;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (Py_ssize_t k = 0; k < H; k++) s += w[k] * v[k];
        y[r] = s;
    }
}

static void gemv(const float *W, const float *v, float *y, Py_ssize_t G, Py_ssize_t H) {
#pragma omp parallel
    {
        Py_ssize_t n = omp_get_num_threads(), t = omp_get_thread_num();
        Py_ssize_t chunk = (G + n - 1) / n, lo = t * chunk, hi = lo + chunk < G ? lo + chunk : G;
        if (lo < hi) dot_rows(W + lo * H, v, y + lo, hi - lo, H);
    }
}

/* run_lane(kind, H, w, g, x, row, stride, nsteps, slot, h, c, bias, out, stop=None, units=0) -> steps run
 *   w [G, H]: W_hh row-major, or with units > 0 W_hh packed in panels of `units` hidden units
 *   (see the fused step), whose threads take panels as they come: a worker still waking
 *   after an idle spell leaves its share to the other thread instead of holding up each step;
 *   g [G]: scratch; step k reads x row `row + k * stride`, writes out at the same row, and
 *   updates state slot `slot` of h [S, H] (and c for lstm).
 *   stop: an int64 flag that another thread may set while this runs (the GIL is released);
 *   once it is nonzero, the call returns after the step in progress, so that a request that
 *   arrives need not wait for the whole run. The first step always runs. */
static PyObject *run_lane(PyObject *self, PyObject *args) {
    int kind;
    Py_ssize_t H, row, stride, nsteps, slot, units = 0;
    PyObject *ow, *og, *ox, *oh, *oc, *ob, *oo, *os = Py_None;
    if (!PyArg_ParseTuple(args, "inOOOnnnnOOOO|On", &kind, &H, &ow, &og, &ox, &row, &stride, &nsteps,
                          &slot, &oh, &oc, &ob, &oo, &os, &units))
        return NULL;
    if (kind < 0 || kind > 3 || H <= 0 || nsteps < 0) {
        PyErr_SetString(PyExc_ValueError, "run_lane: bad kind, hidden size or step count");
        return NULL;
    }
    const Py_ssize_t G = (kind == 0 ? 4 : kind == 1 ? 3 : 1) * H;
    Buf b[8];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (get_buf(ow, 0, 0, &b[0], "w") || get_buf(og, 1, 0, &b[1], "g") || get_buf(ox, 0, 0, &b[2], "x") ||
        get_buf(oh, 1, 0, &b[3], "h") || get_buf(oc, 1, 0, &b[4], "c") || get_buf(ob, 0, 0, &b[5], "bias") ||
        get_buf(oo, 1, 0, &b[6], "out") || get_buf(os, 0, 1, &b[7], "stop"))
        goto done;
    if (!b[0].held || !b[1].held || !b[2].held || !b[3].held || !b[6].held || (kind == 0) != b[4].held ||
        (kind == 1) != b[5].held) {
        PyErr_SetString(PyExc_TypeError, "run_lane: w, g, x, h, out are required; c is for lstm, bias for gru");
        goto done;
    }
    const Py_ssize_t last = row + (nsteps - 1) * stride;
    const Py_ssize_t NR = (G / H) * units, panels = units > 0 ? (H + units - 1) / units : 0;
    if (units < 0 || (units > 0 && NR != 48 && NR != 64)) {
        PyErr_SetString(PyExc_ValueError, "run_lane: units must make panels of 48 or 64 columns");
        goto done;
    }
    if ((units ? b[0].view.len / (Py_ssize_t)sizeof(float) != panels * H * NR : nrows(&b[0], H) < G) ||
        nrows(&b[1], G) < 1 || (kind == 1 && nrows(&b[5], G) < 1)) {
        PyErr_SetString(PyExc_ValueError, units ? "run_lane: w is not W_hh packed in panels of these units"
                                                : "run_lane: w, g or bias is smaller than the gates");
        goto done;
    }
    if (nsteps > 0 && (row < 0 || last < 0 || row >= nrows(&b[2], G) || last >= nrows(&b[2], G) ||
                       row >= nrows(&b[6], H) || last >= nrows(&b[6], H))) {
        PyErr_Format(PyExc_IndexError, "run_lane: rows %zd..%zd are outside x or out", row, last);
        goto done;
    }
    if (b[7].held && b[7].view.len < (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "run_lane: stop holds no flag");
        goto done;
    }
    if (slot < 0 || slot >= nrows(&b[3], H) || (kind == 0 && slot >= nrows(&b[4], H))) {
        PyErr_Format(PyExc_IndexError, "run_lane: slot %zd is outside h or c", slot);
        goto done;
    }
    const float *w = b[0].view.buf, *x = b[2].view.buf, *bias = b[5].held ? b[5].view.buf : NULL;
    float *g = b[1].view.buf, *hs = (float *)b[3].view.buf + slot * H, *out = b[6].view.buf;
    float *cs = b[4].held ? (float *)b[4].view.buf + slot * H : NULL;
    const volatile int64_t *stop = b[7].held ? b[7].view.buf : NULL;
    Py_ssize_t k = 0;
    int64_t at = row, slot_at = slot; /* the packed path's one-lane batch: its row and slot */
    float *hcopy = units ? malloc((size_t)H * sizeof(float)) : NULL;
    if (units && !hcopy) {
        PyErr_NoMemory();
        goto done;
    }
    Fused f = {kind, (int)(NR / 16), H, units, H, G, 1, w, hcopy, x, bias, &at, &slot_at, &at,
               b[3].view.buf, b[4].held ? b[4].view.buf : NULL, out};
    Py_BEGIN_ALLOW_THREADS
    for (; k < nsteps; k++, row += stride) {
        if (k > 0 && stop && *stop) break;
        if (units) { /* the panels overwrite h in place: they read a copy */
            memcpy(hcopy, hs, (size_t)H * sizeof(float));
            at = row;
            fused_run(&f, (int)panels);
        } else {
            gemv(w, hs, g, G, H);
            lane_units(kind, g, H, bias, x + row * G, H, hs, cs, out + row * H, H);
        }
    }
    Py_END_ALLOW_THREADS
    free(hcopy);
    result = PyLong_FromSsize_t(k);
done:
    release(b, 8);
    return result;
}

/* Whether this CPU runs the fused step's AVX-512 build (elsewhere it works, more slowly). */
static PyObject *has_avx512(PyObject *self, PyObject *noargs) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx512f"));
#else
    Py_RETURN_FALSE;
#endif
}

/* tanh(x) with the same approximation, for testing its accuracy. */
static PyObject *tanh_test(PyObject *self, PyObject *arg) {
    double x = PyFloat_AsDouble(arg);
    if (x == -1.0 && PyErr_Occurred()) return NULL;
    return PyFloat_FromDouble(tanh_approx((float)x));
}

static PyMethodDef methods[] = {
    {"step", step, METH_VARARGS, "Fused pointwise half of a batched recurrent cell step."},
    {"run_lane", run_lane, METH_VARARGS, "Several whole steps of one lane (GEMV and pointwise)."},
    {"fused_step", fused_step, METH_VARARGS, "A whole batched step: GEMM on packed weights and gates."},
    {"fused_project", fused_project, METH_VARARGS, "Input projections of rows on packed weights, plus bias."},
    {"elastic_team", elastic_team, METH_VARARGS, "Lead an elastic team of threads on these cores (None: none)."},
    {"elastic_use", elastic_use, METH_O, "Whether the calling thread's steps run on its elastic team."},
    {"has_avx512", has_avx512, METH_NOARGS, "Whether the CPU has AVX-512 (the fused step's fast build)."},
    {"tanh", tanh_test, METH_O, "The kernel's float tanh approximation, for tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pointwise", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pointwise(void) { return PyModule_Create(&module); }
