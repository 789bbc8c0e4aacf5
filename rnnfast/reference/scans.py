"""The time-parallel recurrences as plain loops over time in float64: the oracle of
:mod:`rnnfast.scan` and its "reference" backend.

- linear_scan: h_t = a_t * h_{t-1} + b_t (:func:`scan_reference`);
- minGRU / minLSTM: the scan's coefficients from the gates' pre-activations
  (:func:`minrnn_coefficients`) and the recurrence (:func:`minrnn_reference`).
"""
from __future__ import annotations

import numpy as np

from . import sigmoid


def scan_reference(a2: np.ndarray, b2: np.ndarray, carry: np.ndarray, reverse: bool) -> np.ndarray:
    """Plain loop over time in float64 (the oracle). carry is updated to the final state."""
    a2 = np.asarray(a2, np.float64)
    b2 = np.asarray(b2, np.float64)
    out = np.empty(a2.shape, np.float64)
    h = carry
    if a2.size == 0:                # an empty batch: no work, however long
        return out
    steps = range(a2.shape[0] - 1, -1, -1) if reverse else range(a2.shape[0])
    for t in steps:
        h = a2[t] * h + b2[t]
        out[t] = h
    carry[...] = h
    return out


def minrnn_coefficients(kind: str, pre: np.ndarray, H: int):
    """(a, b) of the scan and the gates, from pre-activations (..., G*H) including biases.

    Returns (a, b, gates) with gates (z, h~) for minGRU and (f, i, h~, a, c) for minLSTM
    (c = i' = 1 - a)."""
    if kind == "mingru":
        z = sigmoid(pre[..., :H])
        ht = pre[..., H:]
        return 1.0 - z, z * ht, (z, ht)
    pf, pi = pre[..., :H], pre[..., H:2 * H]
    f, i = sigmoid(pf), sigmoid(pi)
    ht = pre[..., 2 * H:]
    # f/(f+i) = sigmoid(log f - log i), log sigmoid(x) = -logaddexp(0, -x): exact where f
    # and i both underflow (f/(f+i) would be 0/0 there)
    d = np.logaddexp(0.0, -pi) - np.logaddexp(0.0, -pf)
    a, c = sigmoid(d), sigmoid(-d)
    return a, c * ht, (f, i, ht, a, c)


def minrnn_reference(kind: str, x3: np.ndarray, wcat: np.ndarray, bias: np.ndarray,
                      h0: np.ndarray, lens: np.ndarray | None):
    """The oracle: loop over time in float64. x3 (T, B, I) time-major; h0 (B, H).
    Returns (y (T, B, H), h_n (B, H)) in float64."""
    x3 = np.asarray(x3, np.float64)
    wcat = np.asarray(wcat, np.float64)
    bias = np.asarray(bias, np.float64)
    T, B, _ = x3.shape
    G = 2 if kind == "mingru" else 3
    H = wcat.shape[0] // G
    h = np.array(h0, np.float64)
    y = np.zeros((T, B, H))
    lens = np.full(B, T) if lens is None else lens
    for t in range(min(T, int(lens.max())) if B else 0):     # steps past every length do nothing
        live = lens > t
        if not live.any():
            continue
        a, b, _ = minrnn_coefficients(kind, x3[t, live] @ wcat.T + bias, H)
        h[live] = a * h[live] + b
        y[t, live] = h[live]
    return y, h
