"""Bad inputs on every public entry point, searched by hypothesis (a fresh random search
each run, not a fixed list): each call on a fast backend gives a clear error (TypeError
or ValueError) or a result, exactly as the reference backend does (the same error type,
or the same result within float tolerance, NaN where it has NaN), and never modifies
what the caller passed. Also rnnfast's GEMM, whose C entry point reads raw pointers,
over random layouts, strides and dtypes: a clear error or NumPy's product.

RNNFAST_FUZZ_EXAMPLES sets the examples per test (default 150)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnfast

from conftest import FAST_BACKENDS

N_EXAMPLES = int(os.environ.get("RNNFAST_FUZZ_EXAMPLES", "150"))
SEARCH = settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=False,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])

X_FORMS = ["ok", "nan", "inf", "list", "f16", "int", "bool", "complex", "object", "longdouble",
           "big-endian", "fortran", "strided", "read-only", "memmap", "masked", "0-d", "1-d", "4-d",
           "wrong-features", "other-float", "empty-T", "empty-B"]
LEN_FORMS = [None, "ok", "negative", "past-T", "float", "uint64-huge", "wrong-shape", "bool", "list", "int32"]
HX_FORMS = [None, "ok", "wrong-shape", "int", "tuple-mismatch", "nan", "fortran"]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _x_form(form, rng, T, B, I, dtype):
    """x of shape (T, B, I) in `form` (or the bad shape the form names)."""
    x = rng.standard_normal((T, B, I)).astype(dtype)
    if form == "nan" and x.size:
        x.flat[rng.integers(0, x.size)] = np.nan
    elif form == "inf" and x.size:
        x.flat[rng.integers(0, x.size)] = -np.inf
    elif form == "list":
        return x.tolist()
    elif form in ("f16", "int", "bool", "complex", "object", "longdouble"):
        return x.astype({"f16": np.float16, "int": np.int64, "bool": bool, "complex": np.complex64,
                         "object": object, "longdouble": np.longdouble}[form])
    elif form == "big-endian":
        return x.astype(x.dtype.newbyteorder(">"))
    elif form == "fortran":
        return np.asfortranarray(x)
    elif form == "strided":
        big = rng.standard_normal((2 * T, B, 2 * I)).astype(dtype)
        return big[::2, :, ::2]
    elif form == "read-only":
        x.flags.writeable = False
    elif form == "memmap":
        f = tempfile.NamedTemporaryFile(suffix=".dat", delete=False)
        f.close()
        m = np.memmap(f.name, dtype=dtype, mode="w+", shape=x.shape) if x.size else x
        if x.size:
            m[...] = x
        os.unlink(f.name)
        return m
    elif form == "masked":
        return np.ma.array(x, mask=np.zeros(x.shape, bool))
    elif form == "0-d":
        return np.asarray(x.ravel()[0] if x.size else 0.0, dtype)
    elif form == "1-d":
        return x.ravel()
    elif form == "4-d":
        return x[None]
    elif form == "wrong-features":
        return rng.standard_normal((T, B, I + 1)).astype(dtype)
    elif form == "other-float":
        return x.astype(np.float64 if dtype == np.float32 else np.float32)
    elif form == "empty-T":
        return x[:0]
    elif form == "empty-B":
        return x[:, :0]
    return x


def _len_form(form, rng, T, B):
    ok = rng.integers(0, T + 1, B)
    if form is None:
        return None
    return {"ok": ok, "negative": ok - T - 1, "past-T": ok + T + 1, "float": ok.astype(float) + 0.5,
            "uint64-huge": np.full(B, 2**63 + 5, np.uint64), "wrong-shape": np.append(ok, 1),
            "bool": ok > 0, "list": ok.tolist(), "int32": ok.astype(np.int32)}[form]


def _hx_form(form, rng, kind, nstate, B, H, dtype):
    shape = (nstate, B, H)
    if form is None:
        return None
    h = rng.standard_normal(shape).astype(dtype)
    if form == "wrong-shape":
        h = rng.standard_normal((nstate, B + 1, H)).astype(dtype)
    elif form == "int":
        h = h.astype(np.int64)
    elif form == "nan" and h.size:
        h.flat[0] = np.nan
    elif form == "fortran":
        h = np.asfortranarray(h)
    if kind == "lstm":
        return h if form == "tuple-mismatch" else (h, rng.standard_normal(shape).astype(dtype))
    return (h, h) if form == "tuple-mismatch" else h


def _snapshot(obj):
    """A deep copy of what the caller passed (arrays with their flags), to check nothing changed."""
    if isinstance(obj, np.ndarray):
        return ("arr", obj.copy(), obj.flags.writeable, obj.dtype, obj.shape, obj.strides)
    if isinstance(obj, (tuple, list)):
        return (type(obj), [_snapshot(o) for o in obj])
    return ("obj", obj)


def _same(before, obj) -> bool:
    if before[0] == "arr":
        _, data, w, dt, shape, strides = before
        return (isinstance(obj, np.ndarray) and obj.flags.writeable == w and obj.dtype == dt
                and obj.shape == shape and obj.strides == strides
                and np.array_equal(np.asarray(obj), data, equal_nan=data.dtype.kind in "fc"))
    if before[0] in (tuple, list):
        return type(obj) is before[0] and len(obj) == len(before[1]) and all(
            _same(b, o) for b, o in zip(before[1], obj))
    return before[1] is obj or before[1] == obj


def _outcome(fn):
    try:
        return "ok", fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)


def _assert_close(got, want, dtype):
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_close(g, w, dtype)
        return
    if want is None:
        assert got is None
        return
    tol = dict(rtol=1e-9, atol=1e-9) if np.dtype(dtype) == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), equal_nan=True, **tol)


def _check(call, args, be, dtype):
    """`call(*args)` on `be` and on the reference: the same error type or the same result;
    the arguments unchanged on both."""
    snap = [_snapshot(a) for a in args]
    with rnnfast.backend(be):
        got = _outcome(lambda: call(*args))
    assert all(_same(s, a) for s, a in zip(snap, args)), "an argument was modified"
    with rnnfast.backend("reference"):
        want = _outcome(lambda: call(*args))
    if want[0] != "ok" or got[0] != "ok":
        assert got[0] == want[0], f"{be}: {got[0]} {got[1]!r} but the reference: {want[0]} {want[1]!r}"
        assert len(got[1]) > 10, f"an unclear message: {got[1]!r}"
        return
    _assert_close(got[1], want[1], dtype)


case = st.fixed_dictionaries({
    "kind": st.sampled_from(["lstm", "gru", "rnn"]),
    "T": st.integers(0, 6), "B": st.integers(0, 4), "I": st.integers(1, 5), "H": st.integers(1, 6),
    "dtype": st.sampled_from([np.float32, np.float64]),
    "x": st.sampled_from(X_FORMS), "lengths": st.sampled_from(LEN_FORMS), "hx": st.sampled_from(HX_FORMS),
    "seed": st.integers(0, 2**32 - 1), "batch_first": st.booleans(), "reverse": st.booleans(),
    "layers": st.integers(1, 2), "bidir": st.booleans(),
})


@pytest.mark.parametrize("be", FAST_BACKENDS)
@SEARCH
@given(c=case)
def test_functional_bad_inputs(be, c):
    rng = np.random.default_rng(c["seed"])
    kind, T, B, I, H, dt = c["kind"], c["T"], c["B"], c["I"], c["H"], c["dtype"]
    G = GATES[kind]
    x = _x_form(c["x"], rng, T, B, I, dt)
    if c["batch_first"] and isinstance(x, np.ndarray) and x.ndim == 3:
        x = np.swapaxes(x, 0, 1)
    w_ih = rng.standard_normal((G * H, I)).astype(dt)
    w_hh = rng.standard_normal((G * H, H)).astype(dt)
    b = rng.standard_normal(G * H).astype(dt)
    lengths = _len_form(c["lengths"], rng, T, B)
    hx = _hx_form(c["hx"], rng, kind, 1, B, H, dt)
    fn = getattr(rnnfast, kind)
    kw = {"lengths": lengths, "reverse": c["reverse"], "batch_first": c["batch_first"]}
    if hx is not None:
        if kind == "lstm" and isinstance(hx, tuple):
            kw["h0"], kw["c0"] = hx[0][0], hx[1][0]
        elif isinstance(hx, tuple):
            kw["h0"] = hx
        else:
            kw["h0"] = hx[0]
    _check(lambda *a: fn(*a, **kw), (x, w_ih, w_hh, b, b), be, dt)


@pytest.mark.parametrize("be", FAST_BACKENDS)
@SEARCH
@given(c=case, train=st.booleans())
def test_layer_bad_inputs(be, c, train):
    rng = np.random.default_rng(c["seed"])
    kind, T, B, I, H, dt = c["kind"], c["T"], c["B"], c["I"], c["H"], c["dtype"]
    cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[kind]
    layer = cls(I, H, num_layers=c["layers"], bidirectional=c["bidir"], batch_first=c["batch_first"],
                dtype=dt, seed=c["seed"] % 1000)
    params = {k: v.copy() for k, v in layer.parameters().items()}
    x = _x_form(c["x"], rng, T, B, I, dt)
    if c["batch_first"] and isinstance(x, np.ndarray) and x.ndim == 3:
        x = np.swapaxes(x, 0, 1)
    D = 2 if c["bidir"] else 1
    hx = _hx_form(c["hx"], rng, kind, c["layers"] * D, B, H, dt)
    lengths = _len_form(c["lengths"], rng, T, B)

    def call(x, hx, lengths):
        if not train:
            return layer(x, hx, lengths=lengths)
        y, hn = layer.forward(x, hx, lengths=lengths, train=True)
        dy = np.ones_like(y)
        return (y, hn, *layer.backward(dy), {k: g.copy() for k, g in sorted(layer.grads.items())})

    def compare(call_args):
        snap = [_snapshot(a) for a in call_args]
        with rnnfast.backend(be):
            got = _outcome(lambda: call(*call_args))
        assert all(_same(s, a) for s, a in zip(snap, call_args)), "an argument was modified"
        with rnnfast.backend("reference"):
            want = _outcome(lambda: call(*call_args))
        if want[0] != "ok" or got[0] != "ok":
            assert got[0] == want[0], f"{be}: {got[0]} {got[1]!r} but the reference: {want[0]} {want[1]!r}"
            return
        g, w = got[1], want[1]
        if train:
            gg, wg = g[-1], w[-1]
            assert gg.keys() == wg.keys()
            _assert_close([gg[k] for k in gg], [wg[k] for k in wg], dt)
            g, w = g[:-1], w[:-1]
        _assert_close(g, w, dt)

    compare((x, hx, lengths))
    # a failed call leaves the layer intact: its parameters, and a correct next call
    assert all(np.array_equal(params[k], v) for k, v in layer.parameters().items())
    ok = rng.standard_normal((2, 1, I)).astype(dt)
    if c["batch_first"]:
        ok = np.swapaxes(ok, 0, 1)
    compare((ok, None, None))


@pytest.mark.parametrize("be", FAST_BACKENDS)
@SEARCH
@given(c=case, which=st.sampled_from(["mingru", "minlstm", "linear_scan"]))
def test_scan_bad_inputs(be, c, which):
    rng = np.random.default_rng(c["seed"])
    T, B, I, H, dt = c["T"], c["B"], c["I"], c["H"], c["dtype"]
    x = _x_form(c["x"], rng, T, B, I, dt)
    if which == "linear_scan":
        a = _x_form(c["x"], rng, T, B, H, dt)
        b = rng.standard_normal((T, B, H)).astype(dt)
        h0 = None if c["hx"] is None else _hx_form(c["hx"], rng, "gru", 1, B, H, dt)
        h0 = h0[0] if isinstance(h0, np.ndarray) else h0
        _check(lambda a, b, h0: rnnfast.linear_scan(a, b, h0, reverse=c["reverse"]), (a, b, h0), be, dt)
        return
    G = 2 if which == "mingru" else 3
    ws = [rng.standard_normal((H, I)).astype(dt) for _ in range(G)]
    lengths = _len_form(c["lengths"], rng, T, B)
    h0 = None if c["hx"] is None else _hx_form(c["hx"], rng, "gru", 1, B, H, dt)
    h0 = h0[0] if isinstance(h0, np.ndarray) else h0
    fn = getattr(rnnfast, which)
    _check(lambda x, h0, lengths, *w: fn(x, *w, h0=h0, lengths=lengths, batch_first=False),
           (x, h0, lengths, *ws), be, dt)


@SEARCH
@given(m=st.integers(0, 70), n=st.integers(0, 70), k=st.integers(0, 300), ta=st.booleans(), tb=st.booleans(),
       dtypes=st.sampled_from(["ff", "dd", "fd", "ii"]), beta=st.sampled_from([0.0, 1.0, -0.5]),
       c_form=st.sampled_from(["ok", "strided", "fortran", "wrong-shape", "read-only"]),
       pad=st.integers(0, 3), nthreads=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_gemm_entry_point_fuzz(m, n, k, ta, tb, dtypes, beta, c_form, pad, nthreads, seed):
    """cy_train.pgemm reads raw pointers from its operands: any layout it accepts gives
    NumPy's product; anything else is a TypeError or ValueError (never a crash)."""
    from conftest import require_oracle
    cy_train = require_oracle("rnnfast.kernels.cy_train")
    rng = np.random.default_rng(seed)
    da = {"f": np.float32, "d": np.float64, "i": np.int32}[dtypes[0]]
    db = {"f": np.float32, "d": np.float64, "i": np.int32}[dtypes[1]]
    A = (rng.standard_normal((k, m + pad))[:, :m].T if ta else rng.standard_normal((m, k + pad))[:, :k]).astype(da)
    B = (rng.standard_normal((n, k + pad))[:, :k].T if tb else rng.standard_normal((k, n + pad))[:, :n]).astype(db)
    C = rng.standard_normal((m, n)).astype(da)
    if c_form == "strided":
        C = rng.standard_normal((m, 2 * n)).astype(da)[:, ::2]
    elif c_form == "fortran":
        C = np.asfortranarray(C)
    elif c_form == "wrong-shape":
        C = rng.standard_normal((m + 1, n)).astype(da)
    elif c_form == "read-only":
        C.flags.writeable = False
    a0, b0, c0 = A.copy(), B.copy(), C.copy()
    try:
        cy_train.pgemm(A, B, C, beta, nthreads)
    except (TypeError, ValueError):
        assert np.array_equal(C, c0)
        ok = False
    else:
        ok = True
    assert np.array_equal(A, a0) and np.array_equal(B, b0)
    if ok:
        assert da == db and da in (np.float32, np.float64) and c_form not in ("wrong-shape", "read-only")
        want = A.astype(np.float64) @ B.astype(np.float64) + (0 if beta == 0 else beta * c0.astype(np.float64))
        tol = (3e-5 if da == np.float32 else 1e-12) * max(1.0, np.sqrt(k)) * 4
        np.testing.assert_allclose(C, want, rtol=tol, atol=tol)
    else:
        assert da != db or da == np.int32 or c_form in ("wrong-shape", "strided", "fortran", "read-only")
