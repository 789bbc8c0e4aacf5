"""Numba training kernels: the recurrences of the forward pass that keeps its activations
and of backpropagation through time, for one layer (one or two directions).

Same contract as ``rnnfast.kernels.cy_train`` (``forward_layer`` / ``backward_layer``;
see their docstrings there): packed rows, step-major, prepared and allocated by
``rnnfast.training``; the weight gradients are large GEMMs done there afterwards.

One jitted function per call; each step is

1. the recurrent GEMM of each direction (``np.dot``, single-threaded BLAS; when the
   product is large, a ``prange`` over row blocks, one BLAS call each, so that BLAS's own
   threads never alternate with Numba's on the same cores); the previous states are first
   gathered into a contiguous (n, H_out) block (B*H_out values) from the saved outputs or
   the initial state;
2. one fused pass of gate math (forward) or gate gradients (backward) over
   (direction, row, slice of hidden units): a ``prange`` when there is enough work, a
   plain loop otherwise (a parallel launch costs a few microseconds);
3. backward only: dh_prev = dG_t W_hh (``np.dot``), and the dy of the next step added.

Cell variants (rnnfast.cells.Variant: ``vp``, ``ph0``/``ph1``, ``dv``) take
``_fwd_chunk_v`` / ``_bwd_chunk_v``, in float64: the forward saves each gate's derivative
in ``dv`` beside the gate, the backward reads it.

Transcendentals are ``math.exp`` / ``math.tanh`` in the data's precision (this Numba
has no SVML, so they are scalar libm calls). Threading: every entry sets the
thread count for its call and restores the caller's, and the threading layer is left to
the user (``numba_common``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..cells import GRU_LBR, GRU_NOLBR, LSTM, LSTM_PROJ, RNN_TANH, VARIANT_LEN
from .numba_common import FASTMATH, act, clip, dact, dclip, interruptible_pieces, kernel_threads, variant_fields

_UNIT_BLOCK = 16
FUSED_BIAS_GRADS = False
# Below this many gate values per step (rows * G * H) a pass runs on the calling thread.
# Read at every call (tests set it to 0 to exercise the parallel pass on small shapes).
_SERIAL_WORK = 1 << 16


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _split(total, k, parts):
    nb = (total + _UNIT_BLOCK - 1) // _UNIT_BLOCK
    s = _UNIT_BLOCK * ((nb * k) // parts)
    return s if s < total else total


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def _pdot_par(a, b, out, nchunks):
    """out = a @ b with the rows of a split over threads (single-threaded BLAS each)."""
    n = a.shape[0]
    for c in prange(nchunks):
        r0 = (n * c) // nchunks
        r1 = (n * (c + 1)) // nchunks
        if r1 > r0:
            np.dot(a[r0:r1], b, out[r0:r1])


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _item(c, n0, cpr):
    """(direction, row, unit slice) of work item c of a parallel pass: n0 rows of
    direction 0 first, cpr slices a row."""
    d = 0 if c < n0 * cpr else 1
    cc = c - d * n0 * cpr
    j = cc // cpr
    return d, j, cc - j * cpr


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _dot(a, b, out, nthr, serial_work):
    """out = a @ b: BLAS on one thread, or split by rows when the product is large."""
    n = a.shape[0]
    if nthr > 1 and n >= 16 * nthr and n * a.shape[1] * b.shape[1] >= 32 * serial_work:
        _pdot_par(a, b, out, nthr)
    else:
        np.dot(a, b, out)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _step_info(s, T, d, rev0, bsz, offs, info):
    """info[d] = (t, off, n, nc, off_prev, t_next) of step s of direction d."""
    rev = rev0 if d == 0 else True
    t = T - 1 - s if rev else s
    n = bsz[t]
    if rev:
        tp = t + 1
        nc = bsz[tp] if tp < T else 0
    else:
        tp = t - 1
        nc = n if t > 0 else 0
    info[d, 0] = t
    info[d, 1] = offs[t]
    info[d, 2] = n
    info[d, 3] = nc
    info[d, 4] = offs[tp] if nc > 0 else 0
    info[d, 5] = tp


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _gather_prev(d, n, nc, offp, Hout, y, h0, hp):
    """hp[d, :n] = previous states: saved outputs for rows < nc, initial state after."""
    c0 = d * Hout
    for j in range(n):
        if j < nc:
            for u in range(Hout):
                hp[d, j, u] = y[offp + j, c0 + u]
        else:
            for u in range(Hout):
                hp[d, j, u] = h0[d, j, u]


# ------------------------------------------------------------------------------ forward
@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _fwd_chunk(code, phase, H, Hout, d, j, u0, u1, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
               hp, y, cb, c0, s2, one):
    off = info[d, 1]
    nc = info[d, 3]
    offp = info[d, 4]
    bx = bx0 if d == 0 else bx1
    bh = bh0 if d == 0 else bh1
    xr = xg[d, off + j]
    gr = hg[d, j]
    H1 = np.uint64(H)
    H2 = H1 + H1
    H3 = H2 + H1
    a = np.uint64(u0)
    b = np.uint64(u1)
    yo = np.uint64(d * Hout)
    yr = y[off + j]
    pr = hp[d, j]
    if code == LSTM or code == LSTM_PROJ:
        cp = cb[d, offp + j] if j < nc else c0[d, j]
        cr = cb[d, off + j]
        sr = s2[d, j]
        for u in range(a, b):
            i = one / (one + math.exp(-(xr[u] + gr[u] + bx[u] + bh[u])))
            f = one / (one + math.exp(-(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])))
            g = math.tanh(xr[H2 + u] + gr[H2 + u] + bx[H2 + u] + bh[H2 + u])
            o = one / (one + math.exp(-(xr[H3 + u] + gr[H3 + u] + bx[H3 + u] + bh[H3 + u])))
            c = f * cp[u] + i * g
            xr[u] = i
            xr[H1 + u] = f
            xr[H2 + u] = g
            xr[H3 + u] = o
            cr[u] = c
            h = o * math.tanh(c)
            if code == LSTM:
                yr[yo + u] = h
            else:
                sr[u] = h
    elif code == GRU_LBR:
        for u in range(a, b):
            r = one / (one + math.exp(-(xr[u] + gr[u] + bx[u] + bh[u])))
            z = one / (one + math.exp(-(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])))
            hn = gr[H2 + u] + bh[H2 + u]
            n = math.tanh(xr[H2 + u] + bx[H2 + u] + r * hn)
            xr[u] = r
            xr[H1 + u] = z
            xr[H2 + u] = n
            xr[H3 + u] = hn
            yr[yo + u] = n + z * (pr[u] - n)
    elif code == GRU_NOLBR:
        sr = s2[d, j]
        if phase == 0:
            for u in range(a, b):
                r = one / (one + math.exp(-(xr[u] + gr[u] + bx[u] + bh[u])))
                z = one / (one + math.exp(-(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])))
                xr[u] = r
                xr[H1 + u] = z
                sr[u] = r * pr[u]
        else:
            nr = hn2[d, j]
            for u in range(a, b):
                z = xr[H1 + u]
                n = math.tanh(xr[H2 + u] + bx[H2 + u] + nr[u] + bh[H2 + u])
                xr[H2 + u] = n
                yr[yo + u] = n + z * (pr[u] - n)
    elif code == RNN_TANH:
        for u in range(a, b):
            yr[yo + u] = math.tanh(xr[u] + gr[u] + bx[u] + bh[u])
    else:
        for u in range(a, b):
            v = xr[u] + gr[u] + bx[u] + bh[u]
            yr[yo + u] = max(v, v - v)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _fwd_chunk_v(code, phase, H, Hout, d, j, u0, u1, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                 hp, y, cb, c0, s2, vp, ph0, ph1, dv):
    """:func:`_fwd_chunk` of a cell variant (vp: rnnfast.cells.variant_vector; ph0/ph1 the
    directions' peepholes (3H,), i, f, o), in float64 as the inference kernels: the
    post-activation gates are saved as for the standard cells, and beside them in `dv`
    each gate's derivative (the activation's at the clipped pre-activation, times the
    clip's), which the backward cannot recover from the gate for every activation."""
    off = info[d, 1]
    nc = info[d, 3]
    offp = info[d, 4]
    bx = bx0 if d == 0 else bx1
    bh = bh0 if d == 0 else bh1
    ph = ph0 if d == 0 else ph1
    xr = xg[d, off + j]
    gr = hg[d, j]
    dvr = dv[d, off + j]
    H1 = np.uint64(H)
    H2 = H1 + H1
    H3 = H2 + H1
    yo = np.uint64(d * Hout)
    yr = y[off + j]
    pr = hp[d, j]
    ga, gaa, gab, ca, caa, cab, oa, oaa, oab, cl, cifg, peep = variant_fields(vp)
    if code == LSTM or code == LSTM_PROJ:
        cp = cb[d, offp + j] if j < nc else c0[d, j]
        cr = cb[d, off + j]
        sr = s2[d, j]
        for uu in range(u0, u1):
            u = np.uint64(uu)
            cpu = np.float64(cp[u])
            ai = np.float64(xr[u] + gr[u] + bx[u] + bh[u])
            af = np.float64(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
            ag = np.float64(xr[H2 + u] + gr[H2 + u] + bx[H2 + u] + bh[H2 + u])
            ao = np.float64(xr[H3 + u] + gr[H3 + u] + bx[H3 + u] + bh[H3 + u])
            if peep:
                ai += ph[u] * cpu
                af += ph[H1 + u] * cpu
            i = act(ga, gaa, gab, clip(ai, cl))
            di = dact(ga, gaa, gab, clip(ai, cl)) * dclip(ai, cl)
            if cifg:
                f = 1.0 - i
                df = 0.0
            else:
                f = act(ga, gaa, gab, clip(af, cl))
                df = dact(ga, gaa, gab, clip(af, cl)) * dclip(af, cl)
            g = act(ca, caa, cab, clip(ag, cl))
            dgg = dact(ca, caa, cab, clip(ag, cl)) * dclip(ag, cl)
            c = f * cpu + i * g
            if peep:
                ao += ph[H2 + u] * c
            o = act(ga, gaa, gab, clip(ao, cl))
            do = dact(ga, gaa, gab, clip(ao, cl)) * dclip(ao, cl)
            xr[u] = i
            xr[H1 + u] = f
            xr[H2 + u] = g
            xr[H3 + u] = o
            dvr[u] = di
            dvr[H1 + u] = df
            dvr[H2 + u] = dgg
            dvr[H3 + u] = do
            cr[u] = c
            h = o * act(oa, oaa, oab, c)
            if code == LSTM:
                yr[yo + u] = h
            else:
                sr[u] = h
    elif code == GRU_LBR:
        for uu in range(u0, u1):
            u = np.uint64(uu)
            ar = np.float64(xr[u] + gr[u] + bx[u] + bh[u])
            az = np.float64(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
            r = act(ga, gaa, gab, clip(ar, cl))
            z = act(ga, gaa, gab, clip(az, cl))
            hn = np.float64(gr[H2 + u] + bh[H2 + u])
            an = np.float64(xr[H2 + u] + bx[H2 + u]) + r * hn
            n = act(ca, caa, cab, clip(an, cl))
            dvr[u] = dact(ga, gaa, gab, clip(ar, cl)) * dclip(ar, cl)
            dvr[H1 + u] = dact(ga, gaa, gab, clip(az, cl)) * dclip(az, cl)
            dvr[H2 + u] = dact(ca, caa, cab, clip(an, cl)) * dclip(an, cl)
            xr[u] = r
            xr[H1 + u] = z
            xr[H2 + u] = n
            xr[H3 + u] = hn
            yr[yo + u] = (1.0 - z) * n + z * pr[u]
    elif code == GRU_NOLBR:
        sr = s2[d, j]
        if phase == 0:
            for uu in range(u0, u1):
                u = np.uint64(uu)
                ar = np.float64(xr[u] + gr[u] + bx[u] + bh[u])
                az = np.float64(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])
                r = act(ga, gaa, gab, clip(ar, cl))
                z = act(ga, gaa, gab, clip(az, cl))
                dvr[u] = dact(ga, gaa, gab, clip(ar, cl)) * dclip(ar, cl)
                dvr[H1 + u] = dact(ga, gaa, gab, clip(az, cl)) * dclip(az, cl)
                xr[u] = r
                xr[H1 + u] = z
                sr[u] = r * pr[u]
        else:
            nr = hn2[d, j]
            for uu in range(u0, u1):
                u = np.uint64(uu)
                z = np.float64(xr[H1 + u])
                an = np.float64(xr[H2 + u] + bx[H2 + u] + nr[u] + bh[H2 + u])
                n = act(ca, caa, cab, clip(an, cl))
                dvr[H2 + u] = dact(ca, caa, cab, clip(an, cl)) * dclip(an, cl)
                xr[H2 + u] = n
                yr[yo + u] = (1.0 - z) * n + z * pr[u]
    else:
        for uu in range(u0, u1):
            u = np.uint64(uu)
            a = np.float64(xr[u] + gr[u] + bx[u] + bh[u])
            dvr[u] = dact(ca, caa, cab, clip(a, cl)) * dclip(a, cl)
            yr[yo + u] = act(ca, caa, cab, clip(a, cl))


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def _fwd_pass_par(nchunks, n0, cpr, code, phase, H, Hout, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                  hp, y, cb, c0, s2, one, vp, ph0, ph1, dv):
    for c in prange(nchunks):
        d, j, k = _item(c, n0, cpr)
        if vp[0] != 0.0:
            _fwd_chunk_v(code, phase, H, Hout, d, j, _split(H, k, cpr), _split(H, k + 1, cpr), info, xg, hg,
                         hn2, bx0, bh0, bx1, bh1, hp, y, cb, c0, s2, vp, ph0, ph1, dv)
        else:
            _fwd_chunk(code, phase, H, Hout, d, j, _split(H, k, cpr), _split(H, k + 1, cpr), info, xg, hg, hn2,
                       bx0, bh0, bx1, bh1, hp, y, cb, c0, s2, one)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _fwd_pass(nthr, serial_work, ndir, G, code, phase, H, Hout, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
              hp, y, cb, c0, s2, one, vp, ph0, ph1, dv):
    n0 = info[0, 2]
    rows = n0 + (info[1, 2] if ndir == 2 else 0)
    if nthr > 1 and rows * G * H >= serial_work:
        nb = (H + _UNIT_BLOCK - 1) // _UNIT_BLOCK
        cpr = min(nb, max(1, (4 * nthr + rows - 1) // rows))
        _fwd_pass_par(rows * cpr, n0, cpr, code, phase, H, Hout, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                      hp, y, cb, c0, s2, one, vp, ph0, ph1, dv)
    else:
        for c in range(rows):
            d = 0 if c < n0 else 1
            if vp[0] != 0.0:
                _fwd_chunk_v(code, phase, H, Hout, d, c - d * n0, 0, H, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                             hp, y, cb, c0, s2, vp, ph0, ph1, dv)
            else:
                _fwd_chunk(code, phase, H, Hout, d, c - d * n0, 0, H, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                           hp, y, cb, c0, s2, one)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _fwd(code, bsz, offs, ndir, rev0, xg, w_hh0, bx0, bh0, w_hr0, w_hh1, bx1, bh1, w_hr1,
         h0, c0, y, cb, hg, hn2, s2, hp, pt, nthr, serial_work, one, vp, ph0, ph1, dv, s_begin, s_end):
    """Steps [s_begin, s_end) of the forward (the state of a step is in y/cb: a call
    resumes where the one before stopped)."""
    T = bsz.shape[0]
    Hout = h0.shape[2]
    H = s2.shape[2]
    G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    info = np.zeros((2, 6), np.int64)
    for s in range(s_begin, s_end):
        for d in range(ndir):
            _step_info(s, T, d, rev0, bsz, offs, info)
            n = info[d, 2]
            _gather_prev(d, n, info[d, 3], info[d, 4], Hout, y, h0, hp)
            w_hh = w_hh0 if d == 0 else w_hh1
            if code == GRU_NOLBR:
                _dot(hp[d, :n], w_hh[:2 * H].T, hg[d, :n], nthr, serial_work)
            else:
                _dot(hp[d, :n], w_hh.T, hg[d, :n], nthr, serial_work)
        _fwd_pass(nthr, serial_work, ndir, G, code, 0, H, Hout, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                  hp, y, cb, c0, s2, one, vp, ph0, ph1, dv)
        if code == LSTM_PROJ:
            for d in range(ndir):
                n = info[d, 2]
                off = info[d, 1]
                _dot(s2[d, :n], (w_hr0 if d == 0 else w_hr1).T, pt[d, :n], nthr, serial_work)
                for j in range(n):
                    for p in range(Hout):
                        y[off + j, d * Hout + p] = pt[d, j, p]
        elif code == GRU_NOLBR:
            for d in range(ndir):
                n = info[d, 2]
                _dot(s2[d, :n], (w_hh0 if d == 0 else w_hh1)[2 * H:].T, hn2[d, :n], nthr, serial_work)
            _fwd_pass(nthr, serial_work, ndir, G, code, 1, H, Hout, info, xg, hg, hn2, bx0, bh0, bx1, bh1,
                      hp, y, cb, c0, s2, one, vp, ph0, ph1, dv)


def _readonly(a):
    v = a.view()
    v.flags.writeable = False
    return v


def _variant_args(vp, ph0, ph1, dv, dt):
    """The variant arguments as the jitted functions take them: a zero vector (and empty
    arrays) for the standard cell."""
    empty = _readonly(np.zeros(1, dt))
    if vp is None or vp[0] == 0.0:
        return _readonly(np.zeros(VARIANT_LEN)), empty, empty, np.zeros((1, 1, 1), dt)
    return (_readonly(np.ascontiguousarray(vp, np.float64)), empty if ph0 is None else _readonly(ph0),
            empty if ph1 is None else _readonly(ph1), dv)


def _step_flops(rows, h0, ndir, T) -> float:
    """Flops of an average step's recurrent products: 2 x (N/T rows) x G*H x H_out a direction."""
    return 2.0 * rows.shape[1] / max(T, 1) * rows.shape[2] * h0.shape[2] * ndir


def forward_layer(code, bsz, offs, ndir, rev0, xg, w_hh0, bx0, bh0, w_hr0, w_hh1, bx1, bh1, w_hr1,
                  h0, c0, y, cb, hg, s2, wpk, nthreads, vp=None, ph0=None, ph1=None, dv=None):
    """Same contract as ``rnnfast.kernels.cy_train.forward_layer`` (``wpk`` is ignored)."""
    T = bsz.shape[0]
    if T == 0 or xg.shape[1] == 0:
        return
    dt = xg.dtype
    B, Hout = h0.shape[1], h0.shape[2]
    H = s2.shape[2]
    code = int(code)
    hg_w = 2 * H if code == GRU_NOLBR else hg.shape[2]
    hgc = np.empty((ndir, B, hg_w), dt)
    hn2 = np.empty((ndir, B, H), dt) if code == GRU_NOLBR else np.empty((ndir, 1, 1), dt)
    hp = np.empty((ndir, B, Hout), dt)
    pt = np.empty((ndir, B, Hout), dt) if code == LSTM_PROJ else np.empty((ndir, 1, 1), dt)
    va = _variant_args(vp, ph0, ph1, dv, dt)
    with kernel_threads(nthreads) as nthr:
        for s0, s1 in interruptible_pieces(T, _step_flops(xg, h0, ndir, T)):
            _fwd(code, _readonly(bsz), _readonly(offs), int(ndir), bool(rev0), xg,
                 _readonly(w_hh0), _readonly(bx0), _readonly(bh0), _readonly(w_hr0),
                 _readonly(w_hh1), _readonly(bx1), _readonly(bh1), _readonly(w_hr1),
                 _readonly(h0), _readonly(c0), y, cb, hgc, hn2, s2, hp, pt, nthr, int(_SERIAL_WORK), dt.type(1.0),
                 *va, np.int64(s0), np.int64(s1))


# ------------------------------------------------------------------------------ backward
@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _bwd_chunk(code, phase, H, Hout, d, j, u0, u1, info, xg, cb, y, c0, dh, dc, dg, aux, scr, hp,
               gh, gn, one):
    off = info[d, 1]
    nc = info[d, 3]
    offp = info[d, 4]
    H1 = np.uint64(H)
    H2 = H1 + H1
    H3 = H2 + H1
    a = np.uint64(u0)
    b = np.uint64(u1)
    dgr = dg[d, off + j]
    dhr = dh[d, j]
    if code == LSTM or code == LSTM_PROJ:
        xr = xg[d, off + j]
        cr = cb[d, off + j]
        cp = cb[d, offp + j] if j < nc else c0[d, j]
        dcr = dc[d, j]
        dm = scr[d, j] if code == LSTM_PROJ else dhr
        mr = aux[d, off + j]
        for u in range(a, b):
            i = xr[u]
            f = xr[H1 + u]
            g = xr[H2 + u]
            o = xr[H3 + u]
            tc = math.tanh(cr[u])
            dv = dm[u]
            dct = dcr[u] + dv * o * (one - tc * tc)
            dgr[u] = dct * g * i * (one - i)
            dgr[H1 + u] = dct * cp[u] * f * (one - f)
            dgr[H2 + u] = dct * i * (one - g * g)
            dgr[H3 + u] = dv * tc * o * (one - o)
            dcr[u] = dct * f
            if code == LSTM_PROJ:
                mr[u] = o * tc
    elif code == GRU_LBR:
        xr = xg[d, off + j]
        pr = hp[d, j]
        ghr = gh[d, j]
        for u in range(a, b):
            r = xr[u]
            z = xr[H1 + u]
            n = xr[H2 + u]
            hn = xr[H3 + u]
            dv = dhr[u]
            dn = dv * (one - z) * (one - n * n)
            dr = dn * hn * r * (one - r)
            dz = dv * (pr[u] - n) * z * (one - z)
            dgr[u] = dr
            dgr[H1 + u] = dz
            dgr[H2 + u] = dn
            dgr[H3 + u] = dn * r
            ghr[u] = dr
            ghr[H1 + u] = dz
            ghr[H2 + u] = dn * r
            dhr[u] = dv * z
    elif code == GRU_NOLBR:
        xr = xg[d, off + j]
        pr = hp[d, j]
        ghr = gh[d, j]
        if phase == 0:
            gnr = gn[d, j]
            rr = aux[d, off + j]
            for u in range(a, b):
                r = xr[u]
                z = xr[H1 + u]
                n = xr[H2 + u]
                dv = dhr[u]
                dz = dv * (pr[u] - n) * z * (one - z)
                dn = dv * (one - z) * (one - n * n)
                dgr[H1 + u] = dz
                dgr[H2 + u] = dn
                ghr[H1 + u] = dz
                gnr[u] = dn
                rr[u] = r * pr[u]
                dhr[u] = dv * z
        else:
            qr = scr[d, j]
            for u in range(a, b):
                r = xr[u]
                dr = qr[u] * pr[u] * r * (one - r)
                dgr[u] = dr
                ghr[u] = dr
                dhr[u] += qr[u] * r
    else:
        yr = y[off + j]
        yo = np.uint64(d * Hout)
        if code == RNN_TANH:
            for u in range(a, b):
                h = yr[yo + u]
                dgr[u] = dhr[u] * (one - h * h)
        else:
            for u in range(a, b):
                h = yr[yo + u]
                dgr[u] = dhr[u] if h > one - one else one - one


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _bwd_chunk_v(code, phase, H, Hout, d, j, u0, u1, info, xg, cb, c0, dh, dc, dg, aux, scr, hp,
                 gh, gn, vp, ph0, ph1, dv):
    """:func:`_bwd_chunk` of a cell variant, in float64, from the gates and the
    derivatives (`dv`) that :func:`_fwd_chunk_v` saved (the reference's equations,
    rnnfast.reference.backward._variant_backward)."""
    off = info[d, 1]
    nc = info[d, 3]
    offp = info[d, 4]
    H1 = np.uint64(H)
    H2 = H1 + H1
    H3 = H2 + H1
    dgr = dg[d, off + j]
    dhr = dh[d, j]
    dvr = dv[d, off + j]
    xr = xg[d, off + j]
    _, _, _, _, _, _, oa, oaa, oab, _, cifg, peep = variant_fields(vp)
    if code == LSTM or code == LSTM_PROJ:
        ph = ph0 if d == 0 else ph1
        cr = cb[d, off + j]
        cp = cb[d, offp + j] if j < nc else c0[d, j]
        dcr = dc[d, j]
        dm = scr[d, j] if code == LSTM_PROJ else dhr
        mr = aux[d, off + j]
        for uu in range(u0, u1):
            u = np.uint64(uu)
            i = np.float64(xr[u])
            f = np.float64(xr[H1 + u])
            g = np.float64(xr[H2 + u])
            o = np.float64(xr[H3 + u])
            c = np.float64(cr[u])
            cpu = np.float64(cp[u])
            ho = act(oa, oaa, oab, c)
            dv_ = np.float64(dm[u])
            dao = dv_ * ho * dvr[H3 + u]
            dct = dcr[u] + dv_ * o * dact(oa, oaa, oab, c)
            if peep:
                dct += dao * ph[H2 + u]
            di = dct * g
            df = dct * cpu
            if cifg:
                di -= df
                df = 0.0
            dai = di * dvr[u]
            daf = df * dvr[H1 + u]
            dgr[u] = dai
            dgr[H1 + u] = daf
            dgr[H2 + u] = dct * i * dvr[H2 + u]
            dgr[H3 + u] = dao
            dcp = dct * f
            if peep:
                dcp += dai * ph[u] + daf * ph[H1 + u]
            dcr[u] = dcp
            if code == LSTM_PROJ:
                mr[u] = o * ho
    elif code == GRU_LBR:
        pr = hp[d, j]
        ghr = gh[d, j]
        for uu in range(u0, u1):
            u = np.uint64(uu)
            r = np.float64(xr[u])
            z = np.float64(xr[H1 + u])
            n = np.float64(xr[H2 + u])
            dv_ = np.float64(dhr[u])
            dan = dv_ * (1.0 - z) * dvr[H2 + u]
            daz = dv_ * (pr[u] - n) * dvr[H1 + u]
            dar = dan * xr[H3 + u] * dvr[u]
            dgr[u] = dar
            dgr[H1 + u] = daz
            dgr[H2 + u] = dan
            dgr[H3 + u] = dan * r
            ghr[u] = dar
            ghr[H1 + u] = daz
            ghr[H2 + u] = dan * r
            dhr[u] = dv_ * z
    elif code == GRU_NOLBR:
        pr = hp[d, j]
        ghr = gh[d, j]
        if phase == 0:
            gnr = gn[d, j]
            rr = aux[d, off + j]
            for uu in range(u0, u1):
                u = np.uint64(uu)
                z = np.float64(xr[H1 + u])
                n = np.float64(xr[H2 + u])
                dv_ = np.float64(dhr[u])
                daz = dv_ * (pr[u] - n) * dvr[H1 + u]
                dan = dv_ * (1.0 - z) * dvr[H2 + u]
                dgr[H1 + u] = daz
                dgr[H2 + u] = dan
                ghr[H1 + u] = daz
                gnr[u] = dan
                rr[u] = xr[u] * pr[u]
                dhr[u] = dv_ * z
        else:
            qr = scr[d, j]
            for uu in range(u0, u1):
                u = np.uint64(uu)
                dar = np.float64(qr[u]) * pr[u] * dvr[u]
                dgr[u] = dar
                ghr[u] = dar
                dhr[u] += qr[u] * xr[u]
    else:
        for uu in range(u0, u1):
            u = np.uint64(uu)
            dgr[u] = dhr[u] * dvr[u]


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True)
def _bwd_pass_par(nchunks, n0, cpr, code, phase, H, Hout, info, xg, cb, y, c0, dh, dc, dg, aux, scr, hp,
                  gh, gn, one, vp, ph0, ph1, dv):
    for c in prange(nchunks):
        d, j, k = _item(c, n0, cpr)
        if vp[0] != 0.0:
            _bwd_chunk_v(code, phase, H, Hout, d, j, _split(H, k, cpr), _split(H, k + 1, cpr), info, xg, cb, c0,
                         dh, dc, dg, aux, scr, hp, gh, gn, vp, ph0, ph1, dv)
        else:
            _bwd_chunk(code, phase, H, Hout, d, j, _split(H, k, cpr), _split(H, k + 1, cpr), info, xg, cb, y, c0,
                       dh, dc, dg, aux, scr, hp, gh, gn, one)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _bwd_pass(nthr, serial_work, ndir, G, code, phase, H, Hout, info, xg, cb, y, c0, dh, dc, dg, aux, scr,
              hp, gh, gn, one, vp, ph0, ph1, dv):
    n0 = info[0, 2]
    rows = n0 + (info[1, 2] if ndir == 2 else 0)
    if nthr > 1 and rows * G * H >= serial_work:
        nb = (H + _UNIT_BLOCK - 1) // _UNIT_BLOCK
        cpr = min(nb, max(1, (4 * nthr + rows - 1) // rows))
        _bwd_pass_par(rows * cpr, n0, cpr, code, phase, H, Hout, info, xg, cb, y, c0, dh, dc, dg, aux, scr,
                      hp, gh, gn, one, vp, ph0, ph1, dv)
    else:
        for c in range(rows):
            d = 0 if c < n0 else 1
            if vp[0] != 0.0:
                _bwd_chunk_v(code, phase, H, Hout, d, c - d * n0, 0, H, info, xg, cb, c0, dh, dc, dg, aux, scr,
                             hp, gh, gn, vp, ph0, ph1, dv)
            else:
                _bwd_chunk(code, phase, H, Hout, d, c - d * n0, 0, H, info, xg, cb, y, c0, dh, dc, dg, aux, scr,
                           hp, gh, gn, one)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _add_dy(d, t, Hout, ldy_off, bsz, offs, dy, dh, dhs, proj, add_from, tmp):
    """dh[d, j] (+= tmp[d, j] for j < add_from) += dy of step t; projection: dhs = dh."""
    n = bsz[t]
    off = offs[t]
    for j in range(max(n, add_from)):
        dhr = dh[d, j]
        if j < add_from:
            tr = tmp[d, j]
            for p in range(Hout):
                dhr[p] += tr[p]
        if j < n:
            dyr = dy[off + j]
            for p in range(Hout):
                dhr[p] += dyr[ldy_off + p]
            if proj:
                hs = dhs[d, off + j]
                for p in range(Hout):
                    hs[p] = dhr[p]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _bwd(code, bsz, offs, ndir, rev0, xg, cb, y, h0, c0, w_hh0, w_hr0, w_hh1, w_hr1, dy, dh, dc, dg, aux,
         dhs, scr, hp, gh, gn, tmp, nthr, serial_work, one, vp, ph0, ph1, dv, s_begin, s_end):
    """Steps [s_begin, s_end) of the backward (its state is in dh/dc: a call resumes
    where the one before stopped)."""
    T = bsz.shape[0]
    Hout = h0.shape[2]
    H = scr.shape[2]
    G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    proj = code == LSTM_PROJ
    gru = code == GRU_LBR or code == GRU_NOLBR
    info = np.zeros((2, 6), np.int64)
    if s_begin == 0:
        for d in range(ndir):
            rev = rev0 if d == 0 else True
            _add_dy(d, 0 if rev else T - 1, Hout, d * Hout, bsz, offs, dy, dh, dhs, proj, 0, tmp)
    for s in range(s_begin, s_end):
        for d in range(ndir):
            # backward runs each direction against its forward order
            _step_info(T - 1 - s, T, d, rev0, bsz, offs, info)
            n = info[d, 2]
            if gru:
                _gather_prev(d, n, info[d, 3], info[d, 4], Hout, y, h0, hp)
            if proj:
                _dot(dh[d, :n], w_hr0 if d == 0 else w_hr1, scr[d, :n], nthr, serial_work)
        _bwd_pass(nthr, serial_work, ndir, G, code, 0, H, Hout, info, xg, cb, y, c0, dh, dc, dg, aux, scr,
                  hp, gh, gn, one, vp, ph0, ph1, dv)
        if code == GRU_NOLBR:
            for d in range(ndir):
                n = info[d, 2]
                _dot(gn[d, :n], (w_hh0 if d == 0 else w_hh1)[2 * H:], scr[d, :n], nthr, serial_work)
            _bwd_pass(nthr, serial_work, ndir, G, code, 1, H, Hout, info, xg, cb, y, c0, dh, dc, dg, aux, scr,
                      hp, gh, gn, one, vp, ph0, ph1, dv)
        for d in range(ndir):
            n = info[d, 2]
            off = info[d, 1]
            w_hh = w_hh0 if d == 0 else w_hh1
            if code == GRU_LBR:
                _dot(gh[d, :n], w_hh, tmp[d, :n], nthr, serial_work)
            elif code == GRU_NOLBR:
                _dot(gh[d, :n], w_hh[:2 * H], tmp[d, :n], nthr, serial_work)
            else:
                _dot(dg[d, off:off + n], w_hh, dh[d, :n], nthr, serial_work)
            tn = info[d, 5]
            if 0 <= tn < T:
                _add_dy(d, tn, Hout, d * Hout, bsz, offs, dy, dh, dhs, proj, n if gru else 0, tmp)
            elif gru:
                for j in range(n):
                    for p in range(Hout):
                        dh[d, j, p] += tmp[d, j, p]


def backward_layer(code, bsz, offs, ndir, rev0, xg, cb, y, h0, c0, w_hh0, w_hr0, w_hh1, w_hr1,
                   dy, dh, dc, dg, aux, dhs, scr, wpk, db, nthreads, vp=None, ph0=None, ph1=None, dv=None):
    """Same contract as ``rnnfast.kernels.cy_train.backward_layer``, except that ``wpk`` and
    ``db`` are ignored (FUSED_BIAS_GRADS is False: rnnfast.training sums dG itself)."""
    T = bsz.shape[0]
    if T == 0 or dg.shape[1] == 0:
        return
    dt = dg.dtype
    B, Hout = h0.shape[1], h0.shape[2]
    H = scr.shape[2]
    code = int(code)
    gru = code in (GRU_LBR, GRU_NOLBR)
    hp = np.empty((ndir, B, Hout), dt) if gru else np.empty((ndir, 1, 1), dt)
    gh = np.empty((ndir, B, 3 * H if code == GRU_LBR else 2 * H), dt) if gru else np.empty((ndir, 1, 1), dt)
    gn = np.empty((ndir, B, H), dt) if code == GRU_NOLBR else np.empty((ndir, 1, 1), dt)
    tmp = np.empty((ndir, B, Hout), dt) if gru else np.empty((ndir, 1, 1), dt)
    va = _variant_args(vp, ph0, ph1, dv, dt)
    with kernel_threads(nthreads) as nthr:
        for s0, s1 in interruptible_pieces(T, 2 * _step_flops(dg, h0, ndir, T)):
            _bwd(code, _readonly(bsz), _readonly(offs), int(ndir), bool(rev0), _readonly(xg), _readonly(cb),
                 _readonly(y), _readonly(h0), _readonly(c0), _readonly(w_hh0), _readonly(w_hr0), _readonly(w_hh1),
                 _readonly(w_hr1), _readonly(dy), dh, dc, dg, aux, dhs, scr, hp, gh, gn, tmp, nthr,
                 int(_SERIAL_WORK), dt.type(1.0), *va, np.int64(s0), np.int64(s1))
