"""``layer.to_onnx`` / ``rnnfast.onnx.to_onnx``: the written models against the layers.

Every model is checked with ``onnx.checker.check_model(full_check=True)`` (shape
inference included) and run in ONNX Runtime on the same inputs as the layer: outputs
within 1e-5 in float32. Lengths include 0, T and unsorted values: ONNX Runtime accepts
sequence_lens of 0 (zero outputs) but returns a zero final state for such a sequence,
where rnnfast returns the initial state; the exporter restores it with a Where node,
which the ``lengths`` x ``initial_state`` cases cover.

ONNX Runtime's CPU recurrent kernels are float32 only ("does not support double yet"),
so float64 models run in ``onnx.reference.ReferenceEvaluator``; its LSTM/GRU/RNN take no
``sequence_lens`` (the argument is ignored), so there the float64 graph is compared
node for node with the float32 one, which ONNX Runtime runs with lengths.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import rnnfast

from conftest import flat_states, require_oracle, rng_for

onnx = require_oracle("onnx")
ort = require_oracle("onnxruntime")

T, B, I, H = 6, 5, 3, 4
LENGTHS = np.array([3, T, 0, 1, 5])          # unsorted, a full and an empty sequence
ORT_TOL = dict(rtol=1e-5, atol=1e-5)
F64_TOL = dict(rtol=1e-9, atol=1e-9)

KINDS = [
    ("lstm", rnnfast.LSTM, {}),
    ("gru-lbr", rnnfast.GRU, {"linear_before_reset": True}),
    ("gru-nolbr", rnnfast.GRU, {"linear_before_reset": False}),
    ("rnn-tanh", rnnfast.RNN, {"nonlinearity": "tanh"}),
    ("rnn-relu", rnnfast.RNN, {"nonlinearity": "relu"}),
]
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}


# ---------------------------------------------------------------------------------- helpers
def _inputs(layer, rng, lengths: bool, initial_state: bool, dtype=np.float32):
    """(feeds of the model, the layer's call arguments (x, hx, lengths))."""
    L, D, Hh = layer.num_layers, layer.num_directions, layer.hidden_size
    x = rng.standard_normal((B, T, I) if layer.batch_first else (T, B, I)).astype(dtype)
    feeds, hx, ln = {"X": x}, None, None
    if lengths:
        ln = LENGTHS.copy()
        feeds["lengths"] = ln.astype(np.int64)
    if initial_state:
        states = [(0.5 * rng.standard_normal((L * D, B, Hh))).astype(dtype)
                  for _ in range(2 if layer._kind == "lstm" else 1)]
        feeds["h0"] = states[0]
        if layer._kind == "lstm":
            feeds["c0"] = states[1]
        hx = tuple(states) if layer._kind == "lstm" else states[0]
    return feeds, (x, hx, ln)


def _expected(layer, args) -> list[np.ndarray]:
    y, hn = layer(*args)
    return [y, *flat_states(hn)]


def _ort(model, feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _check_interface(model, layer, lengths: bool, initial_state: bool, elem=None) -> None:
    """Valid model; the inputs and outputs of SPEC's interop section, T and B symbolic."""
    onnx.checker.check_model(model, full_check=True)
    TP = onnx.TensorProto
    elem = elem or (TP.DOUBLE if layer.dtype == np.float64 else TP.FLOAT)
    L, D, Hh = layer.num_layers, layer.num_directions, layer.hidden_size
    tb = ["B", "T"] if layer.batch_first else ["T", "B"]
    lstm = layer._kind == "lstm"
    want_in = [("X", elem, [*tb, I])]
    if lengths:
        want_in.append(("lengths", TP.INT64, ["B"]))
    if initial_state:
        want_in += [(s, elem, [L * D, "B", Hh]) for s in (["h0", "c0"] if lstm else ["h0"])]
    want_out = [("Y", elem, [*tb, D * Hh])] + [(s, elem, [L * D, "B", Hh])
                                                for s in (["h_n", "c_n"] if lstm else ["h_n"])]
    got_in = [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in model.graph.input]
    got_out = [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in model.graph.output]
    assert got_in == want_in
    assert got_out == want_out
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 14
    ops = [n.op_type for n in model.graph.node]
    assert sum(op in RECURRENT_OPS for op in ops) == L, ops
    assert set(ops) <= RECURRENT_OPS | {"Transpose", "Reshape", "Concat", "Squeeze", "Cast", "Slice",
                                        "Equal", "Unsqueeze", "Where"}, ops


def _assert_outputs(got, want, names, **tol) -> None:
    assert len(got) == len(want)
    for g, w, n in zip(got, want, names):
        assert g.shape == w.shape, (n, g.shape, w.shape)
        assert g.dtype == w.dtype, (n, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, err_msg=n, **(tol or ORT_TOL))


def _names(layer) -> list[str]:
    return ["Y", "h_n", "c_n"] if layer._kind == "lstm" else ["Y", "h_n"]


# ----------------------------------------------------------------------- the standard cells
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbi", "bti"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("cls,opts", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_matches_onnxruntime(cls, opts, num_layers, bidirectional, batch_first, tmp_path):
    """Each cell x layers x directions x layout, with and without lengths (0 and T among
    them) and initial states: a valid model with the layer's interface whose ONNX Runtime
    outputs equal the layer's."""
    layer = cls(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                seed=7, **opts)
    rng = rng_for("onnx-export", cls.__name__, repr(opts), num_layers, bidirectional, batch_first)
    for lengths in (False, True):
        for initial_state in (False, True):
            path = tmp_path / f"m_{lengths}_{initial_state}.onnx"
            model = layer.to_onnx(path, lengths=lengths, initial_state=initial_state)
            _check_interface(model, layer, lengths, initial_state)
            assert onnx.load(path).SerializeToString() == model.SerializeToString()
            feeds, args = _inputs(layer, rng, lengths, initial_state)
            _assert_outputs(_ort(model, feeds), _expected(layer, args), _names(layer))


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN], ids=["lstm", "gru", "rnn"])
def test_no_bias_and_dropout(cls, tmp_path):
    """bias=False leaves ONNX's B input out; dropout (training only) is not in the model."""
    layer = cls(I, H, num_layers=2, bias=False, dropout=0.5, bidirectional=True, seed=8)
    model = layer.to_onnx(tmp_path / "m.onnx", lengths=True, initial_state=True)
    _check_interface(model, layer, True, True)
    assert not [t for t in model.graph.initializer if t.name.startswith("B_")]
    feeds, args = _inputs(layer, rng_for("nobias", cls.__name__), True, True)
    _assert_outputs(_ort(model, feeds), _expected(layer, args), _names(layer))


