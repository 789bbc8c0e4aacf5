"""Run a stack of recurrent layers on one backend (inputs already validated).

The fast backends work on *packed rows*: the sequences are sorted by length once,
longest first, and step t holds the rows of its live sequences, a prefix of the
sorted batch, stored one step after another. All layers and directions run on that
layout (one input projection GEMM per layer and direction over every real row, no
padded work), and the result is scattered back to (T, B, F) once at the end. Without
`lengths`, the (T, B, F) input already is that layout and nothing is copied.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import backends, reference, threads, tuning
from .cells import CELLS, GRU_NOLBR, LSTM_PROJ, RNN_RELU, variant_vector
from .memory import SmallCache, aligned_copy, aligned_empty, scratch  # noqa: F401 - re-exported

_USE_FUSED = True     # private switch for measurements: False = BLAS per gate in every step

# The inference kernels (Cython, Numba) project the inputs a chunk of steps at a time, each thread for its
# own units right before it needs them (no extra synchronisation), which bounds the
# projection buffer. Chunks measured a little slower than projecting all steps at once,
# at every chunk size tried (commit 6c426c7; figures in docs/performance.md), so all steps
# are projected at once up to _CHUNK_ABOVE bytes per direction (lstm-b64: 52 MB), and
# longer or wider inputs go in chunks of _CHUNK_BYTES, at least _CHUNK_MIN_ROWS rows per
# GEMM.
_CHUNK_ABOVE = 64 << 20
# Threads of a direction can split the batch rows of each step (no barrier per step)
# rather than the units when there are at least _BSPLIT_MIN_ROWS rows and one direction's
# recurrent weights are at most _BSPLIT_MAX_WBYTES (each thread reads all of them). On the
# Xeon (2 MB L2) that the rule was tuned on, it won at 8 rows with weights up to 1.25 MB;
# on the Zen 5 host (1 MB L2) with the micro-kernel's 6 + 2 row blocks it lost on every
# shape measured (commit 48267e2; figures in docs/performance.md).
_BSPLIT_MIN_ROWS = 8
# Whether it is on is measured on the user's machine (rnnfast/tuning.py: up to 1.25 MB of
# weights where it wins, else off); a number here forces it (tests).
_BSPLIT_MAX_WBYTES: int | None = None
# ... except when a thread's rows leave a short last block for the micro-kernel (its
# blocks are RF_MR rows: 6 at the AVX-512 level, kernels/rf_fused.h, which the kernel
# module reports as build_info()["rows_per_block"]): 7 rows per thread read the weights
# twice for 5 + 2 rows, slower than the unit split for LSTM, GRU and RNN (commit e1c3ddb;
# figures in docs/performance.md). Measured before 7-8 float rows took one block (rf_mkh).
# Live rows <= this: recurrent product by rf_rowdot from the row-major weights, only the
# input weights packed. It won on the Xeon at 2 rows (commit 14c9399) but loses on the
# Zen 5 host, where the packed panels stream from L2 much faster than rf_rowdot's eight
# row streams (commit 9274a3e; figures for both in docs/performance.md).
# Measured per machine too (rnnfast/tuning.py: 2 rows where it wins, else 0); a number
# here forces it (tests).
_REC_ROWDOT_ROWS: int | None = None
_CHUNK_BYTES = 8 << 20
_CHUNK_MIN_ROWS = 96


def _rows_per_block(mod) -> int:
    """The Cython micro-kernel's rows per block in the ISA level loaded (RF_MR)."""
    return mod.build_info()["rows_per_block"]


