"""Cell variants on the layers (rnnfast.cells.Variant): other activations, peepholes, clip,
coupled input-forget gate, and ``reverse=True``.

The variant equations of the reference are checked here against values written out by
hand; tests/test_onnx_import.py checks them against ONNX Runtime's LSTM/GRU/RNN operators.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import rnnfast
from rnnfast import reference
from rnnfast.cells import ACTIVATIONS, ONNX_ACTIVATIONS, Activation, activation

from conftest import (
    BACKENDS,
    FAST_BACKENDS,
    flat_states,
    make_layer,
    random_hx,
    ref_stack,
    require_oracle,
    rng_for,
    tol_for,
)

T, B, I, H = 6, 3, 4, 5


def test_activations_by_hand():
    """Each activation at a few points, written out from ONNX's operator definitions."""
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    want = {
        "sigmoid": 1 / (1 + np.exp(-x)),
        "tanh": np.tanh(x),
        "relu": [0, 0, 0, 0.5, 2],
        "affine": 1.0 * x + 0.0,
        "leaky_relu": [-0.02, -0.005, 0, 0.5, 2],
        "thresholded_relu": [0, 0, 0, 0, 2],
        "scaled_tanh": np.tanh(x),
        "hard_sigmoid": [0.1, 0.4, 0.5, 0.6, 0.9],
        "elu": [np.exp(-2) - 1, np.exp(-0.5) - 1, 0, 0.5, 2],
        "softsign": x / (1 + np.abs(x)),
        "softplus": np.log(1 + np.exp(x)),
    }
    assert set(want) == set(ACTIVATIONS) == set(ONNX_ACTIVATIONS.values())
    for name, w in want.items():
        np.testing.assert_allclose(reference.activate(activation(name), x), w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(reference.activate(activation(("affine", 2.0, -1.0)), x), 2 * x - 1)
    np.testing.assert_allclose(reference.activate(activation(("scaled_tanh", 2.0, 0.5)), x), 2 * np.tanh(0.5 * x))
    np.testing.assert_allclose(reference.activate(activation(("hard_sigmoid", 1 / 6, 0.5)), x),
                               np.clip(x / 6 + 0.5, 0, 1))
    np.testing.assert_allclose(reference.activate(activation(("elu", 0.5)), x), np.where(x >= 0, x, 0.5 * np.expm1(x)))


def test_activation_specs():
    assert activation("hard_sigmoid") == Activation("hard_sigmoid", 0.2, 0.5) == "hard_sigmoid"
    assert activation(("hard_sigmoid", 0.2)) == "hard_sigmoid"
    assert activation(("hard_sigmoid", 0.3)) != "hard_sigmoid"
    assert str(activation(("leaky_relu", 0.1))) == "leaky_relu(0.1)"
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        activation("gelu")
    with pytest.raises(ValueError, match="tanh takes no alpha"):
        activation(("tanh", 1.0))
    with pytest.raises(ValueError, match="finite number"):
        activation(("elu", float("nan")))
    with pytest.raises(TypeError):
        activation(3)


def test_lstm_variant_step_by_hand():
    """One LSTM step with peepholes, clip, hard_sigmoid gates and relu output, from the
    equations (ONNX Runtime's order: peephole terms, then clip, then the activation)."""
    rng = rng_for("var-hand")
    x, h, c = rng.standard_normal((2, I)), rng.standard_normal((2, H)), rng.standard_normal((2, H))
    w_ih, w_hh = rng.standard_normal((4 * H, I)), rng.standard_normal((4 * H, H))
    b_ih, b_hh, p = rng.standard_normal(4 * H), rng.standard_normal(4 * H), rng.standard_normal(3 * H)
    clip = 1.5
    v = rnnfast.cells.make_variant("lstm", gate="hard_sigmoid", output="relu", peephole=True, clip=clip)
    got_h, got_c = reference.cell_step("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh, variant=v, w_ph=p)
    g = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    hs = lambda a: np.clip(0.2 * a + 0.5, 0, 1)             # noqa: E731
    cl = lambda a: np.clip(a, -clip, clip)                   # noqa: E731
    i = hs(cl(g[:, :H] + p[:H] * c))
    f = hs(cl(g[:, H:2 * H] + p[H:2 * H] * c))
    c2 = f * c + i * np.tanh(cl(g[:, 2 * H:3 * H]))
    o = hs(cl(g[:, 3 * H:] + p[2 * H:] * c2))
    np.testing.assert_allclose(got_c, c2, rtol=1e-12)
    np.testing.assert_allclose(got_h, o * np.maximum(c2, 0), rtol=1e-12)
    v2 = rnnfast.cells.make_variant("lstm", input_forget=True)
    _, c3 = reference.cell_step("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh, variant=v2)
    i = 1 / (1 + np.exp(-g[:, :H]))
    np.testing.assert_allclose(c3, (1 - i) * c + i * np.tanh(g[:, 2 * H:3 * H]), rtol=1e-12)


def test_standard_specs_are_the_standard_cell():
    """Options equal to the defaults make no variant: such layers run in the fast kernels."""
    assert rnnfast.LSTM(I, H, gate_activation="sigmoid", candidate_activation=("tanh",))._variant is None
    assert rnnfast.RNN(I, H, nonlinearity="relu")._variant is None
    assert rnnfast.GRU(I, H, clip=None)._variant is None
    assert rnnfast.RNN(I, H, nonlinearity="elu")._variant is not None
    assert rnnfast.LSTM(I, H, clip=3.0)._variant is not None


def test_variant_options_and_errors():
    lay = rnnfast.LSTM(I, H, peephole=True, bidirectional=True, num_layers=2)
    assert lay.parameters()["weight_ph_l1_reverse"].shape == (3 * H,)
    assert lay.peephole and lay.gate_activation == "sigmoid" and lay.clip is None
    assert "peephole=True" in repr(lay)
    with pytest.raises(ValueError, match="clip"):
        rnnfast.LSTM(I, H, clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        rnnfast.GRU(I, H, clip=float("inf"))
    with pytest.raises(ValueError, match="reverse"):
        rnnfast.GRU(I, H, bidirectional=True, reverse=True)
    with pytest.raises(ValueError, match="unknown activation"):
        rnnfast.GRU(I, H, gate_activation="hardsigmoid")
    with pytest.raises(TypeError):
        rnnfast.GRU(I, H, peephole=True)


VARIANT_LAYERS = [
    ("lstm-peep-clip", "lstm", dict(peephole=True, clip=0.8)),
    ("lstm-cifg-hs", "lstm", dict(input_forget=True, gate_activation=("hard_sigmoid", 1 / 6, 0.5))),
    ("lstm-acts", "lstm", dict(candidate_activation="softsign", output_activation=("scaled_tanh", 1.5, 0.7))),
    ("gru-lbr-clip", "gru", dict(clip=0.5, gate_activation="hard_sigmoid")),
    ("gru-nolbr-elu", "gru", dict(linear_before_reset=False, candidate_activation=("elu", 0.7))),
    ("rnn-leaky", "rnn", dict(nonlinearity=("leaky_relu", 0.2), clip=1.0)),
]


@pytest.mark.parametrize("name,kind,kw", VARIANT_LAYERS, ids=[v[0] for v in VARIANT_LAYERS])
@pytest.mark.parametrize("reverse", [False, True])
def test_variant_layers_against_reference(name, kind, kw, reverse):
    """Layers with variants (stacked, bidirectional, lengths, hx, batch_first) give the
    reference's outputs under "auto", and frozen fp32 copies too."""
    rng = rng_for("var-layer", name, reverse)
    for bidir, L in ([(False, 1)] if reverse else [(True, 2), (False, 1)]):
        lay = (rnnfast.LSTM if kind == "lstm" else rnnfast.GRU if kind == "gru" else rnnfast.RNN)(
            I, H, num_layers=L, bidirectional=bidir, batch_first=True, seed=1, reverse=reverse, **kw)
        x = rng.standard_normal((B, T, I)).astype(np.float32)
        lengths = [T, 2, 0]
        D = 2 if bidir else 1
        h0 = rng.standard_normal((L * D, B, H)).astype(np.float32) * 0.5
        hx = (h0, h0 * 0.3) if kind == "lstm" else h0
        got = lay(x, hx, lengths=lengths)
        want = ref_stack(lay, x, hx, lengths)
        for g, w in zip(_flat(got), _flat(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        frozen = lay.freeze("fp32")
        for g, w in zip(_flat(frozen(x, hx, lengths=lengths)), _flat(got)):
            np.testing.assert_array_equal(g, w)
        back = pickle.loads(pickle.dumps(lay))
        for g, w in zip(_flat(back(x, hx, lengths=lengths)), _flat(got)):
            np.testing.assert_array_equal(g, w)


def _flat(out):
    y, s = out
    return [y, *(s if isinstance(s, tuple) else (s,))]


# each backend's kernel paths: Numba's serial and parallel passes; Cython's fused panel
# step, per-step BLAS, rf_rowdot's recurrent step, and threads splitting the batch
_KERNEL_FORMS = {
    "numba": {"default": {}, "parallel": {"numba:_SERIAL_WORK": 0}},
    "cython": {"fused": {}, "blas": {"_USE_FUSED": False}, "rowdot": {"_REC_ROWDOT_ROWS": 64},
               "batch-split": {"_BSPLIT_MIN_ROWS": 1, "_BSPLIT_MAX_WBYTES": 1 << 40, "_REC_ROWDOT_ROWS": 0}},
    "reference": {"default": {}},
}


@pytest.mark.parametrize("name,kind,kw", VARIANT_LAYERS, ids=[v[0] for v in VARIANT_LAYERS])
@pytest.mark.parametrize("be,form", [(b, f) for b in BACKENDS for f in _KERNEL_FORMS[b]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_variant_kernels(name, kind, kw, be, form, dtype, monkeypatch):
    """Every backend's kernels compute the variants (inference) as the oracle: two layers,
    bidirectional, lengths, hx, every cell code's variant path (projection too), each
    kernel path of the backend, 2 threads."""
    from rnnfast import _engine
    from rnnfast.kernels import numba_rnn
    rng = rng_for("var-kern", name, dtype)
    extra = {"proj_size": 2} if kind == "lstm" and "peephole" in kw else {}
    Hv = 40     # more than one 16-unit block per thread (past RF_VCH's 64 units: test_variant_wide_units)
    lay = (rnnfast.LSTM if kind == "lstm" else rnnfast.GRU if kind == "gru" else rnnfast.RNN)(
        I, Hv, num_layers=2, bidirectional=True, seed=2, dtype=dtype, **kw, **extra)
    x = rng.standard_normal((T, 9, I)).astype(dtype)
    lengths = [T, 4, 1, T, T, 2, 3, T, 5]
    for attr, val in _KERNEL_FORMS[be][form].items():
        mod, _, attr = attr.rpartition(":")
        monkeypatch.setattr(numba_rnn if mod == "numba" else _engine, attr, val)
    rnnfast.set_num_threads(2)
    with rnnfast.backend(be):
        got = lay(x, lengths=lengths)
    want = ref_stack(lay, x, None, lengths)
    for g, w in zip(_flat(got), _flat(want)):
        np.testing.assert_allclose(g, w, **({"rtol": 2e-5, "atol": 2e-6} if dtype == np.float32
                                            else tol_for(np.float64)))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("kind,kw", [("lstm", dict(peephole=True, clip=0.9, output_activation="softsign")),
                                     ("gru", dict(linear_before_reset=False, candidate_activation="elu")),
                                     ("rnn", dict(nonlinearity="softplus"))])
def test_variant_wide_units(be, kind, kw):
    """Hidden sizes past the 64-unit chunks of the Cython variant gate math (rf_gates_var_tmpl.h),
    ragged ends included."""
    rng = rng_for("var-wide", kind)
    lay = (rnnfast.LSTM if kind == "lstm" else rnnfast.GRU if kind == "gru" else rnnfast.RNN)(
        7, 150, seed=5, **kw)
    x = rng.standard_normal((5, 3, 7)).astype(np.float32)
    rnnfast.set_num_threads(2)
    with rnnfast.backend(be):
        got = lay(x, lengths=[5, 2, 4])
    for g, w in zip(_flat(got), _flat(ref_stack(lay, x, None, [5, 2, 4]))):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


def test_variant_low_precision_says_so():
    """bf16/int8 freezing of a variant is not built: a clear NotImplementedError, the layer intact."""
    lay = rnnfast.LSTM(I, H, peephole=True)
    before = lay.state_dict()
    with pytest.raises(NotImplementedError, match="bf16"):
        lay.freeze("bf16")
    for k, v in lay.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def _train_grads(lay, be, x, hx, lengths, dy):
    with rnnfast.backend(be):
        y, hn = lay.forward(x, hx, lengths=lengths, train=True)
        dx, dhx = lay.backward(dy)
    return [y, *flat_states(hn), dx, *flat_states(dhx)] + [lay.grads[k].copy() for k in sorted(lay.grads)]


@pytest.mark.parametrize("name,kind,kw", VARIANT_LAYERS, ids=[v[0] for v in VARIANT_LAYERS])
@pytest.mark.parametrize("be,form", [(b, f) for b in FAST_BACKENDS for f in ("packed", "blas")
                                     if b == "cython" or f == "packed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_variant_training_kernels(name, kind, kw, be, form, dtype, monkeypatch):
    """Every compiled backend trains the variants as the reference does: two layers,
    bidirectional, lengths, hx, projection with peepholes, 2 threads on the parallel
    paths, past one 64-unit chunk of the C gate math; the Cython kernels on packed
    weights and on BLAS per step. The values and every gradient (peepholes included)."""
    from rnnfast import _train_fast
    monkeypatch.setattr(_train_fast, "_PAR_MIN_WORK", 0)
    if "numba" in BACKENDS:
        from rnnfast.kernels import numba_train
        monkeypatch.setattr(numba_train, "_SERIAL_WORK", 0)
    if form == "blas":
        monkeypatch.setattr(_train_fast, "_MK_ROWS", 0)
    rng = rng_for("var-train-kern", name, dtype)
    extra = {"proj_size": 5} if kind == "lstm" and "peephole" in kw else {}
    lay = (rnnfast.LSTM if kind == "lstm" else rnnfast.GRU if kind == "gru" else rnnfast.RNN)(
        I, 70, num_layers=2, bidirectional=True, seed=2, dtype=dtype, **kw, **extra)
    sd = lay.state_dict()       # peepholes of both signs, large enough to matter
    lay.load_state_dict({k: (rng.uniform(-1, 1, v.shape).astype(dtype) if "_ph_" in k else v)
                         for k, v in sd.items()})
    Bn = 9
    x = rng.standard_normal((T, Bn, I)).astype(dtype)
    lengths = [T, 4, 1, T, T, 2, 3, T, 5]
    hx = random_hx(lay, Bn, rng, dtype=dtype)
    y0, _ = lay(x, hx, lengths=lengths)
    dy = rng.standard_normal(y0.shape).astype(dtype)
    rnnfast.set_num_threads(2)
    got = _train_grads(lay, be, x, hx, lengths, dy)
    want = _train_grads(lay, "reference", x, hx, lengths, dy)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        if dtype == np.float64:
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)
        else:
            scale = max(1.0, float(np.abs(w).max()))
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=5e-5 * scale)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_reverse_layer(be, kind):
    """``reverse=True`` runs the one direction from each sequence's end, in every backend,
    as the functional API's ``reverse=True`` (and the reverse half of a bidirectional
    layer): inference and training."""
    rng = rng_for("rev", kind)
    lay = make_layer(kind, {}, I, H, dtype=np.float64, seed=3)
    rev2 = type(lay)(I, H, dtype=np.float64, reverse=True)
    rev2.load_state_dict(lay.state_dict())
    x = rng.standard_normal((T, B, I))
    lengths = [T, 3, 1]
    with rnnfast.backend(be):
        got = rev2(x, lengths=lengths)
        p = lay.state_dict()
        fn = getattr(rnnfast, kind)
        yf, sf = fn(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"],
                    lengths=lengths, reverse=True)
        y, st = got
        np.testing.assert_allclose(y, yf, **tol_for(np.float64))
        for g, w in zip(st if kind == "lstm" else (st,), sf if kind == "lstm" else (sf,)):
            np.testing.assert_allclose(g[0], w, **tol_for(np.float64))
        want = ref_stack(rev2, x, None, lengths)
        for g, w in zip(_flat(got), _flat(want)):
            np.testing.assert_allclose(g, w, **tol_for(np.float64))
        yt, _ = rev2.forward(x, lengths=lengths, train=True)
        np.testing.assert_allclose(yt, y, **tol_for(np.float64))
        dy = rng.standard_normal(yt.shape)
        dx, _ = rev2.backward(dy)
    with rnnfast.backend("reference"):
        rev2.forward(x, lengths=lengths, train=True)
        dx_ref, _ = rev2.backward(dy)
    np.testing.assert_allclose(dx, dx_ref, **tol_for(np.float64))
    with pytest.raises(ValueError, match="reverse"):
        rev2.stream(batch=2)


# ---------------------------------------------------------------------------- training
def _torch_act(torch, act, x):
    n, a, b = act.name, act.alpha, act.beta
    return {
        "sigmoid": lambda: torch.sigmoid(x), "tanh": lambda: torch.tanh(x), "relu": lambda: torch.relu(x),
        "affine": lambda: a * x + b, "leaky_relu": lambda: torch.where(x >= 0, x, a * x),
        "thresholded_relu": lambda: torch.where(x > a, x, torch.zeros_like(x)),
        "scaled_tanh": lambda: a * torch.tanh(b * x), "hard_sigmoid": lambda: torch.clamp(a * x + b, 0, 1),
        "elu": lambda: torch.where(x >= 0, x, a * torch.expm1(torch.clamp(x, max=0))),
        "softsign": lambda: x / (1 + x.abs()), "softplus": lambda: torch.nn.functional.softplus(x),
    }[n]()


def _torch_variant_layer(torch, lay, x, lengths, params):
    """The layer (one direction, forward or reverse) written in torch ops, step by step."""
    v, kind, H = lay._variant, lay._kind, lay.hidden_size
    T, Bn, _ = x.shape
    p = params
    cl = (lambda a: a) if v.clip is None else (lambda a: torch.clamp(a, -v.clip, v.clip))
    h = torch.zeros(Bn, H, dtype=torch.float64)
    c = torch.zeros(Bn, H, dtype=torch.float64)
    ys = [None] * T
    steps = range(T - 1, -1, -1) if lay.reverse else range(T)
    lens = torch.tensor(lengths)
    for t in steps:
        live = (lens > t).to(torch.float64)[:, None]
        gx = x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"]
        if kind == "lstm":
            a = gx + h @ p["weight_hh_l0"].T + p["bias_hh_l0"]
            ai, af, ag, ao = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
            if v.peephole:
                ai, af = ai + p["weight_ph_l0"][:H] * c, af + p["weight_ph_l0"][H:2 * H] * c
            i = _torch_act(torch, v.gate, cl(ai))
            f = 1 - i if v.input_forget else _torch_act(torch, v.gate, cl(af))
            cn = f * c + i * _torch_act(torch, v.candidate, cl(ag))
            if v.peephole:
                ao = ao + p["weight_ph_l0"][2 * H:] * cn
            hn = _torch_act(torch, v.gate, cl(ao)) * _torch_act(torch, v.output, cn)
            c = live * cn + (1 - live) * c
        elif kind == "gru":
            gh = h @ p["weight_hh_l0"].T + p["bias_hh_l0"]
            r = _torch_act(torch, v.gate, cl(gx[:, :H] + gh[:, :H]))
            z = _torch_act(torch, v.gate, cl(gx[:, H:2 * H] + gh[:, H:2 * H]))
            if lay.linear_before_reset:
                n = _torch_act(torch, v.candidate, cl(gx[:, 2 * H:] + r * gh[:, 2 * H:]))
            else:
                n = _torch_act(torch, v.candidate, cl(gx[:, 2 * H:] + (r * h) @ p["weight_hh_l0"][2 * H:].T
                                                      + p["bias_hh_l0"][2 * H:]))
            hn = (1 - z) * n + z * h
        else:
            hn = _torch_act(torch, v.candidate, cl(gx + h @ p["weight_hh_l0"].T + p["bias_hh_l0"]))
        h = live * hn + (1 - live) * h
        ys[t] = live * hn
    return torch.stack(ys), h, c


@pytest.mark.parametrize("name,kind,kw", VARIANT_LAYERS, ids=[v[0] for v in VARIANT_LAYERS])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("be", BACKENDS)
def test_variant_training_against_torch_autograd(name, kind, kw, reverse, be):
    """Gradients of a variant layer (inputs, every parameter, peepholes included) equal
    PyTorch autograd's of the same cell written in torch ops (float64), on every backend."""
    torch = require_oracle("torch")
    rng = rng_for("var-train", name, reverse)
    lay = (rnnfast.LSTM if kind == "lstm" else rnnfast.GRU if kind == "gru" else rnnfast.RNN)(
        I, H, seed=4, dtype=np.float64, reverse=reverse, **kw)
    x = rng.standard_normal((T, B, I))
    lengths = [T, 3, 1]
    with rnnfast.backend(be):
        y, _ = lay.forward(x, lengths=lengths, train=True)
        dy = rng.standard_normal(y.shape)
        dx, _ = lay.backward(dy)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in lay.state_dict().items()}
    tx = torch.tensor(x, requires_grad=True)
    ty, _th, _tc = _torch_variant_layer(torch, lay, tx, lengths, tp)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    (ty * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert set(lay.grads) == set(tp)
    for k, g in lay.grads.items():
        np.testing.assert_allclose(g, tp[k].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_variants(be):
    """rnnfast.lstm / gru / rnn take the variants (and ``w_ph``) as the layers do."""
    rng = rng_for("var-fn")
    x = rng.standard_normal((T, B, I))
    kw = dict(clip=0.7, gate_activation=("hard_sigmoid", 0.25, 0.5), output_activation="relu")
    lay = rnnfast.LSTM(I, H, peephole=True, dtype=np.float64, seed=6, **kw)
    p = lay.state_dict()
    g = rnnfast.GRU(I, H, linear_before_reset=False, candidate_activation="softsign", dtype=np.float64, seed=6)
    q = g.state_dict()
    r = rnnfast.RNN(I, H, nonlinearity=("elu", 0.3), clip=2.0, dtype=np.float64, seed=6)
    o = r.state_dict()
    with rnnfast.backend(be):
        y, (hn, cn) = rnnfast.lstm(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"],
                                   w_ph=p["weight_ph_l0"], lengths=[T, 2, 0], **kw)
        yg, _ = rnnfast.gru(x, q["weight_ih_l0"], q["weight_hh_l0"], q["bias_ih_l0"], q["bias_hh_l0"],
                            linear_before_reset=False, candidate_activation="softsign")
        yr, _ = rnnfast.rnn(x, o["weight_ih_l0"], o["weight_hh_l0"], o["bias_ih_l0"], o["bias_hh_l0"],
                            nonlinearity=("elu", 0.3), clip=2.0)
    wy, (wh, wc) = ref_stack(lay, x, None, [T, 2, 0])
    np.testing.assert_allclose(y, wy, **tol_for(np.float64))
    np.testing.assert_allclose(cn, wc[0], **tol_for(np.float64))
    np.testing.assert_allclose(hn, wh[0], **tol_for(np.float64))
    np.testing.assert_allclose(yg, ref_stack(g, x)[0], **tol_for(np.float64))
    np.testing.assert_allclose(yr, ref_stack(r, x)[0], **tol_for(np.float64))
    with pytest.raises(ValueError, match="w_ph"):
        rnnfast.lstm(x, p["weight_ih_l0"], p["weight_hh_l0"], w_ph=np.zeros(2))


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_training_variants(be):
    """rnnfast.lstm_forward_train / gru_forward_train / rnn_forward_train take the variants
    (and ``w_ph``, whose gradient they return) and give the layers' reference gradients."""
    rng = rng_for("var-fn-train")
    x = rng.standard_normal((T, B, I))
    lengths = [T, 2, 0]
    short = {"weight_ih_l0": "w_ih", "weight_hh_l0": "w_hh", "bias_ih_l0": "b_ih", "bias_hh_l0": "b_hh",
             "weight_ph_l0": "w_ph"}
    cases = [
        (rnnfast.LSTM(I, H, peephole=True, clip=0.7, gate_activation=("hard_sigmoid", 0.25, 0.5),
                      output_activation="relu", input_forget=True, dtype=np.float64, seed=6),
         rnnfast.lstm_forward_train, rnnfast.lstm_backward,
         dict(clip=0.7, gate_activation=("hard_sigmoid", 0.25, 0.5), output_activation="relu", input_forget=True)),
        (rnnfast.GRU(I, H, linear_before_reset=False, candidate_activation="softsign", clip=1.5,
                     dtype=np.float64, seed=6),
         rnnfast.gru_forward_train, rnnfast.gru_backward,
         dict(linear_before_reset=False, candidate_activation="softsign", clip=1.5)),
        (rnnfast.RNN(I, H, nonlinearity=("elu", 0.3), clip=2.0, dtype=np.float64, seed=6),
         rnnfast.rnn_forward_train, rnnfast.rnn_backward, dict(nonlinearity=("elu", 0.3), clip=2.0)),
    ]
    for lay, fwd, bwd, kw in cases:
        p = lay.state_dict()
        if "weight_ph_l0" in p:
            p["weight_ph_l0"] = rng.uniform(-1, 1, 3 * H)
            lay.load_state_dict(p)
            kw = {**kw, "w_ph": p["weight_ph_l0"]}
        with rnnfast.backend(be):
            y, _, ctx = fwd(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"],
                            lengths=lengths, **kw)
            dy = rng.standard_normal(y.shape)
            dx, *_, g = bwd(ctx, dy)
        with rnnfast.backend("reference"):
            wy, _ = lay.forward(x, lengths=lengths, train=True)
            wdx, _ = lay.backward(dy)
        np.testing.assert_allclose(y, wy, **tol_for(np.float64))
        np.testing.assert_allclose(dx, wdx, rtol=1e-9, atol=1e-12)
        assert set(g) == {short[k] for k in lay.grads}
        for k, want in lay.grads.items():
            np.testing.assert_allclose(g[short[k]], want, rtol=1e-9, atol=1e-12, err_msg=k)
