"""rnnfast.from_keras: Keras 3 recurrent layers and Sequential models on rnnfast layers.

The oracle is Keras itself (Keras 3 on its torch backend): every converted object is
called on the same inputs, masks and initial states as the Keras object, and must give
the same structure (array or tuple), shapes, dtypes and values (1e-5 in float32).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import rnnfast
import rnnfast.keras

from conftest import require_oracle, rng_for

# Keras picks its backend at import: torch is the oracle installed with the tests.
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = require_oracle("keras")

pytestmark = [
    # Keras's own NumPy conversions (keras.src.backend), not rnnfast's.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    # Keras warns that a Sequential "destroys the mask" it is called with, then passes it
    # to its first layer all the same (the outputs below show the mask applied).
    pytest.mark.filterwarnings("ignore:Layer 'sequential.*does not support masking:UserWarning"),
]
L = keras.layers

B, T, F, U = 4, 5, 3, 3
TOL = dict(rtol=1e-5, atol=1e-5)

# Masks: right-padded with a length-0 and a length-1 row; all valid.
LENGTHS = np.array([3, T, 0, 1])
MASKS = {
    "none": None,
    "prefix": np.arange(T)[None, :] < LENGTHS[:, None],
    "full": np.ones((B, T), bool),
}

KINDS = ["lstm", "gru", "gru-v1", "simple"]


def rnn(kind: str, units: int = U, **kw):
    """A Keras recurrent layer of `kind` ("gru-v1": GRU with reset_after=False)."""
    if kind == "lstm":
        return L.LSTM(units, **kw)
    if kind == "gru":
        return L.GRU(units, **kw)
    if kind == "gru-v1":
        return L.GRU(units, reset_after=False, **kw)
    return L.SimpleRNN(units, **kw)


def inputs(*key, dtype=np.float32) -> np.ndarray:
    return rng_for("x", *key).standard_normal((B, T, F)).astype(dtype)


def built(obj, *key, scale: float = 0.6, x=None):
    """Build `obj` on a batch and give it seeded random weights (Keras's initial biases
    are zeros, which would leave the bias conversion untested)."""
    obj(inputs(*key) if x is None else x)
    rng = rng_for("w", *key)
    obj.set_weights([rng.uniform(-scale, scale, w.shape).astype(w.dtype) for w in obj.get_weights()])
    return obj


def to_numpy(result):
    """A Keras result (a tensor or a tuple of them) as NumPy, keeping the structure."""
    if isinstance(result, (tuple, list)):
        return type(result)(keras.ops.convert_to_numpy(r) for r in result)
    return keras.ops.convert_to_numpy(result)


def assert_same(got, want, tol=TOL, where=""):
    """Same structure (array, or tuple of the same length), shapes, dtypes and values."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple), f"{where}: expected a tuple, got {type(got).__name__}"
        assert len(got) == len(want), f"{where}: {len(got)} results, Keras gives {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, tol, f"{where}[{i}]")
        return
    assert isinstance(got, np.ndarray), f"{where}: expected an ndarray, got {type(got).__name__}"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != Keras {want.shape}"
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != Keras {want.dtype}"
    np.testing.assert_allclose(got, want, err_msg=where, **tol)


def check(obj, model, x, masks=MASKS, **call_kw):
    """`model` agrees with Keras's `obj` on `x` under every mask of `masks`."""
    for name, m in masks.items():
        kw = dict(call_kw)
        if m is not None:
            kw["mask"] = m
        assert_same(model(x, **kw), to_numpy(obj(x, **kw)), where=f"mask={name}")


# ------------------------------------------------------------------------- single layers
@pytest.mark.parametrize("zero_output", [False, True], ids=["repeat", "zero"])
@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "back"])
@pytest.mark.parametrize("return_state", [False, True], ids=["out", "state"])
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_keras(kind, return_sequences, return_state, go_backwards, zero_output):
    key = (kind, return_sequences, return_state, go_backwards, zero_output)
    obj = built(rnn(kind, return_sequences=return_sequences, return_state=return_state,
                    go_backwards=go_backwards, zero_output_for_mask=zero_output), *key)
    model = rnnfast.from_keras(obj)
    assert len(model.layers) == 1
    layer = model.layers[0]
    assert layer.batch_first and not layer.bidirectional
    assert layer.reverse == go_backwards
    check(obj, model, inputs(*key))


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "back"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_without_bias(kind, go_backwards):
    obj = built(rnn(kind, use_bias=False, return_sequences=True, return_state=True,
                    go_backwards=go_backwards), kind, go_backwards, "nobias")
    model = rnnfast.from_keras(obj)
    assert model.layers[0].bias is False
    check(obj, model, inputs(kind))


