"""The fast backends' training paths (Cython, Numba): one layer's recurrence through
the backend's training kernels (``KernelSet.training``) and the large GEMMs over all
rows, on the packed-rows layout of :mod:`rnnfast._engine`; plus what they share with
the reference path (:mod:`rnnfast.training`): the saved widths of each cell and the
inter-layer dropout. :mod:`rnnfast.training` holds the API and the contexts and calls
:func:`_fast_forward` / :func:`_fast_backward`.

Threads: the Cython backend runs everything, its large GEMMs included
(``cy_train.pgemm``), on OpenMP threads that each call single-threaded BLAS; the Numba
backend keeps BLAS single-threaded inside its kernels and NumPy's threaded BLAS for the
large GEMMs. Small steps (``_PAR_MIN_WORK``) run on one thread.
"""
from __future__ import annotations

import weakref

import numpy as np

from . import _engine, backends, memory, threads
from .cells import GRU_LBR, GRU_NOLBR, LSTM_PROJ, RNN_RELU, RNN_TANH, variant_vector


def _train_kernels(name: str):
    """The training kernel module of backend `name` (imported once, lazily)."""
    try:
        ks = backends.kernel_set(name)
    except NotImplementedError:
        raise NotImplementedError(f"training is not implemented for backend {name!r}") from None
    try:
        return ks.module("training")
    except ImportError as e:
        raise NotImplementedError(
            f"training (forward(train=True) / backward) is not available in the {name!r} "
            f"backend: its kernel module {ks.training} cannot be imported ({e}). Rebuild with "
            f"`pip install -e .` or select another backend, e.g. rnnfast.backend('reference')."
        ) from e


# A recurrence kernel runs on one thread when a step has fewer multiply-adds than this
# (rows * G*H * H_out, all directions): a barrier per step would cost more than it saves.
_PAR_MIN_WORK = 1 << 15


def _kernel_threads(nthreads: int, rows: int, D: int, G: int, H: int, Hout: int) -> int:
    return nthreads if rows * D * G * H * Hout >= _PAR_MIN_WORK else 1


# Recurrent products of at most this many rows per step run on weights packed once per
# call (the Cython kernels' micro-kernel, kernels/rf_train.h) instead of BLAS per step.
_MK_ROWS = 128


def _packed(backend, mod, code, H, Hout, D, dtype, rows, backward):
    """Packed-weight scratch for a kernel call, or an empty array (BLAS per step)."""
    if not backends.kernel_set(backend).packed_training or rows > _MK_ROWS:
        return np.empty(0, dtype)
    return _POOL.take((D * mod.packed_size(code, H, Hout, dtype == np.float64, backward),), dtype)


def _gemm_for(backend: str, mod, nthreads: int):
    """The GEMM of a backend and the BLAS thread count to run it with.

    With its own GEMM (KernelSet.own_gemm: Cython's ``pgemm``), every product runs on
    OpenMP threads each calling single-threaded BLAS, so the kernels' OpenMP threads never
    share the cores with BLAS's own (still spinning) threads; otherwise NumPy's BLAS,
    threaded.
    """
    if backends.kernel_set(backend).own_gemm:
        pg = mod.pgemm
        threads.set_blas_threads(1)
        return lambda A, B, C, beta=0.0: pg(A, B, C, beta, nthreads)
    threads.set_blas_threads(nthreads)
    return _np_gemm


def _np_gemm(A, B, C, beta: float = 0.0) -> None:
    """``C = A @ B + beta*C`` with NumPy's BLAS (beta 0 or 1)."""
    if beta == 0.0:
        np.matmul(A, B, out=C)
    else:
        C += A @ B


_POOL = memory.POOL


def _widths(code: int, H: int) -> tuple[int, int, int]:
    """(G, width of the saved activation rows, width of the gate-gradient rows)."""
    if code <= LSTM_PROJ:
        return 4, 4 * H, 4 * H
    if code == GRU_LBR:
        return 3, 4 * H, 4 * H
    if code == GRU_NOLBR:
        return 3, 3 * H, 3 * H
    return 1, H, H


