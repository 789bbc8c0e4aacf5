"""Training: forward passes that keep what backward needs, and backpropagation through time.

Layers call :func:`stack_forward_train` from ``forward(..., train=True)`` and
:func:`layer_backward` from ``backward``; the functional counterparts for one layer and
one direction are :func:`lstm_forward_train` / :func:`lstm_backward`,
:func:`gru_forward_train` / :func:`gru_backward` and :func:`rnn_forward_train` /
:func:`rnn_backward`. Gradients are those of ``sum(y * dy) + sum(h_n * dh_n)
(+ sum(c_n * dc_n))``, the same as PyTorch's autograd.

What a training forward keeps (per layer and direction, on the fast backends):

- LSTM: the post-activation gates i, f, g, o (written over the input projection, so
  no extra buffer) and the cell states c_t;
- GRU: r, z, n and, with ``linear_before_reset=True``, W_hn h + b_hn;
- RNN: nothing beyond the layer's output;
- every layer's output (it is the next layer's input and the recurrent input of the
  weight gradient), the first layer's (packed) input, and one byte per element for
  each inter-layer dropout mask.

Backward recomputes everything else (tanh(c), the dropped-out inputs, r * h). Per
step it runs the fused gate gradients and the recurrent GEMM dh_prev = dG W_hh;
the weight gradients are large GEMMs over all T*B rows afterwards
(dW_ih = dG^T X, dW_hh = dG^T H_prev, dx = dG W_ih), never per step; the bias
gradients are the column sums of dG, accumulated (in float64) by the Cython kernel.

Backends: "cython" (kernels/cy_train.pyx, kernels/rf_train.h) and "numba"
(kernels/numba_train.py) run the packed-rows layout of :mod:`rnnfast._engine` (padded
steps cost nothing); "reference" is plain float64 NumPy
(:mod:`rnnfast.reference.backward`), the test oracle. Dropout masks are drawn in the
(T, B, features) layout from the layer's generator before the backend is chosen, so
every backend sees the same masks for the same seed.

Threads: the Cython backend runs everything, its large GEMMs included
(``cy_train.pgemm``), on OpenMP threads that each call single-threaded BLAS. A threaded
BLAS between the recurrence kernels would leave its idle threads spinning on the cores
that the kernels' threads need next (measured here: 10-70% slower steps). The Numba backend
keeps BLAS single-threaded inside its kernels and NumPy's threaded BLAS for the large
GEMMs. Small steps (see ``_PAR_MIN_WORK``) run on one thread.

Scratch: large buffers that never reach the caller (the saved gates and cell states,
the gate gradients, the packed weights) come from the bounded pool of
``rnnfast.memory`` and go back to it when their context dies or the backward ends: a
training loop then reuses the same memory at every step instead of page-faulting tens of
MB (5-10% of a step). ``rnnfast.release_memory()`` empties it.

A context supports any number of backward calls (each recomputes from the saved state).

Backward uses the weights as they are when it runs (the layer's live parameters; for
the functional API the arrays passed to the forward). Inputs are kept by reference:
modifying ``x`` in place between forward and backward changes the weight gradients.
On the fast backends the output ``y`` of a training forward without ``lengths`` is the
saved output itself, returned read-only (no copy); copy it to modify it.
"""
from __future__ import annotations

import weakref

import numpy as np

from . import _engine, backends, memory, threads
from ._validation import check_float, check_input, check_lengths, check_state, to_numpy
from .cells import CELLS, GRU_LBR, GRU_NOLBR, LSTM_PROJ, RNN_RELU, RNN_TANH, cell_code
from .reference import backward as _rb


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


class TrainContext:
    """What a training forward of a stack of layers keeps for its backward (opaque).

    Attributes are private to :mod:`rnnfast.training`; a context may be used by several
    backward calls (each gives the same result for the same weights and gradients).
    """

    def __repr__(self) -> str:
        return (f"TrainContext(backend={self.backend!r}, kind={self.kind!r}, T={self.T}, B={self.B}, "
                f"layers={self.L}, directions={self.D})")


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


