"""Functional API (rnnfast.lstm / gru / rnn): every backend x cell x option against the
float64 reference and against PyTorch."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import rnnfast
from rnnfast import reference

from conftest import (
    ALL_BACKENDS,
    BACKENDS,
    F64_TORCH_TOL,
    GATES,
    VARIANT_IDS,
    VARIANTS,
    lengths_case,
    rng_for,
    tol_for,
    torch_module,
    torch_run,
    torch_state_dict,
)

T, B, I, H = 7, 4, 3, 5
P = 3   # projection width of lstm-proj


def make_weights(kind, opts, rng, dtype, bias=True, I=I, H=H):
    """Well-conditioned weights U(-1/sqrt(H), 1/sqrt(H)) in `dtype` (a dict of kwargs)."""
    G = GATES[kind]
    Hout = P if opts.get("proj") else H
    k = 1 / np.sqrt(H)
    w = {"w_ih": rng.uniform(-k, k, (G * H, I)), "w_hh": rng.uniform(-k, k, (G * H, Hout))}
    if bias:
        w["b_ih"] = rng.uniform(-k, k, G * H)
        w["b_hh"] = rng.uniform(-k, k, G * H)
    if opts.get("proj"):
        w["w_hr"] = rng.uniform(-k, k, (Hout, H))
    return {n: a.astype(dtype) for n, a in w.items()}, Hout


def call(kind, opts, x, w, **kw):
    """Call the functional API; returns (y, [h_n] or [h_n, c_n])."""
    if kind == "lstm":
        y, (h, c) = rnnfast.lstm(x, w["w_ih"], w["w_hh"], w.get("b_ih"), w.get("b_hh"), w_hr=w.get("w_hr"), **kw)
        return y, [h, c]
    if kind == "gru":
        y, h = rnnfast.gru(x, w["w_ih"], w["w_hh"], w.get("b_ih"), w.get("b_hh"),
                           linear_before_reset=opts["linear_before_reset"], **kw)
        return y, [h]
    y, h = rnnfast.rnn(x, w["w_ih"], w["w_hh"], w.get("b_ih"), w.get("b_hh"),
                       nonlinearity=opts["nonlinearity"], **kw)
    return y, [h]


def oracle(kind, opts, x_tbi, w, h0=None, c0=None, lengths=None, reverse=False):
    """reference.run_direction on the float64 values of the inputs (time-major)."""
    f = {n: np.asarray(a, np.float64) for n, a in w.items()}
    y, h, c = reference.run_direction(
        kind, np.asarray(x_tbi, np.float64), f["w_ih"], f["w_hh"], f.get("b_ih"), f.get("b_hh"),
        h0=None if h0 is None else np.asarray(h0, np.float64),
        c0=None if c0 is None else np.asarray(c0, np.float64), w_hr=f.get("w_hr"),
        lengths=lengths, reverse=reverse, linear_before_reset=opts.get("linear_before_reset", True),
        nonlinearity=opts.get("nonlinearity", "tanh"))
    return y, ([h, c] if kind == "lstm" else [h])


def check(got, want, dtype):
    gy, gs = got
    wy, ws = want
    tol = tol_for(dtype)
    assert gy.dtype == np.dtype(dtype) and gy.shape == wy.shape, (gy.dtype, gy.shape, wy.shape)
    np.testing.assert_allclose(gy, wy, err_msg="y", **tol)
    for i, (g, e) in enumerate(zip(gs, ws)):
        assert g.dtype == np.dtype(dtype) and g.shape == e.shape, (i, g.dtype, g.shape, e.shape)
        np.testing.assert_allclose(g, e, err_msg=f"state {i}", **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("lengths_name", ["none", "full", "unsorted", "with-zero", "short", "equal"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_functional_matches_reference(be, variant, lengths_name, dtype):
    """reverse x batch_first x (h0, c0) x bias, for each backend, cell, lengths pattern, dtype."""
    _, kind, opts = variant
    for reverse, batch_first, with_h0, bias in itertools.product([False, True], repeat=4):
        rng = rng_for("func", be, kind, repr(opts), lengths_name, np.dtype(dtype).name,
                      reverse, batch_first, with_h0, bias)
        w, Hout = make_weights(kind, opts, rng, dtype, bias)
        x = rng.standard_normal((T, B, I)).astype(dtype)
        ln = lengths_case(lengths_name, T, B)
        h0 = (0.5 * rng.standard_normal((B, Hout))).astype(dtype) if with_h0 else None
        c0 = (0.5 * rng.standard_normal((B, H))).astype(dtype) if with_h0 and kind == "lstm" else None
        kw = dict(h0=h0, lengths=ln, reverse=reverse, batch_first=batch_first)
        if kind == "lstm":
            kw["c0"] = c0
        xin = x.transpose(1, 0, 2).copy() if batch_first else x
        with rnnfast.backend(be):
            y, states = call(kind, opts, xin, w, **kw)
        wy, ws = oracle(kind, opts, x, w, h0, c0, ln, reverse)
        if batch_first:
            wy = wy.transpose(1, 0, 2)
        check((y, states), (wy, ws), dtype)
        if ln is not None:   # outputs past each length are exactly 0
            yt = y.transpose(1, 0, 2) if batch_first else y
            for b in range(B):
                assert np.all(yt[ln[b]:, b] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_functional_unbatched(be, variant, dtype):
    """2-D (T, F) input: y (T, H_out), states (H,); lengths scalar or shape (1,);
    batch_first is ignored."""
    _, kind, opts = variant
    for reverse, lengths, with_h0, batch_first in itertools.product(
            [False, True], [None, 4, np.array([1]), [0], T], [False, True], [False, True]):
        rng = rng_for("unb", be, kind, repr(opts), reverse, repr(lengths), with_h0, batch_first)
        w, Hout = make_weights(kind, opts, rng, dtype)
        x = rng.standard_normal((T, I)).astype(dtype)
        h0 = (0.5 * rng.standard_normal(Hout)).astype(dtype) if with_h0 else None
        c0 = (0.5 * rng.standard_normal(H)).astype(dtype) if with_h0 and kind == "lstm" else None
        kw = dict(h0=h0, lengths=lengths, reverse=reverse, batch_first=batch_first)
        if kind == "lstm":
            kw["c0"] = c0
        with rnnfast.backend(be):
            y, states = call(kind, opts, x, w, **kw)
        ln = None if lengths is None else np.asarray(lengths).reshape(1)
        wy, ws = oracle(kind, opts, x[:, None], w, None if h0 is None else h0[None],
                        None if c0 is None else c0[None], ln, reverse)
        check((y, states), (wy[:, 0], [s[0] for s in ws]), dtype)
        assert y.shape == (T, Hout)
        assert states[0].shape == (Hout,)
        if kind == "lstm":
            assert states[1].shape == (H,)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_functional_dtype_rule(be, variant):
    """The weights decide the compute dtype; x and states of the other precision are cast."""
    _, kind, opts = variant
    rng = rng_for("dtype", be, kind, repr(opts))
    w64, Hout = make_weights(kind, opts, rng, np.float64)
    w32 = {n: a.astype(np.float32) for n, a in w64.items()}
    x64 = rng.standard_normal((T, B, I))
    x32 = x64.astype(np.float32)
    h0 = 0.5 * rng.standard_normal((B, Hout))
    c0 = 0.5 * rng.standard_normal((B, H))
    kw = dict(h0=h0.astype(np.float32))
    if kind == "lstm":
        kw["c0"] = c0.astype(np.float32)
    with rnnfast.backend(be):
        # float64 weights, float32 x and states -> float64 result, equal to the all-float64 call
        y, s = call(kind, opts, x32, w64, **kw)
        kw64 = {k: v.astype(np.float64) for k, v in kw.items()}
        y_ref, s_ref = call(kind, opts, x32.astype(np.float64), w64, **kw64)
        assert y.dtype == np.float64 and all(a.dtype == np.float64 for a in s)
        np.testing.assert_array_equal(y, y_ref)
        # float32 weights, float64 x and states -> float32 result, equal to casting first
        kw64 = {k: v.astype(np.float64) for k, v in kw.items()}
        y, s = call(kind, opts, x64, w32, **kw64)
        y_ref, s_ref = call(kind, opts, x32, w32, **kw)
        assert y.dtype == np.float32 and all(a.dtype == np.float32 for a in s)
        np.testing.assert_array_equal(y, y_ref)
        for a, b in zip(s, s_ref):
            np.testing.assert_array_equal(a, b)
        # float16 input is a float too: cast to the weights' dtype
        y, _ = call(kind, opts, x64.astype(np.float16), w32)
        assert y.dtype == np.float32


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] != "gru-nolbr"],
                         ids=[i for i in VARIANT_IDS if i != "gru-nolbr"])
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_functional_matches_torch(be, variant):
    """One direction of a torch layer (forward: weights *_l0, reverse: *_l0_reverse), with
    initial states, full and packed (unsorted, length-1, max < T) sequences."""
    _, kind, opts = variant
    Ht = 6
    m = torch_module(kind, opts, I, Ht, bidirectional=True, seed=11)
    sd = torch_state_dict(m)
    Hout = sd["weight_hh_l0"].shape[1]
    rng = rng_for("func-torch", be, kind, repr(opts))
    x = rng.standard_normal((T, B, I))
    h0 = 0.5 * rng.standard_normal((2, B, Hout))
    c0 = 0.5 * rng.standard_normal((2, B, Ht))
    hx = (h0, c0) if kind == "lstm" else h0
    for ln in [None, np.array([3, 7, 1, 6]), np.array([2, 5, 1, 5])]:
        ty, th = torch_run(m, x, hx, ln)
        th = list(th) if kind == "lstm" else [th]
        for d, sfx in enumerate(["", "_reverse"]):
            w = {"w_ih": sd[f"weight_ih_l0{sfx}"], "w_hh": sd[f"weight_hh_l0{sfx}"],
                 "b_ih": sd[f"bias_ih_l0{sfx}"], "b_hh": sd[f"bias_hh_l0{sfx}"]}
            if opts.get("proj"):
                w["w_hr"] = sd[f"weight_hr_l0{sfx}"]
            kw = dict(h0=h0[d], lengths=ln, reverse=bool(d))
            if kind == "lstm":
                kw["c0"] = c0[d]
            with rnnfast.backend(be):
                y, s = call(kind, dict(opts, linear_before_reset=True, nonlinearity=opts.get("nonlinearity", "tanh")),
                            x, w, **kw)
            np.testing.assert_allclose(y, ty[..., d * Hout:(d + 1) * Hout], **F64_TORCH_TOL)
            for g, e in zip(s, th):
                np.testing.assert_allclose(g, e[d], **F64_TORCH_TOL)


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_length_zero_and_all_zero(be):
    """Length 0: output rows zero, final state == initial state (also when every length is 0)."""
    rng = rng_for("zero", be)
    w, _ = make_weights("lstm", {}, rng, np.float64)
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    for ln in [np.array([0, 3, 0, 7]), np.zeros(B, np.int64)]:
        for reverse in (False, True):
            with rnnfast.backend(be):
                y, (h, c) = rnnfast.lstm(x, **w, h0=h0, c0=c0, lengths=ln, reverse=reverse)
            zero = ln == 0
            assert np.all(y[:, zero] == 0)
            np.testing.assert_array_equal(h[zero], h0[zero])
            np.testing.assert_array_equal(c[zero], c0[zero])


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_lengths_dtypes(be):
    """lengths: any integer dtype, or a list of ints; results identical."""
    rng = rng_for("lendt", be)
    w, _ = make_weights("gru", {"linear_before_reset": True}, rng, np.float64)
    x = rng.standard_normal((T, B, I))
    ln = [3, 7, 1, 0]
    with rnnfast.backend(be):
        want = rnnfast.gru(x, **w, lengths=np.array(ln, np.int64))
        for lv in [ln, np.array(ln, np.int32), np.array(ln, np.uint8), np.array(ln, np.int16),
                   tuple(ln), np.array(ln, np.uint64)]:
            got = rnnfast.gru(x, **w, lengths=lv)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_lstm_h0_only_or_c0_only(be):
    """A missing h0 or c0 is zero, independently of the other."""
    rng = rng_for("h0c0", be)
    for proj in (False, True):
        w, Hout = make_weights("lstm", {"proj": proj}, rng, np.float64)
        x = rng.standard_normal((T, B, I))
        h0, c0 = rng.standard_normal((B, Hout)), rng.standard_normal((B, H))
        for kw, (eh, ec) in [({"h0": h0}, (h0, None)), ({"c0": c0}, (None, c0))]:
            with rnnfast.backend(be):
                y, s = call("lstm", {}, x, w, lengths=[7, 1, 0, 4], **kw)
            wy, ws = oracle("lstm", {}, x, w, eh, ec, np.array([7, 1, 0, 4]))
            check((y, s), (wy, ws), np.float64)


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_state_shapes_are_per_spec(be):
    """SPEC: functional h0, h_n, c0, c_n are (B, H) (P wide for h with w_hr); unbatched
    input gives states (H,). Regression: h0 of shape (B, H) must be accepted."""
    rng = rng_for("state-shapes", be)
    x = rng.standard_normal((T, B, I))
    with rnnfast.backend(be):
        for kind, G in [("lstm", 4), ("gru", 3), ("rnn", 1)]:
            w_ih, w_hh = 0.3 * rng.standard_normal((G * H, I)), 0.3 * rng.standard_normal((G * H, H))
            fn = getattr(rnnfast, kind)
            kw = {"c0": np.zeros((B, H))} if kind == "lstm" else {}
            y, s = fn(x, w_ih, w_hh, h0=np.zeros((B, H)), **kw)
            h = s[0] if kind == "lstm" else s
            assert y.shape == (T, B, H) and h.shape == (B, H)
            kw = {"c0": np.zeros(H)} if kind == "lstm" else {}
            y, s = fn(x[:, 0], w_ih, w_hh, h0=np.zeros(H), **kw)
            h = s[0] if kind == "lstm" else s
            assert y.shape == (T, H) and h.shape == (H,)
        w_hh_p = 0.3 * rng.standard_normal((4 * H, P))
        y, (h, c) = rnnfast.lstm(x, 0.3 * rng.standard_normal((4 * H, I)), w_hh_p, h0=np.zeros((B, P)),
                                 c0=np.zeros((B, H)), w_hr=0.3 * rng.standard_normal((P, H)))
        assert y.shape == (T, B, P) and h.shape == (B, P) and c.shape == (B, H)


# --------------------------------------------------------------- IEEE special values
def _special_case(kind, dt, T, rng):
    """Weights whose recurrent products of an infinite state are +-inf without inf - inf:
    GRU's reset gate gets -inf (r = 0 exactly) and its candidate product +inf, so that
    r * (W_hn h) is 0 * inf = NaN, as PyTorch computes it."""
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    H, I = 20, 6
    w_ih = (rng.standard_normal((G * H, I)) * 0.3).astype(dt)
    w_hh = (np.abs(rng.standard_normal((G * H, H))) + 0.1).astype(dt)
    w_hh[:H] *= -1
    x = rng.standard_normal((T, 3, I)).astype(dt)
    return x, w_ih, w_hh, H


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("be", BACKENDS)
def test_special_values_propagate_as_in_the_reference(be, dtype):
    """Regression: a GRU with an infinite initial state gave NaN in PyTorch and the
    reference, finite values on the fast backends (their float32 sigmoid never reached
    0: sigmoid(-inf) was 4.5e-39, and 4.5e-39 * inf is inf, not NaN). Infinite states and
    NaN/inf inputs give the reference's NaN pattern, on the serving (T=1), per-step (T=3)
    and fused (T=6) paths."""
    rng = rng_for("special", be, np.dtype(dtype).name)
    for kind, f, extra in (("gru", rnnfast.gru, {}), ("gru", rnnfast.gru, {"linear_before_reset": False}),
                           ("lstm", rnnfast.lstm, {}), ("rnn", rnnfast.rnn, {})):
        for T in (1, 3, 6):
            x, w_ih, w_hh, H = _special_case(kind, dtype, T, rng)
            cases = [(x, np.full((3, H), np.inf, dtype)), (x, np.full((3, H), -np.inf, dtype))]
            xn = x.copy()
            xn[0, 1, 2] = np.nan
            xi = x.copy()
            xi[0, 2, :] = np.inf
            cases += [(xn, None), (xi, None)]
            for xx, h0 in cases:
                kw = dict(extra, h0=h0)
                if kind == "lstm" and h0 is not None:
                    kw["c0"] = np.zeros_like(h0)
                with np.errstate(invalid="ignore", over="ignore"), rnnfast.backend("reference"):
                    want = f(xx, w_ih, w_hh, **kw)[0]
                with np.errstate(invalid="ignore", over="ignore"), rnnfast.backend(be):
                    got = f(xx, w_ih, w_hh, **kw)[0]
                label = (kind, extra, T, None if h0 is None else h0[0, 0])
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=str(label))
                fin = np.isfinite(want)
                np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=str(label))
                np.testing.assert_allclose(got[fin], want[fin], rtol=2e-4, atol=2e-5, err_msg=str(label))


@pytest.mark.parametrize("be", BACKENDS)
def test_empty_batch_with_huge_T_costs_nothing(be):
    """B=0 with T=2**40 (a zero-size view): every entry point returns at once with
    (T, 0, .) outputs and allocates nothing T-long (it allocated 8 bytes a step on the
    Cython backend and looped over every step on the reference)."""
    import tracemalloc
    T, I, H = 1 << 40, 4, 6
    x = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (T, 0, I), (0, 0, 0))
    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal((G * H, n)).astype(np.float32) for k, G, n in
         (("l_ih", 4, I), ("l_hh", 4, H), ("g_ih", 3, I), ("g_hh", 3, H), ("r_ih", 1, I), ("r_hh", 1, H))}
    wz, wh = rng.standard_normal((H, I)).astype(np.float32), rng.standard_normal((H, I)).astype(np.float32)
    tracemalloc.start()
    try:
        with rnnfast.backend(be):
            y, (hn, cn) = rnnfast.lstm(x, w["l_ih"], w["l_hh"])
            assert y.shape == (T, 0, H) and hn.shape == cn.shape == (0, H)
            y, hn = rnnfast.gru(x, w["g_ih"], w["g_hh"], lengths=np.zeros(0, np.int64))
            assert y.shape == (T, 0, H) and hn.shape == (0, H)
            y, hn = rnnfast.rnn(x, w["r_ih"], w["r_hh"], reverse=True)
            assert y.shape == (T, 0, H)
            layer = rnnfast.GRU(I, H, num_layers=2, bidirectional=True, seed=0)
            y, hn = layer(x)
            assert y.shape == (T, 0, 2 * H) and hn.shape == (4, 0, H)
            y, hn = layer.forward(x, train=True)
            dx, dh0 = layer.backward(y)
            assert dx.shape == (T, 0, I) and dh0.shape == (4, 0, H)
            assert all(np.all(g == 0) for g in layer.grads.values())
            y, hn = rnnfast.mingru(x, wz, wh)
            assert y.shape == (T, 0, H) and hn.shape == (0, H)
            a = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (T, 0), (0, 0))
            assert rnnfast.linear_scan(a, a).shape == (T, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak         # first calls compile and import: small, never T-long
