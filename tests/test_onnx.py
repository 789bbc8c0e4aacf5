"""ONNX Runtime's GRU (linear_before_reset=0 and 1), LSTM and RNN operators as a peer.

The model is built with onnx.helper as in the project's referee benchmark (anchor_bench.py, ``make_ort``):
gate rows permuted from PyTorch's order (GRU r,z,n -> ONNX z,r,h; LSTM i,f,g,o -> ONNX
i,o,f,c), biases concatenated [W_b, R_b]. ORT's CPU kernels for these operators are
float32 only ("does not support double yet" in 1.32); the float64 test runs where an
ORT build supports it and is skipped otherwise.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnfast

from conftest import BACKENDS, flat_states, make_layer, ref_stack, require_oracle, rng_for

ort = require_oracle("onnxruntime")
onnx = require_oracle("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

T, B, I, H = 7, 4, 3, 5
ORT_TOL = dict(rtol=1e-5, atol=1e-5)


def _perm(kind, a, H):
    if kind == "lstm":       # torch i,f,g,o -> onnx i,o,f,c
        return np.concatenate([a[0:H], a[3 * H:4 * H], a[H:2 * H], a[2 * H:3 * H]])
    if kind == "gru":        # torch r,z,n -> onnx z,r,h
        return np.concatenate([a[H:2 * H], a[0:H], a[2 * H:3 * H]])
    return a


def make_session(layer, dtype=np.float32, with_h0=False, with_seq=False):
    """A one-op ONNX model carrying a one-layer rnnfast layer's weights."""
    kind = layer._kind
    assert layer.num_layers == 1 and not layer.proj_size
    Hh = layer.hidden_size
    sd = layer.state_dict()
    sfxs = ["l0", "l0_reverse"] if layer.bidirectional else ["l0"]
    W = np.stack([_perm(kind, sd[f"weight_ih_{s}"], Hh) for s in sfxs]).astype(dtype)
    R = np.stack([_perm(kind, sd[f"weight_hh_{s}"], Hh) for s in sfxs]).astype(dtype)
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    inputs = ["X", "W", "R", "", "", ""]
    if layer.bias:
        Bb = np.stack([np.concatenate([_perm(kind, sd[f"bias_ih_{s}"], Hh), _perm(kind, sd[f"bias_hh_{s}"], Hh)])
                       for s in sfxs]).astype(dtype)
        inits.append(numpy_helper.from_array(Bb, "B"))
        inputs[3] = "B"
    tp = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    graph_in = [helper.make_tensor_value_info("X", tp, None)]
    if with_seq:
        inputs[4] = "seq"
        graph_in.append(helper.make_tensor_value_info("seq", TensorProto.INT32, None))
    if with_h0:
        inputs[5] = "h0"
        graph_in.append(helper.make_tensor_value_info("h0", tp, None))
        if kind == "lstm":
            inputs.append("c0")
            graph_in.append(helper.make_tensor_value_info("c0", tp, None))
    while inputs and inputs[-1] == "":
        inputs.pop()
    attrs = {"hidden_size": Hh,
             "direction": "bidirectional" if layer.bidirectional else "forward"}
    if kind == "gru":
        attrs["linear_before_reset"] = int(layer.linear_before_reset)
    if kind == "rnn":
        attrs["activations"] = ["Tanh" if layer.nonlinearity == "tanh" else "Relu"] * layer.num_directions
    outs = ["Y", "Y_h"] + (["Y_c"] if kind == "lstm" else [])
    op = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[kind]
    node = helper.make_node(op, inputs, outs, **attrs)
    graph = helper.make_graph([node], "g", graph_in, [helper.make_tensor_value_info(o, tp, None) for o in outs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_session(sess, layer, x, hx=None, lengths=None):
    """ORT result in rnnfast's layout: y (T, B, D*H), states (D, B, H)."""
    feeds = {"X": x}
    if lengths is not None:
        feeds["seq"] = np.asarray(lengths, np.int32)
    if hx is not None:
        if layer._kind == "lstm":
            feeds["h0"], feeds["c0"] = hx
        else:
            feeds["h0"] = hx
    outs = sess.run(None, feeds)
    y = outs[0]                                         # (T, D, B, H)
    y = np.concatenate([y[:, d] for d in range(y.shape[1])], axis=-1)
    return [y, *outs[1:]]


def _compare(layer, be, sess, x, hx, ln, dtype):
    with rnnfast.backend(be):
        y, hn = layer(x, hx, ln)
    want = run_session(sess, layer, x, hx, ln)
    got = [y, *flat_states(hn)]
    for g, w, name in zip(got, want, ["Y", "Y_h", "Y_c"]):
        assert g.dtype == np.dtype(dtype)
        np.testing.assert_allclose(g, w, err_msg=name, **ORT_TOL)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("lbr", [False, True], ids=["lbr0", "lbr1"])
@pytest.mark.parametrize("be", BACKENDS)
def test_gru_matches_onnxruntime(be, lbr, bidirectional, bias):
    """GRU (both linear_before_reset forms) vs ORT's GRU in float32: full sequences, with
    initial states, and with sequence_lens (unsorted, length 1, max < T)."""
    rng = rng_for("ort-gru", be, lbr, bidirectional, bias)
    layer = rnnfast.GRU(I, H, bidirectional=bidirectional, bias=bias, linear_before_reset=lbr,
                        dtype=np.float32, seed=3)
    D = layer.num_directions
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((D, B, H))).astype(np.float32)
    _compare(layer, be, make_session(layer), x, None, None, np.float32)
    _compare(layer, be, make_session(layer, with_h0=True), x, h0, None, np.float32)
    sess = make_session(layer, with_h0=True, with_seq=True)
    for ln in (np.array([3, 7, 1, 5]), np.array([2, 1, 4, 4])):
        _compare(layer, be, sess, x, h0, ln, np.float32)


@pytest.mark.parametrize("be", BACKENDS)
def test_gru_nolbr_functional_reverse_matches_onnxruntime(be):
    """rnnfast.gru(linear_before_reset=False, reverse=True) against ORT's reverse GRU."""
    rng = rng_for("ort-gru-rev", be)
    layer = rnnfast.GRU(I, H, linear_before_reset=False, dtype=np.float32, seed=4)
    sd = layer.state_dict()
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((B, H))).astype(np.float32)
    ln = np.array([6, 2, 7, 1])
    # a reverse ONNX model: same weights, direction="reverse"
    W = _perm("gru", sd["weight_ih_l0"], H)[None]
    R = _perm("gru", sd["weight_hh_l0"], H)[None]
    Bb = np.concatenate([_perm("gru", sd["bias_ih_l0"], H), _perm("gru", sd["bias_hh_l0"], H)])[None]
    node = helper.make_node("GRU", ["X", "W", "R", "B", "seq", "h0"], ["Y", "Y_h"], hidden_size=H,
                            direction="reverse", linear_before_reset=0)
    def f32(n):
        return helper.make_tensor_value_info(n, TensorProto.FLOAT, None)

    graph = helper.make_graph([node], "g", [f32("X"), helper.make_tensor_value_info("seq", TensorProto.INT32, None),
                                            f32("h0")], [f32("Y"), f32("Y_h")],
                              [numpy_helper.from_array(a, n) for a, n in [(W, "W"), (R, "R"), (Bb, "B")]])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    rs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want_y, want_h = rs.run(None, {"X": x, "seq": ln.astype(np.int32), "h0": h0[None]})
    with rnnfast.backend(be):
        y, h = rnnfast.gru(x, sd["weight_ih_l0"], sd["weight_hh_l0"], sd["bias_ih_l0"], sd["bias_hh_l0"],
                           h0=h0, lengths=ln, reverse=True, linear_before_reset=False)
    np.testing.assert_allclose(y, want_y[:, 0], **ORT_TOL)
    np.testing.assert_allclose(h, want_h[0], **ORT_TOL)