# ============================================================================ stack entry points
def stack_forward_train(kind: str, code: int, xs: np.ndarray, weights, h0, c0, lengths, *,
                        dropout: float = 0.0, rng=None, rev0: bool = False):
    """Forward of a stack of layers that keeps what :func:`stack_backward` needs.

    Parameters
    ----------
    kind, code : cell family and code (:mod:`rnnfast.cells`).
    xs : (T, B, I) time-major input, already in the compute dtype.
    weights : list (layers) of list (directions) of :class:`rnnfast._engine.DirWeights`.
    h0 : (L*D, B, H_out) or None;  c0 : (L*D, B, H) or None (LSTM).
    lengths : (B,) int64 or None.
    dropout : inter-layer dropout probability (applied to every layer's output but the
        last; inverted scaling; masks drawn from `rng`).
    rev0 : direction 0 runs in reverse (the functional API's ``reverse=True``).

    Returns
    -------
    y, h_n, c_n, ctx : exactly as :func:`rnnfast._engine.run_stack` plus the context.
    """
    T, B, I = xs.shape
    L, D = len(weights), len(weights[0])
    G = CELLS[kind].num_gates
    H = weights[0][0].w_hh.shape[0] // G
    Hout = weights[0][0].w_hr.shape[0] if code == LSTM_PROJ else H
    dtype = xs.dtype
    ctx = TrainContext()
    ctx.kind, ctx.code, ctx.T, ctx.B, ctx.I, ctx.L, ctx.D = kind, code, T, B, I, L, D
    ctx.H, ctx.Hout, ctx.dtype, ctx.rev0, ctx.lengths = H, Hout, dtype, bool(rev0), lengths
    ctx.p = float(dropout)
    ctx.h0_given = h0 is not None
    if h0 is None:
        h0 = np.zeros((L * D, B, Hout), dtype)
    if kind == "lstm" and c0 is None:
        c0 = np.zeros((L * D, B, H), dtype)
    ctx.masks = _draw_masks(rng, ctx.p, L, (T, B, D * Hout))
    name = backends.resolve(kind, B, H, dtype, threads.get_num_threads())
    name = backends.fit_sizes(name, T, B, I, H, Hout, G, D)
    ctx.backend = name
    if name == "reference":
        y, hn, cn = _ref_forward(ctx, xs, weights, h0, c0)
    else:
        y, hn, cn = threads.call_with_threads(_fast_forward, ctx, _train_kernels(name), xs, weights, h0, c0)
    return y, hn, cn, ctx


def stack_backward(ctx: TrainContext, dy: np.ndarray, dhn, dcn, weights):
    """Backward of :func:`stack_forward_train`.

    Parameters
    ----------
    ctx : the forward's context.  dy : (T, B, D*H_out) in the compute dtype.
    dhn : (L*D, B, H_out) or None;  dcn : (L*D, B, H) or None (zeros).
    weights : the weights to differentiate with (list of list of DirWeights).

    Returns
    -------
    dx (T, B, I), dh0 (L*D, B, H_out), dc0 (L*D, B, H) or None, grads : list (layers) of
    list (directions) of dicts with keys w_ih, w_hh, b_ih, b_hh (when the layer has
    biases), w_hr (projection), all in the compute dtype.
    """
    if ctx.backend == "reference":
        return _ref_backward(ctx, dy, dhn, dcn, weights)
    return threads.call_with_threads(_fast_backward, ctx, _train_kernels(ctx.backend), dy, dhn, dcn, weights)