# ============================================================================ dropout
def _draw_masks(rng, p: float, L: int, shape: tuple) -> list:
    """Keep-masks (bool, True = kept) of the L-1 inter-layer dropouts; None when p is 0 or 1."""
    if L < 2 or p <= 0.0 or p >= 1.0:
        return [None] * max(L - 1, 0)
    if rng is None:
        rng = np.random.default_rng()
    return [rng.random(shape, dtype=np.float32) >= np.float32(p) for _ in range(L - 1)]


def _dropout(ctx, layer: int, a: np.ndarray, masks: list) -> np.ndarray:
    """``a * mask * 1/(1-p)`` for the dropout after `layer` (also its own backward)."""
    if ctx.p <= 0.0:
        return a
    if ctx.p >= 1.0:
        return np.zeros_like(a)
    out = np.multiply(a, masks[layer])
    out *= a.dtype.type(1.0 / (1.0 - ctx.p))
    return out


# ============================================================================ fast backends
def _kernel_blas_threads(name: str, nthreads: int) -> None:
    """BLAS threads while a recurrence kernel runs: 1. The Cython kernels call BLAS from
    their own OpenMP threads; the Numba kernels call it between parallel passes, and a
    threaded BLAS there would alternate two spinning thread pools on the same cores at
    every step."""
    threads.set_blas_threads(1)


def _variant_kwargs(variant) -> dict:
    """The training kernels' variant arguments (rnnfast.cells.variant_vector); {} for the
    standard cell."""
    if variant is None:
        return {}
    return {"vp": variant_vector(variant)}


def _peepholes(dirs, H: int, dtype) -> dict:
    """ph0/ph1: the directions' (3H,) peepholes (zeros for a variant without them)."""
    zeros = np.zeros(3 * H, dtype)
    ph = [zeros if w.w_ph is None else np.ascontiguousarray(w.w_ph, dtype) for w in (dirs[0], dirs[-1])]
    return {"ph0": ph[0], "ph1": ph[1]}


def _grad_ph(dgd, cbd, c0d, segs, g_rows, h_rows, H: int) -> np.ndarray:
    """The peepholes' gradient (3H,): i and f against each row's previous cell state,
    o against its new one (rnnfast.reference.backward._variant_backward), summed over
    rows with the pairing of :func:`_prev_pairs` (no loop over time)."""
    out = np.zeros(3 * H, np.float64)
    dif = dgd[:, :2 * H]
    for g0, y0, n in segs:
        blk = dif[g0:g0 + n]
        out[:H] += np.einsum("ij,ij->j", blk[:, :H], cbd[y0:y0 + n], dtype=np.float64)
        out[H:2 * H] += np.einsum("ij,ij->j", blk[:, H:], cbd[y0:y0 + n], dtype=np.float64)
    if g_rows.size:
        blk = dif[_as_index(g_rows)]
        cp = c0d[_as_index(h_rows)]
        out[:H] += np.einsum("ij,ij->j", blk[:, :H], cp, dtype=np.float64)
        out[H:2 * H] += np.einsum("ij,ij->j", blk[:, H:], cp, dtype=np.float64)
    out[2 * H:] = np.einsum("ij,ij->j", dgd[:, 3 * H:4 * H], cbd, dtype=np.float64)
    return out.astype(dgd.dtype)


