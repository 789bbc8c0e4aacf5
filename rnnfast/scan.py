"""Recurrences that run in parallel over time: ``linear_scan``, ``mingru``, ``minlstm``
(SPEC "Recurrences that run in parallel over time").

``linear_scan`` computes h_t = a_t * h_{t-1} + b_t elementwise. minGRU and minLSTM are
such scans whose coefficients come from the inputs only:

- minGRU: z = sigmoid(x W_z^T + b_z), h~ = x W_h^T + b_h, h_t = (1-z)*h_{t-1} + z*h~,
  i.e. a = 1 - z, b = z*h~;
- minLSTM: f = sigmoid(x W_f^T + b_f), i = sigmoid(x W_i^T + b_i), h~ = x W_h^T + b_h,
  f' = f/(f+i), i' = i/(f+i), h_t = f'*h_{t-1} + i'*h~, i.e. a = f', b = i'*h~.

Backends (``rnnfast.backends``): "reference" is the plain NumPy loop over time in
float64 defined here (the test oracle); "cython" (``rnnfast.kernels.cy_scan``) and
"numba" (``rnnfast.kernels.numba_scan``) are time-chunked scans that use every thread
along the time axis (see their module docstrings); the kernels are imported on first
use. "auto" is a fixed table from measurements on the project's 2-core AVX-512 machine:
the Cython kernel won every shape measured (linear_scan with 1 to 1024 features,
mingru-long), so "auto" is "cython" when it is built, else "numba", else "reference".
(The Numba kernel has no SIMD control: with fewer than ~16 features its float64 state
is converted element by element and it is slower than a plain float32 loop, where the
Cython kernel is faster than both; commit fb0dc6a; figures in docs/performance.md.)

minGRU / minLSTM project the inputs of all gates with one GEMM, x @ [W_z; W_h]^T: the
Cython kernel runs it block by block of steps inside its parallel region (each thread
the blocks of its own chunk, with single-threaded BLAS) and turns each block into the
scan's coefficients while it is in cache; the Numba path calls one threaded BLAS GEMM
first.

Accuracy: both kernels keep states and carries in float64, so float32 results are the
float64 recurrence rounded once (within 1e-5 of the float64 reference even over 10^5
steps with a ~ 1). One documented deviation: a product of coefficients below 2^-600 is
flushed to 0 when chunks are combined (it scales a carry by less than 1e-180), so that
underflowing products never run into the ~100x slower denormal arithmetic.
"""
from __future__ import annotations

import math

import numpy as np

from . import _engine, backends, threads
from ._validation import check_float, check_lengths, check_state, to_numpy, weight_dtype
from .reference.scans import minrnn_coefficients as _coefficients
from .reference.scans import minrnn_reference as _minrnn_reference
from .reference.scans import scan_reference as _scan_reference

__all__ = ["linear_scan", "mingru", "minlstm"]

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)

# ---------------------------------------------------------------------------- kernels
_broken: dict[str, str] = {}
_AUTO_ORDER = ("cython", "numba")


# Tuning of the kernels (measured on the project's 2-core machine; tests lower the
# thresholds to run the multi-threaded paths on small shapes):
#   ls_rho: linear_scan's chunk 0 length against the others' (P+1 chunks for P threads):
#       the cost of reducing a step over scanning it (Cython interleaves its reductions: 0.6;
#       Numba's are plain loops as costly as the scan: 1.0)
#   min_rho: minGRU/minLSTM's weight of chunks 1.. against chunk 0 (which takes one pass, not two)
#   ls_min_steps, ls_min_work: linear_scan runs on one thread below T * N = min_work (a
#       parallel region costs microseconds); below T = min_steps * threads the threads
#       split the features instead (when there are 1024 per thread), else one runs
#   min_steps: minGRU/minLSTM below this many steps per thread project with threaded
#       BLAS and scan on one thread
_TUNE = {"ls_rho": {"cython": 0.6, "numba": 1.0}, "ls_min_steps": 256, "ls_min_work": 32768,
         "min_rho": 0.95, "min_steps": 32}


def _kernel(name: str):
    """The scan kernel module of backend `name` (backends.KernelSet.scans, imported once)."""
    if name in _broken:
        raise RuntimeError(_broken[name])
    ks = backends.kernel_set(name)
    try:
        return ks.module("scans")
    except ImportError as e:
        _broken[name] = (f"backend {name!r}: kernel module {ks.scans} cannot be "
                         f"imported ({e}); rebuild with `pip install -e .`")
        raise RuntimeError(_broken[name]) from None


