"""ONNX in: ``rnnfast.onnx.load`` and ``rnnfast.onnx.layer_from_node`` (issue 15).

Oracles: ONNX's own backend node test cases (expected outputs from onnx's NumPy
reference), PyTorch for models that ``torch.onnx.export`` writes, and ONNX Runtime for
every attribute of the LSTM, GRU and RNN operators on one-node models built with
onnx.helper. ONNX Runtime refuses layout=1 for LSTM and GRU (and ignores it for RNN), so
layout 1 is checked against layout 0 with the inputs and outputs transposed.
"""
from __future__ import annotations

import importlib
import io
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

import rnnfast
from rnnfast.onnx import _import as onnx_import

from conftest import require_oracle, rng_for

onnx = require_oracle("onnx")
ort = require_oracle("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

T, B, I, H = 6, 3, 4, 5
TOL = dict(rtol=1e-5, atol=1e-5)      # float32 against ONNX Runtime's float32 kernels
OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
OUTS = {"lstm": ("Y", "Y_h", "Y_c"), "gru": ("Y", "Y_h"), "rnn": ("Y", "Y_h")}
# ONNX activations and explicit parameters (alpha, beta) that differ from the defaults
ACT_PARAMS = {"Relu": (), "Tanh": (), "Sigmoid": (), "Affine": (0.7, 0.2), "LeakyRelu": (0.05,),
              "ThresholdedRelu": (0.3,), "ScaledTanh": (0.9, 1.3), "HardSigmoid": (0.25, 0.45), "Elu": (0.8,),
              "Softsign": (), "Softplus": ()}
TAKES = {"Affine": (True, True), "LeakyRelu": (True, False), "ThresholdedRelu": (True, False),
         "ScaledTanh": (True, True), "HardSigmoid": (True, True), "Elu": (True, False)}


# ============================================================================ helpers
def act_attrs(kind, names, explicit=True):
    """``activations``/``activation_alpha``/``activation_beta`` for `names`: values consumed
    in order by the activations taking them (ONNX Runtime's LSTM, GRU); positional with
    one value per activation for RNN (ONNX Runtime's RNN)."""
    alphas, betas = [], []
    for n in names:
        ta, tb = TAKES.get(n, (False, False))
        p = ACT_PARAMS[n]
        if kind == "rnn":
            alphas.append(p[0] if ta else 0.0)
            betas.append(p[1] if tb else 0.0)
        else:
            if ta:
                alphas.append(p[0])
            if tb:
                betas.append(p[1])
    out = {"activations": list(names)}
    if explicit and any(n in TAKES for n in names):
        if any(TAKES.get(n, (0, 0))[0] for n in names):
            out["activation_alpha"] = alphas
        if any(TAKES.get(n, (0, 0))[1] for n in names):
            out["activation_beta"] = betas
    return out


def make_model(kind, direction="forward", *, rng, bias=True, seq=False, init=False, peep=False,
               outputs=None, layout=0, dtype=np.float32, weights_as="initializer", opset=17, **attrs):
    """A one-node model: X, sequence_lens, initial states as graph inputs; W, R, B, P as
    initializers (or graph inputs, or Constant nodes). Returns (model, weights dict)."""
    D = 2 if direction == "bidirectional" else 1
    G = GATES[kind]
    w = {"W": rng.uniform(-0.5, 0.5, (D, G * H, I)), "R": rng.uniform(-0.5, 0.5, (D, G * H, H))}
    if bias:
        w["B"] = rng.uniform(-0.5, 0.5, (D, 2 * G * H))
    if peep:
        w["P"] = rng.uniform(-0.5, 0.5, (D, 3 * H))
    w = {k: v.astype(dtype) for k, v in w.items()}
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = ["X", "W", "R", "B" if bias else "", "seq" if seq else "", "h0" if init else ""]
    if kind == "lstm":
        inputs += ["c0" if init else "", "P" if peep else ""]
    while inputs[-1] == "":
        inputs.pop()
    outputs = list(OUTS[kind]) if outputs is None else list(outputs)
    node = helper.make_node(OPS[kind], inputs, outputs, name="rec", hidden_size=H, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    vi = [helper.make_tensor_value_info("X", tp, None)]
    if seq:
        vi.append(helper.make_tensor_value_info("seq", TensorProto.INT32, None))
    if init:
        vi.append(helper.make_tensor_value_info("h0", tp, None))
        if kind == "lstm":
            vi.append(helper.make_tensor_value_info("c0", tp, None))
    nodes, inits = [node], []
    for k, v in w.items():
        if weights_as == "initializer":
            inits.append(numpy_helper.from_array(v, k))
        elif weights_as == "input":
            vi.append(helper.make_tensor_value_info(k, tp, v.shape))
        else:   # Constant nodes
            nodes.insert(0, helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)))
    graph = helper.make_graph(nodes, "g", vi, [helper.make_tensor_value_info(o, tp, None) for o in outputs if o],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, w


def make_feeds(kind, direction, rng, *, seq=None, init=False, layout=0, dtype=np.float32):
    D = 2 if direction == "bidirectional" else 1
    x = rng.standard_normal((T, B, I)).astype(dtype)
    feeds = {"X": x.transpose(1, 0, 2).copy() if layout else x}
    if seq is not None:
        feeds["seq"] = np.asarray(seq, np.int32)
    if init:
        names = ["h0", "c0"] if kind == "lstm" else ["h0"]
        for n in names:
            s = (0.5 * rng.standard_normal((D, B, H))).astype(dtype)
            feeds[n] = s.transpose(1, 0, 2).copy() if layout else s
    return feeds


def ort_run(model, feeds, names=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def assert_outputs_close(got, want, tol=None, names=None):
    tol = tol or TOL
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        name = names[k] if names else f"output {k}"
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_allclose(g, w, err_msg=name, **tol)


def check_against_ort(kind, direction="forward", *, key, seq=None, init=False, tol=None, **kw):
    rng = rng_for("onnx-import", kind, direction, key)
    model, _ = make_model(kind, direction, rng=rng, seq=seq is not None, init=init, **kw)
    feeds = make_feeds(kind, direction, rng, seq=seq, init=init)
    want = ort_run(model, feeds)
    got = rnnfast.onnx.load(model).run(None, feeds)
    assert_outputs_close(got, want, tol, [o.name for o in model.graph.output])
    return model, feeds, got


# ============================================================================ 1. ONNX backend node tests
def _backend_cases():
    """The node test cases of ONNX's backend suite for LSTM, GRU and RNN (the wheel has
    no data directory; the cases are generated by onnx.backend.test.case.node).

    ``collect_testcases(op_type)`` imports every operator's case module (13 s) and its
    filter acts at import time only (a second call returns the first call's list), so
    this imports the three modules concerned, which register their cases in the same
    list that ``collect_testcases`` returns."""
    from onnx.backend.test.case import node as cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in ("gru", "lstm", "rnn"):
            importlib.import_module(f"onnx.backend.test.case.node.{mod}")
        found = [c for c in cases._NodeTestCases
                 if any(n.op_type in ("LSTM", "GRU", "RNN") for n in c.model.graph.node)]
        if not found:   # registered under another op filter earlier in this process
            found = [c for c in cases.collect_testcases(None)
                     if any(n.op_type in ("LSTM", "GRU", "RNN") for n in c.model.graph.node)]
    return sorted({c.name: c for c in found}.values(), key=lambda c: c.name)


BACKEND_CASES = _backend_cases()


def _weights_to_initializers(model, inputs):
    """The same model with its W, R, B, P graph inputs made initializers (the cached path)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = m.graph.node[0]
    names = [i.name for i in m.graph.input]
    feeds, inits = {}, []
    weights = {node.input[k] for k in (1, 2, 3, 7) if k < len(node.input) and node.input[k]}
    for name, arr in zip(names, inputs):
        if name in weights:
            inits.append(numpy_helper.from_array(arr, name))
        else:
            feeds[name] = arr
    keep = [i for i in m.graph.input if i.name not in weights]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.graph.initializer.extend(inits)
    return m, feeds


def test_backend_cases_found():
    ops = {c.model.graph.node[0].op_type for c in BACKEND_CASES}
    assert ops == {"LSTM", "GRU", "RNN"} and len(BACKEND_CASES) >= 18
    assert any(len(c.model.graph.node[0].input) == 8 for c in BACKEND_CASES)    # peepholes


@pytest.mark.parametrize("weights_as", ["inputs", "initializers"])
@pytest.mark.parametrize("case", BACKEND_CASES, ids=[c.name for c in BACKEND_CASES])
def test_onnx_backend_node_case(case, weights_as):
    """Every LSTM/GRU/RNN case of ONNX's backend suite, weights fed as the suite feeds them
    (graph inputs: a layer built per run) and as initializers (the layer built at load)."""
    (inputs, outputs), = case.data_sets
    if weights_as == "inputs":
        model, feeds = case.model, dict(zip([i.name for i in case.model.graph.input], inputs))
    else:
        model, feeds = _weights_to_initializers(case.model, inputs)
    got = rnnfast.onnx.load(model).run(None, feeds)
    # float32 tolerances (the suite's own are rtol=1e-3, atol=1e-7)
    assert_outputs_close(got, list(outputs), dict(rtol=1e-5, atol=1e-6))


# ============================================================================ 2. torch.onnx.export
torch = require_oracle("torch")

TORCH_MODELS = [
    ("lstm", dict()),
    ("lstm-2l-bidir-bf", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("gru-2l-bidir", dict(num_layers=2, bidirectional=True)),
    ("gru-bf", dict(batch_first=True)),
    ("rnn-tanh-bidir", dict(bidirectional=True)),
    ("rnn-relu-2l-bf", dict(num_layers=2, nonlinearity="relu", batch_first=True)),
    ("lstm-nobias", dict(bias=False)),
]


def export_torch(module, with_state: bool) -> bytes:
    """``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``: it writes
    LSTM/GRU/RNN nodes; the dynamo exporter decomposes the recurrences into loops), with
    dynamic batch and time axes."""
    bf = module.batch_first
    x = torch.randn(2, 5, module.input_size) if bf else torch.randn(5, 2, module.input_size)
    D = 2 if module.bidirectional else 1
    h0 = torch.randn(module.num_layers * D, 2, module.hidden_size)
    axes = {"x": {0: "b", 1: "t"} if bf else {0: "t", 1: "b"}, "y": {0: "b", 1: "t"} if bf else {0: "t", 1: "b"},
            "h0": {1: "b"}, "c0": {1: "b"}, "hn": {1: "b"}, "cn": {1: "b"}}
    lstm = isinstance(module, torch.nn.LSTM)
    args = (x,) if not with_state else ((x, (h0, h0.clone())) if lstm else (x, h0))
    in_names = ["x"] + (["h0", "c0"] if lstm else ["h0"]) * with_state
    out_names = ["y", "hn", "cn"] if lstm else ["y", "hn"]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, f, dynamo=False, input_names=in_names, output_names=out_names,
                          dynamic_axes={k: v for k, v in axes.items() if k in in_names + out_names})
    return f.getvalue()


def _torch_module(name, opts):
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[name.split("-")[0]]
    torch.manual_seed(0)
    return cls(I, H, **opts).eval()


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("name,opts", TORCH_MODELS, ids=[m[0] for m in TORCH_MODELS])
def test_torch_export_matches_torch(name, opts, with_state):
    """Models exported from nn.LSTM/GRU/RNN match PyTorch, at shapes other than the
    export's (dynamic axes), with and without initial states."""
    module = _torch_module(name, opts)
    model = onnx.load_from_string(export_torch(module, with_state))
    assert {n.op_type for n in model.graph.node} & {"LSTM", "GRU", "RNN"}
    sess = rnnfast.onnx.load(model)
    rng = rng_for("torch-export", name, with_state)
    D = 2 if module.bidirectional else 1
    for t, b in ((7, 3), (1, 1)):
        x = rng.standard_normal((b, t, I) if module.batch_first else (t, b, I)).astype(np.float32)
        feeds = {"x": x}
        hx = None
        if with_state:
            h0 = rng.standard_normal((module.num_layers * D, b, H)).astype(np.float32)
            feeds["h0"] = h0
            hx = torch.from_numpy(h0)
            if name.startswith("lstm"):
                feeds["c0"] = rng.standard_normal(h0.shape).astype(np.float32)
                hx = (hx, torch.from_numpy(feeds["c0"]))
        with torch.no_grad():
            y, st = module(torch.from_numpy(x), hx)
        want = [y, *(st if isinstance(st, tuple) else (st,))]
        got = sess.run(None, feeds)
        assert_outputs_close(got, [w.numpy() for w in want], dict(rtol=1e-5, atol=1e-6))


def test_torch_export_layer_from_node_equals_from_torch():
    """layer_from_node on an exported single-layer bidirectional LSTM has torch's weights."""
    module = _torch_module("lstm", dict(bidirectional=True))
    model = onnx.load_from_string(export_torch(module, False))
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    layer = rnnfast.onnx.layer_from_node(node, model.graph.initializer)
    want = rnnfast.from_torch(module).state_dict()
    got = layer.state_dict()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ============================================================================ 3. attributes vs ONNX Runtime
SEQ = [6, 2, 4]          # unsorted, max == T
SEQ_SHORT = [3, 1, 2]    # max < T (ONNX Runtime refuses 0)
KINDS = [("lstm", {}), ("gru-lbr0", {"linear_before_reset": 0}), ("gru-lbr1", {"linear_before_reset": 1}),
         ("rnn", {})]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("seq,init", [(None, False), (SEQ, False), (None, True), (SEQ_SHORT, True)],
                         ids=["plain", "seq", "init", "seq-init"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("kind,attrs", KINDS, ids=[k[0] for k in KINDS])
def test_directions_lengths_states_vs_ort(kind, attrs, direction, seq, init, bias):
    check_against_ort(kind.split("-")[0], direction, key=(kind, seq, init, bias), seq=seq, init=init, bias=bias,
                      **attrs)


@pytest.mark.parametrize("opset", [7, 14, 22])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_opsets_vs_ort(kind, opset):
    """The operators as opsets 7 (the first of their current form), 14 (layout) and 22 declare them."""
    attrs = {"linear_before_reset": 1} if kind == "gru" else {}
    check_against_ort(kind, "bidirectional", key=opset, seq=SEQ_SHORT, init=True, opset=opset, **attrs)


def _output_subsets():
    """Each operator with every proper non-empty subset of its outputs named (others "")."""
    cases = []
    for kind, names in OUTS.items():
        for mask in range(1, 2 ** len(names) - 1):
            outs = [n if mask >> k & 1 else "" for k, n in enumerate(names)]
            while outs[-1] == "":
                outs.pop()
            cases.append((kind, tuple(outs)))
    return cases


@pytest.mark.parametrize("kind,outputs", _output_subsets(), ids=lambda v: "-".join(o or "_" for o in v)
                         if isinstance(v, tuple) else v)
def test_optional_outputs_vs_ort(kind, outputs):
    for direction in ("forward", "bidirectional"):
        check_against_ort(kind, direction, key=outputs, seq=SEQ, outputs=outputs)


def test_empty_output_name_does_not_leak_into_optional_inputs():
    """An unnamed output ("" ) of a first node must not become a later node's omitted input."""
    rng = rng_for("leak")
    m1, _ = make_model("gru", rng=rng, outputs=("", "Y_h"))
    g = m1.graph
    # a second GRU reading Y_h as (1, B, H) -> (T=1, B, H) input, its B omitted ("")
    w2 = rng.uniform(-0.5, 0.5, (1, 3 * H, H)).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(w2, "R2")])
    g.node.append(helper.make_node("GRU", ["Y_h", "W2", "R2", "", ""], ["Y2"], hidden_size=H))
    g.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None))
    feeds = make_feeds("gru", "forward", rng)
    assert_outputs_close(rnnfast.onnx.load(m1).run(None, feeds), ort_run(m1, feeds))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_clip_vs_ort(kind):
    for direction in ("forward", "reverse", "bidirectional"):
        check_against_ort(kind, direction, key="clip", seq=SEQ, init=True, clip=0.4)


