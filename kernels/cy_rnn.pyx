# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython kernels for one layer of LSTM / GRU / RNN, both directions at once.

One persistent OpenMP parallel region per call. Each thread owns one or more work
items: a direction d and a slice of its hidden units (panels of rf_fused.h), packs its
slice of the weights, projects the inputs of its slice (all steps at once, or a chunk
of steps at a time right before they are needed), then steps through time: recurrent
product of its slice fused with the gate math (kernels/rf_fused_tmpl.h, rf_gates.h),
one barrier per step (two for LSTM with projection and GRU with
linear_before_reset=False) when threads share a direction, none when each thread owns
whole directions. The weights of a slice stay in that core's cache. The previous state
is read from one half of a ping-pong buffer and the new one written to the other, so no
thread overwrites what another is reading.

Variants chosen by rnnfast._engine: ``batch_split`` (the threads of a direction take
interleaved batch rows with every unit: no barrier per step, for batches of several
rows whose recurrent weights fit in L2), ``rec_rowdot`` (a step's recurrent product by
rf_rowdot from the row-major weights, for one or two live rows), no packing at all for
sequences shorter than FUSED_MIN_T steps (rf_rowdot or BLAS per gate), and
``run_small``, the lean entry of the serving path.

Data layout (prepared by rnnfast._engine, which also validates and allocates):
packed rows, step-major: step t holds rows [off_t, off_t + bsz[t]) of ``x`` and ``y``,
the sequences sorted by length (longest first), so the live rows of a step are a
prefix of the batch and padded steps cost nothing.
"""
from cython cimport floating

include "rf_blas.pxi"
from cython.parallel cimport parallel, threadid
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset
cimport numpy as cnp

cnp.import_array()

include "rf_fused_decl.pxi"

cdef extern from *:
    """
    #ifndef RF_ISA_LEVEL
    #define RF_ISA_LEVEL "single"
    #endif
    """
    const char *RF_ISA_LEVEL


cdef extern from "rf_fused.h":
    int RF_VBYTES
    int RF_MR


cdef extern from "rf_pool.h" nogil:
    ctypedef void (*rf_pool_fn)(void *arg, int tid) noexcept nogil
    int rf_pool_run(rf_pool_fn fn, void *arg)

cdef extern from "rf_gates.h" nogil:
    void rf_barrier()
    int rf_team_size()
    ctypedef struct rf_sync_t:
        pass
    void rf_sync_init(rf_sync_t *b, int n)
    void rf_sync(rf_sync_t *b, int team)
    int rf_have_openmp()
    void rf_lstm_gates_f(int n, int H, int u0, int u1, const float *xg, int ldx, const float *hg, int ldg, int sg,
                         const float *bx, const float *bh, float *c, int ldc, float *h1, int ld1, float *h2, int ld2)
    void rf_lstm_gates_d(int n, int H, int u0, int u1, const double *xg, int ldx, const double *hg, int ldg, int sg,
                         const double *bx, const double *bh, double *c, int ldc, double *h1, int ld1,
                         double *h2, int ld2)
    void rf_gru_gates_f(int n, int H, int u0, int u1, const float *xg, int ldx, const float *hg, int ldg, int sg,
                        const float *bx, const float *bh, const float *hp, int ldp, float *h1, int ld1,
                        float *h2, int ld2)
    void rf_gru_gates_d(int n, int H, int u0, int u1, const double *xg, int ldx, const double *hg, int ldg, int sg,
                        const double *bx, const double *bh, const double *hp, int ldp, double *h1, int ld1,
                        double *h2, int ld2)
    void rf_gru_rz_f(int n, int H, int u0, int u1, const float *xg, int ldx, float *hg, int ldg,
                     const float *bx, const float *bh, const float *hp, int ldp, float *rh, int ldr)
    void rf_gru_rz_d(int n, int H, int u0, int u1, const double *xg, int ldx, double *hg, int ldg,
                     const double *bx, const double *bh, const double *hp, int ldp, double *rh, int ldr)
    void rf_gru_n_f(int n, int H, int u0, int u1, const float *xg, int ldx, const float *hg, int ldg,
                    const float *bx, const float *bh, const float *hp, int ldp, float *h1, int ld1, float *h2, int ld2)
    void rf_gru_n_d(int n, int H, int u0, int u1, const double *xg, int ldx, const double *hg, int ldg,
                    const double *bx, const double *bh, const double *hp, int ldp, double *h1, int ld1,
                    double *h2, int ld2)
    void rf_rnn_gates_f(int n, int relu, int u0, int u1, const float *xg, int ldx, const float *hg, int ldg,
                        const float *bx, const float *bh, float *h1, int ld1, float *h2, int ld2)
    void rf_rnn_gates_d(int n, int relu, int u0, int u1, const double *xg, int ldx, const double *hg, int ldg,
                        const double *bx, const double *bh, double *h1, int ld1, double *h2, int ld2)
    void rf_copy_cols_f(int n, int u0, int u1, const float *src, int lds, float *dst, int ldd)
    void rf_copy_cols_d(int n, int u0, int u1, const double *src, int lds, double *dst, int ldd)

include "rf_interrupt.pxi"

# Cell codes: keep in step with rnnfast/cells.py.
cdef extern from "rf_cells.h":
    # the cell codes (rf_cells.h, one copy of rnnfast/cells.py's)
    enum:
        LSTM "RF_LSTM"
        LSTM_PROJ "RF_LSTM_PROJ"
        GRU_LBR "RF_GRU_LBR"
        GRU_NOLBR "RF_GRU_NOLBR"
        RNN_TANH "RF_RNN_TANH"
        RNN_RELU "RF_RNN_RELU"
    # the cell variants' activation codes (rnnfast/cells.py ACTIVATION_CODES)
    enum:
        ACT_SIGMOID "RF_ACT_SIGMOID"
        ACT_TANH "RF_ACT_TANH"
        ACT_RELU "RF_ACT_RELU"
        ACT_AFFINE "RF_ACT_AFFINE"
        ACT_LEAKY_RELU "RF_ACT_LEAKY_RELU"
        ACT_THRESHOLDED_RELU "RF_ACT_THRESHOLDED_RELU"
        ACT_SCALED_TANH "RF_ACT_SCALED_TANH"
        ACT_HARD_SIGMOID "RF_ACT_HARD_SIGMOID"
        ACT_ELU "RF_ACT_ELU"
        ACT_SOFTSIGN "RF_ACT_SOFTSIGN"
        ACT_SOFTPLUS "RF_ACT_SOFTPLUS"

DEF UNIT_BLOCK = 16     # hidden-unit slices are multiples of this (one AVX-512 vector)
DEF MAX_DIRS = 2
DEF FUSED_MIN_T = 4
DEF ROWDOT_MAX_ROWS = 8  # products with at most this many rows skip BLAS (rf_rowdot)


def build_info():
    """The ISA level this module was compiled for, its vector width and row blocking, and
    the most rows a product may have without calling BLAS (rnnfast limits BLAS's threads
    only around calls that may call it)."""
    return {"level": RF_ISA_LEVEL.decode(), "vector_bytes": RF_VBYTES, "rows_per_block": RF_MR,
            "rowdot_max_rows": ROWDOT_MAX_ROWS,
            "cell_codes": {"LSTM": LSTM, "LSTM_PROJ": LSTM_PROJ, "GRU_LBR": GRU_LBR, "GRU_NOLBR": GRU_NOLBR,
                           "RNN_TANH": RNN_TANH, "RNN_RELU": RNN_RELU},
            "activation_codes": {"sigmoid": ACT_SIGMOID, "tanh": ACT_TANH, "relu": ACT_RELU, "affine": ACT_AFFINE,
                                 "leaky_relu": ACT_LEAKY_RELU, "thresholded_relu": ACT_THRESHOLDED_RELU,
                                 "scaled_tanh": ACT_SCALED_TANH, "hard_sigmoid": ACT_HARD_SIGMOID, "elu": ACT_ELU,
                                 "softsign": ACT_SOFTSIGN, "softplus": ACT_SOFTPLUS}}


def have_openmp() -> bool:
    """Whether these kernels were compiled with OpenMP."""
    return bool(rf_have_openmp())


cdef inline int _gates(int code) noexcept nogil:
    return 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)


def packed_size(int code, int H, int Hout, int I, bint is_double, int T) -> int:
    """Elements of packed weights (recurrent, then input) per direction (0: not used).

    The packed micro-kernel path serves LSTM (with or without projection), GRU with
    linear_before_reset=True and RNN, when the sequence is long enough (T >= 4) for the
    packing to pay for itself; other calls use BLAS per gate.
    """
    if code == GRU_NOLBR or T < FUSED_MIN_T:
        return 0
    cdef int G = _gates(code)
    cdef int up = rf_panel_units(G, is_double)
    cdef int64_t npan = (H + up - 1) // up
    return npan * (Hout + I) * G * up              # 64-bit: past 2**31 for large layers


def pack_weights(int code, const floating[:, ::1] w_ih, const floating[:, ::1] w_hh, floating[::1] out):
    """Pack one direction's weights as run_layer's fused path reads them (recurrent, then
    input panels; packed_size(code, H, Hout, I, is_double, T >= FUSED_MIN_T) elements),
    once, for ``run_layer(..., prepacked=True)``."""
    cdef int G = _gates(code)
    cdef int H = w_hh.shape[0] // G, Hout = w_hh.shape[1], I = w_ih.shape[1]
    cdef int up = rf_panel_units(G, floating is double)
    cdef int npan = (H + up - 1) // up
    cdef size_t rec = <size_t>npan * Hout * G * up
    if code == GRU_NOLBR or w_ih.shape[0] != G * H or <size_t>out.shape[0] < rec + <size_t>npan * I * G * up:
        raise ValueError("pack_weights: this cell has no packed path, or the sizes do not match")
    with nogil:
        if floating is float:
            rf_pack_f(G, H, Hout, 0, npan, &w_hh[0, 0], &out[0])
            rf_pack_f(G, H, I, 0, npan, &w_ih[0, 0], &out[0] + rec)
        else:
            rf_pack_d(G, H, Hout, 0, npan, &w_hh[0, 0], &out[0])
            rf_pack_d(G, H, I, 0, npan, &w_ih[0, 0], &out[0] + rec)


cdef inline void _gemm_nt(int n, int m, int k, const floating *A, int lda, const floating *W, int ldw,
                          floating *C, int ldc, floating beta) noexcept nogil:
    """C[n, m] (row-major, ld ldc) = A[n, k] @ W[m, k]^T + beta*C: rf_rowdot for a few rows
    (beta 0; single-threaded BLAS loses most of its speed there), else single-threaded BLAS."""
    if n <= 0 or m <= 0:
        return
    if n <= ROWDOT_MAX_ROWS and beta == 0:
        if floating is float:
            rf_rowdot_f(n, m, k, A, lda, W, ldw, C, ldc)
        else:
            rf_rowdot_d(n, m, k, A, lda, W, ldw, C, ldc)
    else:
        rf_blas_gemm_nt(n, m, k, A, lda, W, ldw, C, ldc, beta)


cdef inline void _rowdot1_gates(int ng, int m, int k, const floating *a, const floating *W, int H,
                                floating *C, bint rev) noexcept nogil:
    """C[g*H : g*H + m] = W[g*H : g*H + m, :k] @ a for the ng gates g of a slice of units
    (W and C at the slice's first unit), one input row, in one pass: first to last or
    (rev) last to first."""
    if floating is float:
        rf_rowdot1_segs_f(ng, m, k, a, W, k, <size_t>H * k, C, H, rev)
    else:
        rf_rowdot1_segs_d(ng, m, k, a, W, k, <size_t>H * k, C, H, rev)


cdef inline int _imin(int a, int b) noexcept nogil:
    return a if a < b else b


cdef inline int _split(int total, int k, int parts) noexcept nogil:
    """Start of part k when [0, total) is cut into `parts` slices of whole blocks."""
    cdef int nb = (total + UNIT_BLOCK - 1) // UNIT_BLOCK
    cdef int s = UNIT_BLOCK * ((nb * k) // parts)
    return s if s < total else total


cdef inline void _project(int k, int cpd, bint fused, int G, int H, int I, int Hout, int UP, int npan,
                          int n, const floating *x, const floating *w_ih, floating *wpd,
                          floating *xg) noexcept nogil:
    """Input projections of n rows of x for work item k's units, into rows [0, n) of xg."""
    cdef int GH = G * H, g, p0, p1, u0, u1
    cdef floating zero = 0
    if n <= 0:
        return
    if fused:
        p0 = npan * k // cpd
        p1 = npan * (k + 1) // cpd
        if floating is float:
            rf_gemm_panels_f(G, H, I, n, p0, p1, x, I, wpd + <size_t>npan * Hout * G * UP, xg, GH)
        else:
            rf_gemm_panels_d(G, H, I, n, p0, p1, x, I, wpd + <size_t>npan * Hout * G * UP, xg, GH)
    else:
        u0 = _split(H, k, cpd)
        u1 = _split(H, k + 1, cpd)
        for g in range(G):
            _gemm_nt(n, u1 - u0, I, x, I, w_ih + <size_t>(g * H + u0) * I, I, xg + g * H + u0, GH, zero)


cdef void _worker(int tid, int nthr, int code, int ndir, int cpd, bint rev0,
                  int T, int N, int B, int I, int H, int Hout,
                  const int64_t *bsz, const floating *x,
                  const floating **w_ih, const floating **w_hh, const floating **bx,
                  const floating **bh, const floating **w_hr,
                  floating *xg, floating *hbuf, floating *cst, floating *y,
                  floating *hg, floating *s2, floating *wpk, int npk, bint prepacked, int xrows, int chunk,
                  bint rec_rowdot, bint bsplit, rf_sync_t *bar, int onerow,
                  rf_intr_t *intr, const rf_var_t *var, const floating **ph) noexcept nogil:
    # var: a cell variant (NULL: the standard cell) and ph[d] each direction's peepholes
    cdef int G = _gates(code)
    cdef int GH = G * H
    cdef int ldy = ndir * Hout
    cdef int nitems = ndir * cpd
    cdef int it, d, k, g, u0, u1, p0, p1, s, t, n, off, phase
    cdef int UP = rf_panel_units(G, floating is double)
    cdef int npan = (H + UP - 1) // UP
    cdef bint fused = npk > 0                       # packed weights: projection by rf_gemm_panels
    cdef bint fused_step = fused and not rec_rowdot  # ... and the step by rf_fused_step
    cdef floating *wpd
    cdef bint rev
    cdef const floating *xgt
    cdef const floating *xnt     # the next step's projections (prefetched), or NULL
    cdef int nn, nbn             # ... how many of its rows this item takes, of how many
    cdef floating *hr
    cdef floating *hw
    cdef floating *yt
    cdef floating *xgd
    cdef floating *hgd
    cdef floating *s2d
    cdef floating *cd
    cdef floating zero = 0
    cdef int[MAX_DIRS] offs
    cdef int[MAX_DIRS] lo       # first packed row of the steps whose projections xg holds
    cdef int hi, j, tlo, nb
    # bsplit: the steps split the batch instead of the units: item k of a direction takes
    # rows k, k + cpd, ... with every unit (no step depends on another thread's work, no
    # barrier per step); packing and projections still split the units (one barrier)
    cdef bint sync = not bsplit and cpd > 1     # threads share a direction's units: a barrier per step
    cdef int rs = cpd if bsplit else 1          # row stride multiplier
    cdef int ldx = GH * rs, ldg = GH * rs, ldh = Hout * rs, ldH = H * rs, ldyy = ndir * Hout * rs
    # onerow (one step of one row, no packing: run_small): the projection waits for phase
    # 0, and each product takes all the gates of the item's units in one rf_rowdot1_segs
    # pass; 2: the weights in reverse, the recurrent ones first, so that a call after a
    # forward one (1) starts on the lines that one left in L2

    # 1. pack this thread's panels of the weights (fused path; a frozen layer's come packed)
    it = tid
    while it < nitems and fused and not prepacked:
        d = it // cpd
        k = it % cpd
        p0 = npan * k // cpd
        p1 = npan * (k + 1) // cpd
        wpd = wpk + <size_t>d * npk
        if floating is float:
            if fused_step:
                rf_pack_f(G, H, Hout, p0, p1, w_hh[d], wpd)
            rf_pack_f(G, H, I, p0, p1, w_ih[d], wpd + <size_t>npan * Hout * G * UP)
        else:
            if fused_step:
                rf_pack_d(G, H, Hout, p0, p1, w_hh[d], wpd)
            rf_pack_d(G, H, I, p0, p1, w_ih[d], wpd + <size_t>npan * Hout * G * UP)
        it = it + nthr
    for d in range(ndir):
        rev = rev0 if d == 0 else True
        offs[d] = N - <int>bsz[T - 1] if rev else 0
        lo[d] = 0

    # 2. the recurrence; every `chunk` steps, each item projects the inputs of the next
    # chunk of steps for its own units (only it reads them: no barrier), into xg's rows
    for s in range(T):
        if tid == 0 and s % 8 == 0:
            rf_intr_poll(intr, bar, nthr)
        if rf_sync_stopped(bar):        # a Ctrl-C: every thread leaves here (rf_interrupt.h)
            break
        if s % chunk == 0:
            for d in range(ndir):
                rev = rev0 if d == 0 else True
                if not rev:
                    lo[d] = offs[d]
                    hi = offs[d]
                    for j in range(s, _imin(T, s + chunk)):
                        hi = hi + <int>bsz[j]
                else:
                    hi = offs[d] + <int>bsz[T - 1 - s]
                    tlo = T - s - chunk
                    if tlo < 0:
                        tlo = 0
                    lo[d] = offs[d]
                    for j in range(tlo, T - 1 - s):
                        lo[d] = lo[d] - <int>bsz[j]
                if bsplit and s > 0:
                    rf_sync(bar, nthr)    # every thread is done with the previous chunk
                it = tid
                while it < nitems and not onerow:
                    if it // cpd == d:
                        _project(it % cpd, cpd, fused, G, H, I, Hout, UP, npan, hi - lo[d],
                                 x + <size_t>lo[d] * I, w_ih[d], wpk + <size_t>d * npk if fused else NULL,
                                 xg + <size_t>d * xrows * GH)
                    it = it + nthr
            if bsplit:
                rf_sync(bar, nthr)  # all units' projections (and packed panels) are ready
        for phase in range(2):
            if phase == 1 and code != LSTM_PROJ and code != GRU_NOLBR:
                break
            it = tid
            while it < nitems:
                d = it // cpd
                k = it % cpd
                rev = rev0 if d == 0 else True
                t = T - 1 - s if rev else s
                nb = <int>bsz[t]
                off = offs[d]
                if bsplit:
                    n = (nb - k + cpd - 1) // cpd if nb > k else 0
                    p0 = 0
                    p1 = npan
                    u0 = 0
                    u1 = H
                    j = k               # first row of this item
                else:
                    n = nb
                    j = 0
                    if fused:
                        p0 = npan * k // cpd
                        p1 = npan * (k + 1) // cpd
                        u0 = _imin(H, p0 * UP)
                        u1 = _imin(H, p1 * UP)
                    else:
                        u0 = _split(H, k, cpd)
                        u1 = _split(H, k + 1, cpd)
                xgd = xg + <size_t>d * xrows * GH
                xgt = xgd + <size_t>(off - lo[d] + j) * GH
                hgd = hg + <size_t>d * B * GH + <size_t>j * GH
                hr = hbuf + <size_t>(2 * d + (s % 2)) * B * Hout + <size_t>j * Hout
                hw = hbuf + <size_t>(2 * d + ((s + 1) % 2)) * B * Hout + <size_t>j * Hout
                yt = y + <size_t>(off + j) * ldy + d * Hout
                s2d = s2 + <size_t>d * B * H + <size_t>j * H
                cd = cst + <size_t>d * B * H + <size_t>j * H
                if phase == 0 and fused_step:
                    wpd = wpk + <size_t>d * npk
                    xnt = NULL
                    nn = 0
                    if s + 1 < T and (s + 1) % chunk != 0:      # (a new chunk is not projected yet)
                        nbn = <int>bsz[T - 2 - s] if rev else <int>bsz[s + 1]    # its rows
                        if bsplit:
                            nn = (nbn - k + cpd - 1) // cpd if nbn > k else 0
                        else:
                            nn = nbn
                        if rev:
                            xnt = xgd + <size_t>(off - nbn - lo[d] + j) * GH
                        else:
                            xnt = xgd + <size_t>(off + nb - lo[d] + j) * GH
                    if code == LSTM_PROJ:
                        if floating is float:
                            rf_fused_step_v_f(var, ph[d], code, G, H, Hout, n, p0, p1, wpd, xgt, ldx, xnt, nn, bx[d],
                                              bh[d], hr, ldh, cd, ldH, s2d, ldH, NULL, 0)
                        else:
                            rf_fused_step_v_d(var, ph[d], code, G, H, Hout, n, p0, p1, wpd, xgt, ldx, xnt, nn, bx[d],
                                              bh[d], hr, ldh, cd, ldH, s2d, ldH, NULL, 0)
                    else:
                        if floating is float:
                            rf_fused_step_v_f(var, ph[d], code, G, H, Hout, n, p0, p1, wpd, xgt, ldx, xnt, nn, bx[d],
                                              bh[d], hr, ldh, cd, ldH, hw, ldh, yt, ldyy)
                        else:
                            rf_fused_step_v_d(var, ph[d], code, G, H, Hout, n, p0, p1, wpd, xgt, ldx, xnt, nn, bx[d],
                                              bh[d], hr, ldh, cd, ldH, hw, ldh, yt, ldyy)
                elif phase == 0:
                    if onerow == 1:     # (2: the same two products, in the opposite order and reversed;
                        #  kept apart: folded into one branch, the step ran slower from code
                        #  layout; commit 9869743; figures in docs/performance.md)
                        _rowdot1_gates(G, u1 - u0, I, x, w_ih[d] + <size_t>u0 * I, H, xgd + u0, False)
                        _rowdot1_gates(2 if code == GRU_NOLBR else G, u1 - u0, Hout, hr,
                                       w_hh[d] + <size_t>u0 * Hout, H, hgd + u0, False)
                    elif onerow == 2:
                        _rowdot1_gates(2 if code == GRU_NOLBR else G, u1 - u0, Hout, hr,
                                       w_hh[d] + <size_t>u0 * Hout, H, hgd + u0, True)
                        _rowdot1_gates(G, u1 - u0, I, x, w_ih[d] + <size_t>u0 * I, H, xgd + u0, True)
                    elif code == GRU_NOLBR:
                        for g in range(2):
                            _gemm_nt(n, u1 - u0, Hout, hr, ldh, w_hh[d] + <size_t>(g * H + u0) * Hout, Hout,
                                     hgd + g * H + u0, ldg, zero)
                    else:
                        for g in range(G):
                            _gemm_nt(n, u1 - u0, Hout, hr, ldh, w_hh[d] + <size_t>(g * H + u0) * Hout, Hout,
                                     hgd + g * H + u0, ldg, zero)
                    if code == LSTM:
                        if floating is float:
                            rf_lstm_gates_v_f(var, ph[d], n, H, u0, u1, xgt, ldx, hgd, ldg, H, bx[d], bh[d], cd, ldH,
                                              hw, ldh, yt, ldyy)
                        else:
                            rf_lstm_gates_v_d(var, ph[d], n, H, u0, u1, xgt, ldx, hgd, ldg, H, bx[d], bh[d], cd, ldH,
                                              hw, ldh, yt, ldyy)
                    elif code == LSTM_PROJ:
                        if floating is float:
                            rf_lstm_gates_v_f(var, ph[d], n, H, u0, u1, xgt, ldx, hgd, ldg, H, bx[d], bh[d], cd, ldH,
                                              s2d, ldH, NULL, 0)
                        else:
                            rf_lstm_gates_v_d(var, ph[d], n, H, u0, u1, xgt, ldx, hgd, ldg, H, bx[d], bh[d], cd, ldH,
                                              s2d, ldH, NULL, 0)
                    elif code == GRU_LBR:
                        if floating is float:
                            rf_gru_gates_v_f(var, n, H, u0, u1, xgt, ldx, hgd, ldg, H, bx[d], bh[d], hr, ldh, hw, ldh,
                                             yt, ldyy)
                        else:
                            rf_gru_gates_v_d(var, n, H, u0, u1, xgt, ldx, hgd, ldg, H, bx[d], bh[d], hr, ldh, hw, ldh,
                                             yt, ldyy)
                    elif code == GRU_NOLBR:
                        if floating is float:
                            rf_gru_rz_v_f(var, n, H, u0, u1, xgt, ldx, hgd, ldg, bx[d], bh[d], hr, ldh, s2d, ldH)
                        else:
                            rf_gru_rz_v_d(var, n, H, u0, u1, xgt, ldx, hgd, ldg, bx[d], bh[d], hr, ldh, s2d, ldH)
                    else:
                        if floating is float:
                            rf_rnn_gates_v_f(var, n, code == RNN_RELU, u0, u1, xgt, ldx, hgd, ldg, bx[d], bh[d], hw,
                                             ldh, yt, ldyy)
                        else:
                            rf_rnn_gates_v_d(var, n, code == RNN_RELU, u0, u1, xgt, ldx, hgd, ldg, bx[d], bh[d], hw,
                                             ldh, yt, ldyy)
                elif code == LSTM_PROJ:
                    if bsplit:
                        p0 = 0
                        p1 = Hout
                    else:
                        p0 = _split(Hout, k, cpd)
                        p1 = _split(Hout, k + 1, cpd)
                    _gemm_nt(n, p1 - p0, H, s2d, ldH, w_hr[d] + <size_t>p0 * H, H, yt + p0, ldyy, zero)
                    if floating is float:
                        rf_copy_cols_f(n, p0, p1, yt, ldyy, hw, ldh)
                    else:
                        rf_copy_cols_d(n, p0, p1, yt, ldyy, hw, ldh)
                else:   # GRU_NOLBR, phase 2
                    _gemm_nt(n, u1 - u0, H, s2d, ldH, w_hh[d] + <size_t>(2 * H + u0) * Hout, Hout,
                             hgd + 2 * H + u0, ldg, zero)
                    if floating is float:
                        rf_gru_n_v_f(var, n, H, u0, u1, xgt, ldx, hgd, ldg, bx[d], bh[d], hr, ldh, hw, ldh, yt, ldyy)
                    else:
                        rf_gru_n_v_d(var, n, H, u0, u1, xgt, ldx, hgd, ldg, bx[d], bh[d], hr, ldh, hw, ldh, yt, ldyy)
                it = it + nthr
            if sync and (s + 1 < T or (phase == 0 and (code == LSTM_PROJ or code == GRU_NOLBR))):
                rf_sync(bar, nthr)  # (the end of the parallel region synchronises the last step)
        # advance every direction's row offset (each thread keeps its own copy)
        for d in range(ndir):
            rev = rev0 if d == 0 else True
            if rev:
                if s + 1 < T:
                    offs[d] = offs[d] - <int>bsz[T - 2 - s]
            else:
                offs[d] = offs[d] + <int>bsz[s]


def run_layer(int code, const floating[:, ::1] x, const int64_t[::1] bsz,
              const floating[:, ::1] w_ih0, const floating[:, ::1] w_hh0,
              const floating[::1] bx0, const floating[::1] bh0, const floating[:, ::1] w_hr0,
              const floating[:, ::1] w_ih1, const floating[:, ::1] w_hh1,
              const floating[::1] bx1, const floating[::1] bh1, const floating[:, ::1] w_hr1,
              int ndir, bint rev0, floating[:, :, ::1] xg, floating[:, :, :, ::1] hbuf,
              floating[:, :, ::1] cst, floating[:, ::1] y, floating[:, :, ::1] hg,
              floating[:, :, ::1] s2, int nthreads, floating[::1] wpk=None, int chunk=0,
              bint rec_rowdot=False, bint batch_split=False, bint prepacked=False,
              const double[::1] vp=None, const floating[::1] ph0=None, const floating[::1] ph1=None):
    """Run one layer (one or two directions) over packed rows; see the module docstring.

    Parameters
    ----------
    code : cell code (rnnfast.cells).
    x : (N, I) packed inputs.  bsz : (T,) live rows per step, non-increasing, >= 1.
    w_ih*, w_hh*, bx*, bh*, w_hr* : direction 0 and 1 weights (direction 1 ignored when
        ndir == 1; w_hr only read for LSTM with projection).
    rev0 : direction 0 runs in reverse (direction 1 always does).
    xg : (ndir, R, G*H) scratch for the input projections of `chunk` steps at a time
        (R >= min(N, chunk * B); chunk <= 0: all T steps at once, R >= N).
    hbuf : (ndir, 2, B, Hout), both halves holding h0;
        after the call half ``L % 2`` of row j holds its final state for a forward
        direction of length L, half ``T % 2`` for a reverse one.
    cst : (ndir, B, H) c0 in, c_n out (LSTM).  y : (N, ndir*Hout) output.
    hg : (ndir, B, G*H) and s2 : (ndir, B, H) scratch.  nthreads : threads to use.
    wpk : packed weights (packed_size elements per direction), or None: BLAS / rf_rowdot.
    prepacked : wpk already holds them (pack_weights, a frozen layer's); else the call packs.
    rec_rowdot : with wpk, pack only the input weights (projection) and take each step's
        recurrent product with rf_rowdot from the row-major weights (a few live rows).
    batch_split : the threads of a direction split the batch rows of each step (every
        unit, all the weights; no barrier per step) instead of its units; packing and
        projections still split the units. For batches of several rows whose recurrent
        weights fit in each core's L2.
    """
    cdef int T = bsz.shape[0]
    cdef int N = x.shape[0]
    cdef int I = x.shape[1]
    cdef int Hout = hbuf.shape[3]
    cdef int B = hbuf.shape[2]
    cdef int H = s2.shape[2]
    cdef int cpd, nitems, nthr, tid, npk = 0, maxchunks
    cdef rf_sync_t bar
    cdef rf_intr_t intr
    cdef floating *wp = NULL
    cdef int G = _gates(code)
    cdef const floating *w_ih[MAX_DIRS]
    cdef const floating *w_hh[MAX_DIRS]
    cdef const floating *bx[MAX_DIRS]
    cdef const floating *bh[MAX_DIRS]
    cdef const floating *w_hr[MAX_DIRS]
    cdef const floating *ph[MAX_DIRS]
    cdef rf_var_t var
    cdef const rf_var_t *varp = NULL
    if T == 0 or N == 0:
        return
    ph[0] = ph[1] = NULL
    if _read_variant(vp, &var):
        if var.peephole:
            if ph0 is None or ph0.shape[0] < 3 * H or (ndir == 2 and (ph1 is None or ph1.shape[0] < 3 * H)):
                raise ValueError("run_layer: a peephole variant needs each direction's (3H,) peepholes")
            ph[0] = &ph0[0]
            ph[1] = &ph1[0] if ndir == 2 else ph[0]
        varp = &var
    if chunk <= 0 or chunk > T:
        chunk = T
    if xg.shape[1] < _imin(N, chunk * B):
        raise ValueError(f"run_layer: xg holds {xg.shape[1]} rows, {min(N, chunk * B)} needed")
    w_ih[0] = &w_ih0[0, 0]
    w_hh[0] = &w_hh0[0, 0]
    bx[0] = &bx0[0]
    bh[0] = &bh0[0]
    w_hr[0] = &w_hr0[0, 0]
    w_ih[1] = &w_ih1[0, 0]
    w_hh[1] = &w_hh1[0, 0]
    bx[1] = &bx1[0]
    bh[1] = &bh1[0]
    w_hr[1] = &w_hr1[0, 0]
    if nthreads < 1:
        nthreads = 1
    cpd = nthreads // ndir
    if cpd < 1:
        cpd = 1
    if wpk is not None and wpk.shape[0] > 0:
        npk = wpk.shape[0] // ndir
        wp = &wpk[0]
        maxchunks = (H + rf_panel_units(G, floating is double) - 1) // rf_panel_units(G, floating is double)
    else:
        maxchunks = (H + UNIT_BLOCK - 1) // UNIT_BLOCK
    if cpd > maxchunks:
        cpd = maxchunks
    nitems = ndir * cpd
    nthr = nthreads if nthreads < nitems else nitems
    if not rf_have_openmp():
        nthr = 1
    if cpd < 2:
        batch_split = False
    rf_sync_init(&bar, nthr)
    rf_intr_init(&intr, _main_ident)
    if nthr == 1:
        with nogil:
            _worker(0, 1, code, ndir, cpd, rev0, T, N, B, I, H, Hout, &bsz[0], &x[0, 0],
                    w_ih, w_hh, bx, bh, w_hr, &xg[0, 0, 0], &hbuf[0, 0, 0, 0], &cst[0, 0, 0],
                    &y[0, 0], &hg[0, 0, 0], &s2[0, 0, 0], wp, npk, prepacked, <int>xg.shape[1], chunk, rec_rowdot,
                    batch_split, &bar, 0, &intr, varp, ph)
    else:
        with nogil, parallel(num_threads=nthr):
            tid = threadid()
            _worker(tid, rf_team_size(), code, ndir, cpd, rev0, T, N, B, I, H, Hout, &bsz[0], &x[0, 0],
                    w_ih, w_hh, bx, bh, w_hr, &xg[0, 0, 0], &hbuf[0, 0, 0, 0], &cst[0, 0, 0],
                    &y[0, 0], &hg[0, 0, 0], &s2[0, 0, 0], wp, npk, prepacked, <int>xg.shape[1], chunk, rec_rowdot,
                    batch_split, &bar, 0, &intr, varp, ph)
    rf_intr_raise(&intr)     # a signal handler raised during the call (Ctrl-C)


cdef inline void* _data(object a) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef struct _SmallJob:
    # _worker's arguments for one step on two threads (rf_pool_run); (`I` is taken: complex.h)
    int code, cpd, nb, ni, nh, nho
    int onerow
    const int64_t *bs
    const void *xp
    const void **wi
    const void **wh
    const void **bx
    const void **bh
    const void **wr
    void *xgp
    void *hb
    void *cst
    void *yp
    void *hgp
    void *s2p
    rf_sync_t *bar


cdef inline void _small_job_t(floating *dummy, _SmallJob *j, int tid) noexcept nogil:
    _worker(tid, 2, j.code, 1, j.cpd, False, 1, j.nb, j.nb, j.ni, j.nh, j.nho, j.bs,
            <const floating*>j.xp, <const floating**>j.wi, <const floating**>j.wh, <const floating**>j.bx,
            <const floating**>j.bh, <const floating**>j.wr, <floating*>j.xgp, <floating*>j.hb, <floating*>j.cst,
            <floating*>j.yp, <floating*>j.hgp, <floating*>j.s2p, NULL, 0, False, j.nb, 1, False, False,
            j.bar, j.onerow, NULL, NULL, NULL)


cdef void _small_job_f(void *arg, int tid) noexcept nogil:
    _small_job_t(<float*>NULL, <_SmallJob*>arg, tid)


cdef void _small_job_d(void *arg, int tid) noexcept nogil:
    _small_job_t(<double*>NULL, <_SmallJob*>arg, tid)


cdef bint _run_small_t(floating *dummy, int code, object x, object bsz, object w_ih, object w_hh,
                       object b_ih, object b_hh, object w_hr, object h0, object c0, object y,
                       object hn, object cn, object xg, object hbuf, object hg, object s2, object state,
                       int T, int B, int I, int H, int Hout, bint pool, int nthreads):
    cdef const floating *wi[MAX_DIRS]
    cdef const floating *wh[MAX_DIRS]
    cdef const floating *bx[MAX_DIRS]
    cdef const floating *bh[MAX_DIRS]
    cdef const floating *wr[MAX_DIRS]
    cdef floating *hb = <floating*>_data(hbuf)
    cdef floating *cst
    cdef const int64_t *bs = <const int64_t*>_data(bsz)
    cdef const floating *xp = <const floating*>_data(x)
    cdef floating *xgp = <floating*>_data(xg)
    cdef floating *yp = <floating*>_data(y)
    cdef floating *hgp = <floating*>_data(hg)
    cdef floating *s2p = <floating*>_data(s2)
    cdef size_t hbytes = <size_t>B * Hout * sizeof(floating)
    cdef int cpd, nthr, tid
    cdef rf_sync_t bar
    cdef _SmallJob job
    cdef int pooled = 0
    cdef int64_t *calls = <int64_t*>_data(state)
    # a single-token call of one row takes _worker's onerow products, every other one in
    # reverse; the count is the layer's, shared by its callers (a lost update only costs speed)
    cdef int onerow = (1 + <int>(calls[0] & 1)) if (T == 1 and B == 1) else 0
    calls[0] += 1
    wi[0] = wi[1] = <const floating*>_data(w_ih)
    wh[0] = wh[1] = <const floating*>_data(w_hh)
    bx[0] = bx[1] = <const floating*>_data(b_ih)
    bh[0] = bh[1] = <const floating*>_data(b_hh)
    wr[0] = wr[1] = <const floating*>_data(w_hr)
    cst = <floating*>_data(cn) if cn is not None else s2p
    if h0 is None:
        memset(hb, 0, hbytes)
    else:
        memcpy(hb, _data(h0), hbytes)
    if cn is not None:
        if c0 is None:
            memset(cst, 0, <size_t>B * H * sizeof(floating))
        else:
            memcpy(cst, _data(c0), <size_t>B * H * sizeof(floating))
    cpd = _imin(nthreads if nthreads > 0 else 1, (H + UNIT_BLOCK - 1) // UNIT_BLOCK)
    nthr = cpd if rf_have_openmp() else 1
    rf_sync_init(&bar, nthr)
    if pool and nthr == 2 and T == 1 and code != GRU_NOLBR and code != LSTM_PROJ:
        # one token on two threads: the other half goes to rf_pool's helper thread, not
        # to an OpenMP region (one step of these cells has no barrier inside: rf_sync
        # would need OpenMP's thread numbers); 0: the pool is in use, take the region
        job.code = code
        job.cpd = cpd
        job.nb = B
        job.ni = I
        job.nh = H
        job.nho = Hout
        job.onerow = onerow
        job.bs = bs
        job.xp = xp
        job.wi = <const void**>wi
        job.wh = <const void**>wh
        job.bx = <const void**>bx
        job.bh = <const void**>bh
        job.wr = <const void**>wr
        job.xgp = xgp
        job.hb = hb
        job.cst = cst
        job.yp = yp
        job.hgp = hgp
        job.s2p = s2p
        job.bar = &bar
        with nogil:
            if floating is float:
                pooled = rf_pool_run(_small_job_f, &job)
            else:
                pooled = rf_pool_run(_small_job_d, &job)
    if not pooled and nthr == 1:
        with nogil:
            _worker(0, 1, code, 1, 1, False, T, T * B, B, I, H, Hout, bs, xp, wi, wh, bx, bh, wr,
                    xgp, hb, cst, yp, hgp, s2p, NULL, 0, False, T * B, T, False, False, &bar, onerow, NULL, NULL, NULL)
    elif not pooled:
        with nogil, parallel(num_threads=nthr):
            tid = threadid()
            _worker(tid, rf_team_size(), code, 1, cpd, False, T, T * B, B, I, H, Hout, bs, xp, wi, wh, bx, bh, wr,
                    xgp, hb, cst, yp, hgp, s2p, NULL, 0, False, T * B, T, False, False, &bar, onerow, NULL, NULL, NULL)
    memcpy(_data(hn), hb + <size_t>(T % 2) * B * Hout, hbytes)
    return pooled


def run_small(int code, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, hn, cn,
              xg, hbuf, hg, s2, state, bint pool, int nthreads) -> bool:
    """One layer, one forward direction, a few steps (T < 4: no weight packing), for
    serving one token at a time with little overhead. Every argument is an ndarray
    prepared by rnnfast._engine.run_small (C-contiguous, the compute dtype, shapes
    checked there): x (T, B, I) or (T*B, I), bsz (T,) int64 all B, weights and biases
    (zeros when absent; w_hr any when unused), h0 (B, Hout) and c0 (B, H) or None for zeros;
    outputs y (T*B, Hout), hn (B, Hout), cn (B, H) or None; scratch xg (T*B, G*H),
    hbuf (2, B, Hout), hg (B, G*H), s2 (B, H); state (1,) int64, the layer's count of calls.
    pool: a token on two threads may go to rf_pool's helper thread (rnnfast.threads.pool_ok:
    not while OpenMP's threads still spin after a recent region). Returns whether it did.
    """
    cdef int T = cnp.PyArray_DIM(<cnp.ndarray>bsz, 0)
    cdef int B = cnp.PyArray_DIM(<cnp.ndarray>hbuf, 1)
    cdef int Hout = cnp.PyArray_DIM(<cnp.ndarray>hbuf, 2)
    cdef int I = cnp.PyArray_DIM(<cnp.ndarray>x, cnp.PyArray_NDIM(<cnp.ndarray>x) - 1)
    cdef int H = cnp.PyArray_DIM(<cnp.ndarray>s2, 1)
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>state):     # e.g. mapped read-only by a deserialiser
        raise ValueError("run_small: the call counter `state` is read-only")
    if cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_FLOAT32:
        return _run_small_t(<float*>NULL, code, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, hn, cn,
                            xg, hbuf, hg, s2, state, T, B, I, H, Hout, pool, nthreads)
    return _run_small_t(<double*>NULL, code, x, bsz, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, y, hn, cn,
                        xg, hbuf, hg, s2, state, T, B, I, H, Hout, pool, nthreads)