def test_gru_nolbr_float64_matches_onnxruntime_if_supported():
    layer = rnnfast.GRU(I, H, bidirectional=True, linear_before_reset=False, dtype=np.float64, seed=5)
    x = rng_for("ort64").standard_normal((T, B, I))
    sess = make_session(layer, dtype=np.float64, with_seq=True)
    ln = np.array([7, 3, 1, 6])
    try:
        want = run_session(sess, layer, x, None, ln)
    except Exception as e:  # ORT's CPU GRU kernel is float32 only
        if "double" in str(e):
            pytest.skip(f"this ONNX Runtime has no float64 GRU: {str(e)[:100]}")
        raise
    for be in BACKENDS:
        with rnnfast.backend(be):
            y, h = layer(x, None, ln)
        np.testing.assert_allclose(y, want[0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(h, want[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind,opts", [("lstm", {}), ("rnn", {"nonlinearity": "tanh"}),
                                       ("rnn", {"nonlinearity": "relu"})], ids=["lstm", "rnn-tanh", "rnn-relu"])
@pytest.mark.parametrize("be", BACKENDS)
def test_lstm_rnn_match_onnxruntime(be, kind, opts):
    rng = rng_for("ort", be, kind, repr(opts))
    for bidirectional in (False, True):
        layer = make_layer(kind, opts, I, H, bidirectional=bidirectional, dtype=np.float32, seed=6)
        D = layer.num_directions
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        h0 = (0.5 * rng.standard_normal((D, B, H))).astype(np.float32)
        hx = (h0, (0.5 * rng.standard_normal((D, B, H))).astype(np.float32)) if kind == "lstm" else h0
        _compare(layer, be, make_session(layer, with_h0=True, with_seq=True), x, hx,
                 np.array([5, 7, 1, 3]), np.float32)
        _compare(layer, be, make_session(layer), x, None, None, np.float32)


def test_onnx_oracle_agrees_with_reference():
    """Sanity of the ONNX model construction itself: ORT (float32) vs the float64 reference."""
    layer = rnnfast.GRU(I, H, bidirectional=True, linear_before_reset=False, dtype=np.float32, seed=8)
    x = rng_for("ort-sanity").standard_normal((T, B, I)).astype(np.float32)
    ln = np.array([4, 7, 2, 1])
    want = run_session(make_session(layer, with_seq=True), layer, x, None, ln)
    y, h = ref_stack(layer, x, None, ln)
    np.testing.assert_allclose(want[0], y, **ORT_TOL)
    np.testing.assert_allclose(want[1], h, **ORT_TOL)