@pytest.mark.parametrize("peep,input_forget,clip", [(True, 0, None), (False, 1, None), (True, 1, None),
                                                    (True, 0, 0.5), (True, 1, 0.3)],
                         ids=["peep", "input_forget", "peep-input_forget", "peep-clip", "all"])
def test_lstm_peepholes_input_forget_vs_ort(peep, input_forget, clip):
    kw = {"input_forget": input_forget} | ({"clip": clip} if clip else {})
    for direction in ("forward", "reverse", "bidirectional"):
        for seq, init in ((None, False), (SEQ_SHORT, True)):
            check_against_ort("lstm", direction, key=(peep, input_forget, clip, seq), seq=seq, init=init,
                              peep=peep, **kw)


ROLES = [("lstm", 0), ("lstm", 1), ("lstm", 2), ("gru", 0), ("gru", 1), ("rnn", 0)]


@pytest.mark.parametrize("act", list(ACT_PARAMS))
@pytest.mark.parametrize("kind,role", ROLES, ids=[f"{k}-{'fgh'[r]}" for k, r in ROLES])
def test_activation_vs_ort(kind, role, act):
    """Each ONNX activation, with explicit alpha/beta, as each function of each operator
    (f: gates; g: candidate; h: LSTM output), forward and reverse, with clip and lengths."""
    names = list(onnx_import._DEFAULT_ACTS[kind])
    names[role] = act
    for direction in ("forward", "reverse"):
        check_against_ort(kind, direction, key=(role, act), seq=SEQ_SHORT, init=True, **act_attrs(kind, names))
    if act in ("Relu", "Affine", "ThresholdedRelu", "Softplus", "Elu"):    # unbounded: with a clip too
        check_against_ort(kind, "forward", key=(role, act, "clip"), seq=SEQ, clip=0.7, **act_attrs(kind, names))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_bidirectional_different_activations_vs_ort(kind):
    """Two directions with different activations (and parameters): two layers in the
    session; layer_from_node refuses them (one rnnfast layer holds one set)."""
    fwd = {"lstm": ["HardSigmoid", "Tanh", "Softsign"], "gru": ["Sigmoid", "LeakyRelu"], "rnn": ["ScaledTanh"]}[kind]
    rev = {"lstm": ["Sigmoid", "Elu", "Tanh"], "gru": ["HardSigmoid", "Tanh"], "rnn": ["LeakyRelu"]}[kind]
    for seq, init in ((None, False), (SEQ_SHORT, True)):
        model, _, _ = check_against_ort(kind, "bidirectional", key=("bi-acts", seq), seq=seq, init=init,
                                        **act_attrs(kind, fwd + rev))
    with pytest.raises(NotImplementedError, match=r"rec.*different activations"):
        rnnfast.onnx.layer_from_node(model.graph.node[0], model.graph.initializer)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_activation_defaults_vs_ort(kind):
    """Activations without alpha/beta take the ONNX operators' defaults where ONNX Runtime
    has the same (LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1.0); a list shorter than the
    activations taking values leaves the rest at their defaults."""
    names = {"lstm": ["HardSigmoid", "LeakyRelu", "Elu"], "gru": ["HardSigmoid", "Elu"]}[kind]
    check_against_ort(kind, "forward", key="defaults", seq=SEQ, activations=names)
    check_against_ort(kind, "forward", key="short", seq=SEQ, activations=names, activation_alpha=[0.3])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_activation_defaults_follow_onnx_operators(kind):
    """Affine, ThresholdedRelu and ScaledTanh without values are Affine(1, 0),
    ThresholdedRelu(1) and ScaledTanh(1, 1) (ONNX Runtime uses 0 for them)."""
    rng = rng_for("defaults", kind)
    for act, params in (("Affine", (1.0, 0.0)), ("ThresholdedRelu", (1.0,)), ("ScaledTanh", (1.0, 1.0))):
        names = list(onnx_import._DEFAULT_ACTS[kind])
        names[-1] = act
        m_default, _ = make_model(kind, rng=np.random.default_rng(1), activations=names)
        kw = {"activation_alpha": [params[0]]} | ({"activation_beta": [params[1]]} if len(params) > 1 else {})
        m_explicit, _ = make_model(kind, rng=np.random.default_rng(1), activations=names, **kw)
        feeds = make_feeds(kind, "forward", rng)
        assert_outputs_close(rnnfast.onnx.load(m_default).run(None, feeds),
                             rnnfast.onnx.load(m_explicit).run(None, feeds), dict(rtol=0, atol=0))


