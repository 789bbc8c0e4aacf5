"""Plain NumPy implementation of every cell: the test oracle and the "reference" backend.

Everything here runs in float64 and loops over time in Python, one step after another,
written to be read rather than to be fast. The equations are those of
:mod:`rnnfast.cells`. All the reference code is in this package:

- this module: one step of each cell (:func:`cell_step`) and one layer-direction over a
  sequence (:func:`run_direction`), the inference oracle;
- :mod:`rnnfast.reference.backward`: the training oracle (forward keeping what backward
  needs, and backpropagation through time);
- :mod:`rnnfast.reference.scans`: the time-parallel recurrences (``linear_scan``,
  minGRU, minLSTM) as plain loops.
"""
from __future__ import annotations

import numpy as np

from ..cells import CELLS


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def activate(act, x: np.ndarray) -> np.ndarray:
    """An activation of :data:`rnnfast.cells.ACTIVATIONS` (an :class:`rnnfast.cells.Activation`)."""
    n, a, b = act.name, act.alpha, act.beta
    if n == "sigmoid":
        return sigmoid(x)
    if n == "tanh":
        return np.tanh(x)
    if n == "relu":
        return np.maximum(x, 0.0)
    if n == "affine":
        return a * x + b
    if n == "leaky_relu":
        return np.where(x >= 0, x, a * x)
    if n == "thresholded_relu":
        return np.where(x > a, x, 0.0)
    if n == "scaled_tanh":
        return a * np.tanh(b * x)
    if n == "hard_sigmoid":
        return np.clip(a * x + b, 0.0, 1.0)
    if n == "elu":
        return np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0.0)))
    if n == "softsign":
        return x / (1.0 + np.abs(x))
    if n == "softplus":
        return np.logaddexp(0.0, x)
    raise ValueError(f"unknown activation {n!r}")


def _variant_step(kind, v, gx, h, c, w_hh, b_hh, w_ph, w_hr, linear_before_reset, mm, H):
    """One step of a cell variant (:class:`rnnfast.cells.Variant`), as ONNX Runtime computes it."""
    def pre(a):
        return a if v.clip is None else np.clip(a, -v.clip, v.clip)
    if kind == "lstm":
        g = gx + mm(h, w_hh) + b_hh
        gi, gf, gg, go = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
        if v.peephole:
            gi, gf = gi + w_ph[:H] * c, gf + w_ph[H:2 * H] * c
        i = activate(v.gate, pre(gi))
        f = 1.0 - i if v.input_forget else activate(v.gate, pre(gf))
        c_new = f * c + i * activate(v.candidate, pre(gg))
        if v.peephole:
            go = go + w_ph[2 * H:] * c_new
        h_new = activate(v.gate, pre(go)) * activate(v.output, c_new)
        if w_hr is not None:
            h_new = mm(h_new, w_hr)
        return h_new, c_new
    if kind == "gru":
        gh_rz = mm(h, w_hh[:2 * H]) + b_hh[:2 * H]
        r = activate(v.gate, pre(gx[:, :H] + gh_rz[:, :H]))
        z = activate(v.gate, pre(gx[:, H:2 * H] + gh_rz[:, H:]))
        if linear_before_reset:
            n = activate(v.candidate, pre(gx[:, 2 * H:] + r * (mm(h, w_hh[2 * H:]) + b_hh[2 * H:])))
        else:
            n = activate(v.candidate, pre(gx[:, 2 * H:] + mm(r * h, w_hh[2 * H:]) + b_hh[2 * H:]))
        return (1.0 - z) * n + z * h, None
    return activate(v.candidate, pre(gx + mm(h, w_hh) + b_hh)), None


def _matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a @ w.T