def _resolve() -> str:
    """The concrete backend of this call ("auto" resolved by the fixed table)."""
    name = backends.get_backend()
    if name != "auto":
        return name
    avail = backends.available_backends()
    for cand in _AUTO_ORDER:
        if cand in avail and cand not in _broken:
            try:
                _kernel(cand)
            except RuntimeError:
                continue
            return cand
    return "reference"


# ---------------------------------------------------------------------------- linear_scan
def _scan2d(a2: np.ndarray, b2: np.ndarray, carry: np.ndarray, reverse: bool,
            name: str | None = None) -> np.ndarray:
    """Scan of validated C-contiguous (T, N) arrays of one float dtype; carry (N,) float64
    is the initial state and is updated to the final one. Returns (T, N) in a2's dtype."""
    name = _resolve() if name is None else name
    if name == "reference":
        return _scan_reference(a2, b2, carry, reverse).astype(a2.dtype, copy=False)
    out = np.empty(a2.shape, a2.dtype)
    kernel = _kernel(name).linear_scan
    threads.call_with_threads(lambda n: kernel(a2, b2, out, carry, bool(reverse), n, _TUNE["ls_rho"][name],
                                               _TUNE["ls_min_steps"], _TUNE["ls_min_work"]))
    return out


def linear_scan(a, b, h0=None, reverse: bool = False):
    """First-order linear recurrence h_t = a_t * h_{t-1} + b_t, elementwise.

    Parameters
    ----------
    a, b : array_like (T, ...), float32 or float64, of equal shape.
    h0 : array_like, optional
        State before the first step (after the last one with ``reverse``); broadcasts to
        the shape of ``b[0]``. Zero when None.
    reverse : bool
        Run from the last step down: h_t = a_t * h_{t+1} + b_t.

    Returns
    -------
    h : ndarray of a's shape; float32 when a and b are both float32, else float64.

    Raises
    ------
    TypeError : a non-float input (integers, bools, complex, objects).
    ValueError : a 0-d input, ``b`` of another shape than ``a``, ``h0`` that does not
        broadcast to ``b[0]``.
    """
    A = check_float(to_numpy(a, "a"), "a")
    B = check_float(to_numpy(b, "b"), "b")
    if A.ndim < 1:
        raise ValueError(f"a: expected an array of shape (T, ...) with at least 1 dimension, got shape {A.shape}")
    if B.shape != A.shape:
        raise ValueError(f"b: expected shape {A.shape} (the shape of a), got {B.shape}")
    dtype = _F32 if (A.dtype == _F32 and B.dtype == _F32) else _F64
    shape = A.shape
    T = shape[0]
    N = math.prod(shape[1:])
    carry = np.zeros(N, np.float64)
    if h0 is not None:
        H0 = check_float(to_numpy(h0, "h0"), "h0")
        try:
            carry[...] = np.broadcast_to(H0, shape[1:]).reshape(N)
        except ValueError:
            raise ValueError(f"h0: expected a shape that broadcasts to b[0]'s shape {shape[1:]}, "
                             f"got {H0.shape}") from None
    if T == 0 or N == 0:
        return np.zeros(shape, dtype)
    a2 = (A if A.dtype == dtype and A.flags.c_contiguous else np.ascontiguousarray(A, dtype)).reshape(T, N)
    b2 = (B if B.dtype == dtype and B.flags.c_contiguous else np.ascontiguousarray(B, dtype)).reshape(T, N)
    return _scan2d(a2, b2, carry, bool(reverse)).reshape(shape)


# ---------------------------------------------------------------------------- minGRU / minLSTM
_KINDS = {
    # kind: (code, weight argument names, bias argument names)
    "mingru": (0, ("w_z", "w_h"), ("b_z", "b_h")),
    "minlstm": (1, ("w_f", "w_i", "w_h"), ("b_f", "b_i", "b_h")),
}


class _Prepared:
    """Validated inputs of one minGRU/minLSTM call (compute dtype, C-contiguous)."""

    __slots__ = ("kind", "x2", "wcat", "bias", "h0", "lens", "T", "B", "I", "H", "dtype",
                 "unbatched", "batch_first", "x_shape", "project")