def test_rnn_two_default_activations_forward():
    """RNN-1's schema default ["Tanh", "Tanh"] on a one-direction node: the first is used."""
    check_against_ort("rnn", "forward", key="tanh2", activations=["Relu", "Tanh"])


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("kind,attrs", [("lstm", {}), ("lstm", {"peep": True, "clip": 0.5}), ("gru", {}),
                                        ("gru", {"linear_before_reset": 1}), ("rnn", {})],
                         ids=["lstm", "lstm-peep-clip", "gru-lbr0", "gru-lbr1", "rnn"])
def test_layout1_equals_layout0_transposed(kind, attrs, direction):
    """layout=1 (batch-major X, Y, states) against layout 0 with everything transposed;
    layout 0 is checked against ONNX Runtime above (which refuses layout 1)."""
    for seq, init in ((None, False), (SEQ_SHORT, True)):
        m0, _ = make_model(kind, direction, rng=rng_for("layout", kind), seq=seq is not None, init=init, **attrs)
        m1, _ = make_model(kind, direction, rng=rng_for("layout", kind), seq=seq is not None, init=init, layout=1,
                           **attrs)
        f0 = make_feeds(kind, direction, rng_for("lf", kind), seq=seq, init=init)
        f1 = make_feeds(kind, direction, rng_for("lf", kind), seq=seq, init=init, layout=1)
        y0, *s0 = rnnfast.onnx.load(m0).run(None, f0)
        y1, *s1 = rnnfast.onnx.load(m1).run(None, f1)
        assert y1.shape == (B, T, 2 if direction == "bidirectional" else 1, H)
        np.testing.assert_array_equal(y1, y0.transpose(2, 0, 1, 3))
        for a1, a0 in zip(s1, s0):
            assert a1.shape == (B, a0.shape[0], H)
            np.testing.assert_array_equal(a1, a0.transpose(1, 0, 2))