def _fast_forward(ctx, mod, xs, weights, h0, c0, nthreads):
    T, B, I = xs.shape
    kind, code, L, D, H, Hout, dtype = ctx.kind, ctx.code, ctx.L, ctx.D, ctx.H, ctx.Hout, ctx.dtype
    pk = _engine.make_packing(T, B, ctx.lengths)
    bsz = np.ascontiguousarray(pk.bsz, np.int64)
    N = int(bsz.sum())
    ctx.pk, ctx.N = pk, N
    if N == 0:                           # every sequence empty: zero outputs, states unchanged
        ctx.layers = None
        return (np.zeros((T, B, D * Hout), dtype), h0.copy(), None if c0 is None else c0.copy())
    offs = np.zeros(bsz.shape[0] + 1, np.int64)
    np.cumsum(bsz, out=offs[1:])
    ctx.bsz, ctx.offs = bsz, offs
    if pk.perm is None:
        x0 = xs.reshape(T * B, I)
        h0s, c0s = h0, c0
    else:
        x0 = np.ascontiguousarray(xs[pk.rows_t, pk.rows_b])
        h0s = h0[:, pk.perm]
        c0s = None if c0 is None else c0[:, pk.perm]
    ctx.x0 = x0
    ctx.masks_packed = [None if m is None else (m.reshape(T * B, -1) if pk.perm is None
                                                else np.ascontiguousarray(m[pk.rows_t, pk.rows_b]))
                        for m in ctx.masks]
    G, GS, _ = _widths(code, H)
    GH = G * H
    zeros_b = np.zeros(GH, dtype)
    dummy_hr = np.zeros((1, 1), dtype)
    dummy3 = np.zeros((D, 1, 1), dtype)
    hn_s = np.empty((L * D, B, Hout), dtype)
    cn_s = np.empty((L * D, B, H), dtype) if kind == "lstm" else None
    hg = np.empty((D, B, GH), dtype)
    s2 = np.empty((D, B, H), dtype)
    ls = pk.lengths_sorted
    live = np.nonzero(ls > 0)[0]
    last_fwd = offs[ls[live] - 1] + live      # packed row of each live sequence's last step
    vkw = _variant_kwargs(ctx.variant)
    layers = []
    inp = x0
    for layer, dirs in enumerate(weights):
        xg = _POOL.take((D, N, GS), dtype)
        gemm = _gemm_for(ctx.backend, mod, nthreads)
        for d, w in enumerate(dirs):
            gemm(inp, w.w_ih.T, xg[d, :, :GH])
        y = np.empty((N, D * Hout), dtype)
        cb = _POOL.take((D, N, H), dtype) if kind == "lstm" else dummy3
        h0l = np.ascontiguousarray(h0s[layer * D:(layer + 1) * D])
        c0l = np.ascontiguousarray(c0s[layer * D:(layer + 1) * D]) if kind == "lstm" else dummy3
        args = []
        for wd in (dirs[0], dirs[-1]):
            args += [wd.w_hh, zeros_b if wd.b_ih is None else wd.b_ih, zeros_b if wd.b_hh is None else wd.b_hh,
                     dummy_hr if wd.w_hr is None else wd.w_hr]
        dv = None
        if vkw:     # the gates' derivatives, kept for the backward
            dv = _POOL.take((D, N, GH), dtype)
            vkw.update(_peepholes(dirs, H, dtype), dv=dv)
        _kernel_blas_threads(ctx.backend, nthreads)
        wpk = _packed(ctx.backend, mod, code, H, Hout, D, dtype, int(bsz[0]), False)
        mod.forward_layer(code, bsz, offs, D, ctx.rev0, xg, *args, h0l, c0l, y, cb, hg, s2, wpk,
                          _kernel_threads(nthreads, int(bsz[0]), D, G, H, Hout), **vkw)
        _POOL.give(wpk)
        for d in range(D):
            k = layer * D + d
            rows = live if (ctx.rev0 if d == 0 else True) else last_fwd
            hs = h0l[d].copy()
            hs[live] = y[rows, d * Hout:(d + 1) * Hout]
            hn_s[k] = hs
            if cn_s is not None:
                cs = c0l[d].copy()
                cs[live] = cb[d, rows]
                cn_s[k] = cs
        rnn = code in (RNN_TANH, RNN_RELU)
        if rnn:
            _POOL.give(xg)                     # RNN backward needs only the outputs
        layers.append({"xg": None if rnn else xg,
                       "cb": cb if kind == "lstm" else None, "y": y, "h0": h0l,
                       "c0": c0l if kind == "lstm" else None, "dv": dv})
        if layer < L - 1:
            inp = _dropout(ctx, layer, y, ctx.masks_packed)
    ctx.layers = layers
    # the saved gates and cell states go back to the pool when the context dies
    weakref.finalize(ctx, _POOL.give_raw, [_POOL.raw(l[k]) for l in layers for k in ("xg", "cb", "dv")])
    y = layers[-1]["y"]
    if pk.perm is None:
        # the saved outputs themselves, read-only: modifying them in place would change the
        # gradients (PyTorch refuses that at backward time; here it fails at once)
        out = y.reshape(T, B, D * Hout).view()
        out.flags.writeable = False
        return out, hn_s, cn_s
    return _engine.unpack(pk, y, hn_s, cn_s, T, B)