# ============================================================================ reference backend
def _ref_forward(ctx, xs, weights, h0, c0):
    inp = np.asarray(xs, np.float64)
    L, D = ctx.L, ctx.D
    hn = np.empty(h0.shape)
    cn = None if c0 is None else np.empty(c0.shape)
    saved = []
    out = inp
    for layer, dirs in enumerate(weights):
        ys, svs = [], []
        for d, w in enumerate(dirs):
            k = layer * D + d
            y, h, c, sv = _rb.forward_direction(
                ctx.kind, ctx.code, inp, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, h0=h0[k],
                c0=None if c0 is None else c0[k], lengths=ctx.lengths,
                reverse=ctx.rev0 if d == 0 else True)
            ys.append(y)
            svs.append(sv)
            hn[k] = h
            if cn is not None:
                cn[k] = c
        out = np.concatenate(ys, axis=-1) if D > 1 else ys[0]
        saved.append(svs)
        if layer < L - 1:
            inp = _dropout(ctx, layer, out, ctx.masks)
    ctx.saved = saved
    dt = ctx.dtype
    return out.astype(dt), hn.astype(dt), (None if cn is None else cn.astype(dt))


def _ref_backward(ctx, dy, dhn, dcn, weights):
    L, D, Hout = ctx.L, ctx.D, ctx.Hout
    dout = np.asarray(dy, np.float64)
    dh0 = np.zeros((L * D, ctx.B, Hout))
    dc0 = np.zeros((L * D, ctx.B, ctx.H)) if ctx.kind == "lstm" else None
    grads = [[None] * D for _ in range(L)]
    dinp = None
    for layer in range(L - 1, -1, -1):
        dinp = None
        for d, w in enumerate(weights[layer]):
            k = layer * D + d
            dx, dh, dc, g = _rb.backward_direction(
                ctx.saved[layer][d], dout[..., d * Hout:(d + 1) * Hout],
                None if dhn is None else dhn[k], None if dcn is None else dcn[k],
                weights=(w.w_ih, w.w_hh, w.w_hr))
            dinp = dx if dinp is None else dinp + dx
            dh0[k] = dh
            if dc0 is not None:
                dc0[k] = dc
            if w.b_ih is None:
                g.pop("b_ih")
            if w.b_hh is None:
                g.pop("b_hh")
            grads[layer][d] = {n: a.astype(ctx.dtype) for n, a in g.items()}
        if layer > 0:
            dout = _dropout(ctx, layer - 1, dinp, ctx.masks)
    dt = ctx.dtype
    return dinp.astype(dt), dh0.astype(dt), (None if dc0 is None else dc0.astype(dt)), grads


# ============================================================================ fast backends
def _kernel_blas_threads(name: str, nthreads: int) -> None:
    """BLAS threads while a recurrence kernel runs: 1. The Cython kernels call BLAS from
    their own OpenMP threads; the Numba kernels call it between parallel passes, and a
    threaded BLAS there would alternate two spinning thread pools on the same cores at
    every step."""
    threads.set_blas_threads(1)


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
        _kernel_blas_threads(ctx.backend, nthreads)
        wpk = _packed(ctx.backend, mod, code, H, Hout, D, dtype, int(bsz[0]), False)
        mod.forward_layer(code, bsz, offs, D, ctx.rev0, xg, *args, h0l, c0l, y, cb, hg, s2, wpk,
                          _kernel_threads(nthreads, int(bsz[0]), D, G, H, Hout))
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
                       "c0": c0l if kind == "lstm" else None})
        if layer < L - 1:
            inp = _dropout(ctx, layer, y, ctx.masks_packed)
    ctx.layers = layers
    # the saved gates and cell states go back to the pool when the context dies
    weakref.finalize(ctx, _POOL.give_raw, [_POOL.raw(l[k]) for l in layers for k in ("xg", "cb")])
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
        _kernel_blas_threads(ctx.backend, nthreads)
        wpk = _packed(ctx.backend, mod, code, H, Hout, D, dtype, int(bsz[0]), True)
        mod.backward_layer(code, bsz, offs, D, ctx.rev0,
                           dummy3 if sv["xg"] is None else sv["xg"], dummy3 if sv["cb"] is None else sv["cb"],
                           y, sv["h0"], dummy3 if sv["c0"] is None else sv["c0"],
                           w_hh[0], w_hr[0], w_hh[1], w_hr[1], dyl, dh, dc, dg, aux, dhs, scr, wpk, db,
                           _kernel_threads(nthreads, int(bsz[0]), D, G, H, Hout))
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