def test_layout1_rnn_backend_case_via_ort_layout0():
    """A layout-1 RNN with lengths and states against ONNX Runtime run at layout 0."""
    rng = rng_for("rnn-layout1")
    m0, _ = make_model("rnn", "bidirectional", rng=rng, seq=True, init=True)
    m1, _ = make_model("rnn", "bidirectional", rng=rng_for("rnn-layout1"), seq=True, init=True, layout=1)
    f0 = make_feeds("rnn", "bidirectional", rng, seq=SEQ, init=True)
    f1 = {"X": f0["X"].transpose(1, 0, 2), "seq": f0["seq"], "h0": f0["h0"].transpose(1, 0, 2)}
    y0, h0 = ort_run(m0, f0)
    y1, h1 = rnnfast.onnx.load(m1).run(None, f1)
    np.testing.assert_allclose(y1, y0.transpose(2, 0, 1, 3), **TOL)
    np.testing.assert_allclose(h1, h0.transpose(1, 0, 2), **TOL)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_float64_model(kind):
    """float64 weights: float64 layers and outputs, against onnx's own reference (float64)."""
    from onnx.reference import ReferenceEvaluator
    rng = rng_for("f64", kind)
    model, _ = make_model(kind, "bidirectional", rng=rng, dtype=np.float64, init=True)
    feeds = make_feeds(kind, "bidirectional", rng, init=True, dtype=np.float64)
    got = rnnfast.onnx.load(model).run(None, feeds)
    assert all(g.dtype == np.float64 for g in got)
    assert_outputs_close(got, ReferenceEvaluator(model).run(None, feeds), dict(rtol=1e-10, atol=1e-12))
    layer = rnnfast.onnx.layer_from_node(model.graph.node[0], model.graph.initializer)
    assert layer.dtype == np.float64