def cell_step(kind: str, xt: np.ndarray, h: np.ndarray, c: np.ndarray | None,
              w_ih: np.ndarray, w_hh: np.ndarray, b_ih: np.ndarray, b_hh: np.ndarray,
              w_hr: np.ndarray | None = None, linear_before_reset: bool = True,
              nonlinearity: str = "tanh", matmul=None, variant=None,
              w_ph: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One step of one cell for a batch: returns (h', c').

    ``matmul(a, w)`` computes each product ``a @ w.T`` (default: in float64); the frozen
    layers' twin passes their bf16 / int8 products (rnnfast._lowp.lowp_matmul).
    ``variant``: a :class:`rnnfast.cells.Variant` (other activations, peepholes ``w_ph``
    (3*H,) in the order i, f, o, clip, coupled input-forget gate), None for the standard cell."""
    H = w_hh.shape[0] // CELLS[kind].num_gates
    mm = matmul or _matmul
    gx = mm(xt, w_ih) + b_ih
    if variant is not None:
        return _variant_step(kind, variant, gx, h, c, w_hh, b_hh, w_ph, w_hr, linear_before_reset, mm, H)
    if kind == "lstm":
        g = gx + mm(h, w_hh) + b_hh
        i, f, gg, o = sigmoid(g[:, :H]), sigmoid(g[:, H:2 * H]), np.tanh(g[:, 2 * H:3 * H]), sigmoid(g[:, 3 * H:])
        c_new = f * c + i * gg
        h_new = o * np.tanh(c_new)
        if w_hr is not None:
            h_new = mm(h_new, w_hr)
        return h_new, c_new
    if kind == "gru":
        gh_rz = mm(h, w_hh[:2 * H]) + b_hh[:2 * H]
        r = sigmoid(gx[:, :H] + gh_rz[:, :H])
        z = sigmoid(gx[:, H:2 * H] + gh_rz[:, H:])
        if linear_before_reset:
            n = np.tanh(gx[:, 2 * H:] + r * (mm(h, w_hh[2 * H:]) + b_hh[2 * H:]))
        else:
            n = np.tanh(gx[:, 2 * H:] + mm(r * h, w_hh[2 * H:]) + b_hh[2 * H:])
        return (1.0 - z) * n + z * h, None
    if kind == "rnn":
        a = gx + mm(h, w_hh) + b_hh
        return (np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0.0)), None
    raise ValueError(f"unknown cell kind {kind!r}")


def run_direction(kind: str, x: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray,
                  b_ih: np.ndarray | None = None, b_hh: np.ndarray | None = None, *,
                  h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                  w_hr: np.ndarray | None = None, lengths: np.ndarray | None = None,
                  reverse: bool = False, linear_before_reset: bool = True,
                  nonlinearity: str = "tanh", matmul=None, variant=None, w_ph: np.ndarray | None = None):
    """One layer, one direction over a time-major batch ``x`` of shape (T, B, I).

    ``variant`` and ``w_ph``: a cell variant, as in :func:`cell_step`.

    Returns ``(y, h_n, c_n)`` in float64: y (T, B, H_out), zero at t >= lengths[b];
    ``c_n`` is None except for LSTM. A reverse direction runs each sequence from its
    last valid step down to step 0 (PyTorch's packed-sequence semantics).
    """
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    G = CELLS[kind].num_gates
    H = w_hh.shape[0] // G
    w_ih, w_hh = np.asarray(w_ih, np.float64), np.asarray(w_hh, np.float64)
    b_ih = np.zeros(G * H) if b_ih is None else np.asarray(b_ih, np.float64)
    b_hh = np.zeros(G * H) if b_hh is None else np.asarray(b_hh, np.float64)
    w_hr = None if w_hr is None else np.asarray(w_hr, np.float64)
    w_ph = None if w_ph is None else np.asarray(w_ph, np.float64)
    Hout = w_hr.shape[0] if w_hr is not None else H
    h = np.zeros((B, Hout)) if h0 is None else np.array(h0, np.float64)
    c = None
    if kind == "lstm":
        c = np.zeros((B, H)) if c0 is None else np.array(c0, np.float64)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    y = np.zeros((T, B, Hout))
    tmax = min(T, int(lengths.max())) if B else 0      # steps past every length do nothing
    steps = range(tmax - 1, -1, -1) if reverse else range(tmax)
    for t in steps:
        live = lengths > t
        if not live.any():
            continue
        h_new, c_new = cell_step(kind, x[t, live], h[live], None if c is None else c[live],
                                 w_ih, w_hh, b_ih, b_hh, w_hr, linear_before_reset, nonlinearity, matmul,
                                 variant, w_ph)
        h[live] = h_new
        if c is not None:
            c[live] = c_new
        y[t, live] = h_new
    return y, h, c