# ============================================================================ layer glue
def _grad_array(a, name: str, dtype, shape: tuple) -> np.ndarray:
    arr = check_float(to_numpy(a, name), name)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (like the forward's output), got {arr.shape}")
    return arr


def _dy_time_major(dy, name, dtype, T, B, F, unbatched, batch_first) -> np.ndarray:
    """dy in the caller's layout -> (T, B, F) C-contiguous in the compute dtype."""
    if unbatched:
        arr = _grad_array(dy, name, dtype, (T, F))[:, None, :]
    elif batch_first:
        arr = _grad_array(dy, name, dtype, (B, T, F)).transpose(1, 0, 2)
    else:
        arr = _grad_array(dy, name, dtype, (T, B, F))
    return np.ascontiguousarray(arr, dtype=dtype)


def _x_layout(a: np.ndarray, unbatched: bool, batch_first: bool) -> np.ndarray:
    if unbatched:
        return a[:, 0]
    if batch_first:
        return a.transpose(1, 0, 2)
    return a


def _state_grads(kind, dstate, name, dtype, LD, B, Hout, H, unbatched):
    """Validate the gradient of the final state(s); returns (dh_n, dc_n), each None = zeros."""
    if kind == "lstm":
        if dstate is None:
            return None, None
        if not isinstance(dstate, (tuple, list)) or len(dstate) != 2:
            raise TypeError(f"{name}: expected a tuple (dh_n, dc_n) for LSTM (entries may be None), "
                            f"got {type(dstate).__name__}")
        dh = check_state(dstate[0], f"{name}[0] (dh_n)", dtype, (LD, B, Hout), unbatched)
        dc = check_state(dstate[1], f"{name}[1] (dc_n)", dtype, (LD, B, H), unbatched)
        return dh, dc
    if isinstance(dstate, (tuple, list)):
        raise TypeError(f"{name}: expected an array (the gradient of h_n) for {kind.upper()}, "
                        f"got a {type(dstate).__name__}")
    return check_state(dstate, name, dtype, (LD, B, Hout), unbatched), None


def layer_backward(layer, ctx: TrainContext, dy, dhx_n, unbatched: bool, batch_first: bool):
    """Backward of a layer's ``forward(..., train=True)``: returns ``(dx, dhx, grads)``.

    `dy` is in the caller's layout (like y); `dhx_n` like hx_n (LSTM: a tuple whose
    entries may be None) or None. `grads` is keyed by the layer's parameter names.
    """
    kind, dtype = ctx.kind, ctx.dtype
    L, D, H, Hout, T, B = ctx.L, ctx.D, ctx.H, ctx.Hout, ctx.T, ctx.B
    dys = _dy_time_major(dy, "dy", dtype, T, B, D * Hout, unbatched, batch_first)
    dhn, dcn = _state_grads(kind, dhx_n, "dhx_n", dtype, L * D, B, Hout, H, unbatched)
    weights = layer._weights()
    dx, dh0, dc0, glist = stack_backward(ctx, dys, dhn, dcn, weights)
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr"}
    params = layer.parameters()
    grads = {}
    for li in range(L):
        for d in range(D):
            sfx = f"_l{li}" + ("_reverse" if d else "")
            for short, g in glist[li][d].items():
                key = names[short] + sfx
                if key in params:
                    grads[key] = np.asarray(g, dtype)
    grads = {k: grads[k] for k in params if k in grads}     # the parameters' order
    dx = _x_layout(dx, unbatched, batch_first)
    if unbatched:
        dh0 = dh0[:, 0]
        dc0 = None if dc0 is None else dc0[:, 0]
    dhx = (dh0, dc0) if kind == "lstm" else dh0
    return dx, dhx, grads


# ============================================================================ functional API
class FunctionalTrainContext:
    """Context of a functional training forward (pass it to the matching ``*_backward``)."""

    __slots__ = ("stack", "kind", "weights", "unbatched", "batch_first", "consumed")

    def __repr__(self) -> str:
        return f"FunctionalTrainContext(kind={self.kind!r}, {self.stack!r})"


def _functional_forward(kind, code, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, batch_first):
    from .functional import _weights
    dw, dtype, H, Hout, I = _weights(kind, x, w_ih, w_hh, b_ih, b_hh, w_hr)
    xs, unbatched = check_input(x, "x", dtype, I, batch_first)
    T, B, _ = xs.shape
    h = check_state(h0, "h0", dtype, (B, Hout), unbatched)          # (B, H_out), or (H_out,) unbatched
    c = check_state(c0, "c0", dtype, (B, H), unbatched) if kind == "lstm" else None
    h = None if h is None else h[None]                               # one layer-direction: (1, B, .)
    c = None if c is None else c[None]
    ln = check_lengths(lengths, T, B, unbatched)
    y, hn, cn, sctx = stack_forward_train(kind, code, xs, [[dw]], h, c, ln, rev0=bool(reverse))
    fctx = FunctionalTrainContext()
    fctx.stack, fctx.kind, fctx.weights = sctx, kind, dw
    fctx.unbatched, fctx.batch_first = unbatched, bool(batch_first)
    hn, cn = hn[0], (None if cn is None else cn[0])
    if unbatched:
        y, hn, cn = y[:, 0], hn[0], (None if cn is None else cn[0])
    elif batch_first:
        y = y.transpose(1, 0, 2)
    return y, hn, cn, fctx


def _functional_backward(ctx, kind, dy, dh_n, dc_n):
    if not isinstance(ctx, FunctionalTrainContext):
        raise TypeError(f"ctx: expected the context returned by {kind}_forward_train, got {type(ctx).__name__}")
    if ctx.kind != kind:
        raise ValueError(f"ctx: this context comes from {ctx.kind}_forward_train, not {kind}_forward_train")
    s = ctx.stack
    dys = _dy_time_major(dy, "dy", s.dtype, s.T, s.B, s.Hout, ctx.unbatched, ctx.batch_first)
    dh = check_state(dh_n, "dh_n", s.dtype, (s.B, s.Hout), ctx.unbatched)
    dc = check_state(dc_n, "dc_n", s.dtype, (s.B, s.H), ctx.unbatched) if kind == "lstm" else None
    dh = None if dh is None else dh[None]
    dc = None if dc is None else dc[None]
    dx, dh0, dc0, glist = stack_backward(s, dys, dh, dc, [[ctx.weights]])
    dx = _x_layout(dx, ctx.unbatched, ctx.batch_first)
    dh0 = dh0[0]
    dc0 = None if dc0 is None else dc0[0]
    if ctx.unbatched:
        dh0 = dh0[0]
        dc0 = None if dc0 is None else dc0[0]
    return dx, dh0, dc0, dict(glist[0][0])


def lstm_forward_train(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, c0=None, w_hr=None, lengths=None,
                       reverse: bool = False, batch_first: bool = False):
    """:func:`rnnfast.lstm` that also returns the context :func:`lstm_backward` needs.

    Parameters
    ----------
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, batch_first
        As :func:`rnnfast.lstm`.

    Returns
    -------
    y : (T, B, H_out), (B, T, H_out) with ``batch_first``, or (T, H_out) unbatched.
    (h_n, c_n) : final states, (B, H_out) and (B, H) (unbatched: (H_out,), (H,)).
    ctx : :class:`FunctionalTrainContext`, to pass to :func:`lstm_backward`.

    Notes
    -----
    The context keeps references to the weights (backward uses them as they are when it
    runs) and to ``x``. It stays valid for several backward calls.
    """
    code = cell_code("lstm", proj=w_hr is not None)
    y, hn, cn, ctx = _functional_forward("lstm", code, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths,
                                         reverse, batch_first)
    return y, (hn, cn), ctx


def lstm_backward(ctx, dy, dh_n=None, dc_n=None):
    """Gradients of ``sum(y*dy) + sum(h_n*dh_n) + sum(c_n*dc_n)`` after :func:`lstm_forward_train`.

    Parameters
    ----------
    ctx : the context returned by :func:`lstm_forward_train`.
    dy : array_like shaped like y (batch-first / unbatched as the forward's input was).
    dh_n : like h_n, optional (zeros).  dc_n : like c_n, optional (zeros).

    Returns
    -------
    dx : shaped like x.
    (dh0, dc0) : shaped like h0 and c0 (also when the forward used zero initial states).
    grads : dict with ``w_ih``, ``w_hh``, plus ``b_ih``, ``b_hh`` and ``w_hr`` for the
        ones the forward was given, in the compute dtype.
    """
    dx, dh0, dc0, g = _functional_backward(ctx, "lstm", dy, dh_n, dc_n)
    return dx, (dh0, dc0), g


def gru_forward_train(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, lengths=None, reverse: bool = False,
                      batch_first: bool = False, linear_before_reset: bool = True):
    """:func:`rnnfast.gru` that also returns the context :func:`gru_backward` needs.

    Returns
    -------
    y, h_n, ctx : as :func:`rnnfast.gru`, plus a :class:`FunctionalTrainContext`.
    """
    code = cell_code("gru", linear_before_reset=bool(linear_before_reset))
    y, hn, _, ctx = _functional_forward("gru", code, x, w_ih, w_hh, b_ih, b_hh, None, h0, None, lengths,
                                        reverse, batch_first)
    return y, hn, ctx


def gru_backward(ctx, dy, dh_n=None):
    """Gradients of ``sum(y*dy) + sum(h_n*dh_n)`` after :func:`gru_forward_train`.

    Returns
    -------
    dx : like x.  dh0 : like h0.  grads : dict ``w_ih``, ``w_hh`` (+ ``b_ih``, ``b_hh`` when given).
    """
    dx, dh0, _, g = _functional_backward(ctx, "gru", dy, dh_n, None)
    return dx, dh0, g


def rnn_forward_train(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, lengths=None, reverse: bool = False,
                      batch_first: bool = False, nonlinearity: str = "tanh"):
    """:func:`rnnfast.rnn` that also returns the context :func:`rnn_backward` needs.

    Returns
    -------
    y, h_n, ctx : as :func:`rnnfast.rnn`, plus a :class:`FunctionalTrainContext`.
    """
    from .functional import check_nonlinearity
    check_nonlinearity(nonlinearity)
    code = cell_code("rnn", nonlinearity=nonlinearity)
    y, hn, _, ctx = _functional_forward("rnn", code, x, w_ih, w_hh, b_ih, b_hh, None, h0, None, lengths,
                                        reverse, batch_first)
    return y, hn, ctx


def rnn_backward(ctx, dy, dh_n=None):
    """Gradients of ``sum(y*dy) + sum(h_n*dh_n)`` after :func:`rnn_forward_train`.

    Returns
    -------
    dx : like x.  dh0 : like h0.  grads : dict ``w_ih``, ``w_hh`` (+ ``b_ih``, ``b_hh`` when given).
    """
    dx, dh0, _, g = _functional_backward(ctx, "rnn", dy, dh_n, None)
    return dx, dh0, g


__all__ = ["lstm_forward_train", "lstm_backward", "gru_forward_train", "gru_backward",
           "rnn_forward_train", "rnn_backward", "stack_forward_train", "stack_backward", "layer_backward",
           "TrainContext", "FunctionalTrainContext"]