def test_float16_model_computes_in_float32():
    rng = rng_for("f16")
    m16, _ = make_model("lstm", rng=rng, dtype=np.float16, seq=True)
    m32, _ = make_model("lstm", rng=rng_for("f16"), dtype=np.float16, seq=True)
    for t in m32.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in (*m32.graph.input, *m32.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    feeds = make_feeds("lstm", "forward", rng, seq=SEQ, dtype=np.float16)
    got = rnnfast.onnx.load(m16).run(None, feeds)
    want = rnnfast.onnx.load(m32).run(None, {**feeds, "X": feeds["X"].astype(np.float32)})
    for g, w32 in zip(got, want):
        assert g.dtype == np.float16
        np.testing.assert_array_equal(g, w32.astype(np.float16))


# ============================================================================ weights: where they come from
@pytest.mark.parametrize("weights_as", ["initializer", "input", "constant"])
def test_weights_as_initializers_inputs_constants(weights_as, monkeypatch):
    """Layers are built once at load for initializer and Constant weights, and per run
    for weights the graph takes as inputs."""
    rng = rng_for("weights-as", weights_as)
    model, w = make_model("lstm", "bidirectional", rng=rng, weights_as=weights_as, peep=True, seq=True)
    feeds = make_feeds("lstm", "bidirectional", rng, seq=SEQ)
    want = ort_run(make_model("lstm", "bidirectional", rng=rng_for("weights-as", weights_as), peep=True,
                              seq=True)[0], feeds)
    calls = []
    build = onnx_import._build
    monkeypatch.setattr(onnx_import, "_build", lambda *a: calls.append(1) or build(*a))
    sess = rnnfast.onnx.load(model)
    at_load = len(calls)
    if weights_as == "input":
        feeds.update(w)
    for _ in range(3):
        assert_outputs_close(sess.run(None, feeds), want)
    if weights_as == "input":
        assert (at_load, len(calls)) == (0, 3)
    else:
        assert (at_load, len(calls)) == (1, 1)


def test_initializer_that_is_also_an_input_may_be_fed(monkeypatch):
    """An initializer listed among the graph inputs is a default: feeding it replaces it
    for that run (a layer built for the run), the cached layer serves the others."""
    rng = rng_for("overridable")
    model, w = make_model("gru", rng=rng, linear_before_reset=1)
    model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, w["R"].shape))
    feeds = make_feeds("gru", "forward", rng)
    sess = rnnfast.onnx.load(model)
    assert sess.input_names == ["X"]
    base = sess.run(None, feeds)
    assert_outputs_close(base, ort_run(model, feeds))
    R2 = (w["R"] * 0.5).astype(np.float32)
    over = sess.run(None, {**feeds, "R": R2})
    assert_outputs_close(over, ort_run(model, {**feeds, "R": R2}))
    assert not np.allclose(over[0], base[0])
    assert_outputs_close(sess.run(None, feeds), base, dict(rtol=0, atol=0))