def test_weight_conversion():
    """The documented mapping, checked on the parameters themselves."""
    lstm = built(L.LSTM(U), "conv-lstm")
    k, r, b = lstm.get_weights()
    sd = rnnfast.from_keras(lstm).layers[0].state_dict()
    np.testing.assert_array_equal(sd["weight_ih_l0"], k.T)
    np.testing.assert_array_equal(sd["weight_hh_l0"], r.T)
    np.testing.assert_array_equal(sd["bias_ih_l0"], b)
    np.testing.assert_array_equal(sd["bias_hh_l0"], 0)

    gru = built(L.GRU(U), "conv-gru")
    k, r, b = gru.get_weights()
    layer = rnnfast.from_keras(gru).layers[0]
    sd = layer.state_dict()
    z, rr, h = (slice(i * U, (i + 1) * U) for i in range(3))
    for name, keras_w in (("weight_ih_l0", k.T), ("weight_hh_l0", r.T), ("bias_ih_l0", b[0]),
                          ("bias_hh_l0", b[1])):
        got = sd[name]
        np.testing.assert_array_equal(got[:U], keras_w[rr])      # rnnfast r, z, n <- Keras z, r, h
        np.testing.assert_array_equal(got[U:2 * U], keras_w[z])
        np.testing.assert_array_equal(got[2 * U:], keras_w[h])
    assert layer.linear_before_reset is True
    gru1 = built(L.GRU(U, reset_after=False), "conv-gru1")
    layer = rnnfast.from_keras(gru1).layers[0]
    assert layer.linear_before_reset is False
    np.testing.assert_array_equal(layer.state_dict()["bias_hh_l0"], 0)


@pytest.mark.parametrize("kind", ["lstm", "gru-v1"])
def test_unroll_and_dropout(kind):
    """unroll=True (Keras's unrolled loop, same masking rules) and dropout /
    recurrent_dropout (training only) leave inference outputs as they are."""
    obj = built(rnn(kind, unroll=True, dropout=0.3, recurrent_dropout=0.2, return_sequences=True,
                    return_state=True), "unroll", kind)
    check(obj, rnnfast.from_keras(obj), inputs("unroll", kind))


def test_float64_layer():
    """A float64 Keras layer becomes a float64 rnnfast layer (agreement to 1e-10)."""
    x = inputs("f64", dtype=np.float64)
    obj = built(L.LSTM(U, return_sequences=True, return_state=True, dtype="float64"), "f64", x=x)
    model = rnnfast.from_keras(obj)
    assert model.layers[0].dtype == np.float64
    assert_same(model(x), to_numpy(obj(x)), tol=dict(rtol=1e-10, atol=1e-10))
    # With a mask Keras takes its generic per-step loop, which is itself only good to
    # ~1e-8 in float64 (measured against a NumPy float64 LSTM); rnnfast stays exact.
    for m in MASKS.values():
        assert_same(model(x, mask=m), to_numpy(obj(x, mask=m)), tol=dict(rtol=1e-7, atol=1e-7))


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "GRUCell-v1", "SimpleRNNCell"])
def test_rnn_of_one_cell(cell):
    c = (L.GRUCell(U, reset_after=False) if cell == "GRUCell-v1" else getattr(L, cell)(U))
    obj = built(L.RNN(c, return_sequences=True, return_state=True, go_backwards=True), cell)
    check(obj, rnnfast.from_keras(obj), inputs(cell))


def test_torch_tensors_in():
    """Keras's torch-backend users hold torch tensors: they are taken as they come."""
    torch = require_oracle("torch")
    obj = built(L.GRU(U, return_sequences=True), "torch-in")
    x = inputs("torch-in")
    m = MASKS["prefix"]
    got = rnnfast.from_keras(obj)(torch.from_numpy(x), mask=torch.from_numpy(m))
    assert_same(got, to_numpy(obj(x, mask=m)))


