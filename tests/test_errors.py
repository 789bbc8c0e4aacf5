"""Every error of SPEC.md "Errors": the right exception type, raised before any kernel
runs, naming the argument; nothing the caller passed is modified and a failed call
leaves the layer's weights untouched."""
from __future__ import annotations

import re

import numpy as np
import pytest

import rnnfast

from conftest import BACKENDS, make_layer, rng_for

T, B, I, H = 5, 3, 4, 6


def msg(text: str) -> str:
    """A ``pytest.raises(match=...)`` pattern: the message starts with `text`, verbatim."""
    return "^" + re.escape(text)


def dtype_msg(name: str, dt) -> str:
    return msg(f"{name}: expected a float32 or float64 array, got dtype {np.dtype(dt)}")


def _w(kind, G, rng, I=I, H=H, dtype=np.float64):
    return (rng.standard_normal((G * H, I)).astype(dtype), rng.standard_normal((G * H, H)).astype(dtype),
            rng.standard_normal(G * H).astype(dtype), rng.standard_normal(G * H).astype(dtype))


FUNCS = [("lstm", 4), ("gru", 3), ("rnn", 1)]


@pytest.fixture(params=BACKENDS)
def be(request):
    with rnnfast.backend(request.param):
        yield request.param


# ------------------------------------------------------------------ functional API
@pytest.mark.parametrize("kind,G", FUNCS)
def test_functional_bad_x(be, kind, G):
    rng = rng_for("fx", kind)
    w = _w(kind, G, rng)
    fn = getattr(rnnfast, kind)
    for bad in [rng.standard_normal(I), rng.standard_normal((1, T, B, I)), np.float64(1.0)]:
        with pytest.raises(ValueError, match=msg(f"x: expected a 2-D (T, F) or 3-D input, got "
                                                 f"{np.ndim(bad)}-D with shape {np.shape(bad)}")):
            fn(bad, *w)
    with pytest.raises(ValueError, match=msg(f"x: expected input feature size {I}, got {I + 1} "
                                             f"(shape {(T, B, I + 1)})")):   # feature size mismatch
        fn(rng.standard_normal((T, B, I + 1)), *w)
    with pytest.raises(ValueError, match=msg(f"x: expected input feature size {I}, got {I + 1} "
                                             f"(shape {(T, I + 1)})")):
        fn(rng.standard_normal((T, I + 1)), *w)                 # unbatched too
    for dt in (np.int64, np.int32, np.bool_, np.complex128, object):
        with pytest.raises(TypeError, match=dtype_msg("x", dt)):
            fn(np.ones((T, B, I), dt), *w)
    with pytest.raises(TypeError):
        fn([[["a"] * I] * B] * T, *w)                            # strings


