"""Numba kernels for one layer of LSTM / GRU / RNN, both directions at once.

Same contract as ``rnnfast.kernels.cy_rnn.run_layer`` (see ``run_layer`` below): packed
rows, step-major; ``rnnfast._engine._run_packed`` validates and allocates everything.
The equations are those of ``rnnfast/cells.py``.

Work is cut into *items*: (direction d, slice k of the hidden units, in whole 16-unit
blocks), one item per thread: with 2 threads one direction is split in two halves of
its units (each with all its gates), two directions get one thread each. An item's
weight rows are the same at every step, so they stay in that core's cache. One call:

1. input projections of every step: each item multiplies its gate rows of ``w_ih``
   with all N packed rows (``xg``);
2. every step s, all inside one jitted function (no Python per step): one ``prange``
   over the items, each doing the recurrent GEMM of its units (all gates, all live
   rows) and then the fused gate math of those units, which writes the new state and
   the output row. LSTM with projection and GRU with ``linear_before_reset=False``
   need a second pass per step (the projection ``w_hr``; ``(r*h) W_hn^T``), because
   it reads the whole result of the first.

Passes with too little work to pay for a parallel launch run on the calling thread
(``_SERIAL_WORK``; commit bdbb59a; figures in docs/performance.md).
BLAS is called single-threaded on each item's slice through Numba's own BLAS helpers
with explicit leading dimensions (``np.dot`` only writes whole contiguous arrays).

The previous state is read from half ``s % 2`` of the ping-pong buffer ``hbuf`` and the
new one written to half ``(s + 1) % 2`` (rows [0, n) only), the convention the engine
relies on to read the final states.

Transcendentals: this Numba has no SVML, so ``math.exp`` in a loop is a scalar libm
call that LLVM cannot vectorise. float32 uses the Cephes single-precision ``expf`` /
``tanhf`` polynomials written out here (max error measured 1-2.5 ulp), which LLVM
vectorises (the LSTM gates then no longer wait on a scalar call per element; commit
bdbb59a; figures in docs/performance.md); float64 uses ``math.exp`` / ``math.tanh``.

Threading: ``run_layer`` sets the thread count for its call and restores the caller's,
and the threading layer is left to the user (``numba_common``). The kernels release
the GIL.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.linalg import ensure_blas

from .. import threads
from ..cells import GRU_LBR, GRU_NOLBR, LSTM, LSTM_PROJ, RNN_TANH, VARIANT_LEN
from . import numba_vmath
from .numba_common import FASTMATH, act, clip, interruptible_pieces, kernel_threads, variant_fields

_JIT = dict(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)

_UNIT_BLOCK = 16        # hidden-unit slices are multiples of this (one AVX-512 vector)
_SMALL_ROWS = 32        # GEMMs of at most this many rows are cut into column blocks ...
_SMALL_MN = 1024        # ... of at most this many outputs (see _gemm_nt)
# A pass (the input projections, or one step) of fewer multiply-adds than this runs on
# the calling thread: below it a parallel launch costs more than the split saves. The
# value lies between the largest step measured faster serially at 2 threads and the
# smallest measured faster in parallel (commit bdbb59a; figures in docs/performance.md).
# Read at every call (tests set it to 0 to exercise the parallel path).
_SERIAL_WORK = 98304


# --------------------------------------------------------------------------------------
# float32 exp / tanh / sigmoid that LLVM can vectorise (Cephes expf, tanhf)
# --------------------------------------------------------------------------------------

# (kernels/numba_vmath.py: one definition for every Numba kernel)


@njit(**_JIT)
def _sigmoid_f64(x):
    return 1.0 / (1.0 + math.exp(-x))


def _sigmoid(x):    # pragma: no cover - typed stub, see the overload
    raise NotImplementedError


def _tanh(x):       # pragma: no cover - typed stub, see the overload
    raise NotImplementedError


@overload(_sigmoid)
def _ol_sigmoid(x):
    if x == types.float32:
        return lambda x: numba_vmath.sigmoidf(x)
    return lambda x: _sigmoid_f64(x)


@overload(_tanh)
def _ol_tanh(x):
    if x == types.float32:
        return lambda x: numba_vmath.tanhf(x)
    return lambda x: math.tanh(x)


# --------------------------------------------------------------------------------------
# BLAS with leading dimensions (np.dot only writes whole contiguous arrays)
# --------------------------------------------------------------------------------------
# Numba's own BLAS helpers (numba_xxgemm / numba_xxgemv, which call SciPy's cython_blas)
# are called directly: they are resolved by symbol name, so the kernels stay cacheable,
# and they may be called without the GIL.

def _blas_kind(dtype):
    if dtype == types.float32:
        return ord("s")
    if dtype == types.float64:
        return ord("d")
    return None


def _elem_ptr(context, builder, aryty, ary, off):
    arr = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(arr.data, [off]), ir.IntType(8).as_pointer())


def _slot(builder, context, dtype, value):
    ptr = cgutils.alloca_once(builder, context.get_value_type(dtype))
    builder.store(value, ptr)
    return builder.bitcast(ptr, ir.IntType(8).as_pointer())


@intrinsic
def _xgemm(typingctx, transa, transb, m, n, k, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """Fortran-order GEMM: c = op(a) op(b) + beta*c on element offsets of the arrays."""
    if not all(isinstance(t, types.Array) for t in (a, b, c)):
        return None
    kind = _blas_kind(c.dtype)
    if kind is None or a.dtype != c.dtype or b.dtype != c.dtype:
        return None
    ensure_blas()
    sig = types.int32(transa, transb, m, n, k, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)

    def codegen(context, builder, sig, args):
        (ta, tb, m_, n_, k_, a_, ao, lda_, b_, bo, ldb_, beta_, c_, co, ldc_) = args
        i8, i64 = ir.IntType(8), ir.IntType(64)
        p8 = i8.as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [i8, i8, i8, i64, i64, i64, p8, p8, i64,
                                                p8, i64, p8, p8, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        dt = sig.args[12].dtype
        one = context.get_constant(dt, 1.0)
        betav = context.cast(builder, beta_, sig.args[11], dt)
        def ext(v, t):
            return context.cast(builder, v, t, types.int64)
        return builder.call(fn, [
            ir.Constant(i8, kind), builder.trunc(ta, i8), builder.trunc(tb, i8),
            ext(m_, sig.args[2]), ext(n_, sig.args[3]), ext(k_, sig.args[4]),
            _slot(builder, context, dt, one),
            _elem_ptr(context, builder, sig.args[5], a_, ext(ao, sig.args[6])), ext(lda_, sig.args[7]),
            _elem_ptr(context, builder, sig.args[8], b_, ext(bo, sig.args[9])), ext(ldb_, sig.args[10]),
            _slot(builder, context, dt, betav),
            _elem_ptr(context, builder, sig.args[12], c_, ext(co, sig.args[13])), ext(ldc_, sig.args[14])])
    return sig, codegen


@intrinsic
def _xgemv(typingctx, trans, m, n, a, a_off, lda, x, x_off, beta, y, y_off):
    """Fortran-order GEMV with unit strides: y = op(a) x + beta*y on element offsets."""
    if not all(isinstance(t, types.Array) for t in (a, x, y)):
        return None
    kind = _blas_kind(y.dtype)
    if kind is None or a.dtype != y.dtype or x.dtype != y.dtype:
        return None
    ensure_blas()
    sig = types.int32(trans, m, n, a, a_off, lda, x, x_off, beta, y, y_off)

    def codegen(context, builder, sig, args):
        (tr, m_, n_, a_, ao, lda_, x_, xo, beta_, y_, yo) = args
        i8, i64 = ir.IntType(8), ir.IntType(64)
        p8 = i8.as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [i8, i8, i64, i64, p8, p8, i64, p8, p8, p8])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemv")
        dt = sig.args[9].dtype
        one = context.get_constant(dt, 1.0)
        betav = context.cast(builder, beta_, sig.args[8], dt)
        def ext(v, t):
            return context.cast(builder, v, t, types.int64)
        return builder.call(fn, [
            ir.Constant(i8, kind), builder.trunc(tr, i8), ext(m_, sig.args[1]), ext(n_, sig.args[2]),
            _slot(builder, context, dt, one),
            _elem_ptr(context, builder, sig.args[3], a_, ext(ao, sig.args[4])), ext(lda_, sig.args[5]),
            _elem_ptr(context, builder, sig.args[6], x_, ext(xo, sig.args[7])),
            _slot(builder, context, dt, betav),
            _elem_ptr(context, builder, sig.args[9], y_, ext(yo, sig.args[10]))])
    return sig, codegen


_T = ord("t")
_N = ord("n")


@njit(**_JIT)
def _gemm_nt(n, m, k, a, a_off, lda, w, w_off, ldw, c, c_off, ldc):
    """Row-major C[n, m] (leading dimension ldc) = A[n, k] @ W[m, k]^T, single-threaded
    BLAS (the caller keeps BLAS at one thread; rnnfast's threads split the units).

    A few rows (2..32) go in column blocks of at most 1024 // n outputs: OpenBLAS then
    takes its small-matrix kernel, which skips packing the weights (packing dominates a
    product of a few rows; no difference from 48 rows up, where one call is kept; commit
    bdbb59a; figures in docs/performance.md).
    """
    if n <= 0 or m <= 0:
        return
    zero = c.dtype.type(0.0)
    if k <= 0:          # empty product (BLAS rejects a zero leading dimension)
        for j in range(n):
            for u in range(m):
                c.reshape(c.size)[c_off + j * ldc + u] = zero
        return
    if n == 1:
        _xgemv(_T, k, m, w, w_off, ldw, a, a_off, zero, c, c_off)
    elif n > _SMALL_ROWS:
        _xgemm(_T, _N, m, n, k, w, w_off, ldw, a, a_off, lda, zero, c, c_off, ldc)
    else:
        ub = max(_UNIT_BLOCK, (_SMALL_MN // n) // _UNIT_BLOCK * _UNIT_BLOCK)
        for u in range(0, m, ub):
            mb = min(ub, m - u)
            _xgemm(_T, _N, mb, n, k, w, w_off + u * ldw, ldw, a, a_off, lda, zero, c, c_off + u, ldc)


# --------------------------------------------------------------------------------------
# fused gate math of one row and a slice of hidden units
# --------------------------------------------------------------------------------------

@njit(**_JIT)
def _gates_chunk(code, phase, H, u0, u1, xr, gr, bx, bh, hp, hw, yr, cr, sr):
    """Gate math of one row, hidden units [u0, u1).

    Row views: xr input projections (G*H), gr recurrent projections (G*H; GRU_NOLBR
    phase 0 writes z over r, phase 1 finds (r*h) W_hn^T in the n slot), bx / bh biases
    (G*H), hp the previous h, hw / yr where the new h goes (state buffer, output row),
    cr the cell state (LSTM), sr a scratch row (LSTM_PROJ: o*tanh(c); GRU_NOLBR: r*h).
    All indices are unsigned so that Numba emits no negative-index wraparound, which
    would keep LLVM from vectorising the loops.
    """
    H1 = np.uint64(H)
    H2 = H1 + H1
    H3 = H2 + H1
    a = np.uint64(u0)
    b = np.uint64(u1)
    if code == LSTM or code == LSTM_PROJ:
        out = sr if code == LSTM_PROJ else hw
        for u in range(a, b):
            i = _sigmoid(xr[u] + gr[u] + bx[u] + bh[u])
            f = _sigmoid(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
            g = _tanh(xr[H2 + u] + gr[H2 + u] + bx[H2 + u] + bh[H2 + u])
            o = _sigmoid(xr[H3 + u] + gr[H3 + u] + bx[H3 + u] + bh[H3 + u])
            c = f * cr[u] + i * g
            cr[u] = c
            out[u] = o * _tanh(c)
    elif code == GRU_LBR:
        for u in range(a, b):
            r = _sigmoid(xr[u] + gr[u] + bx[u] + bh[u])
            z = _sigmoid(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
            n = _tanh(xr[H2 + u] + bx[H2 + u] + r * (gr[H2 + u] + bh[H2 + u]))
            hw[u] = n + z * (hp[u] - n)
    elif code == GRU_NOLBR:
        if phase == 0:
            # r*h into sr for the second GEMM; z replaces r in gr's r slot
            for u in range(a, b):
                r = _sigmoid(xr[u] + gr[u] + bx[u] + bh[u])
                z = _sigmoid(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
                sr[u] = r * hp[u]
                gr[u] = z
        else:
            # gr: z in the r slot, (r*h) W_hn^T in the n slot
            for u in range(a, b):
                z = gr[u]
                n = _tanh(xr[H2 + u] + bx[H2 + u] + gr[H2 + u] + bh[H2 + u])
                hw[u] = n + z * (hp[u] - n)
    elif code == RNN_TANH:
        for u in range(a, b):
            hw[u] = _tanh(xr[u] + gr[u] + bx[u] + bh[u])
    else:   # RNN_RELU
        zero = hw.dtype.type(0.0)
        for u in range(a, b):
            v = xr[u] + gr[u] + bx[u] + bh[u]
            hw[u] = zero if v < zero else v     # NaN stays NaN (np.maximum, torch.relu)
    if code != LSTM_PROJ and (code != GRU_NOLBR or phase == 1):
        for u in range(a, b):
            yr[u] = hw[u]


# --------------------------------------------------------------------------------------
# cell variants (rnnfast.cells.Variant; layout of `vp`: rnnfast.cells.variant_vector)
# --------------------------------------------------------------------------------------

@njit(**_JIT)
def _gates_chunk_v(code, phase, H, u0, u1, xr, gr, bx, bh, hp, hw, yr, cr, sr, vp, ph):
    """:func:`_gates_chunk` of a cell variant, in float64 (vp: the variant vector; ph:
    the direction's peepholes (3H,), i, f, o). ONNX Runtime's order: peephole terms,
    clip, activation."""
    H1 = np.uint64(H)
    H2 = H1 + H1
    H3 = H2 + H1
    ga, gaa, gab, ca, caa, cab, oa, oaa, oab, cl, cifg, peep = variant_fields(vp)
    for uu in range(u0, u1):
        u = np.uint64(uu)
        if code == LSTM or code == LSTM_PROJ:
            c0 = np.float64(cr[u])
            gi = np.float64(xr[u] + gr[u] + bx[u] + bh[u])
            gf = np.float64(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
            gg = np.float64(xr[H2 + u] + gr[H2 + u] + bx[H2 + u] + bh[H2 + u])
            go = np.float64(xr[H3 + u] + gr[H3 + u] + bx[H3 + u] + bh[H3 + u])
            if peep:
                gi += np.float64(ph[u]) * c0
                gf += np.float64(ph[H1 + u]) * c0
            i = act(ga, gaa, gab, clip(gi, cl))
            f = 1.0 - i if cifg else act(ga, gaa, gab, clip(gf, cl))
            c = f * c0 + i * act(ca, caa, cab, clip(gg, cl))
            if peep:
                go += np.float64(ph[H2 + u]) * c
            o = act(ga, gaa, gab, clip(go, cl))
            cr[u] = c
            if code == LSTM_PROJ:
                sr[u] = o * act(oa, oaa, oab, c)
            else:
                hw[u] = o * act(oa, oaa, oab, c)
        elif code == GRU_LBR:
            r = act(ga, gaa, gab, clip(np.float64(xr[u] + gr[u] + bx[u] + bh[u]), cl))
            z = act(ga, gaa, gab, clip(np.float64(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u]), cl))
            n = act(ca, caa, cab, clip(np.float64(xr[H2 + u] + bx[H2 + u]) + r * np.float64(gr[H2 + u] + bh[H2 + u]),
                                         cl))
            hw[u] = n + z * (np.float64(hp[u]) - n)
        elif code == GRU_NOLBR:
            if phase == 0:
                r = act(ga, gaa, gab, clip(np.float64(xr[u] + gr[u] + bx[u] + bh[u]), cl))
                z = act(ga, gaa, gab, clip(np.float64(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u]), cl))
                sr[u] = r * np.float64(hp[u])
                gr[u] = z
            else:
                z = np.float64(gr[u])
                n = act(ca, caa, cab, clip(np.float64(xr[H2 + u] + bx[H2 + u] + gr[H2 + u] + bh[H2 + u]), cl))
                hw[u] = n + z * (np.float64(hp[u]) - n)
        else:   # RNN: the candidate activation is its nonlinearity
            hw[u] = act(ca, caa, cab, clip(np.float64(xr[u] + gr[u] + bx[u] + bh[u]), cl))
    if code != LSTM_PROJ and (code != GRU_NOLBR or phase == 1):
        for u in range(u0, u1):
            yr[u] = hw[u]


@njit(**_JIT)
def _split(total, k, parts):
    """Start of part k when [0, total) is cut into `parts` slices of whole unit blocks."""
    nb = (total + _UNIT_BLOCK - 1) // _UNIT_BLOCK
    s = _UNIT_BLOCK * ((nb * k) // parts)
    return s if s < total else total


# --------------------------------------------------------------------------------------
# work items: (direction d, slice k of the hidden units), cpd slices per direction
# --------------------------------------------------------------------------------------

@njit(**_JIT)
def _proj_item(it, cpd, H, x, w_ih0, w_ih1, xg, ra0, rb0, ra1, rb1):
    """Input projections of packed rows [ra, rb) of the item's direction (ra0/rb0 for
    direction 0, ra1/rb1 for 1) into rows [0, rb - ra) of its xg, the item's units, all
    gates."""
    d = it // cpd
    k = it - d * cpd
    u0 = _split(H, k, cpd)
    u1 = _split(H, k + 1, cpd)
    I = x.shape[1]
    GH = xg.shape[2]
    w = w_ih0 if d == 0 else w_ih1
    ra = ra0 if d == 0 else ra1
    rb = rb0 if d == 0 else rb1
    for g in range(GH // H):
        _gemm_nt(rb - ra, u1 - u0, I, x, ra * I, I, w, (g * H + u0) * I, I, xg[d], g * H + u0, GH)


@njit(**_JIT)
def _step_item(it, cpd, code, phase, H, n0, n1, off0, off1, xo0, xo1, rd, wr, w_hh0, bx0, bh0, w_hr0,
               w_hh1, bx1, bh1, w_hr1, xg, hbuf, cst, y, hg, s2, vp, ph0, ph1):
    """One item of one step: recurrent GEMM of its units (all live rows), then their gates.
    off0/off1: the step's first packed row (of y) in each direction; xo0/xo1: its row in
    the direction's projection chunk (xg).

    phase 1 exists for LSTM_PROJ (projection GEMM, the item's slice of the P outputs)
    and GRU_NOLBR ((r*h) W_hn^T of its units, then the n gate): both need the whole
    phase-0 result of every item, hence a separate (parallel) pass.
    """
    d = it // cpd
    k = it - d * cpd
    n = n0 if d == 0 else n1
    off = off0 if d == 0 else off1
    xo = xo0 if d == 0 else xo1
    Hout = hbuf.shape[3]
    GH = hg.shape[2]
    w_hh = w_hh0 if d == 0 else w_hh1
    hgd = hg[d]
    hr = hbuf[d, rd]
    hw = hbuf[d, wr]
    s2d = s2[d]
    if code == LSTM_PROJ and phase == 1:
        p0 = _split(Hout, k, cpd)
        p1 = _split(Hout, k + 1, cpd)
        _gemm_nt(n, p1 - p0, H, s2d, 0, H, w_hr0 if d == 0 else w_hr1, p0 * H, H, hw, p0, Hout)
        for j in range(n):
            for u in range(p0, p1):
                y[off + j, d * Hout + u] = hw[j, u]
        return
    u0 = _split(H, k, cpd)
    u1 = _split(H, k + 1, cpd)
    if u0 >= u1:
        return
    if phase == 0:
        for g in range(2 if code == GRU_NOLBR else GH // H):
            _gemm_nt(n, u1 - u0, Hout, hr, 0, Hout, w_hh, (g * H + u0) * Hout, Hout,
                     hgd, g * H + u0, GH)
    else:   # GRU_NOLBR: (r*h) W_hn^T into the n slot
        _gemm_nt(n, u1 - u0, H, s2d, 0, H, w_hh, (2 * H + u0) * Hout, Hout, hgd, 2 * H + u0, GH)
    bx = bx0 if d == 0 else bx1
    bh = bh0 if d == 0 else bh1
    cd = cst[d]
    xgd = xg[d]
    if vp[0] != 0.0:
        ph = ph0 if d == 0 else ph1
        for j in range(n):
            _gates_chunk_v(code, phase, H, u0, u1, xgd[xo + j], hgd[j], bx, bh, hr[j], hw[j],
                           y[off + j, d * Hout:(d + 1) * Hout], cd[j], s2d[j], vp, ph)
        return
    for j in range(n):
        _gates_chunk(code, phase, H, u0, u1, xgd[xo + j], hgd[j], bx, bh, hr[j], hw[j],
                     y[off + j, d * Hout:(d + 1) * Hout], cd[j], s2d[j])


@njit(fastmath=FASTMATH, error_model="numpy", nogil=True, parallel=True, cache=True)
def _layer(code, x, bsz, w_ih0, w_hh0, bx0, bh0, w_hr0, w_ih1, w_hh1, bx1, bh1, w_hr1,
           ndir, rev0, xg, hbuf, cst, y, hg, s2, nthr, serial_work, vp, ph0, ph1, chunk, s_begin, s_end, base):
    """Steps [s_begin, s_end) of the layer: the input projections a chunk of `chunk` steps
    at a time, and each step (no Python in between). A call resumes where the one before
    stopped (the states live in hbuf/cst; base: each direction's first packed row in xg,
    kept between calls), so that a long layer runs in pieces with Python's signal
    handlers between them (run_layer).

    Parallel passes are ``prange`` loops over the items, one item per thread.
    """
    T = bsz.shape[0]
    Hout = hbuf.shape[3]
    H = s2.shape[2]
    GH = hg.shape[2]
    # items per direction: the threads split the hidden units (whole 16-unit blocks)
    cpd = min(max(1, nthr // ndir), (H + _UNIT_BLOCK - 1) // _UNIT_BLOCK)
    nitems = ndir * cpd
    par = nthr > 1 and nitems > 1
    one = np.int64(1)
    zero = np.int64(0)
    nphase = 2 if code == LSTM_PROJ or code == GRU_NOLBR else 1

    offs = np.zeros(T + 1, np.int64)
    for t in range(T):
        offs[t + 1] = offs[t] + bsz[t]
    # the recurrence: step s reads half s % 2 of hbuf, writes half (s + 1) % 2; before
    # each chunk of steps, the input projections of its rows (each direction its own)
    off0 = offs[T - 1 - s_begin] if rev0 else offs[s_begin]
    off1 = offs[T - 1 - s_begin]
    base0 = base[0]
    base1 = base[1]
    for s in range(s_begin, s_end):
        if s % chunk == 0:
            e = min(s + chunk, T)
            ra0, rb0 = (offs[T - e], offs[T - s]) if rev0 else (offs[s], offs[e])
            ra1, rb1 = (offs[T - e], offs[T - s]) if ndir == 2 else (zero, zero)
            base0 = ra0
            base1 = ra1
            if par and (rb0 - ra0 + rb1 - ra1) * GH * x.shape[1] >= serial_work:
                for it in prange(nitems):
                    _proj_item(np.int64(it), cpd, H, x, w_ih0, w_ih1, xg, ra0, rb0, ra1, rb1)
            else:
                for it in range(ndir):
                    _proj_item(it, one, H, x, w_ih0, w_ih1, xg, ra0, rb0, ra1, rb1)
        rd = s % 2
        wr = 1 - rd
        n0 = bsz[T - 1 - s] if rev0 else bsz[s]
        n1 = bsz[T - 1 - s] if ndir == 2 else zero
        step_par = par and (n0 + n1) * GH * Hout >= serial_work
        for phase in range(nphase):
            if step_par:
                for it in prange(nitems):
                    _step_item(np.int64(it), cpd, code, phase, H, n0, n1, off0, off1, off0 - base0,
                               off1 - base1, rd, wr,
                               w_hh0, bx0, bh0, w_hr0, w_hh1, bx1, bh1, w_hr1,
                               xg, hbuf, cst, y, hg, s2, vp, ph0, ph1)
            else:
                for it in range(ndir):
                    _step_item(it, one, code, phase, H, n0, n1, off0, off1, off0 - base0, off1 - base1, rd, wr,
                               w_hh0, bx0, bh0, w_hr0, w_hh1, bx1, bh1, w_hr1,
                               xg, hbuf, cst, y, hg, s2, vp, ph0, ph1)
        if s + 1 < T:
            if rev0:
                off0 -= bsz[T - 2 - s]
            else:
                off0 += bsz[s]
            off1 -= bsz[T - 2 - s]
    base[0] = base0
    base[1] = base1


def _readonly(a):
    v = a.view()
    v.setflags(write=False)
    return v


def run_layer(code, x, bsz, w_ih0, w_hh0, bx0, bh0, w_hr0, w_ih1, w_hh1, bx1, bh1, w_hr1,
              ndir, rev0, xg, hbuf, cst, y, hg, s2, nthreads, wpk=None, vp=None, ph0=None, ph1=None,
              chunk=0):
    """Run one layer (one or two directions) over packed rows.

    Same signature and semantics as ``rnnfast.kernels.cy_rnn.run_layer``:

    code : cell code (rnnfast.cells).
    x : (N, I) packed inputs.  bsz : (T,) int64 live rows per step, non-increasing, >= 1.
    w_ih*, w_hh*, bx*, bh*, w_hr* : direction 0 and 1 weights (direction 1 ignored when
        ndir == 1; w_hr only read for LSTM with projection).
    rev0 : direction 0 runs in reverse (direction 1 always does).
    xg : (ndir, N, G*H) scratch.  hbuf : (ndir, 2, B, Hout), both halves holding h0;
        after the call half ``L % 2`` of row j holds its final state for a forward
        direction of length L, half ``T % 2`` for a reverse one.
    cst : (ndir, B, H) c0 in, c_n out (LSTM).  y : (N, ndir*Hout) output.
    hg : (ndir, B, G*H) and s2 : (ndir, B, H) scratch.  nthreads : threads to use.
    wpk : accepted for signature parity with the Cython kernel (its packed-weight
        scratch) and ignored here.
    vp, ph0, ph1 : a cell variant (rnnfast.cells.variant_vector, float64) and each
        direction's peepholes (3H,) in the compute dtype; None: the standard cell.
    chunk : the inputs are projected this many steps at a time (<= 0 or > T: all at
        once); xg then needs min(N, chunk * B) rows.

    All float arrays share one dtype (float32 or float64) and are C-contiguous. When any
    input is read-only, all inputs are passed as read-only views (one more compiled
    specialisation per dtype, made on first use and cached on disk; the common
    all-writable call pays nothing for it). BLAS is set to one thread: the kernel's
    own threads each call it on their slice of the hidden units, as the Cython kernel
    does.
    """
    T = bsz.shape[0]
    if T == 0 or x.shape[0] == 0:
        return
    threads.set_blas_threads(1)
    ins = (x, bsz, w_ih0, w_hh0, bx0, bh0, w_hr0, w_ih1, w_hh1, bx1, bh1, w_hr1)
    for a in ins:
        if not a.flags.writeable:
            ins = tuple(_readonly(a) for a in ins)
            break
    vp = _NO_VARIANT if vp is None else _readonly(np.ascontiguousarray(vp, np.float64))
    if ph0 is None:
        ph0 = _no_peepholes(x.dtype)
    if ph1 is None:
        ph1 = ph0
    chunk = T if chunk <= 0 or chunk > T else int(chunk)
    if xg.shape[1] < min(x.shape[0], chunk * hbuf.shape[2]):
        raise ValueError(f"run_layer: xg holds {xg.shape[1]} rows, {min(x.shape[0], chunk * hbuf.shape[2])} needed")
    base = np.zeros(2, np.int64)
    # pieces of steps sized by time: Ctrl-C (Python's handler runs between two pieces)
    # stops a long call within about _PIECE_SECONDS
    step_flops = 2.0 * x.shape[0] / T * hg.shape[2] * (hbuf.shape[3] + x.shape[1]) * ndir
    with kernel_threads(nthreads) as nthr:
        for s0, s1 in interruptible_pieces(T, step_flops):
            _layer(int(code), *ins, int(ndir), bool(rev0), xg, hbuf, cst, y, hg, s2, nthr, int(_SERIAL_WORK),
                   vp, _readonly(ph0), _readonly(ph1), np.int64(chunk), np.int64(s0), np.int64(s1), base)


_NO_VARIANT = np.zeros(VARIANT_LEN)
_NO_VARIANT.setflags(write=False)


def _no_peepholes(dtype):
    return np.zeros(1, dtype)