# --------------------------------------------------------------------------- activations
ACTIVATION_CASES = [
    ("lstm", "tanh", "hard_sigmoid"),
    ("lstm", "relu", "sigmoid"),
    ("lstm", "softsign", "hard_sigmoid"),
    ("lstm", "linear", "sigmoid"),
    ("lstm", "elu", "softsign"),
    ("lstm", "leaky_relu", "sigmoid"),
    ("gru", "tanh", "hard_sigmoid"),
    ("gru", "softplus", "sigmoid"),
    ("gru", "relu", "hard_sigmoid"),
    ("gru-v1", "elu", "hard_sigmoid"),
    ("gru-v1", "sigmoid", "tanh"),
    ("simple", "relu", None),
    ("simple", "linear", None),
    ("simple", "elu", None),
    ("simple", "softsign", None),
    ("simple", "softplus", None),
    ("simple", "leaky_relu", None),
    ("simple", "hard_sigmoid", None),
    ("simple", "sigmoid", None),
]


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "back"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=["-".join(map(str, c)) for c in ACTIVATION_CASES])
def test_activations(case, go_backwards):
    kind, act, rec = case
    kw = dict(activation=act, return_sequences=True, return_state=True, go_backwards=go_backwards)
    if rec is not None:
        kw["recurrent_activation"] = rec
    obj = built(rnn(kind, **kw), *case)
    check(obj, rnnfast.from_keras(obj), inputs(*case))


def test_hard_sigmoid_is_keras3s():
    """Keras 3's hard_sigmoid is relu6(x + 3) / 6, not ONNX's default 0.2x + 0.5."""
    assert rnnfast.keras.keras_activation("hard_sigmoid") == ("hard_sigmoid", 1 / 6, 0.5)
    x = np.linspace(-4, 4, 17).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.activations.hard_sigmoid(x)),
                               np.clip(x / 6 + 0.5, 0, 1), atol=1e-7)


@pytest.mark.parametrize("act", ["selu", "gelu", "swish", "relu6", "custom"])
def test_unsupported_activation(act):
    fn = keras.ops.sin if act == "custom" else act
    obj = built(L.LSTM(U, activation=fn), "act", act)
    with pytest.raises(ValueError, match="no rnnfast equivalent"):
        rnnfast.from_keras(obj)
    obj = built(L.SimpleRNN(U, activation=fn), "act-s", act)
    with pytest.raises(ValueError, match="no rnnfast equivalent"):
        rnnfast.from_keras(obj)


# ------------------------------------------------------------------------- Bidirectional
@pytest.mark.parametrize("return_state", [False, True], ids=["out", "state"])
@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional(kind, merge_mode, return_sequences, return_state):
    key = ("bi", kind, merge_mode, return_sequences, return_state)
    obj = built(L.Bidirectional(rnn(kind, return_sequences=return_sequences, return_state=return_state),
                                merge_mode=merge_mode), *key)
    model = rnnfast.from_keras(obj)
    # The two halves share one configuration: one bidirectional rnnfast layer.
    assert len(model.layers) == 1 and model.layers[0].bidirectional
    check(obj, model, inputs(*key))


UNFUSED = {
    # a backward half of another kind
    "lstm+gru": lambda rs: L.Bidirectional(L.LSTM(U, return_sequences=rs, return_state=True),
                                           backward_layer=L.GRU(U, return_sequences=rs, return_state=True,
                                                                go_backwards=True)),
    # the "forward" half reads backwards, the "backward" half forwards
    "swapped": lambda rs: L.Bidirectional(L.GRU(U, return_sequences=rs, go_backwards=True, reset_after=False),
                                          backward_layer=L.GRU(U, return_sequences=rs, reset_after=False),
                                          merge_mode="sum"),
    # different units
    "units": lambda rs: L.Bidirectional(L.SimpleRNN(U, return_sequences=rs),
                                        backward_layer=L.SimpleRNN(U + 2, return_sequences=rs,
                                                                   go_backwards=True)),
    # different activations
    "acts": lambda rs: L.Bidirectional(L.LSTM(U, return_sequences=rs),
                                       backward_layer=L.LSTM(U, return_sequences=rs, go_backwards=True,
                                                             recurrent_activation="hard_sigmoid"),
                                       merge_mode=None),
}


@pytest.mark.parametrize("return_sequences", [False, True], ids=["last", "seq"])
@pytest.mark.parametrize("case", list(UNFUSED))
def test_bidirectional_unfused(case, return_sequences):
    obj = built(UNFUSED[case](return_sequences), "unfused", case, return_sequences)
    model = rnnfast.from_keras(obj)
    assert len(model.layers) == 2 and not any(layer.bidirectional for layer in model.layers)
    check(obj, model, inputs(case))