def _prev_pairs(bsz: np.ndarray, offs: np.ndarray, rev: bool):
    """Which packed rows hold the previous state of each gradient row.

    Returns ``(segments, g_rows, h_rows)``: ``segments`` is a list of ``(g0, y0, n)``,
    gradient rows [g0, g0+n) whose previous states are output rows [y0, y0+n), merged
    into as few runs as possible; ``g_rows``/``h_rows`` pair the remaining gradient rows
    with rows of the initial state.
    """
    B, N = int(bsz[0]), int(offs[-1])
    if int(bsz[-1]) == B:                 # every step full: one shifted run plus one step of h0
        j = np.arange(B)
        if not rev:
            return ([(B, 0, N - B)] if N > B else []), j, j
        return ([(0, B, N - B)] if N > B else []), N - B + j, j
    # Steps of one run of equal batch sizes share one shift between gradient rows and
    # previous-state rows: one segment (GEMM) per run, found without a loop over T.
    Tp = int(np.count_nonzero(bsz))       # bsz does not increase (longest sequences first)
    if not rev:
        t = np.arange(1, Tp)
        brk = np.ones(t.size, bool)
        brk[1:] = bsz[t[1:] - 1] != bsz[t[1:] - 2]
        a = t[brk]
        e = np.append(a[1:], Tp)
        segs = list(zip(offs[a].tolist(), offs[a - 1].tolist(), (offs[e] - offs[a]).tolist()))
        j = np.arange(B)
        return segs, j, j
    t = np.arange(Tp - 1)                 # steps followed by a live step
    brk = np.ones(t.size, bool)
    brk[1:] = bsz[t[1:]] != bsz[t[1:] - 1]
    a = t[brk]
    e = np.append(a[1:], Tp - 1)
    segs = list(zip(offs[a].tolist(), offs[a + 1].tolist(), (offs[e + 1] - offs[a + 1]).tolist()))
    # rows of step t with no row at step t + 1 start from the initial state
    nxt = np.zeros(Tp, np.int64)
    nxt[:-1] = bsz[1:Tp]
    d = bsz[:Tp] - nxt
    tt = np.repeat(np.arange(Tp), d)
    first = np.cumsum(d) - d
    j = nxt[tt] + (np.arange(tt.size) - first[tt])
    return segs, offs[tt] + j, j


def _as_index(idx: np.ndarray):
    """A slice when `idx` is a run of consecutive integers (a view instead of a gather)."""
    if idx.size and idx[-1] - idx[0] == idx.size - 1:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _grad_hh(gemm, dgp, yd, h0d, segs, g_rows, h_rows, out, use_h0: bool) -> None:
    """out = sum over rows of dG^T h_prev (one GEMM per run of equally shifted rows)."""
    beta = 0.0
    for g0, y0, n in segs:
        gemm(dgp[g0:g0 + n].T, yd[y0:y0 + n], out, beta)
        beta = 1.0
    if use_h0 and g_rows.size:
        gemm(dgp[_as_index(g_rows)].T, h0d[_as_index(h_rows)], out, beta)
        beta = 1.0
    if beta == 0.0:
        out[...] = 0
    if not use_h0 and g_rows.size:
        # the implicit zero initial state still multiplies dG: a NaN or inf there makes
        # NaN, as in the reference and PyTorch (0 * inf), so skip only the arithmetic
        bad = ~np.isfinite(dgp[_as_index(g_rows)]).all(axis=0)
        if bad.any():
            out[bad] = np.nan