def _prepare(kind: str, x, weights, biases, h0, lengths, batch_first: bool,
             h0_name: str = "h0") -> _Prepared:
    _code, wnames, bnames = _KINDS[kind]
    ws = [check_float(to_numpy(w, n), n) for w, n in zip(weights, wnames)]
    bs = [None if v is None else check_float(to_numpy(v, n), n) for v, n in zip(biases, bnames)]
    dtype = weight_dtype(*ws)
    w0 = ws[0]
    if w0.ndim != 2:
        raise ValueError(f"{wnames[0]}: expected a 2-D (H, I) array, got shape {w0.shape}")
    H, I = w0.shape
    for w, n in zip(ws[1:], wnames[1:]):
        if w.shape != (H, I):
            raise ValueError(f"{n}: expected shape {(H, I)} (the shape of {wnames[0]}), got {w.shape}")
    for v, n in zip(bs, bnames):
        if v is not None and v.shape != (H,):
            raise ValueError(f"{n}: expected shape {(H,)}, got {v.shape}")
    X = check_float(to_numpy(x, "x"), "x")
    if X.ndim not in (2, 3):
        raise ValueError(f"x: expected a 2-D (T, I) or 3-D input, got {X.ndim}-D with shape {X.shape}")
    if X.shape[-1] != I:
        raise ValueError(f"x: expected input feature size {I}, got {X.shape[-1]} (shape {X.shape})")
    p = _Prepared()
    p.kind, p.dtype, p.H, p.I, p.x_shape = kind, dtype, H, I, X.shape
    p.unbatched = X.ndim == 2
    p.batch_first = bool(batch_first) and not p.unbatched
    if p.unbatched:
        T, B = X.shape[0], 1
    elif p.batch_first:
        B, T = X.shape[0], X.shape[1]
    else:
        T, B = X.shape[0], X.shape[1]
    p.T, p.B = T, B
    p.x2 = np.ascontiguousarray(X, dtype).reshape(T * B, I)   # rows in x's own layout
    p.wcat = np.concatenate([np.asarray(w, dtype) for w in ws]) if len(ws) else None
    p.bias = np.concatenate([np.zeros(H, dtype) if v is None else np.asarray(v, dtype) for v in bs])
    hs = check_state(h0, h0_name, dtype, (B, H), p.unbatched)
    p.h0 = np.zeros((B, H), np.float64) if hs is None else hs.astype(np.float64).reshape(B, H)
    p.lens = check_lengths(lengths, T, B, p.unbatched)
    p.project = None    # a frozen low-precision layer's projection (rnnfast/frozen.py)
    return p


def _time_major(arr2: np.ndarray, p: _Prepared) -> np.ndarray:
    """(T*B, F) rows in x's layout as a (T, B, F) view."""
    F = arr2.shape[-1]
    if p.batch_first:
        return arr2.reshape(p.B, p.T, F).transpose(1, 0, 2)
    return arr2.reshape(p.T, p.B, F)


def _user_layout(y2: np.ndarray, p: _Prepared) -> np.ndarray:
    """(T*B, H) rows in x's layout as the caller's output shape."""
    F = y2.shape[-1]
    if p.unbatched:
        return y2.reshape(p.T, F)
    if p.batch_first:
        return y2.reshape(p.B, p.T, F)
    return y2.reshape(p.T, p.B, F)


def _forward(p: _Prepared, keep: bool = False, name: str | None = None):
    """Run a prepared call. Returns (y2 (T*B, H) rows in x's layout, h_n (B, H) float64,
    proj (T*B, G*H) pre-activations without biases, or None) — proj only with ``keep``."""
    name = _resolve() if name is None else name
    kind, T, B, H, dtype = p.kind, p.T, p.B, p.H, p.dtype
    tmax = T if p.lens is None else (int(p.lens.max()) if B else 0)
    if name == "reference" or T * B * H == 0 or tmax == 0:
        proj = (p.x2 @ p.wcat.T).astype(dtype, copy=False) if keep else None
        y2 = np.zeros((T * B, H), dtype)
        if tmax == 0 or B * H == 0:
            return y2, p.h0.copy(), proj
        y3, hn = _minrnn_reference(kind, _time_major(p.x2, p), p.wcat, p.bias, p.h0, p.lens)
        _time_major(y2, p)[...] = y3
        return y2, hn, proj
    return threads.call_with_threads(_forward_fast, p, keep, name, _kernel(name))