@pytest.mark.parametrize("kind,G", FUNCS)
def test_functional_bad_weights(be, kind, G):
    rng = rng_for("fw", kind)
    w_ih, w_hh, b_ih, b_hh = _w(kind, G, rng)
    x = rng.standard_normal((T, B, I))
    fn = getattr(rnnfast, kind)
    GH = G * H
    w2d = f"w_ih: expected a 2-D ({G}*H, I) array, got shape "
    cases = [
        (ValueError, msg(w2d + f"{(GH, I, 1)}"), (w_ih[:, :, None], w_hh, b_ih, b_hh)),       # 3-D
        (ValueError, msg(w2d + f"{(GH * I,)}"), (w_ih.ravel(), w_hh, b_ih, b_hh)),            # 1-D
        (ValueError, msg(f"w_hh: expected shape {(GH, H)}, got {(GH, H - 1)}"),
         (w_ih, w_hh[:, :-1], b_ih, b_hh)),                                                    # columns != H
        (ValueError, msg(f"w_hh: expected shape {(GH, H)}, got {(GH - 1, H)}"),
         (w_ih, w_hh[:-1], b_ih, b_hh)),                                                       # rows != G*H
        (ValueError, msg(f"b_ih: expected shape {(GH,)}, got {(GH - 1,)}"), (w_ih, w_hh, b_ih[:-1], b_hh)),
        (ValueError, msg(f"b_hh: expected shape {(GH,)}, got {(GH + 1,)}"),
         (w_ih, w_hh, b_ih, np.append(b_hh, 0.0))),
        (ValueError, msg(f"b_ih: expected shape {(GH,)}, got {(1, GH)}"), (w_ih, w_hh, b_ih[None], b_hh)),  # 2-D bias
        (TypeError, dtype_msg("w_ih", np.int64), (w_ih.astype(np.int64), w_hh, b_ih, b_hh)),
        (TypeError, dtype_msg("w_hh", np.complex128), (w_ih, w_hh.astype(np.complex128), b_ih, b_hh)),
        (TypeError, dtype_msg("b_ih", np.bool_), (w_ih, w_hh, b_ih.astype(bool), b_hh)),
    ]
    if G > 1:   # gate rows not a multiple of G
        cases.append((ValueError, msg(f"w_ih: expected {G}*H rows for {kind} (H >= 1), got {GH - 1}"),
                      (w_ih[:-1], w_hh[:-1], b_ih[:-1], b_hh[:-1])))
    for exc, pattern, args in cases:
        with pytest.raises(exc, match=pattern):
            fn(x, *args)


def test_functional_lstm_bad_projection(be):
    rng = rng_for("proj")
    w_ih, _, b_ih, b_hh = _w("lstm", 4, rng)
    P = 2
    w_hh = rng.standard_normal((4 * H, P))
    x = rng.standard_normal((T, B, I))
    with pytest.raises(ValueError, match=msg(f"w_hr: expected shape (P, {H}), got {(P, H + 1)}")):
        rnnfast.lstm(x, w_ih, w_hh, b_ih, b_hh, w_hr=rng.standard_normal((P, H + 1)))
    with pytest.raises(ValueError, match=msg(f"w_hr: expected shape (P, {H}), got {(H,)}")):
        rnnfast.lstm(x, w_ih, w_hh, b_ih, b_hh, w_hr=rng.standard_normal(H))
    with pytest.raises(ValueError, match=msg(f"w_hh: expected shape {(4 * H, P)}, got {(4 * H, H)}")):
        # w_hh must be P wide with a projection
        rnnfast.lstm(x, w_ih, rng.standard_normal((4 * H, H)), b_ih, b_hh, w_hr=rng.standard_normal((P, H)))
    with pytest.raises(ValueError, match=msg(f"h0: expected shape {(B, P)}, got {(B, H)}")):   # h0 is P wide
        rnnfast.lstm(x, w_ih, w_hh, b_ih, b_hh, w_hr=rng.standard_normal((P, H)), h0=np.zeros((B, H)))
    with pytest.raises(TypeError):
        rnnfast.gru(x, *_w("gru", 3, rng), w_hr=rng.standard_normal((P, H)))


@pytest.mark.parametrize("kind,G", FUNCS)
def test_functional_bad_states(be, kind, G):
    rng = rng_for("fs", kind)
    w = _w(kind, G, rng)
    x = rng.standard_normal((T, B, I))
    fn = getattr(rnnfast, kind)
    for bad in [np.zeros((B + 1, H)), np.zeros((B, H + 1)), np.zeros(H), np.zeros((2, B, H)),
                np.zeros((1, B + 1, H))]:
        with pytest.raises(ValueError, match=msg(f"h0: expected shape {(B, H)}, got {bad.shape}")):
            fn(x, *w, h0=bad)
    with pytest.raises(TypeError, match=dtype_msg("h0", np.int64)):
        fn(x, *w, h0=np.zeros((B, H), np.int64))
    with pytest.raises(ValueError, match=msg(f"h0: expected shape {(H,)}, got {(B, H)}")):   # unbatched: (H,)
        fn(x[:, 0], *w, h0=np.zeros((B, H)))
    if kind == "lstm":
        for bad in [np.zeros((B + 1, H)), np.zeros((B, H - 1)), np.zeros((1, B, H + 1))]:
            with pytest.raises(ValueError, match=msg(f"c0: expected shape {(B, H)}, got {bad.shape}")):
                fn(x, *w, c0=bad)
        with pytest.raises(TypeError, match=dtype_msg("c0", np.complex64)):
            fn(x, *w, c0=np.zeros((B, H), np.complex64))


