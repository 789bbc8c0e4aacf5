"""Input conversion (rnnfast._validation): any array-like is accepted for x, weights,
states and lengths, and nothing the caller passed is ever modified."""
from __future__ import annotations

import numpy as np
import pytest

import rnnfast

from conftest import BACKENDS, F64_TOL, flat_states, make_layer, random_hx, require_oracle, rng_for

T, B, I, H = 6, 3, 4, 5


def _readonly(a):
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _fortran(a):
    return np.asfortranarray(a)


def _strided(a):
    """A non-contiguous view with the same values (every other element of a bigger array)."""
    a = np.asarray(a)
    big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype) if a.ndim else np.zeros(2, a.dtype)
    if a.ndim == 0:
        return a
    big[..., ::2] = a
    v = big[..., ::2]
    assert not v.flags.c_contiguous or a.shape[-1] <= 1
    return v


def _reversed_view(a):
    """Negative strides: a reversed copy viewed back in order."""
    a = np.asarray(a)
    if a.ndim == 0:
        return a
    return np.ascontiguousarray(a[::-1])[::-1]


def _tolist(a):
    return np.asarray(a).tolist()


def _torch(a):
    torch = require_oracle("torch")
    return torch.from_numpy(np.array(a, copy=True))


def _torch_grad(a):
    torch = require_oracle("torch")
    t = torch.from_numpy(np.array(a, copy=True))
    return t.requires_grad_(True) if t.is_floating_point() else t


def _torch_noncontig(a):
    torch = require_oracle("torch")
    a = np.asarray(a)
    if a.ndim < 2:
        return torch.from_numpy(a.copy())
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, -1, -2))).transpose(-1, -2)


class _HasArray:
    def __init__(self, a):
        self._a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


CONVERTERS = {
    "list": _tolist, "fortran": _fortran, "strided": _strided, "negstride": _reversed_view,
    "readonly": _readonly, "torch": _torch, "torch-grad": _torch_grad, "torch-noncontig": _torch_noncontig,
    "__array__": _HasArray,
}


def _snapshot(obj):
    """A deep numeric copy of whatever was passed (to check it is not modified)."""
    if obj is None:
        return None
    if isinstance(obj, (tuple, list)) and obj and not np.isscalar(obj[0]) and hasattr(obj[0], "shape"):
        return tuple(_snapshot(o) for o in obj)
    if hasattr(obj, "detach"):
        return obj.detach().numpy().copy()
    if isinstance(obj, _HasArray):
        return obj._a.copy()
    return np.array(obj, copy=True)


def _assert_same(before, after_obj):
    if before is None:
        return
    if isinstance(before, tuple):
        for b, a in zip(before, after_obj):
            _assert_same(b, a)
        return
    now = _snapshot(after_obj)
    np.testing.assert_array_equal(now, before)


@pytest.mark.parametrize("conv", list(CONVERTERS), ids=list(CONVERTERS))
@pytest.mark.parametrize("be", BACKENDS)
def test_functional_array_likes(be, conv):
    """x, every weight, h0/c0 and lengths as the array-like: same result as contiguous
    arrays, and the inputs are unchanged afterwards."""
    f = CONVERTERS[conv]
    rng = rng_for("al-func", be, conv)
    k = 1 / np.sqrt(H)
    w = dict(w_ih=rng.uniform(-k, k, (4 * H, I)), w_hh=rng.uniform(-k, k, (4 * H, 2)),
             b_ih=rng.uniform(-k, k, 4 * H), b_hh=rng.uniform(-k, k, 4 * H), w_hr=rng.uniform(-k, k, (2, H)))
    x = rng.standard_normal((T, B, I))
    h0, c0 = rng.standard_normal((B, 2)), rng.standard_normal((B, H))
    ln = np.array([4, 6, 1])
    with rnnfast.backend(be):
        want = rnnfast.lstm(x, **w, h0=h0, c0=c0, lengths=ln)
        args = {n: f(a) for n, a in w.items()}
        xa, h0a, c0a = f(x), f(h0), f(c0)
        lna = ln.tolist() if conv in ("list",) else (f(ln) if conv not in ("torch-grad",) else _torch(ln))
        before = {n: _snapshot(a) for n, a in {**args, "x": xa, "h0": h0a, "c0": c0a, "ln": lna}.items()}
        got = rnnfast.lstm(xa, **args, h0=h0a, c0=c0a, lengths=lna)
    np.testing.assert_allclose(got[0], want[0], **F64_TOL)
    for g, e in zip(got[1], want[1]):
        np.testing.assert_allclose(g, e, **F64_TOL)
    for n, a in {**args, "x": xa, "h0": h0a, "c0": c0a, "ln": lna}.items():
        _assert_same(before[n], a)