def _chunk_steps(T: int, B: int, GH: int, itemsize: int) -> int:
    """Steps per projection chunk of the inference kernels (T: all at once)."""
    step = max(1, B * GH * itemsize)
    if T * step <= _CHUNK_ABOVE:
        return T
    steps = max(_CHUNK_BYTES // step, -(-_CHUNK_MIN_ROWS // max(1, B)), 1)
    return int(min(T, steps))


@dataclass(frozen=True)
class DirWeights:
    """Weights of one direction of one layer, in the compute dtype, C-contiguous."""

    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray | None
    b_hh: np.ndarray | None
    w_hr: np.ndarray | None
    w_ph: np.ndarray | None = None      # LSTM peepholes (3*H,), i, f, o (a cell variant's)


@dataclass(frozen=True)
class Packing:
    """Where each packed row comes from: rows of step t are (t, perm[j]) for j < bsz[t]."""

    perm: np.ndarray | None       # sorted position -> batch index (None: identity, all full)
    lengths_sorted: np.ndarray    # (B,)
    bsz: np.ndarray               # (T_max,) int64, live rows per step
    rows_t: np.ndarray | None     # (N,) time index of each packed row
    rows_b: np.ndarray | None     # (N,) batch index of each packed row


_FULL: dict = {}
_FULL_CACHE_MAX_T = 1 << 16     # the cache holds T-long arrays: long sequences are not kept


def _full_packing(T: int, B: int) -> Packing:
    """Packing of a batch without padding (cached: its arrays are read-only)."""
    pk = _FULL.get((T, B))
    if pk is None:
        ls, bsz = np.full(B, T, np.int64), np.full(T, B, np.int64)
        ls.flags.writeable = bsz.flags.writeable = False
        pk = Packing(None, ls, bsz, None, None)
        if T <= _FULL_CACHE_MAX_T:
            if len(_FULL) > 256:
                _FULL.clear()
            _FULL[(T, B)] = pk
    return pk


_EMPTY_PACKING = Packing(None, np.zeros(0, np.int64), np.zeros(0, np.int64), None, None)
for _a in (_EMPTY_PACKING.lengths_sorted, _EMPTY_PACKING.bsz):
    _a.flags.writeable = False


def make_packing(T: int, B: int, lengths: np.ndarray | None) -> Packing:
    if B == 0:                      # no rows at any step, however long T is
        return _EMPTY_PACKING
    if lengths is None or bool((lengths == T).all()):
        return _full_packing(T, B)
    perm = np.argsort(-lengths, kind="stable")
    ls = lengths[perm]
    tmax = int(ls[0]) if B else 0
    live = ls[None, :] > np.arange(tmax)[:, None]
    bsz = live.sum(axis=1).astype(np.int64)
    ti, ji = np.nonzero(live)
    return Packing(perm, ls, bsz, ti, perm[ji])


_ZEROS: dict = {}


def _zeros(n: int, dtype) -> np.ndarray:
    """A shared read-only zero vector (missing biases)."""
    key = (n, np.dtype(dtype).char)
    z = _ZEROS.get(key)
    if z is None:
        z = np.zeros(n, dtype)
        z.flags.writeable = False
        _ZEROS[key] = z
    return z


def run_stack(kind: str, code: int, x: np.ndarray, weights: list[list[DirWeights]],
              h0: np.ndarray | None, c0: np.ndarray | None, lengths: np.ndarray | None, *,
              rev0: bool = False, backend: str = "auto", packed: list | None = None,
              variant=None):
    """Forward of `len(weights)` layers of `len(weights[0])` directions.

    `variant`: a cell variant (:class:`rnnfast.cells.Variant`; None: the standard cell),
    which every backend computes (the compiled kernels' variant gate math).

    `packed`: per layer, its directions' weights packed once by :func:`pack_layer_weights`
    (a frozen layer's), used by the Cython kernel's fused path instead of packing per call.

    Returns ``(y, h_n, c_n)``: y (T, B, D*H_out), h_n (L*D, B, H_out), c_n (L*D, B, H)
    for LSTM else None, all in x's dtype.
    """
    T, B, _ = x.shape
    L, D = len(weights), len(weights[0])
    G = CELLS[kind].num_gates
    H = weights[0][0].w_hh.shape[0] // G
    Hout = weights[0][0].w_hr.shape[0] if code == LSTM_PROJ else H
    dtype = x.dtype
    if h0 is None:
        h0 = np.zeros((L * D, B, Hout), dtype)
    if kind == "lstm" and c0 is None:
        c0 = np.zeros((L * D, B, H), dtype)
    name = backends.resolve(kind, B, H, dtype, threads.get_num_threads())
    name = backends.fit_sizes(name, T, B, x.shape[2], H, Hout, G, D)
    if name == "reference":
        return _run_reference(kind, code, x, weights, h0, c0, lengths, rev0, variant)
    # the step forms measured on this machine (before this call takes any scratch: the
    # first call on a machine measures them with a few calls of its own)
    prof = tuning.profile(threads.get_num_threads()) if name == "cython" else tuning.DEFAULTS
    return threads.call_with_threads(_run_packed, name, kind, code, x, weights, h0, c0, lengths, rev0,
                                     G, H, Hout, prof, packed if name == "cython" else None, variant)


def pack_layer_weights(kind: str, code: int, weights: list[list[DirWeights]]) -> list | None:
    """Each layer's directions packed for the Cython kernel's fused path (None where the
    cell has none), for ``run_stack(..., packed=...)``."""
    if "cython" not in backends.available_backends():
        return None
    mod = backends.kernel_module("cython")
    out = []
    for dirs in weights:
        w0 = dirs[0]
        dtype = w0.w_ih.dtype
        G = CELLS[kind].num_gates
        H = w0.w_hh.shape[0] // G
        Hout = w0.w_hh.shape[1]
        n = mod.packed_size(code, H, Hout, w0.w_ih.shape[1], dtype == np.float64, 1 << 20)
        if not n:
            return None
        arr = aligned_empty((len(dirs) * n,), dtype)
        for d, w in enumerate(dirs):
            mod.pack_weights(code, w.w_ih, w.w_hh, arr[d * n:(d + 1) * n])
        out.append(arr)
    return out


def _run_reference(kind, code, x, weights, h0, c0, lengths, rev0, variant=None):
    out = x
    hn, cn = np.empty_like(h0), (None if c0 is None else np.empty_like(c0))
    D = len(weights[0])
    for layer, dirs in enumerate(weights):
        ys = []
        for d, w in enumerate(dirs):
            k = layer * D + d
            y, h, c = reference.run_direction(
                kind, out, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0=h0[k],
                c0=None if c0 is None else c0[k], w_hr=w.w_hr, lengths=lengths,
                reverse=rev0 if d == 0 else True, linear_before_reset=code != GRU_NOLBR,
                nonlinearity="relu" if code == RNN_RELU else "tanh", variant=variant, w_ph=w.w_ph)
            ys.append(y)
            hn[k] = h
            if cn is not None:
                cn[k] = c
        out = np.concatenate(ys, axis=-1).astype(x.dtype) if D > 1 else ys[0].astype(x.dtype)
    return out, hn, cn


def _run_packed(name, kind, code, x, weights, h0, c0, lengths, rev0, G, H, Hout, prof, packed, variant,
                nthreads):
    T, B, I = x.shape
    L, D = len(weights), len(weights[0])
    dtype = x.dtype
    pk = make_packing(T, B, lengths)
    N = T * B if pk.perm is None else int(pk.bsz.sum())
    if N == 0:   # every sequence empty: zero outputs, states unchanged
        return (np.zeros((T, B, D * Hout), dtype), h0.copy(), None if c0 is None else c0.copy())
    if pk.perm is None:
        inp = x.reshape(T * B, I)
        h0s, c0s = h0, c0
    else:
        inp = x[pk.rows_t, pk.rows_b]
        h0s = h0[:, pk.perm]
        c0s = None if c0 is None else c0[:, pk.perm]
    mod = backends.kernel_module(name)
    threads.set_blas_threads(1)     # both backends call BLAS from inside their own parallel regions
    zeros_b = _zeros(G * H, dtype)
    dummy_hr = _zeros(1, dtype).reshape(1, 1)
    extra = {}
    hn_s = np.empty((L * D, B, Hout), dtype)
    cn_s = np.empty((L * D, B, H), dtype) if kind == "lstm" else None
    xrows = N
    if name in ("cython", "numba"):    # project the inputs a chunk of steps at a time (see _CHUNK_BYTES)
        chunk = _chunk_steps(int(pk.bsz.shape[0]), B, G * H, dtype.itemsize)
        xrows = min(N, chunk * B)
        extra["chunk"] = chunk
    if variant is not None:
        extra["vp"] = variant_vector(variant)
    xg = scratch("xg", (D, xrows, G * H), dtype)      # one projection buffer per direction
    hg = scratch("hg", (D, B, G * H), dtype)
    s2 = scratch("s2", (D, B, H), dtype)
    if name == "cython" and _USE_FUSED:     # packed recurrent weights for the fused micro-kernel step
        n_el = max(mod.packed_size(code, H, Hout, w.w_ih.shape[1], dtype == np.float64, int(pk.bsz.shape[0]))
                   for w in (weights[0][0], weights[-1][0]))
        if n_el:
            extra["wpk"] = scratch("wpk", (D * n_el,), dtype) if packed is None else packed[0]
            rows0 = int(pk.bsz[0])      # the first step's live rows (the most)
            rowdot_rows = prof["rec_rowdot_rows"] if _REC_ROWDOT_ROWS is None else _REC_ROWDOT_ROWS
            bsplit_bytes = prof["bsplit_max_wbytes"] if _BSPLIT_MAX_WBYTES is None else _BSPLIT_MAX_WBYTES
            extra["rec_rowdot"] = rows0 <= rowdot_rows
            cpd = nthreads // D
            rows_pt = -(-rows0 // max(1, cpd))      # a thread's rows, rounded up
            extra["batch_split"] = (nthreads >= 2 * D and rows0 >= _BSPLIT_MIN_ROWS
                                    and not extra["rec_rowdot"]
                                    and G * H * Hout * dtype.itemsize <= bsplit_bytes
                                    and rows_pt % _rows_per_block(mod) != 1)
    for layer, dirs in enumerate(weights):
        sl = slice(layer * D, (layer + 1) * D)
        hbuf = scratch("hbuf", (D, 2, B, Hout), dtype)
        hbuf[...] = h0s[sl, None]      # both halves
        if cn_s is not None:        # the kernel updates c in place: start from c0
            cst = cn_s[sl]
            cst[...] = c0s[sl]
        else:
            cst = s2
        last = layer == L - 1
        y = (np.empty((N, D * Hout), dtype) if last and pk.perm is None
             else scratch(f"y{layer % 2}", (N, D * Hout), dtype))
        w = [dirs[0], dirs[-1]]
        args = []
        for wd in w:
            args += [wd.w_ih, wd.w_hh,
                     zeros_b if wd.b_ih is None else wd.b_ih,
                     zeros_b if wd.b_hh is None else wd.b_hh,
                     wd.w_hr if wd.w_hr is not None else dummy_hr]
        if variant is not None and variant.peephole:
            extra["ph0"], extra["ph1"] = dirs[0].w_ph, dirs[-1].w_ph
        if packed is not None and "wpk" in extra:     # a frozen layer's, packed once
            mod.run_layer(code, inp, pk.bsz, *args, D, bool(rev0), xg, hbuf, cst, y, hg, s2, nthreads,
                          **{**extra, "wpk": packed[layer], "prepacked": True})
        else:
            mod.run_layer(code, inp, pk.bsz, *args, D, bool(rev0), xg, hbuf, cst, y, hg, s2, nthreads, **extra)
        for d in range(D):
            rev = rev0 if d == 0 else True
            if pk.perm is None or rev:      # every row ends in the same half
                hn_s[layer * D + d] = hbuf[d, pk.bsz.shape[0] % 2]
            else:
                hn_s[layer * D + d] = hbuf[d, pk.lengths_sorted % 2, np.arange(B)]
        inp = y
    if pk.perm is None:
        return inp.reshape(T, B, D * Hout), hn_s, cn_s
    return unpack(pk, inp, hn_s, cn_s, T, B)


def unpack(pk: Packing, y: np.ndarray, hn_s: np.ndarray, cn_s: np.ndarray | None, T: int, B: int):
    """Packed rows `y` (N, F) and length-sorted states back to (T, B, F) (zero padding) and
    the caller's batch order (`pk.perm` not None)."""
    out = np.zeros((T, B, y.shape[1]), y.dtype)
    out[pk.rows_t, pk.rows_b] = y
    hn = np.empty_like(hn_s)
    hn[:, pk.perm] = hn_s
    cn = None
    if cn_s is not None:
        cn = np.empty_like(cn_s)
        cn[:, pk.perm] = cn_s
    return out, hn, cn


# ---------------------------------------------------------------- lean path for serving
SMALL_MAX_T = 3       # below the fused kernel's FUSED_MIN_T: no weight packing
# Calls of at most _SMALL_1T_ROWS rows (rf_rowdot's products) whose weights (input and
# recurrent) are at most _SMALL_1T_WBYTES run on one thread: a second one costs more in
# starting the region and moving the state between cores than it saves once one core's L2
# holds the weights. On the Zen 5 host (1 MB L2) one thread won with up to 512 KB of
# weights and lost from 864 KB (commit 219a349; figures in docs/performance.md).
_SMALL_1T_WBYTES = 640 << 10
_SMALL_1T_ROWS = 8
_small = threading.local()
_SMALL_KEEP_BYTES = 4 << 20


@dataclass(frozen=True)
class SmallPlan:
    """What the lean path needs of a layer, built once per layer (its parameter arrays are
    never replaced): the weights with zeros for missing biases, the kernel, the
    buffer-cache key and the layer's count of calls (`calls`, which the kernel reads to
    take every other single-token call's weights in reverse, and updates)."""

    kind: str
    code: int
    G: int
    I: int
    H: int
    Hout: int
    dtype: np.dtype
    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray
    w_hr: np.ndarray
    key: str
    kernel: object
    calls: np.ndarray
    one_thread: bool      # weights small enough for one core (_SMALL_1T_WBYTES)
    blas_rows: int        # products of more rows than this call BLAS (the kernel's ROWDOT_MAX_ROWS)


def small_plan(kind: str, code: int, w: DirWeights, H: int, Hout: int) -> SmallPlan:
    dtype = w.w_ih.dtype
    G = CELLS[kind].num_gates
    zb = _zeros(G * H, dtype)
    I = w.w_ih.shape[1]
    mod = backends.kernel_module("cython")
    return SmallPlan(kind, code, G, I, H, Hout, dtype, w.w_ih, w.w_hh, zb if w.b_ih is None else w.b_ih,
                     zb if w.b_hh is None else w.b_hh, w.w_hr if w.w_hr is not None else _zeros(1, dtype),
                     f"{code}:{I}:{H}:{Hout}:{dtype.char}", mod.run_small,
                     np.zeros(1, np.int64), (w.w_ih.nbytes + w.w_hh.nbytes) <= _SMALL_1T_WBYTES,
                     mod.build_info()["rowdot_max_rows"])


def _small_bufs(plan: SmallPlan, T: int, B: int) -> tuple:
    """This thread's scratch of the lean path for `plan`'s shape and (T, B), made once."""
    cache = getattr(_small, "bufs", None)
    if cache is None:
        cache = _small.bufs = SmallCache()
    if len(cache) > 64:
        cache.clear()
    GH = plan.G * plan.H
    bufs = (np.full(T, B, np.int64), aligned_empty((T * B, GH), plan.dtype),
            aligned_empty((2, B, plan.Hout), plan.dtype),
            aligned_empty((B, GH), plan.dtype), aligned_empty((B, plan.H), plan.dtype))
    if B * (T + 1) * GH * plan.dtype.itemsize <= _SMALL_KEEP_BYTES:   # served tokens, not a big batch
        cache[plan.key, T, B] = bufs
    return bufs


def run_small(plan: SmallPlan, x: np.ndarray, B: int, h0, c0):
    """One layer, one direction, a few steps, on the Cython kernel with little per-call
    overhead (serving one token at a time). `x` is a C-contiguous array of the compute
    dtype, (T, B, I) or unbatched (T, I) with B = 1; `h0` (B, Hout) / `c0` (B, H) are such
    arrays of any shape holding those elements, or None for zeros. Returns y, h_n and c_n
    (None unless LSTM) shaped like x: (T, B, Hout), (1, B, Hout), (1, B, H), or without
    their B axis when x is unbatched. Every line here runs once per served token, so the
    buffers are keyed by a string and the kernel is called without call_with_threads'
    frame: less Python per token (commit a976e67; figures in docs/performance.md)."""
    T = x.shape[0]
    try:
        bsz, xg, hbuf, hg, s2 = _small.bufs[plan.key, T, B]
    except (AttributeError, KeyError):
        bsz, xg, hbuf, hg, s2 = _small_bufs(plan, T, B)
    dt = plan.dtype
    if x.ndim == 2:
        y = np.empty((T, plan.Hout), dt)
        hn = np.empty((1, plan.Hout), dt)
        cn = np.empty((1, plan.H), dt) if plan.G == 4 else None
    else:
        y = np.empty((T, B, plan.Hout), dt)
        hn = np.empty((1, B, plan.Hout), dt)
        cn = np.empty((1, B, plan.H), dt) if plan.G == 4 else None
    n = threads.enter_call(1 if plan.one_thread and B <= _SMALL_1T_ROWS else 0)
    pooled = False
    # products of more rows than the kernel's row-dot limit call BLAS inside the parallel
    # region: on one thread, and the caller's count back afterwards
    blas = T * B > plan.blas_rows
    try:
        if blas:
            threads.blas_enter()
            threads.set_blas_threads(1)
        pooled = plan.kernel(plan.code, x, bsz, plan.w_ih, plan.w_hh, plan.b_ih, plan.b_hh, plan.w_hr, h0, c0, y,
                             hn, cn, xg, hbuf, hg, s2, plan.calls, threads.pool_ok(), n)
    finally:
        if blas:
            threads.blas_exit()
        threads.leave_call(n, n > 1 and not pooled)
    return y, hn, cn