@pytest.mark.parametrize("kind,G", FUNCS)
def test_functional_bad_lengths(be, kind, G):
    rng = rng_for("fl", kind)
    w = _w(kind, G, rng)
    x = rng.standard_normal((T, B, I))
    fn = getattr(rnnfast, kind)
    for bad in [[T + 1, 1, 1], [-1, 2, 3], [0, 0, T + 5]]:               # out of [0, T]
        with pytest.raises(ValueError, match=msg(f"lengths: every length must be in [0, {T}], "
                                                 f"got min {min(bad)} max {max(bad)}")):
            fn(x, *w, lengths=bad)
    for bad in [[1, 2], [1, 2, 3, 4], [[1, 2, 3]], 3, np.ones((B, 1), np.int64)]:   # shape != (B,)
        with pytest.raises(ValueError, match=msg(f"lengths: expected shape {(B,)}, got {np.shape(bad)}")):
            fn(x, *w, lengths=bad)
    for bad in [np.array([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0], np.array([1, 2, 3], np.float32),
                np.array([True, False, True]), [True, True, False], np.array([1, 2, 3], np.complex64),
                ["1", "2", "3"]]:
        with pytest.raises(TypeError, match=msg(f"lengths: expected integers, got dtype {np.asarray(bad).dtype}")):
            fn(x, *w, lengths=bad)
    # unbatched: a scalar or shape (1,), in range
    with pytest.raises(ValueError, match=msg(f"lengths: every length must be in [0, {T}], "
                                             f"got min {T + 1} max {T + 1}")):
        fn(x[:, 0], *w, lengths=T + 1)
    with pytest.raises(ValueError, match=msg("lengths: expected shape (1,), got (2,)")):
        fn(x[:, 0], *w, lengths=[1, 2])
    with pytest.raises(TypeError, match=msg("lengths: expected integers, got dtype float64")):
        fn(x[:, 0], *w, lengths=2.0)


def test_functional_bad_nonlinearity(be):
    rng = rng_for("nl")
    w = _w("rnn", 1, rng)
    x = rng.standard_normal((T, B, I))
    for bad in ["Tanh", ""]:
        with pytest.raises(ValueError, match=msg(f"nonlinearity: unknown activation {bad!r}")):
            rnnfast.rnn(x, *w, nonlinearity=bad)
    with pytest.raises(TypeError, match=msg("nonlinearity: expected a name or a tuple")):
        rnnfast.rnn(x, *w, nonlinearity=None)
    # the training functions take the same activations, and the same errors
    with pytest.raises(ValueError, match=msg("nonlinearity: unknown activation 'Tanh'")):
        rnnfast.rnn_forward_train(x, *w, nonlinearity="Tanh")


# ------------------------------------------------------------------ layer constructors
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_constructor_errors(cls):
    with pytest.raises(ValueError, match=msg("num_layers: expected >= 1, got 0")):
        cls(I, H, num_layers=0)
    with pytest.raises(ValueError, match=msg("num_layers: expected >= 1, got -2")):
        cls(I, H, num_layers=-2)
    for bad in [-0.1, 1.0001, 2, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match=msg(f"dropout: expected a number in [0, 1], got {bad}")):
            cls(I, H, num_layers=2, dropout=bad)
    for ok in [0, 0.0, 0.5, 1, 1.0]:
        cls(I, H, num_layers=2, dropout=ok)
    with pytest.raises(ValueError, match=msg("hidden_size: expected >= 1, got 0")):
        cls(I, 0)
    with pytest.raises(ValueError, match=msg("input_size: expected >= 1, got 0")):
        cls(0, H)
    with pytest.raises(TypeError):
        cls(I, H, dtype=np.int32)


def test_constructor_proj_and_nonlinearity_errors():
    for bad in [H, H + 1]:
        with pytest.raises(ValueError, match=msg(f"proj_size: expected 0 <= proj_size < hidden_size ({H}), got {bad}")):
            rnnfast.LSTM(I, H, proj_size=bad)
    with pytest.raises(ValueError, match=msg("proj_size: expected >= 0, got -1")):
        rnnfast.LSTM(I, H, proj_size=-1)
    rnnfast.LSTM(I, H, proj_size=H - 1)
    with pytest.raises(TypeError):
        rnnfast.GRU(I, H, proj_size=2)
    # any activation of rnnfast.cells.ACTIVATIONS is a nonlinearity (a cell variant past tanh / relu)
    for bad in ["TANH", "swish"]:
        with pytest.raises(ValueError, match=msg(f"nonlinearity: unknown activation {bad!r}")):
            rnnfast.RNN(I, H, nonlinearity=bad)
    with pytest.raises(TypeError, match=msg("nonlinearity: expected a name or a tuple (name, alpha[, beta]), "
                                            "got None")):
        rnnfast.RNN(I, H, nonlinearity=None)
    with pytest.raises(ValueError, match=msg("nonlinearity: sigmoid takes no alpha (got 2.0)")):
        rnnfast.RNN(I, H, nonlinearity=("sigmoid", 2.0))


# ------------------------------------------------------------------ layer calls
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_layer_bad_calls_leave_weights_untouched(be, kind):
    rng = rng_for("lay-bad", kind)
    layer = make_layer(kind, {}, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    before = layer.state_dict()
    live = layer.parameters()
    x = rng.standard_normal((T, B, I))
    good_h = np.zeros((4, B, H))
    hx_ok = (good_h, good_h) if kind == "lstm" else good_h
    ndim_msg = "x: expected a 2-D (T, F) or 3-D input, got "
    len_msg = f"lengths: every length must be in [0, {T}], got "
    bad_calls = [
        (ValueError, msg(f"x: expected input feature size {I}, got {I + 1} (shape {(T, B, I + 1)})"),
         dict(x=rng.standard_normal((T, B, I + 1)))),
        (ValueError, msg(ndim_msg + f"4-D with shape {(1, T, B, I)}"), dict(x=rng.standard_normal((1, T, B, I)))),
        (ValueError, msg(ndim_msg + f"1-D with shape {(I,)}"), dict(x=rng.standard_normal(I))),
        (TypeError, dtype_msg("x", np.int32), dict(x=np.ones((T, B, I), np.int32))),
        (TypeError, dtype_msg("x", np.bool_), dict(x=np.ones((T, B, I), bool))),
        (TypeError, dtype_msg("x", np.complex128), dict(x=np.ones((T, B, I), np.complex128))),
        (ValueError, msg(len_msg + f"min 1 max {T + 1}"), dict(x=x, lengths=[T + 1, 1, 1])),
        (ValueError, msg(len_msg + "min -1 max 1"), dict(x=x, lengths=[-1, 1, 1])),
        (ValueError, msg(f"lengths: expected shape {(B,)}, got (2,)"), dict(x=x, lengths=[1, 1])),
        (TypeError, msg("lengths: expected integers, got dtype float64"), dict(x=x, lengths=[1.0, 1.0, 1.0])),
        (TypeError, msg("lengths: expected integers, got dtype bool"), dict(x=x, lengths=np.ones(B, bool))),
    ]
    if kind == "lstm":
        bad_calls += [
            (ValueError, msg(f"hx[0] (h0): expected shape {(4, B, H)}, got {(2, B, H)}"),
             dict(x=x, hx=(np.zeros((2, B, H)), good_h))),                             # L*D rows wrong
            (ValueError, msg(f"hx[0] (h0): expected shape {(4, B, H)}, got {(4, B + 1, H)}"),
             dict(x=x, hx=(np.zeros((4, B + 1, H)), good_h))),                         # batch wrong
            (ValueError, msg(f"hx[1] (c0): expected shape {(4, B, H)}, got {(4, B, H + 1)}"),
             dict(x=x, hx=(good_h, np.zeros((4, B, H + 1))))),
            (ValueError, msg("hx: expected a tuple (h0, c0) for LSTM"), dict(x=x, hx=good_h)),   # not a pair
            (ValueError, msg("hx: expected a tuple (h0, c0) for LSTM"), dict(x=x, hx=(good_h,))),
            (TypeError, dtype_msg("hx[0] (h0)", np.int64), dict(x=x, hx=(good_h.astype(np.int64), good_h))),
        ]
    else:
        bad_calls += [
            (ValueError, msg(f"hx: expected shape {(4, B, H)}, got {(2, B, H)}"), dict(x=x, hx=np.zeros((2, B, H)))),
            (ValueError, msg(f"hx: expected shape {(4, B, H)}, got {(4, B, H + 1)}"),
             dict(x=x, hx=np.zeros((4, B, H + 1)))),
            (ValueError, msg(f"hx: expected shape {(4, B, H)}, got {(4, B - 1, H)}"),
             dict(x=x, hx=np.zeros((4, B - 1, H)))),
            (ValueError, msg(f"hx: expected shape {(4, H)}, got {(4, B, H)}"),
             dict(x=x[:, 0], hx=np.zeros((4, B, H)))),                                 # unbatched wants (4, H)
            (TypeError, dtype_msg("hx", np.int32), dict(x=x, hx=np.zeros((4, B, H), np.int32))),
        ]
    for exc, pattern, kw in bad_calls:
        xin = kw.pop("x")
        with pytest.raises(exc, match=pattern):
            layer(xin, **kw)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
        for k, v in layer.parameters().items():
            assert v is live[k]
    layer(x, hx_ok)     # and the layer still works


def test_unknown_backend_and_threads_errors():
    prev = rnnfast.get_backend()
    for bad in ["torch", "CYTHON", "", None, 3]:
        with pytest.raises(ValueError):
            rnnfast.set_backend(bad)
        assert rnnfast.get_backend() == prev
        with pytest.raises(ValueError):
            with rnnfast.backend(bad):
                pass
        assert rnnfast.get_backend() == prev
    nt = rnnfast.get_num_threads()
    for bad in [0, -1, -8]:
        with pytest.raises(ValueError):
            rnnfast.set_num_threads(bad)
        assert rnnfast.get_num_threads() == nt
    for bad in [1.5, "2", None]:
        with pytest.raises((TypeError, ValueError)):
            rnnfast.set_num_threads(bad)
        assert rnnfast.get_num_threads() == nt


def test_messages_name_expected_and_given():
    """Errors say what was expected and what was given."""
    layer = rnnfast.GRU(I, H, num_layers=2, dtype=np.float64)
    with pytest.raises(ValueError) as ei:
        layer(np.zeros((T, B, I + 3)))
    assert str(I) in str(ei.value) and str(I + 3) in str(ei.value)
    with pytest.raises(ValueError) as ei:
        layer(np.zeros((T, B, I)), lengths=[T + 4, 1, 1])
    assert str(T) in str(ei.value) and str(T + 4) in str(ei.value)
    with pytest.raises(ValueError) as ei:
        layer(np.zeros((T, B, I)), np.zeros((3, B, H)))
    assert "(2, 3, 6)" in str(ei.value) and "(3, 3, 6)" in str(ei.value)
