"""Numba kernels for one layer of LSTM / GRU / RNN, both directions at once.

Same contract as ``rnnfast.kernels.cy_rnn.run_layer`` (see its docstring): packed
rows, step-major; ``rnnfast._engine._run_packed`` validates and allocates everything.

Structure of one call (all inside one jitted function, no Python per step):

1. input projection of every step, one BLAS GEMM per direction into ``xg[d]``;
2. for each step s: the recurrent GEMM of each direction (BLAS, into ``hg``), then ONE
   fused gate kernel over (direction, row, slice of hidden units), a ``prange`` when
   there is enough work, a plain loop otherwise (a parallel launch costs a few
   microseconds, more than the gate math of a batch-1 step). GRU with
   ``linear_before_reset=False`` needs two GEMMs and two gate passes per step, LSTM with
   projection an extra GEMM with ``w_hr``.

The previous state is read from half ``s % 2`` of the ping-pong buffer ``hbuf`` and the
new one written to half ``(s + 1) % 2`` (rows [0, n) only), the convention the engine
relies on to read the final states.

Transcendentals: this Numba has no SVML, so ``math.exp`` in a loop is a scalar libm
call that LLVM cannot vectorise. float32 uses the Cephes single-precision ``expf`` /
``tanhf`` polynomials written out here (about 1-2 ulp, vectorised by LLVM); float64
uses ``math.exp`` / ``math.tanh``. The equations are those of ``rnnfast/cells.py``.

Threading: the module selects Numba's thread-safe threading layer at import (OpenMP or
TBB; the default workqueue layer is not safe for calls from several Python threads)
unless ``NUMBA_THREADING_LAYER`` is set, and ``run_layer`` applies the thread count at
every entry (Numba's count is per calling thread).
"""
from __future__ import annotations

import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "threadsafe"

# Flags of every kernel loop. Never "nnan"/"ninf": padded or saturated values must
# stay IEEE (exp overflow to inf gives sigmoid 0, not garbage).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# The polynomial approximations below rely on the exact order of their operations
# (Cody-Waite range reduction): only contraction into FMAs is allowed there.
_STRICT = {"contract"}

# Cell codes: keep in step with rnnfast/cells.py.
LSTM, LSTM_PROJ, GRU_LBR, GRU_NOLBR, RNN_TANH, RNN_RELU = range(6)

_UNIT_BLOCK = 16        # hidden-unit slices are multiples of this (one AVX-512 vector)
_SERIAL_WORK = 4096     # below this many gate elements per step the gate pass runs serially


# --------------------------------------------------------------------------------------
# float32 exp / tanh / sigmoid that LLVM can vectorise (Cephes expf, tanhf)
# --------------------------------------------------------------------------------------

@intrinsic
def _bits_as_f32(typingctx, v):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        val = args[0]
        if v.bitwidth > 32:
            val = builder.trunc(val, ir.IntType(32))
        return builder.bitcast(val, ir.FloatType())
    return types.float32(v), codegen