def _fast_backward(ctx, mod, dy, dhn, dcn, weights, nthreads):
    T, B, I = ctx.T, ctx.B, ctx.I
    kind, code, L, D, H, Hout, dtype = ctx.kind, ctx.code, ctx.L, ctx.D, ctx.H, ctx.Hout, ctx.dtype
    G, _GS, GSb = _widths(code, H)
    GH = G * H
    pk, N = ctx.pk, ctx.N
    lstm = kind == "lstm"
    if N == 0:
        grads = []
        for dirs in weights:
            grads.append([{n: np.zeros_like(a) for n, a in
                           (("w_ih", w.w_ih), ("w_hh", w.w_hh), ("b_ih", w.b_ih), ("b_hh", w.b_hh),
                            ("w_hr", w.w_hr)) if a is not None} for w in dirs])
        dh0 = np.zeros((L * D, B, Hout), dtype) if dhn is None else np.array(dhn, dtype)
        dc0 = None
        if lstm:
            dc0 = np.zeros((L * D, B, H), dtype) if dcn is None else np.array(dcn, dtype)
        return np.zeros((T, B, I), dtype), dh0, dc0, grads
    bsz, offs = ctx.bsz, ctx.offs
    if pk.perm is None:
        dyl = np.ascontiguousarray(dy.reshape(T * B, D * Hout))
    else:
        dyl = np.ascontiguousarray(dy[pk.rows_t, pk.rows_b])

    def sorted_state(s, width):
        if s is None:
            return np.zeros((L * D, B, width), dtype)
        return np.array(s if pk.perm is None else s[:, pk.perm], dtype)

    dhn_s = sorted_state(dhn, Hout)
    dcn_s = sorted_state(dcn, H) if lstm else None
    dh0_s = np.empty((L * D, B, Hout), dtype)
    dc0_s = np.empty((L * D, B, H), dtype) if lstm else None
    dummy3 = np.zeros((D, 1, 1), dtype)
    dummy_hr = np.zeros((1, 1), dtype)
    scr = np.empty((D, B, H), dtype)
    fused_bias = bool(getattr(mod, "FUSED_BIAS_GRADS", False))
    ones = None if fused_bias else np.ones(N, dtype)
    pairs = [_prev_pairs(bsz, offs, ctx.rev0 if d == 0 else True) for d in range(D)]
    grads = [[None] * D for _ in range(L)]
    dx = None
    dyl_pooled = None
    for layer in range(L - 1, -1, -1):
        sv = ctx.layers[layer]
        y = sv["y"]
        dh = np.ascontiguousarray(dhn_s[layer * D:(layer + 1) * D])
        dc = np.ascontiguousarray(dcn_s[layer * D:(layer + 1) * D]) if lstm else dummy3
        dg = _POOL.take((D, N, GSb), dtype)
        aux = _POOL.take((D, N, H), dtype) if code in (LSTM_PROJ, GRU_NOLBR) else dummy3
        dhs = _POOL.take((D, N, Hout), dtype) if code == LSTM_PROJ else dummy3
        dirs = weights[layer]
        w_hh = [w.w_hh for w in (dirs[0], dirs[-1])]
        w_hr = [dummy_hr if w.w_hr is None else w.w_hr for w in (dirs[0], dirs[-1])]
        db = np.zeros((D, GSb), np.float64)
        vkw = _variant_kwargs(ctx.variant)
        if vkw:
            vkw.update(_peepholes(dirs, H, dtype), dv=sv["dv"])
        _kernel_blas_threads(ctx.backend, nthreads)
        wpk = _packed(ctx.backend, mod, code, H, Hout, D, dtype, int(bsz[0]), True)
        mod.backward_layer(code, bsz, offs, D, ctx.rev0,
                           dummy3 if sv["xg"] is None else sv["xg"], dummy3 if sv["cb"] is None else sv["cb"],
                           y, sv["h0"], dummy3 if sv["c0"] is None else sv["c0"],
                           w_hh[0], w_hr[0], w_hh[1], w_hr[1], dyl, dh, dc, dg, aux, dhs, scr, wpk, db,
                           _kernel_threads(nthreads, int(bsz[0]), D, G, H, Hout), **vkw)
        _POOL.give(wpk)
        dh0_s[layer * D:(layer + 1) * D] = dh
        if lstm:
            dc0_s[layer * D:(layer + 1) * D] = dc
        # ---- the large GEMMs over all rows
        gemm = _gemm_for(ctx.backend, mod, nthreads)
        inp = ctx.x0 if layer == 0 else _dropout(ctx, layer - 1, ctx.layers[layer - 1]["y"], ctx.masks_packed)
        # layer 0's becomes the caller's dx: never pooled
        dinp = np.empty((N, inp.shape[1]), dtype) if layer == 0 else _POOL.take((N, inp.shape[1]), dtype)
        for d, w in enumerate(dirs):
            dgd = dg[d]
            dgx = dgd[:, :GH]                        # input side: [.., dn] for every cell
            gemm(dgx, w.w_ih, dinp, 0.0 if d == 0 else 1.0)
            g = {"w_ih": np.empty_like(w.w_ih), "w_hh": np.empty_like(w.w_hh)}
            gemm(dgx.T, inp, g["w_ih"])
            segs, g_rows, h_rows = pairs[d]
            yd = y[:, d * Hout:(d + 1) * Hout]
            h0d = sv["h0"][d]
            if code == GRU_LBR:
                _grad_hh(gemm, dgd[:, :2 * H], yd, h0d, segs, g_rows, h_rows, g["w_hh"][:2 * H], ctx.h0_given)
                _grad_hh(gemm, dgd[:, 3 * H:], yd, h0d, segs, g_rows, h_rows, g["w_hh"][2 * H:], ctx.h0_given)
            elif code == GRU_NOLBR:
                _grad_hh(gemm, dgd[:, :2 * H], yd, h0d, segs, g_rows, h_rows, g["w_hh"][:2 * H], ctx.h0_given)
                gemm(dgd[:, 2 * H:].T, aux[d], g["w_hh"][2 * H:])
            else:
                _grad_hh(gemm, dgd, yd, h0d, segs, g_rows, h_rows, g["w_hh"], ctx.h0_given)
            if code == LSTM_PROJ:
                g["w_hr"] = np.empty_like(w.w_hr)
                gemm(dhs[d].T, aux[d], g["w_hr"])
            if w.w_ph is not None:
                g["w_ph"] = _grad_ph(dgd, sv["cb"][d], sv["c0"][d], segs, g_rows, h_rows, H)
            if w.b_ih is not None or w.b_hh is not None:
                if fused_bias:      # column sums of dG accumulated (in float64) by the kernel
                    gb = db[d, :GH].astype(dtype)
                    gbh = np.concatenate([db[d, :2 * H], db[d, 3 * H:]]).astype(dtype) if code == GRU_LBR else gb
                else:
                    gb = ones @ dgx
                    gbh = np.concatenate([gb[:2 * H], ones @ dgd[:, 3 * H:]]) if code == GRU_LBR else gb
                if w.b_ih is not None:
                    g["b_ih"] = gb
                if w.b_hh is not None:
                    g["b_hh"] = gbh.copy() if gbh is gb else gbh
            grads[layer][d] = g
        _POOL.give(dg, aux, dhs)
        del dg, aux, dhs
        if dyl_pooled is not None:             # this layer's dy came from the layer above
            _POOL.give(dyl_pooled)
            dyl_pooled = None
        if layer > 0:
            dyl = _dropout(ctx, layer - 1, dinp, ctx.masks_packed)
            if dyl is dinp:
                dyl_pooled = dinp
            else:
                _POOL.give(dinp)
        else:
            dx = dinp
    if pk.perm is None:
        dx_out = dx.reshape(T, B, I)
        dh0, dc0 = dh0_s, dc0_s
    else:
        dx_out = np.zeros((T, B, I), dtype)
        dx_out[pk.rows_t, pk.rows_b] = dx
        dh0 = np.empty_like(dh0_s)
        dh0[:, pk.perm] = dh0_s
        dc0 = None
        if dc0_s is not None:
            dc0 = np.empty_like(dc0_s)
            dc0[:, pk.perm] = dc0_s
    return dx_out, dh0, dc0, grads