def test_load_simplifies_exported_glue():
    """torch.onnx's zero initial states (Shape -> ... -> ConstantOfShape) are dropped at
    load with the nodes that only served them, Constant nodes become initializers, and
    the weights move into the layer; the caller's model is left as it was."""
    module = _torch_module("lstm", {})
    model = onnx.load_from_string(export_torch(module, False))
    before = model.SerializeToString()
    simple, stripped = onnx_import._simplify(model)
    assert [n.op_type for n in simple.graph.node] == ["LSTM", "Squeeze"]
    assert len(simple.graph.node[0].input) == 1 and len(stripped) == 1
    assert [t.name for t in simple.graph.initializer] == [simple.graph.node[1].input[1]]
    sess = rnnfast.onnx.load(model)
    assert model.SerializeToString() == before
    x = rng_for("glue").standard_normal((4, 2, I)).astype(np.float32)
    with torch.no_grad():
        want = [w.numpy() for w in (lambda y, s: (y, *s))(*module(torch.from_numpy(x)))]
    assert_outputs_close(sess.run(None, {"x": x}), want, dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_initial_state_from_constant_of_shape(value):
    """A ConstantOfShape initial state is dropped when zero, kept otherwise (ORT agrees)."""
    rng = rng_for("cos", value)
    model, _ = make_model("gru", "bidirectional", rng=rng)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array([2, B, H], np.int64), "shape"))
    g.node.insert(0, helper.make_node("ConstantOfShape", ["shape"], ["h0"],
                                      value=numpy_helper.from_array(np.array([value], np.float32))))
    g.node[1].input.extend(["", "h0"])
    feeds = make_feeds("gru", "bidirectional", rng)
    assert_outputs_close(rnnfast.onnx.load(model).run(None, feeds), ort_run(model, feeds))
    simple, _ = onnx_import._simplify(model)
    assert (len(simple.graph.node) == 1) == (value == 0.0)


def test_run_output_names_and_feed_checks():
    rng = rng_for("names")
    model, _ = make_model("lstm", rng=rng)
    sess = rnnfast.onnx.load(model.SerializeToString())
    feeds = make_feeds("lstm", "forward", rng)
    _, hn, _ = sess.run(None, feeds)
    (hn2,) = sess.run(["Y_h"], feeds)
    np.testing.assert_array_equal(hn, hn2)
    assert sess.output_names == ["Y", "Y_h", "Y_c"]
    with pytest.raises(ValueError, match=r"not inputs of the model"):
        sess.run(None, {**feeds, "W": np.zeros(1)})
    with pytest.raises(ValueError, match=r"\['X'\] are not fed"):
        sess.run(None, {})