# ------------------------------------------------------------------------- initial state
def _states(*key, n: int, units: int = U):
    rng = rng_for("h0", *key)
    return [(0.5 * rng.standard_normal((B, units))).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("go_backwards", [False, True], ids=["fwd", "back"])
@pytest.mark.parametrize("kind", KINDS)
def test_initial_state(kind, go_backwards):
    obj = built(rnn(kind, return_sequences=True, return_state=True, go_backwards=go_backwards), "h0", kind)
    model = rnnfast.from_keras(obj)
    x = inputs("h0", kind)
    st = _states(kind, go_backwards, n=2 if kind == "lstm" else 1)
    # a length-0 row keeps its initial state, as in Keras
    check(obj, model, x, initial_state=st)
    if kind != "lstm":
        check(obj, model, x, initial_state=st[0])       # a single-state layer takes an array too


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_initial_state(kind):
    obj = built(L.Bidirectional(rnn(kind, return_sequences=True, return_state=True)), "bi-h0", kind)
    st = _states("bi", kind, n=4 if kind == "lstm" else 2)
    check(obj, rnnfast.from_keras(obj), inputs("bi-h0", kind), initial_state=st)


# ---------------------------------------------------------------------------- Sequential
def _padded(lengths, mask_value=0.0, *key) -> np.ndarray:
    """Inputs whose steps past each length hold `mask_value` in every feature."""
    x = inputs("pad", *key)
    x[np.arange(T)[None, :] >= np.asarray(lengths)[:, None]] = mask_value
    return x


def test_sequential_with_masking():
    obj = keras.Sequential([
        keras.Input((T, F)),
        L.Masking(-1.0),
        L.LSTM(4, return_sequences=True),
        L.GRU(3, return_sequences=True, go_backwards=True),
        L.Bidirectional(L.SimpleRNN(2, return_sequences=True), merge_mode="sum"),
        L.GRU(U, reset_after=False, return_state=True),
    ])
    built(obj, "seq-masking")
    model = rnnfast.from_keras(obj)
    assert model.source == "Sequential"
    assert [type(layer).__name__ for layer in model.layers] == ["LSTM", "GRU", "RNN", "GRU"]
    for lengths in (LENGTHS, [T] * B, [2, 0, 4, 1]):
        x = _padded(lengths, -1.0, tuple(lengths))
        assert_same(model(x), to_numpy(obj(x)), where=f"lengths={lengths}")


@pytest.mark.parametrize("last", ["bidir-none-state", "lstm-state", "gru-last"])
def test_sequential_with_mask_argument(last):
    tail = {"bidir-none-state": L.Bidirectional(L.LSTM(2, return_sequences=True, return_state=True),
                                                merge_mode=None),
            "lstm-state": L.LSTM(2, return_state=True, go_backwards=True),
            "gru-last": L.GRU(2)}[last]
    obj = keras.Sequential([L.SimpleRNN(4, return_sequences=True, activation="relu"),
                            L.Bidirectional(L.GRU(3, return_sequences=True), merge_mode="ave"),
                            L.LSTM(3, return_sequences=True, zero_output_for_mask=True), tail])
    built(obj, "seq-mask", last, scale=0.4)
    check(obj, rnnfast.from_keras(obj), inputs("seq-mask", last))


def test_nested_sequential():
    inner = keras.Sequential([L.LSTM(4, return_sequences=True), L.GRU(3, return_sequences=True)])
    obj = keras.Sequential([keras.Input((T, F)), L.Masking(0.0), inner, L.SimpleRNN(2)])
    built(obj, "nested")
    model = rnnfast.from_keras(obj)
    assert len(model.layers) == 3
    x = _padded(LENGTHS, 0.0, "nested")
    assert_same(model(x), to_numpy(obj(x)))


def test_masking_that_is_not_a_prefix():
    obj = built(keras.Sequential([keras.Input((T, F)), L.Masking(0.0), L.LSTM(U)]), "masking-bad")
    model = rnnfast.from_keras(obj)
    x = inputs("masking-bad")
    x[1, 2] = 0.0                           # a masked step in the middle of row 1
    with pytest.raises(ValueError, match=r"Masking layer .* not a valid prefix .*rows \[1\]"):
        model(x)


# -------------------------------------------------------------------------------- errors
def test_mask_errors():
    obj = built(L.GRU(U), "mask-err")
    model = rnnfast.from_keras(obj)
    x = inputs("mask-err")
    m = np.ones((B, T), bool)
    m[2, 0] = False                         # left padding: not translatable to lengths
    with pytest.raises(ValueError, match=r"not a valid prefix .*rows \[2\]"):
        model(x, mask=m)
    m = np.ones((B, T), bool)
    m[0, 1] = False                         # a hole
    with pytest.raises(ValueError, match="not a valid prefix"):
        model(x, mask=m)
    with pytest.raises(ValueError, match="shape"):
        model(x, mask=np.ones((B, T + 1), bool))
    # 0/1 masks are taken as Keras takes them (cast to bool)
    assert_same(model(x, mask=MASKS["prefix"].astype(np.int32)), to_numpy(obj(x, mask=MASKS["prefix"])))


def test_call_errors():
    obj = built(L.LSTM(U), "call-err")
    model = rnnfast.from_keras(obj)
    x = inputs("call-err")
    with pytest.raises(ValueError, match=r"\(B, T, F\)"):
        model(x[0])
    with pytest.raises(ValueError, match="features"):
        model(x[..., :2])
    with pytest.raises(ValueError, match="2 arrays"):
        model(x, initial_state=_states("e", n=1))
    with pytest.raises(ValueError, match="shape"):
        model(x, initial_state=_states("e", n=2, units=U + 1))
    seq = built(keras.Sequential([L.LSTM(U)]), "call-err-seq")
    with pytest.raises(TypeError, match="initial_state"):
        rnnfast.from_keras(seq)(x, initial_state=_states("e", n=2))


def test_unsupported_objects():
    with pytest.raises(TypeError, match="Dense is not supported"):
        rnnfast.from_keras(built(keras.Sequential([L.LSTM(U, return_sequences=True), L.Dense(2)]), "dense"))
    with pytest.raises(TypeError, match="Dense is not supported"):
        rnnfast.from_keras(built(L.Dense(2), "dense-alone"))
    with pytest.raises(ValueError, match="no weights yet"):
        rnnfast.from_keras(L.LSTM(U))
    stacked = L.RNN([L.LSTMCell(U), L.LSTMCell(U)])
    with pytest.raises(ValueError, match="StackedRNNCells"):
        rnnfast.from_keras(built(stacked, "stacked"))
    stateful = L.GRU(U, stateful=True)
    stateful(inputs("stateful"))
    with pytest.raises(ValueError, match="stateful"):
        rnnfast.from_keras(stateful)
    mixed = L.LSTM(U, dtype="mixed_bfloat16")
    mixed(inputs("mixed"))
    with pytest.raises(ValueError, match="bfloat16"):
        rnnfast.from_keras(mixed)


def test_multi_output_layer_not_last():
    first = L.LSTM(U, return_sequences=True, return_state=True)
    second = L.GRU(2)
    first(inputs("multi"))
    second(inputs("multi"))                 # F == U: the LSTM's output size
    seq = keras.Sequential([first, second])
    with pytest.raises(ValueError, match="not the last layer"):
        rnnfast.from_keras(seq)


def test_copies_weights():
    obj = built(L.LSTM(U, return_sequences=True), "copy")
    model = rnnfast.from_keras(obj)
    x = inputs("copy")
    before = model(x)
    obj.set_weights([w + 1 for w in obj.get_weights()])
    np.testing.assert_array_equal(model(x), before)


def test_rnnfast_does_not_import_keras():
    code = ("import sys, rnnfast, rnnfast.keras, rnnfast.interop; "
            "assert 'keras' not in sys.modules, 'rnnfast imported keras'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("case", ["lstm", "bidirectional-gru"])
def test_keras_to_onnx_matches_keras(tmp_path, case):
    """Keras -> rnnfast -> ONNX -> ONNX Runtime gives Keras's outputs."""
    require_oracle("onnx")
    ort = require_oracle("onnxruntime")
    if case == "lstm":
        obj = L.LSTM(U, return_sequences=True, return_state=True, zero_output_for_mask=True)
    else:
        obj = L.Bidirectional(L.GRU(U, return_sequences=True, return_state=True, recurrent_activation="hard_sigmoid"))
    obj = built(obj, "onnx", case)
    (layer,) = rnnfast.from_keras(obj).layers
    path = tmp_path / "model.onnx"
    layer.to_onnx(path, lengths=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = inputs("onnx", case)
    for name, m in MASKS.items():
        lengths = np.full(B, T, np.int64) if m is None else m.sum(axis=1).astype(np.int64)
        y, *states = sess.run(None, {"X": x, "lengths": lengths})
        want_y, *want_states = to_numpy(obj(x) if m is None else obj(x, mask=m))
        # ONNX's sequence_lens leaves zeros past each length, as Keras does with
        # zero_output_for_mask (which Bidirectional sets on both halves).
        np.testing.assert_allclose(y, want_y, err_msg=f"Y mask={name}", **TOL)
        # ONNX h_n (D, B, H) [, c_n]; Keras [h, c] per direction, forward first
        got_states = [s[d] for d in range(states[0].shape[0]) for s in states]
        assert len(got_states) == len(want_states)
        for i, (g, w) in enumerate(zip(got_states, want_states)):
            np.testing.assert_allclose(g, w, err_msg=f"state {i} mask={name}", **TOL)