def _forward_fast(p: _Prepared, keep: bool, name: str, mod, nthreads: int):
    """_forward on a fast backend's kernel module `mod`, with `nthreads` threads."""
    kind, T, B, H, dtype = p.kind, p.T, p.B, p.H, p.dtype
    code = _KINDS[kind][0]
    GH = p.wcat.shape[0]
    carry = p.h0.reshape(B * H).copy()
    tmax = T if p.lens is None else (int(p.lens.max()) if B else 0)
    # the projections of an inference call never leave it: reuse this thread's scratch
    # (a fresh buffer per call pays a page fault per page at first touch; commit 267e391;
    # figures in docs/performance.md)
    proj = np.empty((T * B, GH), dtype) if keep else _engine.scratch("min_proj", (T * B, GH), dtype)
    y2 = np.empty((T * B, H), dtype)
    lens = np.full(B, T, np.int64) if p.lens is None else np.ascontiguousarray(p.lens, np.int64)
    small = tmax < _TUNE["min_steps"] * nthreads
    if p.project is not None:       # a frozen layer's bf16 / int8 projection (one thread)
        p.project(p.x2, proj)
        do_gemm = False
        kthreads = 1 if small else nthreads
    elif name == "numba" or small:
        threads.set_blas_threads(nthreads)
        np.matmul(p.x2, p.wcat.T, out=proj)
        do_gemm = False
        kthreads = 1 if small else nthreads
    else:
        threads.set_blas_threads(1)      # each OpenMP thread projects its own chunk of steps
        do_gemm = True
        kthreads = nthreads
    # steps per block: about 1 MiB of projections (half of L2), 64 to 2048 rows per GEMM
    # (fewer, larger GEMMs: 512-row blocks beat 128-row ones on mingru-long; commit
    # fb0dc6a; figures in docs/performance.md)
    row_bytes = GH * dtype.itemsize
    rows = max(64, min(2048, 1048576 // max(1, row_bytes)))
    Tsub = max(1, rows // B)
    if p.batch_first:
        Tsub = max(Tsub, 32)
    scratch = (np.empty((kthreads * Tsub * B, 2 * H), dtype) if keep and name == "cython"
               else np.empty((1, 1), dtype))
    mod.minrnn_forward(code, p.x2, p.wcat, p.bias, proj, scratch, y2, carry, lens, T, B, tmax,
                       p.batch_first, bool(keep), do_gemm, Tsub, kthreads, _TUNE["min_rho"])
    if tmax < T:
        _time_major(y2, p)[tmax:] = 0
    return y2, carry.reshape(B, H), (proj if keep else None)


def _run(kind, x, weights, biases, h0, lengths, batch_first):
    p = _prepare(kind, x, weights, biases, h0, lengths, batch_first)
    y2, hn, _ = _forward(p)
    hn = hn.astype(p.dtype)
    return _user_layout(y2, p), (hn[0] if p.unbatched else hn)


def mingru(x, w_z, w_h, b_z=None, b_h=None, *, h0=None, lengths=None, batch_first: bool = False):
    """minGRU over a sequence, in parallel over time.

    z = sigmoid(x W_z^T + b_z), h~ = x W_h^T + b_h, h_t = (1-z)*h_{t-1} + z*h~.

    Parameters
    ----------
    x : array_like (T, B, I), (B, T, I) with ``batch_first``, or unbatched (T, I).
    w_z, w_h : array_like (H, I); their dtype decides the compute dtype.
    b_z, b_h : array_like (H,), optional (zero when missing).
    h0 : (B, H), or (H,) unbatched; zero when None.
    lengths : int array_like (B,), optional, each in [0, T]: outputs past a sequence's
        length are 0 and its final state is the state after its last valid step
        (h0 for length 0).

    Returns
    -------
    y : (T, B, H) (or (B, T, H), or (T, H) unbatched);  h_n : (B, H) (or (H,)).
    """
    return _run("mingru", x, (w_z, w_h), (b_z, b_h), h0, lengths, batch_first)


def minlstm(x, w_f, w_i, w_h, b_f=None, b_i=None, b_h=None, *, h0=None, lengths=None,
            batch_first: bool = False):
    """minLSTM over a sequence, in parallel over time.

    f = sigmoid(x W_f^T + b_f), i = sigmoid(x W_i^T + b_i), h~ = x W_h^T + b_h,
    f' = f/(f+i), i' = i/(f+i), h_t = f'*h_{t-1} + i'*h~.
    Shapes, dtypes and ``lengths`` as :func:`mingru`. Returns ``(y, h_n)``.
    """
    return _run("minlstm", x, (w_f, w_i, w_h), (b_f, b_i, b_h), h0, lengths, batch_first)


# ---------------------------------------------------------------------------- backward
def minrnn_backward(p: _Prepared, proj: np.ndarray, y2: np.ndarray, dy, dhn, *,
                    name: str | None = None):
    """Gradients of sum(y*dy) + sum(h_n*dhn) for a forward run with ``keep=True``.

    ``proj`` (T*B, G*H): the forward's pre-activations without biases; ``y2`` its outputs
    (rows in x's layout). ``dy`` like the caller's y, ``dhn`` (B, H) (or (H,) unbatched)
    or None. The gradient of the scan is a reverse scan:
    g_t = dL/dh_t = m_t*dy_t + a_{t+1} g_{t+1}, from g_T = dhn, with a = 1 and dy = 0 at
    padded steps (m_t = 0). Returns (dx like x, dh0 (B, H) float, dwcat (G*H, I), dbias (G*H,)).
    """
    kind, T, B, H, I, dtype = p.kind, p.T, p.B, p.H, p.I, p.dtype
    GH = p.wcat.shape[0]
    ytm = _time_major(y2, p)
    dY = check_float(to_numpy(dy, "dy"), "dy")
    want = _user_layout(y2, p).shape
    if dY.shape != want:
        raise ValueError(f"dy: expected shape {want} (the shape of y), got {dY.shape}")
    dYtm = _time_major(np.ascontiguousarray(dY, dtype).reshape(T * B, H), p)
    dH = np.zeros((B, H), dtype)
    if dhn is not None:
        dHn = check_float(to_numpy(dhn, "dhx_n"), "dhx_n")
        wantn = (H,) if p.unbatched else (B, H)
        if dHn.shape != wantn:
            raise ValueError(f"dhx_n: expected shape {wantn}, got {dHn.shape}")
        dH[...] = dHn.reshape(B, H)
    if T == 0 or B == 0:
        return (np.zeros(p.x_shape, dtype), dH, np.zeros((GH, I), dtype), np.zeros(GH, dtype))
    pre = _time_major(proj, p) + p.bias                     # (T, B, GH)
    a, _, gates = _coefficients(kind, pre, H)
    h0 = p.h0.astype(dtype)
    hprev = np.empty((T, B, H), dtype)
    hprev[0] = h0
    hprev[1:] = ytm[:-1]
    lens = np.full(B, T, np.int64) if p.lens is None else p.lens
    m = (np.arange(T)[:, None] < lens[None, :])[..., None]  # (T, B, 1)
    a_eff = np.where(m, a, 1.0).astype(dtype)
    a_next = np.ones((T, B, H), dtype)
    a_next[:-1] = a_eff[1:]
    rhs = np.where(m, dYtm, 0.0).astype(dtype)
    carry = dH.astype(np.float64).reshape(B * H)
    g = _scan2d(np.ascontiguousarray(a_next).reshape(T, B * H), np.ascontiguousarray(rhs).reshape(T, B * H),
                carry, True, name).reshape(T, B, H)
    dh0 = a_eff[0] * g[0]
    gm = np.where(m, g, 0.0)
    dP = np.empty((T * B, GH), dtype)
    dPtm = _time_major(dP, p)
    if kind == "mingru":
        z, ht = gates
        dPtm[..., :H] = gm * (ht - hprev) * z * (1.0 - z)
        dPtm[..., H:] = gm * z
    else:
        f, i, ht, a_, c = gates
        da = gm * hprev
        dc = gm * ht
        k = (da - dc) * a_ * c
        dPtm[..., :H] = k * (1.0 - f)
        dPtm[..., H:2 * H] = -k * (1.0 - i)
        dPtm[..., 2 * H:] = gm * c
    with threads.blas_threads(threads.get_num_threads()):
        dwcat = dP.T @ p.x2
        dx2 = dP @ p.wcat
    dbias = dP.sum(axis=0)
    return dx2.reshape(p.x_shape), dh0.astype(dtype), dwcat.astype(dtype), dbias.astype(dtype)
