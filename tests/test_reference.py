"""The NumPy reference (rnnfast.reference), the suite's oracle: anchored here to PyTorch
and to the equations of SPEC.md written out independently."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from rnnfast import reference

from conftest import F64_TORCH_TOL, require_oracle, rng_for, torch_module, torch_run, torch_state_dict

torch = require_oracle("torch")


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _by_hand(kind, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, w_hr=None, lbr=True, act="tanh"):
    """SPEC.md's equations, one unbatched step after another (independent of rnnfast)."""
    H = w_hh.shape[0] // {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    h, c = h0.copy(), None if c0 is None else c0.copy()
    ys = []
    for xt in x:
        if kind == "lstm":
            a = w_ih @ xt + b_ih + w_hh @ h + b_hh
            i, f, g, o = _sig(a[:H]), _sig(a[H:2 * H]), np.tanh(a[2 * H:3 * H]), _sig(a[3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
            if w_hr is not None:
                h = w_hr @ h
        elif kind == "gru":
            Wir, Wiz, Win = np.split(w_ih, 3)
            Whr, Whz, Whn = np.split(w_hh, 3)
            bir, biz, bin_ = np.split(b_ih, 3)
            bhr, bhz, bhn = np.split(b_hh, 3)
            r = _sig(Wir @ xt + bir + Whr @ h + bhr)
            z = _sig(Wiz @ xt + biz + Whz @ h + bhz)
            if lbr:
                n = np.tanh(Win @ xt + bin_ + r * (Whn @ h + bhn))
            else:
                n = np.tanh(Win @ xt + bin_ + Whn @ (r * h) + bhn)
            h = (1 - z) * n + z * h
        else:
            a = w_ih @ xt + b_ih + w_hh @ h + b_hh
            h = np.tanh(a) if act == "tanh" else np.maximum(a, 0)
        ys.append(h)
    return np.array(ys), h, c


@pytest.mark.parametrize("kind,proj,lbr,act", [
    ("lstm", False, True, "tanh"), ("lstm", True, True, "tanh"), ("gru", False, True, "tanh"),
    ("gru", False, False, "tanh"), ("rnn", False, True, "tanh"), ("rnn", False, True, "relu")])
@pytest.mark.parametrize("reverse", [False, True])
def test_reference_matches_equations(kind, proj, lbr, act, reverse):
    rng = rng_for("eq", kind, proj, lbr, act, reverse)
    T, B, I, H, P = 6, 3, 4, 5, 3
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    Hout = P if proj else H
    w_ih = rng.uniform(-0.5, 0.5, (G * H, I))
    w_hh = rng.uniform(-0.5, 0.5, (G * H, Hout))
    b_ih, b_hh = rng.uniform(-0.5, 0.5, G * H), rng.uniform(-0.5, 0.5, G * H)
    w_hr = rng.uniform(-0.5, 0.5, (P, H)) if proj else None
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((B, Hout)) * 0.5
    c0 = rng.standard_normal((B, H)) * 0.5 if kind == "lstm" else None
    y, hn, cn = reference.run_direction(kind, x, w_ih, w_hh, b_ih, b_hh, h0=h0, c0=c0, w_hr=w_hr,
                                        reverse=reverse, linear_before_reset=lbr, nonlinearity=act)
    assert y.dtype == np.float64 and y.shape == (T, B, Hout) and hn.shape == (B, Hout)
    for b in range(B):
        xs = x[::-1, b] if reverse else x[:, b]
        ey, eh, ec = _by_hand(kind, xs, w_ih, w_hh, b_ih, b_hh, h0[b], None if c0 is None else c0[b],
                              w_hr, lbr, act)
        np.testing.assert_allclose(y[:, b], ey[::-1] if reverse else ey, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(hn[b], eh, rtol=1e-12, atol=1e-12)
        if kind == "lstm":
            assert cn.shape == (B, H)
            np.testing.assert_allclose(cn[b], ec, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", [("lstm", {}), ("lstm", {"proj": True}), ("gru", {}),
                                     ("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"})],
                         ids=["lstm", "lstm-proj", "gru", "rnn-tanh", "rnn-relu"])
@pytest.mark.parametrize("lengths", [None, [4, 7, 1, 5]], ids=["full", "packed"])
def test_reference_matches_torch_bidirectional(variant, lengths):
    """Both directions of one torch layer vs run_direction(reverse=False/True), incl. packed."""
    kind, opts = variant
    T, B, I, H = 7, 4, 3, 6
    m = torch_module(kind, opts, I, H, bidirectional=True, seed=3)
    sd = torch_state_dict(m)
    rng = rng_for("ref-torch", kind, repr(opts), repr(lengths))
    x = rng.standard_normal((T, B, I))
    Hout = sd["weight_hh_l0"].shape[1]
    h0 = rng.standard_normal((2, B, Hout)) * 0.5
    c0 = rng.standard_normal((2, B, H)) * 0.5
    hx = (h0, c0) if kind == "lstm" else h0
    ty, th = torch_run(m, x, hx, lengths)
    th = th if kind == "lstm" else (th,)
    ln = None if lengths is None else np.array(lengths)
    for d, sfx in enumerate(["", "_reverse"]):
        y, hn, cn = reference.run_direction(
            kind, x, sd[f"weight_ih_l0{sfx}"], sd[f"weight_hh_l0{sfx}"], sd[f"bias_ih_l0{sfx}"],
            sd[f"bias_hh_l0{sfx}"], h0=h0[d], c0=c0[d] if kind == "lstm" else None,
            w_hr=sd.get(f"weight_hr_l0{sfx}"), lengths=ln, reverse=bool(d),
            nonlinearity=opts.get("nonlinearity", "tanh"))
        np.testing.assert_allclose(y, ty[..., d * Hout:(d + 1) * Hout], **F64_TORCH_TOL)
        np.testing.assert_allclose(hn, th[0][d], **F64_TORCH_TOL)
        if kind == "lstm":
            np.testing.assert_allclose(cn, th[1][d], **F64_TORCH_TOL)


def test_reference_lengths_semantics():
    """Outputs past a length are exactly 0; length 0 keeps the initial state; a reverse
    direction ends on step 0 of each sequence's own valid steps."""
    rng = rng_for("ref-len")
    T, B, I, H = 5, 3, 2, 4
    w_ih, w_hh = rng.uniform(-0.5, 0.5, (4 * H, I)), rng.uniform(-0.5, 0.5, (4 * H, H))
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    ln = np.array([2, 0, 5])
    for reverse in (False, True):
        y, hn, cn = reference.run_direction("lstm", x, w_ih, w_hh, h0=h0, c0=c0, lengths=ln, reverse=reverse)
        assert np.all(y[2:, 0] == 0) and np.all(y[:, 1] == 0)
        np.testing.assert_array_equal(hn[1], h0[1])
        np.testing.assert_array_equal(cn[1], c0[1])
        # sequence 0 alone, truncated to its 2 steps
        y0, h0n, _c0n = reference.run_direction("lstm", x[:2, :1], w_ih, w_hh, h0=h0[:1], c0=c0[:1],
                                               reverse=reverse)
        np.testing.assert_allclose(y[:2, :1], y0, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(hn[:1], h0n, rtol=1e-13, atol=1e-13)


def test_reference_sigmoid_is_stable():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = reference.sigmoid(x)
    np.testing.assert_allclose(s, [0.0, _sig(-50.0), 0.5, _sig(50.0), 1.0], rtol=1e-15, atol=1e-300)


def test_reference_does_not_modify_inputs():
    rng = rng_for("ref-nomod")
    x = rng.standard_normal((4, 2, 3))
    w_ih, w_hh = rng.standard_normal((12, 3)), rng.standard_normal((12, 4))
    h0 = rng.standard_normal((2, 4))
    copies = [a.copy() for a in (x, w_ih, w_hh, h0)]
    reference.run_direction("gru", x, w_ih, w_hh, h0=h0, lengths=np.array([1, 4]))
    for a, c in zip((x, w_ih, w_hh, h0), copies):
        np.testing.assert_array_equal(a, c)