@pytest.mark.parametrize("conv", list(CONVERTERS), ids=list(CONVERTERS))
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("be", BACKENDS)
def test_layer_array_likes(be, kind, conv):
    f = CONVERTERS[conv]
    rng = rng_for("al-layer", be, kind, conv)
    layer = make_layer(kind, {}, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.standard_normal((T, B, I))
    hx = random_hx(layer, B, rng)
    ln = np.array([6, 2, 5])
    with rnnfast.backend(be):
        want = layer(x, hx, ln)
        xa = f(x)
        hxa = tuple(f(s) for s in hx) if kind == "lstm" else f(hx)
        lna = ln.tolist() if conv == "list" else (_torch(ln) if conv == "torch-grad" else f(ln))
        before = (_snapshot(xa), _snapshot(hxa), _snapshot(lna))
        got = layer(xa, hxa, lna)
    np.testing.assert_allclose(got[0], want[0], **F64_TOL)
    for g, e in zip(flat_states(got[1]), flat_states(want[1])):
        np.testing.assert_allclose(g, e, **F64_TOL)
    _assert_same(before[0], xa)
    _assert_same(before[1], hxa)
    _assert_same(before[2], lna)


@pytest.mark.parametrize("be", BACKENDS)
def test_lstm_hx_as_list(be):
    layer = make_layer("lstm", {}, I, H, dtype=np.float64)
    rng = rng_for("hx-list", be)
    x = rng.standard_normal((T, B, I))
    h, c = random_hx(layer, B, rng)
    with rnnfast.backend(be):
        a = layer(x, (h, c))
        b = layer(x, [h, c])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("be", BACKENDS)
def test_inputs_never_modified(be, kind):
    """Every array the caller passes is bit-identical after the call (including float32
    arrays a float32 layer could use without copying, and the states)."""
    rng = rng_for("nomod", be, kind)
    for dtype in (np.float32, np.float64):
        layer = make_layer(kind, {}, I, H, num_layers=2, bidirectional=True, dtype=dtype, seed=3)
        params_before = layer.state_dict()
        for ln in (None, np.array([6, 1, 0])):
            for batch_first in (False, True):
                layer.batch_first = batch_first
                x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
                hx = random_hx(layer, B, rng, dtype)
                copies = (x.copy(), [s.copy() for s in flat_states(hx)], None if ln is None else ln.copy())
                with rnnfast.backend(be):
                    layer(x, hx, ln)
                np.testing.assert_array_equal(x, copies[0])
                for s, c in zip(flat_states(hx), copies[1]):
                    np.testing.assert_array_equal(s, c)
                if ln is not None:
                    np.testing.assert_array_equal(ln, copies[2])
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, params_before[k])
    # the functional API: x, weights, states
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    for dtype in (np.float32, np.float64):
        w = [rng.standard_normal(s).astype(dtype) * 0.3 for s in [(G * H, I), (G * H, H), (G * H,), (G * H,)]]
        x = rng.standard_normal((T, B, I)).astype(dtype)
        h0 = rng.standard_normal((B, H)).astype(dtype)
        c0 = rng.standard_normal((B, H)).astype(dtype)
        copies = [a.copy() for a in (*w, x, h0, c0)]
        fn = getattr(rnnfast, kind)
        kw = {"c0": c0} if kind == "lstm" else {}
        with rnnfast.backend(be):
            fn(x, *w, reverse=True)
            fn(x, *w, h0=h0, lengths=[6, 2, 3], **kw)
        for a, c in zip((*w, x, h0, c0), copies):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("be", BACKENDS)
