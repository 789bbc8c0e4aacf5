"""Numba kernels of the time-parallel recurrences: ``linear_scan``, minGRU, minLSTM.

Same contract as ``rnnfast.kernels.cy_scan`` (see its docstrings); ``rnnfast.scan``
validates and allocates everything. The algorithm is the same chunked scan (``prange``
over chunks): chunk 0 is scanned from the initial state while chunks 1..P-1 are reduced
to their pairs (A, H) = (prod a, result from a zero state); the pairs give each chunk its
carry-in; then chunks 1..P are scanned (``linear_scan``: P+1 chunks for P threads;
minGRU/minLSTM: P chunks, chunk 0 then waits, so that the projections are spread evenly).
States and carries are float64 whatever the data
type (a float32 state drifts on long runs of a ~ 1). Loops are vectorised over
features by LLVM, a row at a time.

minGRU / minLSTM: the projections of all steps are one BLAS GEMM (NumPy, BLAS with the
rnnfast thread count) before the kernel; the gate math runs inside the scan and reduce
passes (recomputed in the second pass rather than stored, so the projections are never
modified). Numba here has no SVML, so ``math.exp`` is a scalar call.

Threading: every entry sets the rnnfast thread count for its call and restores the
caller's, and the threading layer is left to the user (``numba_common``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_common import FASTMATH_ORDERED, kernel_threads

FASTMATH = FASTMATH_ORDERED         # (numba_common: no "reassoc" in a recurrence)

# Products of many |a| < 1 underflow; denormal operands are ~100x slower on x86, so a
# product below this (it scales a carry by less than 1e-180) is set to 0.
_TINY = 2.0 ** -600



def chunk_bounds(T: int, P: int, rho: float) -> np.ndarray:
    """Chunk starts (P+1,): chunk 0 has weight 1, the others `rho`."""
    tot = 1.0 + (P - 1) * rho
    b = np.empty(P + 1, np.int64)
    b[0] = 0
    for p in range(1, P):
        b[p] = min(T, int(T * (1.0 + (p - 1) * rho) / tot + 0.5))
    b[P] = T
    return b


# ------------------------------------------------------------------------------ linear_scan
@njit(cache=True, fastmath=FASTMATH)
def _scan_rows(a, b, out, h, t0, t1, rev):
    T, N = a.shape
    for s in range(t0, t1):
        t = T - 1 - s if rev else s
        for n in range(N):
            v = a[t, n] * h[n] + b[t, n]
            h[n] = v
            out[t, n] = v


@njit(cache=True, fastmath=FASTMATH)
def _reduce_rows(a, b, A, Hh, t0, t1, rev):
    T, N = a.shape
    for s in range(t0, t1):
        t = T - 1 - s if rev else s
        for n in range(N):
            av = a[t, n]
            Hh[n] = av * Hh[n] + b[t, n]
            p = A[n] * av
            A[n] = p if abs(p) >= _TINY else 0.0


@njit(cache=True, fastmath=FASTMATH)
def _scan_serial(a, b, out, h, rev):
    _scan_rows(a, b, out, h, 0, a.shape[0], rev)


def ls_bounds(T: int, P: int, rho: float) -> np.ndarray:
    """P+1 chunk starts (P+2,): chunk 0 of rho*L steps, chunks 1..P of L steps."""
    L = T / (rho + P)
    b = np.empty(P + 2, np.int64)
    b[0] = 0
    for k in range(1, P + 1):
        b[k] = min(T, int(rho * L + (k - 1) * L + 0.5))
    b[P + 1] = T
    return b


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _scan_chunks(a, b, out, h, bounds, rev):
    """P threads, P+1 chunks: chunk 0 scanned and chunks 1..P-1 reduced at once, then
    chunks 1..P scanned from their carries (see cy_scan's module docstring)."""
    P = bounds.size - 2
    N = a.shape[1]
    work = np.empty((P + 1, 3, N))
    for p in prange(P):
        if p == 0:
            _scan_rows(a, b, out, h, bounds[0], bounds[1], rev)
        else:
            work[p, 0, :] = 1.0
            work[p, 1, :] = 0.0
            _reduce_rows(a, b, work[p, 0], work[p, 1], bounds[p], bounds[p + 1], rev)
    for p in range(1, P + 1):
        for n in range(N):
            work[p, 2, n] = h[n] if p == 1 else work[p - 1, 0, n] * work[p - 1, 2, n] + work[p - 1, 1, n]
    for q in prange(P):
        p = q + 1
        _scan_rows(a, b, out, work[p, 2], bounds[p], bounds[p + 1], rev)
    for n in range(N):
        h[n] = work[P, 2, n]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _scan_columns(a, b, out, h, P, rev):
    N = a.shape[1]
    for p in prange(P):
        n0 = (N * p // P) // 8 * 8
        n1 = N if p == P - 1 else (N * (p + 1) // P) // 8 * 8
        if n1 > n0:
            _scan_rows(a[:, n0:n1], b[:, n0:n1], out[:, n0:n1], h[n0:n1], 0, a.shape[0], rev)


def linear_scan(a, b, out, carry, reverse, nthreads, rho=1.0, min_steps=256, min_work=32768):
    """h_t = a_t * h_{t-1} + b_t over the rows of a, b (T, N) into out (T, N).

    carry : (N,) float64, initial state in, final state out. reverse : from the last row down.
    nthreads : threads. rho : length of chunk 0 against the P others (P+1 chunks: chunk 0
    scanned while 1..P-1 are reduced, then 1..P scanned; rho = cost of reducing a step
    over scanning it, about 1 here). One thread when T*N < min_work (a parallel launch
    costs microseconds); with T < min_steps*nthreads the threads split the features
    instead (at least 1024 per thread), else one thread runs.
    """
    T, N = a.shape
    if T == 0 or N == 0:
        return
    with kernel_threads(nthreads) as P:
        if T * N < min_work:
            P = 1
        if P > 1 and T < min_steps * P:
            if N >= 1024 * P:      # few steps, many features: split the features instead
                _scan_columns(a, b, out, carry, P, bool(reverse))
                return
            P = 1
        if P == 1:
            _scan_serial(a, b, out, carry, bool(reverse))
        else:
            _scan_chunks(a, b, out, carry, ls_bounds(T, P, rho), bool(reverse))


# ------------------------------------------------------------------------------ minGRU / minLSTM
@njit(cache=True, fastmath=FASTMATH, inline="always")
def _gate(kind, pr, bias, u, H):
    """(a, b) of unit u from one projection row pr (pre-activations without bias)."""
    # infinite pre-activations as in IEEE arithmetic on the reference's formulas (see
    # cy_scan's RFS_GRU_COEF): z = 0 exactly where exp overflows, a = 1 there
    if kind == 0:
        v = -(np.float64(pr[u]) + bias[u])
        e = math.exp(v)
        z = 1.0 / (1.0 + e)
        return (1.0 if e == math.inf else e * z), z * (np.float64(pr[H + u]) + bias[H + u])
    vf = -(np.float64(pr[u]) + bias[u])
    vi = -(np.float64(pr[H + u]) + bias[H + u])
    m = vf if vf > vi else vi     # scale by exp(-m): no overflow, denominator >= 1
    m = m if m > 0.0 else 0.0
    e0 = math.exp(-m)
    ef = 1.0 if vf == m else math.exp(vf - m)
    ei = 1.0 if vi == m else math.exp(vi - m)
    r2 = math.nan if (m == math.inf and vf == vi) else 1.0 / (2.0 * e0 + ef + ei)
    return (e0 + ei) * r2, (e0 + ef) * r2 * (np.float64(pr[2 * H + u]) + bias[2 * H + u])


@njit(cache=True, fastmath=FASTMATH)
def _min_rows(kind, proj, bias, y, h, lens, t0, t1, H, reduce, A, Hh):
    """Steps [t0, t1): scan into y and h (reduce False) or compose onto (A, Hh)."""
    B = proj.shape[1]
    for t in range(t0, t1):
        for bb in range(B):
            if t < lens[bb]:
                pr = proj[t, bb]
                if reduce:
                    for u in range(H):
                        av, bv = _gate(kind, pr, bias, u, H)
                        Hh[bb, u] = av * Hh[bb, u] + bv
                        p = A[bb, u] * av
                        A[bb, u] = p if abs(p) >= _TINY else 0.0
                else:
                    for u in range(H):
                        av, bv = _gate(kind, pr, bias, u, H)
                        v = av * h[bb, u] + bv
                        h[bb, u] = v
                        y[t, bb, u] = v
            elif not reduce:
                for u in range(H):
                    y[t, bb, u] = 0.0


@njit(cache=True, fastmath=FASTMATH)
def _min_serial(kind, proj, bias, y, h, lens, tmax, H):
    _min_rows(kind, proj, bias, y, h, lens, 0, tmax, H, False, h, h)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _min_chunks(kind, proj, bias, y, h, lens, bounds, H):
    P = bounds.size - 1
    B = proj.shape[1]
    work = np.empty((P, 3, B, H))
    for p in prange(P):
        if p == 0:
            _min_rows(kind, proj, bias, y, h, lens, bounds[0], bounds[1], H, False, h, h)
        else:
            work[p, 0] = 1.0
            work[p, 1] = 0.0
            _min_rows(kind, proj, bias, y, h, lens, bounds[p], bounds[p + 1], H, True,
                      work[p, 0], work[p, 1])
    for p in range(1, P):
        for bb in range(B):
            for u in range(H):
                work[p, 2, bb, u] = h[bb, u] if p == 1 else \
                    work[p - 1, 0, bb, u] * work[p - 1, 2, bb, u] + work[p - 1, 1, bb, u]
    for p in prange(P):
        if p > 0:
            _min_rows(kind, proj, bias, y, work[p, 2], lens, bounds[p], bounds[p + 1], H, False,
                      work[p, 2], work[p, 2])
    if P > 1:
        for bb in range(B):
            for u in range(H):
                h[bb, u] = work[P - 1, 2, bb, u]


def minrnn_forward(kind, x, w, bias, proj, scratch, y, carry, lens, T, B, tmax, batch_first,
                   keep, do_gemm, Tsub, nthreads, rho=0.8):
    """Same contract as ``cy_scan.minrnn_forward``; proj is never modified (``keep`` and
    ``Tsub``/``scratch`` are irrelevant here). With ``do_gemm`` the projection is one
    NumPy GEMM (the caller sets the BLAS thread count)."""
    GH = w.shape[0]
    H = GH // (3 if kind else 2)
    if tmax <= 0 or B * H == 0:
        return
    if do_gemm:
        np.matmul(x, w.T, out=proj)
    if batch_first:
        p3 = proj.reshape(B, T, GH).transpose(1, 0, 2)
        y3 = y.reshape(B, T, H).transpose(1, 0, 2)
    else:
        p3 = proj.reshape(T, B, GH)
        y3 = y.reshape(T, B, H)
    h = carry.reshape(B, H)
    b64 = np.ascontiguousarray(bias, np.float64)
    with kernel_threads(nthreads) as P:
        P = min(P, int(tmax))
        if P == 1:
            _min_serial(int(kind), p3, b64, y3, h, lens, int(tmax), H)
        else:
            _min_chunks(int(kind), p3, b64, y3, h, lens, chunk_bounds(int(tmax), P, rho), H)