def test_load_from_path(tmp_path):
    rng = rng_for("path")
    model, _ = make_model("rnn", "reverse", rng=rng, seq=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    feeds = make_feeds("rnn", "reverse", rng, seq=SEQ)
    for src in (path, str(path)):
        assert_outputs_close(rnnfast.onnx.load(src).run(None, feeds), ort_run(model, feeds))


def test_lstm_inside_if_branch_and_glue_ops():
    """A recurrent node in a subgraph (an If branch), its weights initializers of the main
    graph, and glue ops around it."""
    rng = rng_for("if")
    inner, _ = make_model("lstm", rng=rng, outputs=("Y", "Y_h"))
    node = inner.graph.node[0]
    then_g = helper.make_graph([node, helper.make_node("Squeeze", ["Y", "axes1"], ["out"])], "then", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["X"], ["out2"])], "else", [],
                               [helper.make_tensor_value_info("out2", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["res"], then_branch=then_g, else_branch=else_g),
         helper.make_node("Relu", ["res"], ["final"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("final", TensorProto.FLOAT, None)],
        [*inner.graph.initializer, numpy_helper.from_array(np.array([1], np.int64), "axes1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {"X": rng.standard_normal((T, B, I)).astype(np.float32), "cond": np.array(True)}
    assert_outputs_close(rnnfast.onnx.load(model).run(None, feeds), ort_run(model, feeds))


def test_lstm_inside_model_local_function():
    """A recurrent node inside a model-local function runs on rnnfast too (onnx's own
    reference LSTM ignores activations, so the ORT match shows it)."""
    rng = rng_for("function")
    inner, _ = make_model("lstm", rng=rng, bias=False, outputs=("", "Y_h"),
                          activations=["HardSigmoid", "Softsign", "Tanh"])
    fnode = inner.graph.node[0]
    fnode.ClearField("name")
    func = helper.make_function("local", "RecFn", ["X", "W", "R"], ["Y_h"], [fnode],
                                [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("RecFn", ["X", "W", "R"], ["out"], domain="local")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              list(inner.graph.initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func])
    model.ir_version = 8
    feeds = {"X": rng.standard_normal((T, B, I)).astype(np.float32)}
    assert_outputs_close(rnnfast.onnx.load(model).run(None, feeds), ort_run(model, feeds))


def test_session_threads():
    """One session run from several threads at once (a layer's inference is thread-safe)."""
    rng = rng_for("threads")
    model, _ = make_model("gru", "bidirectional", rng=rng, seq=True)
    sess = rnnfast.onnx.load(model)
    feeds = [make_feeds("gru", "bidirectional", rng, seq=SEQ) for _ in range(4)]
    want = [sess.run(None, f) for f in feeds]
    got = [None] * 4

    def work(k):
        for _ in range(5):
            got[k] = sess.run(None, feeds[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert_outputs_close(g, w, dict(rtol=0, atol=0))


# ============================================================================ 4. errors
def _node_model(kind="lstm", inputs=("X", "W", "R"), init_shapes=None, **attrs):
    rng = np.random.default_rng(0)
    G = GATES[kind]
    shapes = init_shapes or {"W": (1, G * H, I), "R": (1, G * H, H)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    node = helper.make_node(OPS[kind], list(inputs), ["Y"], name="bad", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


ERRORS = [
    ("direction", dict(direction="sideways"), ValueError, "'bad'.*direction.*sideways"),
    ("layout", dict(layout=2), ValueError, "'bad'.*layout.*2"),
    ("hidden_size", dict(hidden_size=H + 1), ValueError, "'bad'.*hidden_size"),
    ("lbr", dict(kind="gru", linear_before_reset=2), ValueError, "'bad'.*linear_before_reset"),
    ("input_forget", dict(input_forget=3), ValueError, "'bad'.*input_forget"),
    ("clip", dict(clip=-1.0), ValueError, "'bad'.*clip"),
    ("clip-zero", dict(clip=0.0), ValueError, "'bad'.*clip"),
    ("activation", dict(activations=["Gelu", "Tanh", "Tanh"]), NotImplementedError, "'bad'.*activation.*Gelu"),
    ("activation-count", dict(activations=["Sigmoid", "Tanh"]), ValueError, "'bad'.*activations.*3"),
    ("activation-count-bidir", dict(direction="bidirectional", activations=["Sigmoid", "Tanh", "Tanh"],
                                    init_shapes={"W": (2, 4 * H, I), "R": (2, 4 * H, H)}),
     ValueError, "'bad'.*activations.*6"),
    ("unknown-attribute", dict(foo=1), NotImplementedError, "'bad'.*attribute 'foo'"),
    ("attribute-type", dict(direction=1), ValueError, "'bad'.*direction.*STRING"),
    ("input_forget-on-gru", dict(kind="gru", input_forget=1), NotImplementedError, "'bad'.*input_forget"),
    ("missing-W", dict(inputs=("X", "", "R")), ValueError, "'bad'.*W.*missing"),
    ("undefined-R", dict(inputs=("X", "W", "nowhere")), ValueError, "'bad'.*'nowhere'"),
    ("W-shape", dict(init_shapes={"W": (1, 3 * H, I), "R": (1, 4 * H, H)}), ValueError, "'bad'.*input W.*shape"),
    ("W-directions", dict(direction="bidirectional"), ValueError, "'bad'.*input W.*shape"),
    ("B-shape", dict(inputs=("X", "W", "R", "Bb"), init_shapes={"W": (1, 4 * H, I), "R": (1, 4 * H, H),
                                                               "Bb": (1, 4 * H)}), ValueError, "'bad'.*input B"),
    ("P-shape", dict(inputs=("X", "W", "R", "", "", "", "", "Pp"),
                     init_shapes={"W": (1, 4 * H, I), "R": (1, 4 * H, H), "Pp": (1, 4 * H)}),
     ValueError, "'bad'.*input P"),
]


@pytest.mark.parametrize("attrs,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_at_load_name_the_node(attrs, exc, match):
    attrs = dict(attrs)
    model = _node_model(attrs.pop("kind", "lstm"), attrs.pop("inputs", ("X", "W", "R")),
                        attrs.pop("init_shapes", None), **attrs)
    with pytest.raises(exc, match=match):
        rnnfast.onnx.load(model)
    with pytest.raises(exc, match=match):
        rnnfast.onnx.layer_from_node(model.graph.node[0], model.graph.initializer)


def test_errors_other():
    model = _node_model()
    node = model.graph.node[0]
    with pytest.raises(ValueError, match=r"'bad'.*'W'.*not among the initializers"):
        rnnfast.onnx.layer_from_node(node, {})
    with pytest.raises(TypeError, match=r"'bad'.*W must hold floats"):
        rnnfast.onnx.layer_from_node(node, {"W": np.zeros((1, 4 * H, I), np.int32),
                                            "R": np.zeros((1, 4 * H, H), np.float32)})
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((1, 4 * H, I), np.int32), "W"))
    with pytest.raises(TypeError, match=r"'bad'.*W must hold floats"):
        rnnfast.onnx.load(bad)
    with pytest.raises(TypeError, match="path, bytes or an onnx"):
        rnnfast.onnx.load(3)
    # a function attribute reference: the value is only known per call
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    att = onnx.AttributeProto()
    att.name, att.ref_attr_name, att.type = "clip", "myclip", onnx.AttributeProto.FLOAT
    ref.graph.node[0].attribute.append(att)
    with pytest.raises(NotImplementedError, match=r"'bad'.*'clip'.*myclip"):
        rnnfast.onnx.layer_from_node(ref.graph.node[0], ref.graph.initializer)
    with pytest.raises(ValueError, match=r"X must be 3-D"):
        rnnfast.onnx.load(model).run(None, {"X": np.zeros((T, I), np.float32)})


# ============================================================================ 5. layer_from_node
LFN_CASES = [("lstm", "forward", dict(peep=True, clip=0.6, input_forget=1)),
             ("lstm", "bidirectional", {}), ("lstm", "reverse", {"layout": 1}),
             ("gru", "bidirectional", {"linear_before_reset": 1}), ("gru", "reverse", {"clip": 0.5}),
             ("rnn", "bidirectional", {"activations": ["Relu", "Relu"]}),
             ("rnn", "forward", {"activations": ["LeakyRelu"], "activation_alpha": [0.2], "layout": 1}),
             ("lstm", "forward", {"activations": ["HardSigmoid", "Tanh", "Softsign"], "activation_alpha": [0.3],
                                  "activation_beta": [0.4]})]


@pytest.mark.parametrize("kind,direction,kw", LFN_CASES, ids=[f"{c[0]}-{c[1]}-{k}" for k, c in enumerate(LFN_CASES)])
def test_layer_from_node_equals_session(kind, direction, kw):
    rng = rng_for("lfn", kind, direction, repr(kw))
    layout = kw.get("layout", 0)
    model, w = make_model(kind, direction, rng=rng, seq=True, init=True, **kw)
    feeds = make_feeds(kind, direction, rng, seq=SEQ_SHORT, init=True, layout=layout)
    got = rnnfast.onnx.load(model).run(None, feeds)
    for inits in (model.graph.initializer, w):
        layer = rnnfast.onnx.layer_from_node(model.graph.node[0], inits)
        assert layer.batch_first == bool(layout)
        assert layer.bidirectional == (direction == "bidirectional")
        assert layer.reverse == (direction == "reverse")
        states = [feeds[n] for n in (("h0", "c0") if kind == "lstm" else ("h0",))]
        if layout:
            states = [s.transpose(1, 0, 2) for s in states]
        hx = tuple(states) if kind == "lstm" else states[0]
        y, st = layer(feeds["X"], hx, feeds["seq"])
        st = list(st) if kind == "lstm" else [st]
        D = 2 if direction == "bidirectional" else 1
        Y = got[0]
        Y = Y.reshape(B, T, D * H) if layout else Y.transpose(0, 2, 1, 3).reshape(T, B, D * H)
        np.testing.assert_array_equal(y, Y)
        for s, g in zip(st, got[1:]):
            np.testing.assert_array_equal(s, g.transpose(1, 0, 2) if layout else g)


def test_import_rnnfast_does_not_import_onnx():
    code = "import sys, rnnfast; assert 'onnx' not in sys.modules, 'onnx imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
