"""Layers (rnnfast.LSTM / GRU / RNN): every backend x cell x option against the float64
reference oracle (conftest.ref_stack) and PyTorch; parameters, state_dict, load_state_dict."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import rnnfast
from rnnfast import _engine

from conftest import (
    ALL_BACKENDS,
    BACKENDS,
    F64_TORCH_TOL,
    VARIANT_IDS,
    VARIANTS,
    assert_result_close,
    flat_states,
    lengths_case,
    make_layer,
    random_hx,
    ref_stack,
    require_oracle,
    rng_for,
    torch_module,
    torch_run,
)

T, B, I, H = 7, 4, 3, 6
TORCH_VARIANTS = [v for v in VARIANTS if v[0] != "gru-nolbr"]
TORCH_IDS = [v[0] for v in TORCH_VARIANTS]


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_layer_matches_reference(be, variant, num_layers, bidirectional, dtype):
    """batch_first x lengths patterns (none, full, unsorted with length 1, length 0,
    max < T) x initial states x bias."""
    _, kind, opts = variant
    for i, lname in enumerate(["none", "full", "unsorted", "with-zero", "short", "equal"]):
        batch_first, with_hx, bias = i % 2 == 1, i % 3 != 2, i not in (1, 4)
        rng = rng_for("layer", be, kind, repr(opts), num_layers, bidirectional, np.dtype(dtype).name, i)
        layer = make_layer(kind, opts, I, H, num_layers=num_layers, bidirectional=bidirectional,
                           batch_first=batch_first, bias=bias, dtype=dtype, seed=i)
        x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
        hx = random_hx(layer, B, rng, dtype) if with_hx else None
        ln = lengths_case(lname, T, B)
        with rnnfast.backend(be):
            got = layer(x, hx, ln)
        want = ref_stack(layer, x, hx, ln)
        assert_result_close(got, want, dtype)
        D = 2 if bidirectional else 1
        assert got[0].shape == ((B, T) if batch_first else (T, B)) + (D * layer.output_size,)
        if ln is not None:
            yt = got[0].transpose(1, 0, 2) if batch_first else got[0]
            for b in range(B):
                assert np.all(yt[ln[b]:, b] == 0), "outputs past a length must be exactly 0"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_layer_unbatched(be, variant, dtype):
    """2-D input: y (T, D*H_out), states (L*D, H); lengths scalar or (1,); batch_first ignored."""
    _, kind, opts = variant
    for i, (bidir, lengths) in enumerate(itertools.product([False, True], [None, 3, np.array([T]), [0]])):
        batch_first, with_hx = i % 2 == 1, i % 3 != 1
        rng = rng_for("layer-unb", be, kind, repr(opts), i)
        layer = make_layer(kind, opts, I, H, num_layers=2, bidirectional=bidir, batch_first=batch_first,
                           dtype=dtype, seed=i)
        x = rng.standard_normal((T, I)).astype(dtype)
        hx = random_hx(layer, 1, rng, dtype, unbatched=True) if with_hx else None
        with rnnfast.backend(be):
            y, hn = layer(x, hx, lengths)
        want = ref_stack(layer, x, hx, lengths)
        assert_result_close((y, hn), want, dtype)
        D = 2 if bidir else 1
        assert y.shape == (T, D * layer.output_size)
        states = flat_states(hn)
        assert states[0].shape == (2 * D, layer.output_size)
        if kind == "lstm":
            assert states[1].shape == (2 * D, H)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_layer_dtype_rule(be, variant):
    """The layer's dtype decides: x and hx of the other precision are cast; output dtype ==
    layer dtype; lists and float16 inputs too."""
    _, kind, opts = variant
    rng = rng_for("layer-dtype", be, kind, repr(opts))
    for dtype, other in [(np.float32, np.float64), (np.float64, np.float32)]:
        layer = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=dtype, seed=1)
        x = rng.standard_normal((T, B, I))
        hx = random_hx(layer, B, rng, np.float64)
        def cast(s, dt):
            return tuple(a.astype(dt) for a in s) if isinstance(s, tuple) else s.astype(dt)

        with rnnfast.backend(be):
            y1, h1 = layer(x.astype(other), cast(hx, other))
            y2, h2 = layer(x.astype(other).astype(dtype), cast(cast(hx, other), dtype))
        assert y1.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(y1, y2)
        for a, b in zip(flat_states(h1), flat_states(h2)):
            assert a.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(a, b)
        with rnnfast.backend(be):
            y3, _ = layer(x.astype(np.float16))
        assert y3.dtype == np.dtype(dtype)


@pytest.mark.parametrize("be", BACKENDS)
def test_layer_length_zero_keeps_initial_state(be):
    rng = rng_for("layer-zero", be)
    for kind, opts in [("lstm", {}), ("lstm", {"proj": True}), ("gru", {"linear_before_reset": False}),
                       ("rnn", {"nonlinearity": "relu"})]:
        layer = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, seed=2)
        x = rng.standard_normal((T, B, I))
        hx = random_hx(layer, B, rng)
        for ln in [np.array([0, 5, 0, 1]), np.zeros(B, np.int64)]:
            with rnnfast.backend(be):
                y, hn = layer(x, hx, ln)
            z = ln == 0
            assert np.all(y[:, z] == 0)
            for got, init in zip(flat_states(hn), flat_states(hx)):
                np.testing.assert_array_equal(got[:, z], init[:, z])


@pytest.mark.parametrize("be", BACKENDS)
def test_layer_dropout_not_applied_in_inference(be):
    rng = rng_for("dropout", be)
    a = rnnfast.LSTM(I, H, num_layers=3, dropout=0.5, dtype=np.float64, seed=4)
    b = rnnfast.LSTM(I, H, num_layers=3, dropout=0.0, dtype=np.float64, seed=4)
    b.load_state_dict(a.state_dict())
    x = rng.standard_normal((T, B, I))
    with rnnfast.backend(be):
        ya, _ = a(x)
        yb, _ = b(x)
        ya2, _ = a.forward(x)
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(ya, ya2)


# ------------------------------------------------------------------ against PyTorch
def _torch_hx(module, B, rng):
    D = 2 if module.bidirectional else 1
    Hout = getattr(module, "proj_size", 0) or module.hidden_size
    h = 0.5 * rng.standard_normal((module.num_layers * D, B, Hout))
    if isinstance(module, __import__("torch").nn.LSTM):
        return (h, 0.5 * rng.standard_normal((module.num_layers * D, B, module.hidden_size)))
    return h


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("variant", TORCH_VARIANTS, ids=TORCH_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_layer_matches_torch(be, variant, num_layers, bidirectional):
    """torch.nn.LSTM/GRU/RNN (float64) via from_torch and via load_state_dict; full batches
    and packed sequences (enforce_sorted=False, unsorted, length 1, max < T); with and
    without initial states; batch_first; no bias."""
    _, kind, opts = variant
    odd = (num_layers + bidirectional) % 2 == 1
    for i, (batch_first, bias) in enumerate([(odd, True), (not odd, False)]):
        m = torch_module(kind, opts, I, H, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, bias=bias, seed=i)
        rng = rng_for("layer-torch", be, kind, repr(opts), num_layers, bidirectional, i)
        via_from = rnnfast.from_torch(m)
        via_sd = make_layer(kind, opts, I, H, num_layers=num_layers, bidirectional=bidirectional,
                            batch_first=batch_first, bias=bias, dtype=np.float64, seed=99)
        via_sd.load_state_dict(m.state_dict())
        assert via_from.dtype == np.float64
        x = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
        for ln, with_hx in [(None, False), (None, True), (np.array([3, 7, 1, 5]), True),
                            (np.array([2, 1, 5, 4]), False)]:
            hx = _torch_hx(m, B, rng) if with_hx else None
            ty, th = torch_run(m, x, hx, ln)
            for layer in (via_from, via_sd):
                with rnnfast.backend(be):
                    y, hn = layer(x, hx, ln)
                assert y.dtype == np.float64
                np.testing.assert_allclose(y, ty, **F64_TORCH_TOL)
                for a, e in zip(flat_states(hn), flat_states(th)):
                    np.testing.assert_allclose(a, e, **F64_TORCH_TOL)


@pytest.mark.parametrize("variant", TORCH_VARIANTS, ids=TORCH_IDS)
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_layer_matches_torch_unbatched_and_float32(be, variant):
    torch = require_oracle("torch")
    _, kind, opts = variant
    rng = rng_for("layer-torch-unb", be, kind, repr(opts))
    m64 = torch_module(kind, opts, I, H, num_layers=2, bidirectional=True, seed=5)
    x = rng.standard_normal((T, I))
    layer = rnnfast.from_torch(m64)
    with torch.no_grad():
        ty, th = m64(torch.from_numpy(x))
    with rnnfast.backend(be):
        y, hn = layer(x)
    np.testing.assert_allclose(y, ty.numpy(), **F64_TORCH_TOL)
    for a, e in zip(flat_states(hn), flat_states(th)):
        np.testing.assert_allclose(a, e.numpy(), **F64_TORCH_TOL)
    # float32 torch module -> float32 layer; compared to torch's float32 result loosely and
    # to the float64 reference with the float32 contract tolerance
    m32 = torch_module(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=np.float32, seed=5)
    l32 = rnnfast.from_torch(m32)
    assert l32.dtype == np.float32
    x32 = rng.standard_normal((T, B, I)).astype(np.float32)
    ln = np.array([7, 2, 1, 6])
    with rnnfast.backend(be):
        got = l32(x32, None, ln)
    ty, th = torch_run(m32, x32, None, ln)
    np.testing.assert_allclose(got[0], ty, rtol=1e-4, atol=1e-5)
    assert_result_close(got, ref_stack(l32, x32, None, ln), np.float32)


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_parameter_names_and_shapes_match_torch(variant):
    require_oracle("torch")
    _, kind, opts = variant
    for L, bidir, bias in itertools.product([1, 3], [False, True], [True, False]):
        layer = make_layer(kind, opts, I, H, num_layers=L, bidirectional=bidir, bias=bias, dtype=np.float32)
        m = torch_module(kind, dict(opts, linear_before_reset=True), I, H, num_layers=L,
                         bidirectional=bidir, bias=bias, dtype=np.float32)
        want = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        got = {k: v.shape for k, v in layer.state_dict().items()}
        assert got == want
        assert set(layer.parameters()) == set(want)
        assert all(v.dtype == np.float32 for v in layer.parameters().values())


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_initialisation_range_and_seed(kind):
    a = make_layer(kind, {}, I, 16, num_layers=2, bidirectional=True, dtype=np.float64, seed=123)
    b = make_layer(kind, {}, I, 16, num_layers=2, bidirectional=True, dtype=np.float64, seed=123)
    c = make_layer(kind, {}, I, 16, num_layers=2, bidirectional=True, dtype=np.float64, seed=124)
    k = 1 / np.sqrt(16)
    for name, v in a.state_dict().items():
        assert np.all(np.abs(v) <= k), name
        assert v.std() > k / 4, name           # spread over the interval, not constant
        np.testing.assert_array_equal(v, b.state_dict()[name])
    assert any(not np.array_equal(v, c.state_dict()[n]) for n, v in a.state_dict().items())
    for dt in (np.float32, np.float64):
        lay = make_layer(kind, {}, I, 16, dtype=dt, seed=None)
        assert lay.dtype == np.dtype(dt)
        assert all(v.dtype == np.dtype(dt) for v in lay.state_dict().values())


def test_state_dict_returns_copies():
    layer = rnnfast.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, dtype=np.float64, seed=0)
    x = rng_for("sd-copy").standard_normal((T, B, I))
    y0, _ = layer(x)
    sd = layer.state_dict()
    for v in sd.values():
        v[...] = 7.0
    sd2 = layer.state_dict()
    assert all(not np.any(v == 7.0) for v in sd2.values())
    for k in sd2:
        assert not np.shares_memory(sd2[k], layer.parameters()[k])
    y1, _ = layer(x)
    np.testing.assert_array_equal(y0, y1)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_parameters_are_live(be, variant):
    """parameters() returns the live arrays; an in-place update changes the next result
    (no stale packed copy of the weights), also after load_state_dict."""
    _, kind, opts = variant
    rng = rng_for("live", be, kind, repr(opts))
    layer = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=3)
    x = rng.standard_normal((T, B, I))
    ln = np.array([7, 3, 1, 5])
    with rnnfast.backend(be):
        y0, _ = layer(x, None, ln)
    params = layer.parameters()
    assert set(params) == set(layer.state_dict())
    # every parameter of layer 0, and one of each kind in layer 1
    names = [n for n in sorted(params) if "_l0" in n] + \
        [n for n in sorted(params) if n.endswith("_l1_reverse")][::2]
    for name in names:
        p = params[name]
        assert p is layer.parameters()[name]
        old = p.copy()
        p -= 0.05 * rng.standard_normal(p.shape)        # an optimiser step, in place
        with rnnfast.backend(be):
            y1, h1 = layer(x, None, ln)
        assert not np.array_equal(y1, y0), name
        assert_result_close((y1, h1), ref_stack(layer, x, None, ln), np.float64)
        p[...] = old
        with rnnfast.backend(be):
            y2, _ = layer(x, None, ln)
        np.testing.assert_array_equal(y2, y0)
    # load_state_dict writes through: the arrays returned before see the new values
    other = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=8)
    layer.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(params[k], v)
    with rnnfast.backend(be):
        np.testing.assert_array_equal(layer(x, None, ln)[0], other(x, None, ln)[0])


def test_load_state_dict_accepts_array_likes_and_casts():
    torch = require_oracle("torch")
    src = rnnfast.GRU(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    sd = src.state_dict()
    for conv in [lambda v: v.tolist(), lambda v: torch.from_numpy(v.copy()).requires_grad_(True),
                 lambda v: np.asfortranarray(v), lambda v: v.astype(np.float32),
                 lambda v: np.repeat(v, 2, axis=0)[::2], lambda v: _readonly(v)]:
        dst = rnnfast.GRU(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=2)
        dst.load_state_dict({k: conv(v) for k, v in sd.items()})
        for k, v in dst.state_dict().items():
            assert v.dtype == np.float64
            np.testing.assert_allclose(v, sd[k], rtol=1e-7, atol=0)
    f32 = rnnfast.GRU(I, H, num_layers=2, bidirectional=True, dtype=np.float32, seed=2)
    f32.load_state_dict(sd)     # float64 values into a float32 layer: cast, dtype kept
    assert all(v.dtype == np.float32 for v in f32.state_dict().values())


def _readonly(v):
    v = v.copy()
    v.setflags(write=False)
    return v


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_load_state_dict_strict(kind):
    """Missing, unexpected and mis-shaped keys: one ValueError naming every offending key;
    the layer is left untouched."""
    layer = make_layer(kind, {}, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    before = layer.state_dict()
    good = make_layer(kind, {}, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=1).state_dict()
    bad = dict(good)
    del bad["weight_ih_l1"]
    del bad["bias_hh_l0_reverse"]
    bad["weight_xx_l0"] = np.zeros(3)
    bad["bias_ih_l9"] = np.zeros(3)
    bad["weight_hh_l0"] = np.zeros((2, 2))
    bad["bias_ih_l1_reverse"] = np.zeros(good["bias_ih_l1_reverse"].shape[0] + 1)
    with pytest.raises(ValueError) as ei:
        layer.load_state_dict(bad)
    msg = str(ei.value)
    for key in ["weight_ih_l1", "bias_hh_l0_reverse", "weight_xx_l0", "bias_ih_l9", "weight_hh_l0",
                "bias_ih_l1_reverse"]:
        assert key in msg, (key, msg)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # each kind of fault alone raises too, and leaves the layer as it was
    for mutate in [lambda d: d.pop("weight_hh_l1_reverse"),
                   lambda d: d.__setitem__("extra", np.zeros(1)),
                   lambda d: d.__setitem__("weight_ih_l0", np.zeros((1, I)))]:
        d = dict(good)
        mutate(d)
        with pytest.raises(ValueError):
            layer.load_state_dict(d)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
    # a value that is not numeric: TypeError, nothing loaded (not even the keys before it)
    d = {k: v + 1.0 for k, v in good.items()}
    d[sorted(d)[-1]] = np.zeros(good[sorted(d)[-1]].shape, np.complex128)
    with pytest.raises((TypeError, ValueError)):
        layer.load_state_dict(d)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # a bias-free layer has no bias keys: loading a state dict with biases is an error
    nb = make_layer(kind, {}, I, H, bias=False, dtype=np.float64)
    full = make_layer(kind, {}, I, H, bias=True, dtype=np.float64).state_dict()
    with pytest.raises(ValueError, match=r"^load_state_dict: unexpected keys: \['bias_hh_l0', 'bias_ih_l0'\]$"):
        nb.load_state_dict(full)


# ---------------------------------------------------------------- lean serving path
@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v[2].get("proj")], ids=lambda v: v[0])
@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("B", [1, 3, 9])          # 9: more rows than rf_rowdot takes, BLAS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_calls_match_reference(variant, T, B, dtype):
    """Calls of a few steps (the lean serving path with the Cython backend) against the
    oracle, with and without a carried state, and the caller's arrays left untouched."""
    _, kind, opts = variant
    lay = make_layer(kind, opts, 24, 40, dtype=dtype, seed=11)
    rng = rng_for("small", kind, str(opts), T, B, np.dtype(dtype).name)
    x = rng.standard_normal((T, B, 24)).astype(dtype)
    hx = random_hx(lay, B, rng, dtype)
    x0, hx0 = x.copy(), [a.copy() for a in flat_states(hx)]
    for state in (None, hx):
        got = lay(x, state)
        assert_result_close(got, ref_stack(lay, x, state), dtype)
        assert isinstance(got[0], np.ndarray) and got[0].flags.c_contiguous
    np.testing.assert_array_equal(x, x0)
    for a, b in zip(flat_states(hx), hx0):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("I,H", [(1, 3), (5, 16), (16, 17), (17, 31), (33, 48), (47, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_calls_any_feature_width(I, H, dtype):
    """The lean path's row products (rf_rowdot) over widths that are no multiple of the
    vector length: whole vectors, then the last elements as one masked vector (a scalar
    tail loop once made a 16-wide layer's step 2x slower). Regression for that rewrite."""
    lay = make_layer("lstm", {}, I, H, dtype=dtype, seed=21)
    rng = rng_for("width", I, H, np.dtype(dtype).name)
    x = rng.standard_normal((1, 2, I)).astype(dtype)
    hx = random_hx(lay, 2, rng, dtype)
    assert_result_close(lay(x, hx), ref_stack(lay, x, hx), dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_small_unbatched_calls_with_state(kind):
    """Unbatched serving calls (x (T, I), states (1, H)) on the lean path give the batched
    call's results without its batch axis, as fresh arrays of the unbatched shapes."""
    lay = make_layer(kind, {}, 12, 20, dtype=np.float32, seed=9)
    rng = rng_for("unbatched", kind)
    x = rng.standard_normal((2, 1, 12)).astype(np.float32)
    hx = random_hx(lay, 1, rng, np.float32)
    y_b, h_b = lay(x, hx)
    hx_u = tuple(a[:, 0] for a in hx) if kind == "lstm" else hx[:, 0]
    y_u, h_u = lay(x[:, 0], hx_u)
    assert y_u.shape == (2, 20) and y_u.flags.c_contiguous
    np.testing.assert_array_equal(y_u, y_b[:, 0])
    for g, w in zip(flat_states(h_u), flat_states(h_b)):
        assert g.shape == (1, 20)
        np.testing.assert_array_equal(g, w[:, 0])


def test_small_calls_carry_state_like_one_long_call():
    """Serving token by token (state carried) gives the outputs of one call over the sequence."""
    lay = make_layer("lstm", {}, 16, 48, dtype=np.float32, seed=2)
    x = rng_for("carry").standard_normal((12, 2, 16)).astype(np.float32)
    y_all, (h_all, c_all) = lay(x)
    hx, ys = None, []
    for t in range(12):
        y, hx = lay(x[t:t + 1], hx)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys), y_all, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hx[0], h_all, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hx[1], c_all, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v[2].get("proj")], ids=lambda v: v[0])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_token_calls_in_both_weight_orders(variant, nthreads, dtype, monkeypatch):
    """Every other one-token call of one row reads its weights in reverse (for L2 reuse,
    kernels/rf_fused_tmpl.h rf_rowdot1). Consecutive calls on the same input and state
    give the same bits, and each call of a served sequence matches the oracle. 70 units
    split into uneven slices (2 threads, which weights this small would not get unless
    forced); 37 and 70 are no multiple of the vector length."""
    _, kind, opts = variant
    monkeypatch.setattr(_engine, "_SMALL_1T_WBYTES", 0)
    rnnfast.set_num_threads(nthreads)
    lay = make_layer(kind, opts, 37, 70, dtype=dtype, seed=5)
    rng = rng_for("flip", kind, str(opts), nthreads, np.dtype(dtype).name)
    x = rng.standard_normal((6, 1, 37)).astype(dtype)
    hx = random_hx(lay, 1, rng, dtype)
    first, second = lay(x[:1], hx), lay(x[:1], hx)
    for a, b in zip([first[0], *flat_states(first[1])], [second[0], *flat_states(second[1])]):
        np.testing.assert_array_equal(a, b)
    state = hx
    for t in range(6):
        got = lay(x[t:t + 1], state)
        assert_result_close(got, ref_stack(lay, x[t:t + 1], state), dtype)
        state = got[1]


def test_small_call_results_are_fresh_arrays():
    """Outputs of the lean path never alias its reused scratch or each other."""
    lay = make_layer("gru", {}, 8, 16, dtype=np.float32, seed=4)
    x1 = np.ones((1, 1, 8), np.float32)
    y1, h1 = lay(x1)
    keep = y1.copy(), h1.copy()
    lay(-x1)
    np.testing.assert_array_equal(y1, keep[0])
    np.testing.assert_array_equal(h1, keep[1])
    assert not np.shares_memory(y1, h1)


@pytest.mark.parametrize("hx_kind", ["list", "float64", "fortran", "bad-shape"])
def test_small_call_odd_states_take_the_checked_path(hx_kind):
    """States the lean path does not take as they are go through the general checks:
    converted like any call, or rejected with the general error."""
    lay = make_layer("lstm", {}, 8, 16, dtype=np.float32, seed=6)
    rng = rng_for("odd", hx_kind)
    x = rng.standard_normal((1, 2, 8)).astype(np.float32)
    h, c = (rng.standard_normal((1, 2, 16)) for _ in range(2))
    if hx_kind == "bad-shape":
        with pytest.raises(ValueError, match=r"^hx\[0\] \(h0\): expected shape \(1, 2, 16\), got \(1, 1, 16\)$"):
            lay(x, (h[:, :1].astype(np.float32), c.astype(np.float32)))
        return
    hx = {"list": [h.astype(np.float32), c.astype(np.float32)],
          "float64": (h, c),
          "fortran": (np.asfortranarray(h.astype(np.float32).transpose(1, 0, 2)).transpose(1, 0, 2),
                      c.astype(np.float32))}[hx_kind]
    assert_result_close(lay(x, hx), ref_stack(lay, x, tuple(np.asarray(a, np.float64) for a in hx)), np.float32)


@pytest.mark.parametrize("H,B,want", [(64, 1, 1), (64, 8, 1), (64, 9, 2), (256, 1, 2)])
def test_small_calls_thread_count_by_weight_size(H, B, want, monkeypatch):
    """A served call of at most 8 rows whose weights fit one core's cache runs on one
    thread (_engine._SMALL_1T_WBYTES); larger weights or more rows take the set count."""
    rnnfast.set_num_threads(2)
    lay = make_layer("lstm", {}, H, H, dtype=np.float32, seed=3)
    x = rng_for("nthreads", H, B).standard_normal((1, B, H)).astype(np.float32)
    lay(x)
    plan = lay._splan
    seen = []
    lay._splan = dataclasses.replace(plan, kernel=lambda *a: seen.append(a[-1]) or plan.kernel(*a))
    got = lay(x)
    assert seen == [want]
    assert_result_close(got, ref_stack(lay, x, None), np.float32)


def test_small_calls_from_several_threads():
    """The lean path's scratch is per thread: concurrent serving calls give each caller its answer."""
    import threading
    lay = make_layer("lstm", {}, 32, 64, dtype=np.float32, seed=8)
    xs = [rng_for("thr", i).standard_normal((1, 1, 32)).astype(np.float32) for i in range(8)]
    want = [lay(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(200):
                y, (_h, c) = lay(xs[i])
                np.testing.assert_array_equal(y, want[i][0])
                np.testing.assert_array_equal(c, want[i][1][1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_small_path_taken_only_for_plain_cython_calls(be, monkeypatch):
    """The lean path serves plain calls when the Cython backend is in force, and only then."""
    calls = []
    real = _engine.run_small
    monkeypatch.setattr(_engine, "run_small", lambda *a, **k: calls.append(1) or real(*a, **k))
    lay = make_layer("lstm", {}, 8, 16, dtype=np.float32, seed=1)
    x = np.ones((1, 2, 8), np.float32)
    with rnnfast.backend(be):
        want = ref_stack(lay, x)
        assert_result_close(lay(x), want, np.float32)
        assert_result_close(lay(x[0]), ref_stack(lay, x[0]), np.float32)   # unbatched (2, 8)
        lay(np.ones((4, 2, 8), np.float32))            # T = 4: the general (packed) path
        lay(x, lengths=[1, 1])                          # lengths: the general path
    cython_in_force = rnnfast.backends.resolve_fast() == "cython" if be == "auto" else be == "cython"
    assert len(calls) == (2 if cython_in_force else 0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_parameters_are_cache_line_aligned(kind):
    """Weights start on 64-byte boundaries (vector loads of a row never straddle two cache
    lines), also after load_state_dict, which copies into the same arrays."""
    lay = LAYER_CLS_BY_KIND[kind](24, 40, num_layers=2, bidirectional=True)
    assert all(p.ctypes.data % 64 == 0 for p in lay.parameters().values())
    lay.load_state_dict({k: np.zeros_like(v) for k, v in lay.state_dict().items()})
    assert all(p.ctypes.data % 64 == 0 for p in lay.parameters().values())
    mg = rnnfast.MinGRU(8, 16)
    assert all(p.ctypes.data % 64 == 0 for p in mg.parameters().values())


LAYER_CLS_BY_KIND = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}


# ------------------------------------------------------------------------- pickling
_ZERO_COPY_CHILD = '''
import pickle
import numpy as np
import rnnfast
lay = rnnfast.LSTM(64, 64, seed=0)
x = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
want = lay(x)[0]                         # builds the serving plan (and its call counter)
bufs = []
data = pickle.dumps(lay, protocol=5, buffer_callback=bufs.append)
ro = [memoryview(bytes(b.raw())) for b in bufs]      # read-only, as an object store maps them
back = pickle.loads(data, buffers=ro)
assert not back.parameters()["weight_ih_l0"].flags.writeable
for _ in range(3):
    np.testing.assert_allclose(back(x)[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(back(np.repeat(x, 5, axis=0))[0][:1], want, rtol=1e-6, atol=1e-7)
print("ok")
'''


def test_zero_copy_unpickled_layer_serves_tokens():
    """Regression: a layer unpickled from read-only buffers (what Ray's object store
    hands out) crashed with SIGSEGV on its first one-step call: the serving plan's call
    counter travelled in the pickle and the kernel wrote through it. Run in a child
    process so that a crash fails this test instead of killing the run."""
    import os
    import subprocess
    import sys
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rnnfast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [pkg_parent, os.environ.get("PYTHONPATH", "")] if p))
    r = subprocess.run([sys.executable, "-c", _ZERO_COPY_CHILD], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "ok"


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_serving_kernel_refuses_a_read_only_call_counter():
    """No kernel writes through a pointer into an array it has not checked: the serving
    kernel's call counter must be writeable."""
    from rnnfast.kernels import cy_rnn
    lay = rnnfast.GRU(8, 16, seed=0)
    x = np.zeros((1, 1, 8), np.float32)
    lay(x)
    plan = lay._splan
    plan.calls.setflags(write=False)
    with pytest.raises(ValueError, match="call counter `state` is read-only"):
        lay(x)
    assert cy_rnn is not None


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.MinGRU])
def test_pickle_carries_parameters_only(cls):
    """Regression: after one training step an LSTM(256, 256) pickled to 113.5 MB (the
    saved training context) instead of its 2 MB of parameters, also after later
    inference calls. A pickle holds the configuration and the parameters; the copy
    computes the same results and needs its own forward(train=True) before backward."""
    import pickle
    lay = cls(256, 256, seed=0)
    x = np.random.default_rng(0).standard_normal((50, 16, 256)).astype(np.float32)
    y, _ = lay.forward(x, train=True)
    lay.backward(np.ones_like(y))
    lay(x[:1])
    lay(x)
    pbytes = sum(v.nbytes for v in lay.parameters().values())
    data = pickle.dumps(lay)
    assert len(data) < pbytes + 100_000, (len(data), pbytes)
    back = pickle.loads(data)
    np.testing.assert_array_equal(back(x)[0], lay(x)[0])
    np.testing.assert_array_equal(back(x[:1])[0], lay(x[:1])[0])
    with pytest.raises(RuntimeError, match="needs a forward"):
        back.backward(np.ones_like(y))
    assert lay.grads and not back.grads
    y2, _ = back.forward(x, train=True)
    back.backward(np.ones_like(y2))
    for k, g in lay.grads.items():
        np.testing.assert_allclose(back.grads[k], g, rtol=1e-5, atol=1e-6)