@njit(fastmath=_STRICT, error_model="numpy", cache=True)
def _expf(x):
    """exp of a float32, Cephes expf: |rel err| ~ 1 ulp; clamps to the normal range."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.3))
    fx = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    x = x - fx * np.float32(0.693359375)
    x = x - fx * np.float32(-2.12194440e-4)
    z = x * x
    p = np.float32(1.9875691500e-4)
    p = p * x + np.float32(1.3981999507e-3)
    p = p * x + np.float32(8.3334519073e-3)
    p = p * x + np.float32(4.1665795894e-2)
    p = p * x + np.float32(1.6666665459e-1)
    p = p * x + np.float32(5.0000001201e-1)
    p = p * z + x + np.float32(1.0)
    return p * _bits_as_f32((np.int64(fx) + 127) << 23)


@njit(fastmath=_STRICT, error_model="numpy", cache=True)
def _sigmoid_f32(x):
    return np.float32(1.0) / (np.float32(1.0) + _expf(-x))


@njit(fastmath=_STRICT, error_model="numpy", cache=True)
def _tanh_f32(x):
    """Cephes tanhf: odd polynomial below 0.625, 1 - 2/(exp(2|x|)+1) above."""
    a = min(abs(x), np.float32(9.0))
    z = x * x
    small = ((((np.float32(-5.70498872745e-3) * z + np.float32(2.06390887954e-2)) * z
               - np.float32(5.37397155531e-2)) * z + np.float32(1.33314422036e-1)) * z
             - np.float32(3.33332819422e-1)) * z * x + x
    big = np.float32(1.0) - np.float32(2.0) / (_expf(a + a) + np.float32(1.0))
    big = big if x >= np.float32(0.0) else -big
    return small if a < np.float32(0.625) else big


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _sigmoid_f64(x):
    return 1.0 / (1.0 + math.exp(-x))


def _sigmoid(x):    # pragma: no cover - typed stub, see the overload
    raise NotImplementedError


def _tanh(x):       # pragma: no cover - typed stub, see the overload
    raise NotImplementedError


@overload(_sigmoid)
def _ol_sigmoid(x):
    if x == types.float32:
        return lambda x: _sigmoid_f32(x)
    return lambda x: _sigmoid_f64(x)


@overload(_tanh)
def _ol_tanh(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: math.tanh(x)


# --------------------------------------------------------------------------------------
# fused gate math of one (direction, row, unit slice) chunk
# --------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _gates_chunk(code, phase, H, u0, u1, xr, gr, bx, bh, hp, hw, yr, cr, sr):
    """Gate math of one row, hidden units [u0, u1).

    Row views: xr input projections (G*H), gr recurrent projections (G*H; for GRU_NOLBR
    phase 0 the r,z part (2H), phase 1 the n part (H)), bx / bh biases (G*H), hp the
    previous h, hw / yr where the new h goes (state buffer, output row), cr the cell
    state (LSTM), sr a scratch row (LSTM_PROJ: o*tanh(c); GRU_NOLBR: r*h).
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
            # gr: the z row (z in the r slot); sr: the (r*h) W_hn^T row
            for u in range(a, b):
                z = gr[u]
                n = _tanh(xr[H2 + u] + bx[H2 + u] + sr[u] + bh[H2 + u])
                hw[u] = n + z * (hp[u] - n)
    elif code == RNN_TANH:
        for u in range(a, b):
            hw[u] = _tanh(xr[u] + gr[u] + bx[u] + bh[u])
    else:   # RNN_RELU
        for u in range(a, b):
            v = xr[u] + gr[u] + bx[u] + bh[u]
            hw[u] = max(v, v - v)
    if code != LSTM_PROJ and (code != GRU_NOLBR or phase == 1):
        for u in range(a, b):
            yr[u] = hw[u]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _split(total, k, parts):
    """Start of part k when [0, total) is cut into `parts` slices of whole unit blocks."""
    nb = (total + _UNIT_BLOCK - 1) // _UNIT_BLOCK
    s = _UNIT_BLOCK * ((nb * k) // parts)
    return s if s < total else total


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _chunk(c, code, phase, H, Hout, cpr, nc0, off0, off1, rd, wr,
           xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y):
    """Chunk c of one step's gate pass: (direction, row j, slice k of the hidden units)."""
    c = np.int64(c)     # a prange index is unsigned
    if c < nc0:
        d = 0
        cc = c
        off = off0
        rec = rec0
        aux = aux0
        bx = bx0
        bh = bh0
    else:
        d = 1
        cc = c - nc0
        off = off1
        rec = rec1
        aux = aux1
        bx = bx1
        bh = bh1
    j = cc // cpr
    k = cc - j * cpr
    u0 = _split(H, k, cpr)
    u1 = _split(H, k + 1, cpr)
    _gates_chunk(code, phase, H, u0, u1, xg[d, off + j], rec[j], bx, bh, hbuf[d, rd, j],
                 hbuf[d, wr, j], y[off + j, d * Hout:(d + 1) * Hout], cst[d, j], aux[j])


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def _gate_pass_par(nchunks, code, phase, H, Hout, cpr, nc0, off0, off1, rd, wr,
                   xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y):
    for c in prange(nchunks):
        _chunk(c, code, phase, H, Hout, cpr, nc0, off0, off1, rd, wr,
               xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _gate_pass(nthr, n0, n1, code, phase, H, Hout, off0, off1, rd, wr,
               xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y):
    """One gate pass of one step over both directions (n0, n1 live rows)."""
    G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    rows = n0 + n1
    if nthr > 1 and rows * H * G >= _SERIAL_WORK:
        nb = (H + _UNIT_BLOCK - 1) // _UNIT_BLOCK
        cpr = min(nb, max(1, (4 * nthr + rows - 1) // rows))
        _gate_pass_par((n0 + n1) * cpr, code, phase, H, Hout, cpr, n0 * cpr, off0, off1, rd, wr,
                       xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y)
    else:
        for c in range(n0 + n1):
            _chunk(c, code, phase, H, Hout, 1, n0, off0, off1, rd, wr,
                   xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _rec_views(code, hg, s2, d, n, H):
    """Contiguous (n, .) views for the recurrent projections (rec, rec2) and scratch (aux)."""
    if code == GRU_NOLBR:
        flat = hg[d].reshape(hg.shape[1] * hg.shape[2])
        rec = flat[:n * 2 * H].reshape((n, 2 * H))           # r, z projections
        rec2 = flat[n * 2 * H:n * 3 * H].reshape((n, H))      # (r*h) W_hn^T
    else:
        rec = hg[d, :n]
        rec2 = rec
    return rec, rec2, s2[d, :n]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _layer(code, x, bsz, w_ih0, w_hh0, bx0, bh0, w_hr0, w_ih1, w_hh1, bx1, bh1, w_hr1,
           ndir, rev0, xg, hbuf, cst, y, hg, s2):
    T = bsz.shape[0]
    N = x.shape[0]
    Hout = hbuf.shape[3]
    H = s2.shape[2]
    nthr = numba.get_num_threads()

    # 1. input projections of every step, one GEMM per direction
    np.dot(x, w_ih0.T, xg[0])
    if ndir == 2:
        np.dot(x, w_ih1.T, xg[1])

    # 2. the recurrence
    off0 = N - bsz[T - 1] if rev0 else 0
    off1 = N - bsz[T - 1]
    for s in range(T):
        rd = s % 2
        wr = 1 - rd
        n0 = bsz[T - 1 - s] if rev0 else bsz[s]
        n1 = bsz[T - 1 - s] if ndir == 2 else 0
        rec0, recb0, aux0 = _rec_views(code, hg, s2, 0, n0, H)
        rec1, recb1, aux1 = _rec_views(code, hg, s2, ndir - 1, n1, H)
        if code == GRU_NOLBR:
            np.dot(hbuf[0, rd, :n0], w_hh0[:2 * H].T, rec0)
            if ndir == 2:
                np.dot(hbuf[1, rd, :n1], w_hh1[:2 * H].T, rec1)
            _gate_pass(nthr, n0, n1, code, 0, H, Hout, off0, off1, rd, wr,
                       xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y)
            np.dot(aux0, w_hh0[2 * H:].T, recb0)
            if ndir == 2:
                np.dot(aux1, w_hh1[2 * H:].T, recb1)
            _gate_pass(nthr, n0, n1, code, 1, H, Hout, off0, off1, rd, wr,
                       xg, rec0, rec1, recb0, recb1, bx0, bh0, bx1, bh1, hbuf, cst, y)
        else:
            np.dot(hbuf[0, rd, :n0], w_hh0.T, rec0)
            if ndir == 2:
                np.dot(hbuf[1, rd, :n1], w_hh1.T, rec1)
            _gate_pass(nthr, n0, n1, code, 0, H, Hout, off0, off1, rd, wr,
                       xg, rec0, rec1, aux0, aux1, bx0, bh0, bx1, bh1, hbuf, cst, y)
            if code == LSTM_PROJ:
                np.dot(aux0, w_hr0.T, hbuf[0, wr, :n0])
                y[off0:off0 + n0, 0:Hout] = hbuf[0, wr, :n0]
                if ndir == 2:
                    np.dot(aux1, w_hr1.T, hbuf[1, wr, :n1])
                    y[off1:off1 + n1, Hout:2 * Hout] = hbuf[1, wr, :n1]
        # advance the row offsets
        if s + 1 < T:
            if rev0:
                off0 -= bsz[T - 2 - s]
            else:
                off0 += bsz[s]
            off1 -= bsz[T - 2 - s]


def _readonly(a):
    v = a.view()
    v.flags.writeable = False
    return v


def run_layer(code, x, bsz, w_ih0, w_hh0, bx0, bh0, w_hr0, w_ih1, w_hh1, bx1, bh1, w_hr1,
              ndir, rev0, xg, hbuf, cst, y, hg, s2, nthreads, wpk=None):
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

    All float arrays share one dtype (float32 or float64) and are C-contiguous. The
    read-only inputs are passed on as read-only views, so that writable and read-only
    callers share one compiled specialisation per dtype.
    """
    T = bsz.shape[0]
    if T == 0 or x.shape[0] == 0:
        return
    numba.set_num_threads(max(1, min(int(nthreads), numba.config.NUMBA_NUM_THREADS)))
    _layer(int(code), _readonly(x), _readonly(bsz),
           _readonly(w_ih0), _readonly(w_hh0), _readonly(bx0), _readonly(bh0), _readonly(w_hr0),
           _readonly(w_ih1), _readonly(w_hh1), _readonly(bx1), _readonly(bh1), _readonly(w_hr1),
           int(ndir), bool(rev0), xg, hbuf, cst, y, hg, s2)