@pytest.mark.parametrize("cls,opts", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_any_batch_and_length(cls, opts, tmp_path):
    """One model serves other T and B (symbolic dims), lengths all below T included."""
    layer = cls(I, H, num_layers=2, bidirectional=True, batch_first=True, seed=14, **opts)
    model = layer.to_onnx(tmp_path / "m.onnx", lengths=True, initial_state=True)
    rng = rng_for("any-shape", cls.__name__, repr(opts))
    for t, ln in ((9, [2, 1, 0, 4, 4, 7]), (1, [1]), (2, [0, 0])):
        b = len(ln)
        x = rng.standard_normal((b, t, I)).astype(np.float32)
        states = [(0.5 * rng.standard_normal((4, b, H))).astype(np.float32)
                  for _ in range(2 if layer._kind == "lstm" else 1)]
        feeds = {"X": x, "lengths": np.array(ln, np.int64), "h0": states[0]}
        if layer._kind == "lstm":
            feeds["c0"] = states[1]
        hx = tuple(states) if layer._kind == "lstm" else states[0]
        _assert_outputs(_ort(model, feeds), _expected(layer, (x, hx, np.array(ln))), _names(layer))


def test_path_forms(tmp_path):
    """str and PathLike paths write the returned ModelProto; None only builds it."""
    layer = rnnfast.GRU(I, H, seed=1)
    m1 = layer.to_onnx(str(tmp_path / "a.onnx"))
    m2 = rnnfast.onnx.to_onnx(layer, pathlib.Path(tmp_path / "b.onnx"))
    assert isinstance(m1, onnx.ModelProto)
    assert m1.SerializeToString() == m2.SerializeToString()
    assert onnx.load(str(tmp_path / "a.onnx")).SerializeToString() == m1.SerializeToString()
    assert onnx.load(tmp_path / "b.onnx").SerializeToString() == m1.SerializeToString()
    assert rnnfast.onnx.to_onnx(layer, None).SerializeToString() == m1.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx"]


def test_weights_at_export_time(tmp_path):
    """The model holds the weights the layer had when written (in-place updates included)."""
    layer = rnnfast.LSTM(I, H, seed=2)
    layer.parameters()["weight_hh_l0"][:] *= 1.5
    model = layer.to_onnx(tmp_path / "m.onnx", initial_state=True)
    feeds, args = _inputs(layer, rng_for("export-time"), False, True)
    _assert_outputs(_ort(model, feeds), _expected(layer, args), _names(layer))


# -------------------------------------------------------------------------------- float64
def _reference_ops() -> list:
    """ReferenceEvaluator's RNN knows the activations Tanh and Affine only: Relu added."""
    from onnx.reference.ops.op_rnn import RNN_14

    class RNN(RNN_14):        # the class name is the op type it stands for
        op_domain = ""

        def choose_act(self, name, alpha, beta):
            if name == "Relu":
                return lambda x: np.maximum(x, 0)
            return super().choose_act(name, alpha, beta)

    return [RNN]


@pytest.mark.parametrize("cls,opts", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_float64_model(cls, opts, tmp_path):
    """A float64 layer writes DOUBLE tensors. ReferenceEvaluator runs the model (ONNX
    Runtime's recurrent kernels are float32 only) without lengths, which it ignores; with
    lengths the graph equals the float32 model's node for node (run in ORT above)."""
    from onnx.reference import ReferenceEvaluator
    layer = cls(I, H, num_layers=2, bidirectional=True, batch_first=True, dtype=np.float64, seed=9, **opts)
    model = layer.to_onnx(tmp_path / "m.onnx", initial_state=True)
    _check_interface(model, layer, False, True)
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in model.graph.initializer
               if t.name[0] in "WRBP")
    feeds, args = _inputs(layer, rng_for("f64", cls.__name__, repr(opts)), False, True, np.float64)
    got = ReferenceEvaluator(model, new_ops=_reference_ops()).run(None, feeds)
    _assert_outputs(got, _expected(layer, args), _names(layer), **F64_TOL)

    f32 = cls(I, H, num_layers=2, bidirectional=True, batch_first=True, dtype=np.float32, seed=9, **opts)
    m64 = layer.to_onnx(None, lengths=True, initial_state=True)
    m32 = f32.to_onnx(None, lengths=True, initial_state=True)
    _check_interface(m64, layer, True, True)
    assert [str(n) for n in m64.graph.node] == [str(n) for n in m32.graph.node]
    for t64, t32 in zip(m64.graph.initializer, m32.graph.initializer):
        a64, a32 = onnx.numpy_helper.to_array(t64), onnx.numpy_helper.to_array(t32)
        assert t64.name == t32.name and a64.shape == a32.shape
        np.testing.assert_allclose(a64, a32, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- frozen
def test_frozen_fp32_and_fp64(tmp_path):
    """A frozen fp32 layer writes its own copy of the weights (later changes to the layer do
    not reach it); fp32 of a float64 layer writes FLOAT, fp64 writes DOUBLE."""
    layer = rnnfast.LSTM(I, H, num_layers=2, bidirectional=True, seed=10)
    frozen = layer.freeze("fp32")
    layer.parameters()["weight_ih_l0"][:] = 0.0          # after the freeze: not in the model
    model = frozen.to_onnx(tmp_path / "f.onnx", lengths=True, initial_state=True)
    _check_interface(model, layer, True, True)
    feeds, args = _inputs(layer, rng_for("frozen32"), True, True)
    _assert_outputs(_ort(model, feeds), _expected(frozen, args), _names(layer))

    l64 = rnnfast.GRU(I, H, batch_first=True, dtype=np.float64, seed=11, linear_before_reset=False)
    f32 = l64.freeze("fp32")
    model = f32.to_onnx(tmp_path / "g.onnx", lengths=True)
    _check_interface(model, l64, True, False, elem=onnx.TensorProto.FLOAT)
    feeds, args = _inputs(l64, rng_for("frozen64"), True, False)
    _assert_outputs(_ort(model, feeds), _expected(f32, args), _names(l64))

    m64 = l64.freeze("fp64").to_onnx(None)
    _check_interface(m64, l64, False, False, elem=onnx.TensorProto.DOUBLE)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_frozen_low_precision_raises(precision, tmp_path):
    frozen = rnnfast.GRU(I, H, seed=1).freeze(precision)
    with pytest.raises(ValueError, match=precision):
        frozen.to_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("make", [
    lambda: rnnfast.LSTM(I, H, proj_size=2),
    lambda: rnnfast.LSTM(I, H, proj_size=2).freeze("fp32"),
    lambda: rnnfast.MinGRU(I, H),
    lambda: rnnfast.MinLSTM(I, H),
    lambda: rnnfast.MinGRU(I, H).freeze("fp32"),
], ids=["lstm-proj", "frozen-lstm-proj", "mingru", "minlstm", "frozen-mingru"])
def test_no_onnx_operator(make, tmp_path):
    """LSTM projections and the min RNNs have no ONNX operator: a clear NotImplementedError."""
    with pytest.raises(NotImplementedError, match="no ONNX operator"):
        make().to_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="LSTM, GRU or RNN"):
        rnnfast.onnx.to_onnx(object(), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="lengths"):
        rnnfast.GRU(I, H).to_onnx(tmp_path / "m.onnx", lengths="yes")
    with pytest.raises(TypeError, match="initial_state"):
        rnnfast.GRU(I, H).to_onnx(tmp_path / "m.onnx", initial_state=1)
    assert not (tmp_path / "m.onnx").exists()


def test_import_rnnfast_needs_no_onnx():
    """onnx is imported when a model is written, not by ``import rnnfast``."""
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
            "import rnnfast, rnnfast.onnx\n"
            "try:\n"
            "    rnnfast.GRU(2, 3).to_onnx(None)\n"
            "except ImportError:\n"
            "    print('lazy')\n")
    env = dict(os.environ, RNNFAST_TUNE="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


# ------------------------------------------------------------------------- cell variants
VARIANTS = [
    ("lstm-reverse-L2", rnnfast.LSTM, dict(reverse=True, num_layers=2)),
    ("gru-reverse-bti", rnnfast.GRU, dict(reverse=True, batch_first=True, linear_before_reset=False)),
    ("rnn-reverse-relu", rnnfast.RNN, dict(reverse=True, nonlinearity="relu")),
    ("lstm-peephole", rnnfast.LSTM, dict(peephole=True)),
    ("lstm-peephole-bi-L2", rnnfast.LSTM, dict(peephole=True, bidirectional=True, num_layers=2)),
    ("lstm-clip", rnnfast.LSTM, dict(clip=0.5)),
    ("lstm-input-forget-bi", rnnfast.LSTM, dict(input_forget=True, bidirectional=True)),
    # alpha / beta listed only for the activations that take them (ONNX Runtime's reading)
    ("lstm-acts", rnnfast.LSTM, dict(gate_activation="hard_sigmoid", candidate_activation=("leaky_relu", 0.1),
                                     output_activation="softsign")),
    ("lstm-acts-params-bi", rnnfast.LSTM, dict(gate_activation=("hard_sigmoid", 0.3, 0.4),
                                               candidate_activation=("scaled_tanh", 0.9, 1.1),
                                               output_activation=("affine", 0.5, 0.1), bidirectional=True)),
    # a parameterised activation after plain ones: its alpha comes first in the list
    ("lstm-elu-output", rnnfast.LSTM, dict(output_activation=("elu", 0.5))),
    ("gru-leaky-bi", rnnfast.GRU, dict(candidate_activation=("leaky_relu", 0.3), bidirectional=True)),
    ("gru-acts-clip", rnnfast.GRU, dict(gate_activation="hard_sigmoid", candidate_activation=("elu", 0.7),
                                        clip=2.0, linear_before_reset=False)),
    ("gru-softplus-bi", rnnfast.GRU, dict(candidate_activation="softplus", bidirectional=True)),
    ("rnn-thresholded-clip-bi", rnnfast.RNN, dict(nonlinearity=("thresholded_relu", 0.2), clip=3.0,
                                                  bidirectional=True)),
    ("rnn-softsign", rnnfast.RNN, dict(nonlinearity="softsign")),
    ("lstm-all", rnnfast.LSTM, dict(peephole=True, clip=1.5, input_forget=True, reverse=True,
                                    gate_activation=("hard_sigmoid", 0.25, 0.45), num_layers=2)),
]


@pytest.mark.parametrize("cls,opts", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_cell_variants_match_onnxruntime(cls, opts, tmp_path):
    """reverse, peepholes, clip, input_forget and the activations as ONNX attributes / P."""
    try:
        layer = cls(I, H, seed=12, **opts)
    except TypeError as e:       # a checkout from before the cell variants (issue 15)
        pytest.fail(f"{cls.__name__}({opts}) is not accepted: {e}")
    model = layer.to_onnx(tmp_path / "m.onnx", lengths=True, initial_state=True)
    _check_interface(model, layer, True, True)
    node = next(n for n in model.graph.node if n.op_type in RECURRENT_OPS)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if opts.get("reverse"):
        assert attrs["direction"] == b"reverse"
    if "clip" in opts:
        assert attrs["clip"] == pytest.approx(opts["clip"])
    if opts.get("peephole"):
        assert node.input[7] == "P_l0"
    feeds, args = _inputs(layer, rng_for("variant", cls.__name__, repr(opts)), True, True)
    _assert_outputs(_ort(model, feeds), _expected(layer, args), _names(layer))


def test_default_activations_write_no_attribute():
    """Default activations leave ``activations`` out (a named default is still the default)."""
    for layer in (rnnfast.LSTM(I, H, gate_activation="sigmoid", candidate_activation="tanh"),
                  rnnfast.GRU(I, H), rnnfast.RNN(I, H, nonlinearity="tanh")):
        node = layer.to_onnx(None).graph.node[0]
        assert not {a.name for a in node.attribute} & {"activations", "activation_alpha", "activation_beta"}
    node = rnnfast.RNN(I, H, nonlinearity="relu", bidirectional=True).to_onnx(None).graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["activations"] == [b"Relu", b"Relu"]
    assert "activation_alpha" not in attrs


# ------------------------------------------------------------------------------ round trip
ROUND_TRIP = [
    ("lstm-bi-L2-bti", rnnfast.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("gru-nolbr", rnnfast.GRU, dict(linear_before_reset=False, num_layers=2)),
    ("rnn-relu-bi", rnnfast.RNN, dict(nonlinearity="relu", bidirectional=True)),
    ("lstm-peephole-reverse", rnnfast.LSTM, dict(peephole=True, reverse=True, clip=2.0)),
]


@pytest.mark.parametrize("cls,opts", [v[1:] for v in ROUND_TRIP], ids=[v[0] for v in ROUND_TRIP])
def test_round_trip_through_rnnfast_onnx_load(cls, opts, tmp_path):
    """rnnfast -> ONNX -> rnnfast.onnx.load: the session gives the layer's outputs, from a
    path and from the ModelProto."""
    layer = cls(I, H, seed=13, **opts)
    path = tmp_path / "m.onnx"
    model = layer.to_onnx(path, lengths=True, initial_state=True)
    feeds, args = _inputs(layer, rng_for("round-trip", cls.__name__, repr(opts)), True, True)
    want = _expected(layer, args)
    for src in (str(path), model):
        sess = rnnfast.onnx.load(src)
        _assert_outputs([np.asarray(o) for o in sess.run(None, feeds)], want, _names(layer))