def test_results_do_not_alias_inputs_or_each_other(be):
    """Outputs are fresh arrays: writing into them changes neither the inputs nor a later call."""
    rng = rng_for("alias", be)
    layer = make_layer("gru", {}, I, H, dtype=np.float64)
    x = rng.standard_normal((T, B, I))
    h0 = random_hx(layer, B, rng)
    with rnnfast.backend(be):
        y, hn = layer(x, h0)
        assert not np.shares_memory(y, x) and not np.shares_memory(hn, h0)
        y_copy = y.copy()
        y[...] = 0
        hn[...] = 0
        y2, _ = layer(x, h0)
    np.testing.assert_array_equal(y2, y_copy)


# ------------------------------------------------------------ dtypes and odd containers
@pytest.mark.parametrize("be", BACKENDS)
def test_big_endian_float64_computes_in_float64(be):
    """Regression: '>f8' weights were computed in float32 (the dtype test compared with
    native float64). Functional and layer calls give float64 results equal to the
    native-order call."""
    rng = rng_for("bigendian", be)
    x = rng.standard_normal((T, B, I))
    w_ih, w_hh = rng.standard_normal((4 * H, I)) * 0.3, rng.standard_normal((4 * H, H)) * 0.3
    with rnnfast.backend(be):
        want = rnnfast.lstm(x, w_ih, w_hh)[0]
        got = rnnfast.lstm(x.astype(">f8"), w_ih.astype(">f8"), w_hh.astype(">f8"))[0]
        assert want.dtype == np.float64 and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
        lay = rnnfast.GRU(I, H, dtype=">f8", seed=1)
        assert lay.dtype == np.float64
        assert lay(x.astype(">f8"))[0].dtype == np.float64
        mg = rnnfast.mingru(x.astype(">f8"), w_ih[:H].astype(">f8"), w_ih[H:2 * H].astype(">f8"))[0]
        assert mg.dtype == np.float64


def test_long_double_is_a_clear_error():
    x = np.zeros((T, B, I), np.longdouble)
    w = np.zeros((4 * H, I), np.longdouble)
    with pytest.raises(TypeError, match=r"w_ih: long double .* not supported"):
        rnnfast.lstm(np.zeros((T, B, I)), w, np.zeros((4 * H, H)))
    with pytest.raises(TypeError, match=r"x: long double .* not supported"):
        rnnfast.LSTM(I, H)(x)
    with pytest.raises(TypeError, match=r"x: long double .* not supported"):
        rnnfast.mingru(x, np.zeros((H, I)), np.zeros((H, I)))


@pytest.mark.parametrize("be", BACKENDS)
def test_input_size_zero(be):
    """Regression: an input size of 0 killed the process (SIGFPE in the Cython kernel's
    projection for T >= 4). Every backend gives the same clear error (as the layers,
    whose input_size is at least 1)."""
    with rnnfast.backend(be):
        for f, G in ((rnnfast.lstm, 4), (rnnfast.gru, 3), (rnnfast.rnn, 1)):
            for steps in (1, 5, 40):
                with pytest.raises(ValueError, match=r"w_ih: expected an input size of at least 1"):
                    f(np.zeros((steps, 3, 0), "f4"), np.zeros((G * 6, 0), "f4"), np.ones((G * 6, 6), "f4"))


def test_masked_arrays_refused():
    """A masked array's mask would be ignored silently: it is refused, with the way to
    give padding (lengths=)."""
    x = np.ma.masked_array(np.zeros((T, B, I), "f4"), mask=False)
    with pytest.raises(TypeError, match=r"x: masked arrays are not accepted.*lengths="):
        rnnfast.LSTM(I, H)(x)
    with pytest.raises(TypeError, match=r"w_ih: masked arrays are not accepted"):
        rnnfast.gru(np.zeros((T, B, I), "f4"), np.ma.masked_array(np.zeros((3 * H, I), "f4")),
                    np.zeros((3 * H, H), "f4"))


def test_huge_unsigned_lengths_reported_as_given():
    """Regression: uint64 lengths above 2**63 were reported wrapped (negative)."""
    big = np.array([2 ** 64 - 1, 1, 1], np.uint64)
    with pytest.raises(ValueError,
                       match=r"lengths: every length must be in \[0, 6\], got min 1 max 18446744073709551615"):
        rnnfast.LSTM(I, H)(np.zeros((T, B, I), "f4"), lengths=big)
