"""Training: backpropagation through time (``forward(train=True)`` / ``backward``) of every
backend x cell x option against PyTorch autograd (float64, rtol/atol 1e-8), the float64
reference against finite differences, and the training contract of SPEC.md (errors,
zero gradients, repeatability, dropout, the functional API, the example)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast
from rnnfast import _train_fast, training

from conftest import BACKENDS, VARIANT_IDS, VARIANTS, make_layer, random_hx, rng_for

T, B, I, H = 5, 4, 3, 6
TORCH_VARIANTS = [v for v in VARIANTS if v[0] != "gru-nolbr"]
TORCH_IDS = [v[0] for v in TORCH_VARIANTS]
GRAD_TOL = dict(rtol=1e-8, atol=1e-8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _parallel_paths_on_small_shapes(monkeypatch):
    """Run the multi-threaded kernel paths, and the scratch pool, even on the small shapes
    of these tests."""
    monkeypatch.setattr(_train_fast, "_PAR_MIN_WORK", 0)
    monkeypatch.setattr(_train_fast._POOL, "MIN_BYTES", 0)
    if "numba" in BACKENDS:
        from rnnfast.kernels import numba_train
        monkeypatch.setattr(numba_train, "_SERIAL_WORK", 0)


# ----------------------------------------------------------------------------- helpers
def torch_layer(layer):
    """The torch module equivalent to an rnnfast layer, same weights, float64."""
    kw = dict(num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
              bidirectional=layer.bidirectional)
    if layer._kind == "lstm":
        m = torch.nn.LSTM(layer.input_size, layer.hidden_size, proj_size=layer.proj_size, **kw)
    elif layer._kind == "gru":
        m = torch.nn.GRU(layer.input_size, layer.hidden_size, **kw)
    else:
        m = torch.nn.RNN(layer.input_size, layer.hidden_size, nonlinearity=layer.nonlinearity, **kw)
    m = m.double()
    m.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in layer.state_dict().items()})
    return m


def torch_grads(m, x, hx, lengths, dy, dhx_n):
    """Autograd of sum(y*dy) + sum(hx_n*dhx_n) (packed sequences when `lengths`)."""
    lstm = isinstance(m, torch.nn.LSTM)
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    hxt = None
    if hx is not None:
        hxt = tuple(torch.tensor(np.asarray(s, np.float64), requires_grad=True) for s in hx) if lstm \
            else torch.tensor(np.asarray(hx, np.float64), requires_grad=True)
    if lengths is None:
        y, hn = m(xt, hxt)
    else:
        tlen = xt.shape[1] if m.batch_first else xt.shape[0]
        p = pack_padded_sequence(xt, torch.as_tensor(np.asarray(lengths), dtype=torch.int64),
                                 batch_first=m.batch_first, enforce_sorted=False)
        yp, hn = m(p, hxt)
        y = pad_packed_sequence(yp, batch_first=m.batch_first, total_length=tlen)[0]
    loss = (y * torch.from_numpy(dy)).sum()
    if dhx_n is not None:
        if lstm:
            loss = loss + (hn[0] * torch.from_numpy(dhx_n[0])).sum() + (hn[1] * torch.from_numpy(dhx_n[1])).sum()
        else:
            loss = loss + (hn * torch.from_numpy(dhx_n)).sum()
    loss.backward()
    out = {"y": y.detach().numpy(), "dx": xt.grad.numpy()}
    if hx is not None:
        if lstm:
            out["dh0"], out["dc0"] = hxt[0].grad.numpy(), hxt[1].grad.numpy()
        else:
            out["dh0"] = hxt.grad.numpy()
    for k, v in m.named_parameters():
        out[k] = v.grad.numpy()
    return out


def rnnfast_grads(layer, be, x, hx, lengths, dy, dhx_n):
    with rnnfast.backend(be):
        y, hn = layer.forward(x, hx, lengths, train=True)
        dx, dhx = layer.backward(dy, dhx_n)
    out = {"y": y, "dx": dx, "hn": hn, **layer.grads}
    if layer._kind == "lstm":
        out["dh0"], out["dc0"] = dhx
    else:
        out["dh0"] = dhx
    return out


def random_grads(layer, x, rng, unbatched=False, states=True):
    """dy like y and dhx_n like hx_n for `layer` and input `x`."""
    D = layer.num_directions
    LD = layer.num_layers * D
    if unbatched:
        Tn, Bn = x.shape[0], None
    elif layer.batch_first:
        Bn, Tn = x.shape[:2]
    else:
        Tn, Bn = x.shape[:2]
    ylead = (Tn,) if unbatched else ((Bn, Tn) if layer.batch_first else (Tn, Bn))
    dy = rng.standard_normal((*ylead, D * layer.output_size))
    if not states:
        return dy, None
    sb = () if unbatched else (Bn,)
    dh = rng.standard_normal((LD, *sb, layer.output_size))
    if layer._kind == "lstm":
        return dy, (dh, rng.standard_normal((LD, *sb, layer.hidden_size)))
    return dy, dh


def assert_grads_close(got, want, keys=None, **tol):
    tol = tol or GRAD_TOL
    keys = keys if keys is not None else [k for k in want if k in got]
    assert keys
    for k in keys:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape, f"{k}: shape {g.shape} != {w.shape}"
        np.testing.assert_allclose(g, w, err_msg=k, **tol)


# ----------------------------------------------------------------------------- against PyTorch
CASES = {
    # name: (layer options, input options)
    "plain": (dict(), dict()),
    "h0": (dict(), dict(hx=True)),
    "2layers-bidir-bf": (dict(num_layers=2, bidirectional=True, batch_first=True), dict(hx=True)),
    "lengths-bidir": (dict(num_layers=2, bidirectional=True), dict(hx=True, lengths=[2, T, 1, 1])),
    "lengths-bf-nobias": (dict(batch_first=True, bias=False), dict(hx=True, lengths=[1, 3, T, 2])),
    "unbatched-2layers": (dict(num_layers=2, bidirectional=True), dict(hx=True, unbatched=True)),
    "wide-split": (dict(), dict(hx=True, hidden=40, lengths=[T, 3, 1, T])),   # hidden units split over threads
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", TORCH_VARIANTS, ids=TORCH_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_grads_match_torch(be, variant, case):
    _, kind, opts = variant
    lopts, iopts = CASES[case]
    hidden = iopts.get("hidden", H)
    rng = rng_for("train-torch", be, kind, repr(opts), case)
    layer = make_layer(kind, opts, I, hidden, dtype=np.float64, seed=3, **lopts)
    unbatched = iopts.get("unbatched", False)
    if unbatched:
        x = rng.standard_normal((T, I))
    else:
        x = rng.standard_normal((B, T, I) if layer.batch_first else (T, B, I))
    hx = random_hx(layer, B, rng, unbatched=unbatched) if iopts.get("hx") else None
    lengths = iopts.get("lengths")
    dy, dhx_n = random_grads(layer, x, rng, unbatched)
    got = rnnfast_grads(layer, be, x, hx, lengths, dy, dhx_n)
    want = torch_grads(torch_layer(layer), x, hx, lengths, dy, dhx_n)
    keys = ["y", "dx"] + (["dh0"] + (["dc0"] if kind == "lstm" else []) if hx is not None else []) \
        + list(layer.parameters())
    assert set(layer.grads) == set(layer.state_dict())
    assert_grads_close(got, want, keys)


@pytest.mark.parametrize("be", BACKENDS)
def test_grads_match_torch_without_state_grads(be):
    """dhx_n=None means zeros; no hx means zero initial states (dhx still returned)."""
    layer = make_layer("lstm", {"proj": True}, I, H, num_layers=2, dtype=np.float64, seed=1)
    rng = rng_for("train-nostate", be)
    x = rng.standard_normal((T, B, I))
    dy, _ = random_grads(layer, x, rng, states=False)
    got = rnnfast_grads(layer, be, x, None, None, dy, None)
    want = torch_grads(torch_layer(layer), x, None, None, dy, None)
    assert_grads_close(got, want, ["y", "dx", *layer.parameters()])
    assert got["dh0"].shape == (2, B, layer.output_size) and got["dc0"].shape == (2, B, H)


# ----------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("lengths", [None, [3, 0, T, 1], [0, 0, 0, 0]], ids=["full", "with-zero", "all-zero"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", [b for b in BACKENDS if b != "reference"])
def test_fast_backends_match_reference(be, variant, lengths):
    """Every cell (GRU linear_before_reset=False included: PyTorch has none), bidirectional
    stacks, length-0 sequences (an rnnfast extension: dh0 = dh_n, dx = 0 there)."""
    _, kind, opts = variant
    rng = rng_for("train-ref", be, kind, repr(opts), repr(lengths))
    layer = make_layer(kind, opts, I, 20, num_layers=2, bidirectional=True, dtype=np.float64, seed=5)
    x = rng.standard_normal((T, B, I))
    hx = random_hx(layer, B, rng)
    dy, dhx_n = random_grads(layer, x, rng)
    want = rnnfast_grads(layer, "reference", x, hx, lengths, dy, dhx_n)
    got = rnnfast_grads(layer, be, x, hx, lengths, dy, dhx_n)
    assert_grads_close(got, want, ["y", "dx", "dh0"] + (["dc0"] if kind == "lstm" else []) + list(layer.grads),
                       rtol=1e-9, atol=1e-9)
    if lengths is not None:
        for b, n in enumerate(lengths):
            assert np.all(got["dx"][n:, b] == 0), "padded steps get exactly zero gradient"
            if n == 0:   # final state = initial state for an empty sequence
                dh = dhx_n[0] if kind == "lstm" else dhx_n
                np.testing.assert_allclose(got["dh0"][-2:, b], dh[-2:, b], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_float32_matches_float64_reference(be, variant):
    _, kind, opts = variant
    rng = rng_for("train-f32", be, kind, repr(opts))
    l32 = make_layer(kind, opts, I, 24, num_layers=2, bidirectional=True, dtype=np.float32, seed=2)
    l64 = make_layer(kind, opts, I, 24, num_layers=2, bidirectional=True, dtype=np.float64, seed=2)
    l64.load_state_dict(l32.state_dict())
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = [T, 2, 4, 1]
    dy, dhx_n = random_grads(l32, x, rng)
    got = rnnfast_grads(l32, be, x, None, lengths, dy.astype(np.float32), dhx_n)
    want = rnnfast_grads(l64, "reference", x.astype(np.float64), None, lengths, dy, dhx_n)
    for k in ["dx", "dh0", *l32.grads]:
        assert got[k].dtype == np.float32, k
        scale = max(1.0, float(np.abs(want[k]).max()))
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5 * scale, err_msg=k)


@pytest.mark.parametrize("be", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("kind, batch", [("gru", 8), ("lstm", 40)])
def test_thread_counts_agree(be, kind, batch):
    """1, 2 and 3 threads give the same gradients (batch 40: Numba's row-split products)."""
    layer = make_layer(kind, {"proj": True}, I, 64, dtype=np.float64, seed=0)
    rng = rng_for("train-threads", be, kind)
    x = rng.standard_normal((T, batch, I))
    dy, dh = random_grads(layer, x, rng)
    lengths = (np.arange(batch) % T) + 1
    res = []
    for n in (1, 2, 3):
        rnnfast.set_num_threads(n)
        res.append(rnnfast_grads(layer, be, x, None, lengths, dy, dh))
    for r in res[1:]:
        assert_grads_close(r, res[0], ["y", "dx", "dh0", *layer.grads], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_blas_and_packed_recurrent_products_agree(variant, monkeypatch):
    """The Cython kernels' two ways of running the per-step products (weights packed once
    per call for small batches, BLAS per step for large ones) give the same gradients."""
    if "cython" not in BACKENDS:
        pytest.skip("no Cython backend")
    _, kind, opts = variant
    layer = make_layer(kind, opts, I, 40, num_layers=2, bidirectional=True, dtype=np.float64, seed=6)
    rng = rng_for("train-mk", kind, repr(opts))
    x = rng.standard_normal((T, 6, I))
    hx = random_hx(layer, 6, rng)
    dy, dhx_n = random_grads(layer, x, rng)
    res = []
    for rows in (10**9, 0):
        monkeypatch.setattr(_train_fast, "_MK_ROWS", rows)
        res.append(rnnfast_grads(layer, "cython", x, hx, [T, 2, 0, 1, 4, T], dy, dhx_n))
    assert_grads_close(res[1], res[0], ["y", "dx", "dh0", *layer.grads], rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_reference_finite_differences(variant):
    """Central differences of the float64 reference: every parameter (a few entries
    each), x and both initial states, through a 2-layer bidirectional stack with lengths."""
    _, kind, opts = variant
    rng = rng_for("train-fd", kind, repr(opts))
    layer = make_layer(kind, opts, 2, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=7)
    Tn, Bn = 4, 3
    x = rng.standard_normal((Tn, Bn, 2))
    hx = random_hx(layer, Bn, rng)
    lengths = [Tn, 2, 1]
    dy, dhx_n = random_grads(layer, x, rng)

    def loss(x_, hx_):
        with rnnfast.backend("reference"):
            y, hn = layer(x_, hx_, lengths)
        total = float((y * dy).sum())
        for s, ds in zip(hn if kind == "lstm" else (hn,), dhx_n if kind == "lstm" else (dhx_n,)):
            total += float((s * ds).sum())
        return total

    got = rnnfast_grads(layer, "reference", x, hx, lengths, dy, dhx_n)
    eps = 1e-6

    def check(arr, grad, name, n=4):
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, size=min(n, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            up = loss(x, hx)
            flat[i] = old - eps
            down = loss(x, hx)
            flat[i] = old
            np.testing.assert_allclose(grad.reshape(-1)[i], (up - down) / (2 * eps), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name}[{i}]")

    for k, p in layer.parameters().items():
        check(p, got[k], k)
    check(x, got["dx"], "x", n=8)
    states = hx if kind == "lstm" else (hx,)
    for s, name in zip(states, ["dh0", "dc0"]):
        check(s, got[name], name)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("be", BACKENDS)
def test_backward_needs_training_forward(be):
    layer = make_layer("lstm", {}, I, H, dtype=np.float64)
    x = np.ones((T, B, I))
    with rnnfast.backend(be):
        with pytest.raises(RuntimeError):
            layer.backward(np.ones((T, B, H)))
        layer(x)                                   # inference does not enable backward
        with pytest.raises(RuntimeError):
            layer.backward(np.ones((T, B, H)))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_zero_dy_gives_zero_gradients(be, variant):
    _, kind, opts = variant
    layer = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=np.float64)
    rng = rng_for("train-zero", be, kind)
    x = rng.standard_normal((T, B, I))
    with rnnfast.backend(be):
        y, _ = layer.forward(x, random_hx(layer, B, rng), [T, 1, 3, 2], train=True)
        dx, dhx = layer.backward(np.zeros_like(y))
    assert not np.any(dx)
    for s in (dhx if kind == "lstm" else (dhx,)):
        assert not np.any(s)
    assert all(not np.any(g) for g in layer.grads.values())


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
@pytest.mark.parametrize("steps, lengths, row", [(1, None, 0), (T, [T, 1, 3, 2], 1)], ids=["T1", "ragged"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", [b for b in BACKENDS if b != "reference"])
def test_nonfinite_gradients_through_the_implicit_zero_state(be, variant, steps, lengths, row, bad):
    """Without hx a sequence's first step has a zero previous state, but 0 * NaN is NaN:
    where the reference (and PyTorch) gives NaN in the weight_hh gradient, so does every
    backend, not 0. A regression test: the fast paths skipped that product (found by the
    fuzz search). The bad value sits in a sequence of one step, so nothing else carries it."""
    _, kind, opts = variant
    layer = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=3)
    rng = rng_for("train-nan-h0", be, kind, repr(opts))
    x = rng.standard_normal((steps, B, I))
    x[0, row, 0] = bad
    dy, _ = random_grads(layer, x, rng)
    want = rnnfast_grads(layer, "reference", x, None, lengths, dy, None)
    got = rnnfast_grads(layer, be, x, None, lengths, dy, None)
    if np.isnan(bad) and opts.get("nonlinearity") != "relu":   # relu's gradient at NaN is 0
        assert np.isnan(want["weight_hh_l0"]).any()
    for k in layer.grads:
        np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(want[k]), err_msg=k)
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=k)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_repeated_forward_backward_identical(be, variant):
    _, kind, opts = variant
    layer = make_layer(kind, opts, I, 20, num_layers=2, bidirectional=True, dtype=np.float32)
    rng = rng_for("train-repeat", be, kind)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy, dhx_n = random_grads(layer, x, rng)
    a = rnnfast_grads(layer, be, x, None, [T, 2, 1, 4], dy, dhx_n)
    b = rnnfast_grads(layer, be, x, None, [T, 2, 1, 4], dy, dhx_n)
    for k in ["y", "dx", "dh0", *layer.grads]:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("be", BACKENDS)
def test_grads_contract(be):
    """Keys/shapes/dtype of grads; overwritten by each backward; untouched by inference and
    load_state_dict; inputs never modified."""
    layer = make_layer("lstm", {"proj": True}, I, H, num_layers=2, bidirectional=True, dtype=np.float32)
    rng = rng_for("train-contract", be)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    x_copy = x.copy()
    assert layer.grads == {}
    with rnnfast.backend(be):
        y, _ = layer.forward(x, train=True)
        dy = np.ones_like(y)
        dy_copy = dy.copy()
        layer.backward(dy)
        g1 = layer.grads
        assert list(g1) == list(layer.state_dict())
        for k, v in layer.state_dict().items():
            assert g1[k].shape == v.shape and g1[k].dtype == np.float32, k
        snapshot = {k: v.copy() for k, v in g1.items()}
        layer(x)
        layer.load_state_dict(layer.state_dict())
        assert layer.grads is g1 and all(np.array_equal(g1[k], snapshot[k]) for k in g1)
        layer.backward(2 * dy)
    assert layer.grads is not g1
    for k in g1:
        np.testing.assert_allclose(layer.grads[k], 2 * snapshot[k], rtol=1e-5, atol=1e-6)
    assert np.array_equal(x, x_copy) and np.array_equal(dy, dy_copy)


@pytest.mark.parametrize("be", BACKENDS)
def test_interleaved_training_loops_keep_results_intact(be):
    """Scratch buffers are reused between calls: outputs, gradients and contexts still
    alive must never be overwritten (two layers trained in turns, results kept)."""
    rng = rng_for("train-pool", be)
    layers = [make_layer("lstm", {}, I, 20, num_layers=2, dtype=np.float64, seed=s) for s in (1, 2)]
    x = rng.standard_normal((T, B, I))
    kept, fresh = [], []
    for step in range(3):
        for k, layer in enumerate(layers):
            with rnnfast.backend(be):
                y, _ = layer.forward(x * (step + 1), train=True)
                dx, dh = layer.backward(np.ones_like(y))
            kept.append((y, dx, dh, dict(layer.grads)))
            ref = make_layer("lstm", {}, I, 20, num_layers=2, dtype=np.float64, seed=(1, 2)[k])
            fresh.append(rnnfast_grads(ref, "reference", x * (step + 1), None, None, np.ones_like(y), None))
    rnnfast.release_memory()
    for (y, dx, _dh, g), want in zip(kept, fresh):
        np.testing.assert_allclose(y, want["y"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dx, want["dx"], rtol=1e-9, atol=1e-9)
        for n in g:
            np.testing.assert_allclose(g[n], want[n], rtol=1e-9, atol=1e-9, err_msg=n)


@pytest.mark.parametrize("be", BACKENDS)
def test_backward_uses_current_weights(be):
    """Weights updated between forward and backward: every backend differentiates with the
    new weights (the same result as the reference doing the same)."""
    res = {}
    for name in ("reference", be):
        layer = make_layer("gru", {}, I, 20, num_layers=2, dtype=np.float64, seed=4)
        rng = rng_for("train-current")
        x = rng.standard_normal((T, B, I))
        with rnnfast.backend(name):
            y, _ = layer.forward(x, train=True)
            for p in layer.parameters().values():
                p *= 1.5
            dx, dh = layer.backward(np.ones_like(y))
        res[name] = {"dx": dx, "dh0": dh, **layer.grads}
    assert_grads_close(res[be], res["reference"], rtol=1e-9, atol=1e-9)
    fresh = make_layer("gru", {}, I, 20, num_layers=2, dtype=np.float64, seed=4)
    rng = rng_for("train-current")
    with rnnfast.backend("reference"):
        y, _ = fresh.forward(rng.standard_normal((T, B, I)), train=True)
        dx0, _ = fresh.backward(np.ones_like(y))
    assert not np.allclose(dx0, res[be]["dx"])


@pytest.mark.parametrize("be", BACKENDS)
def test_backward_input_errors(be):
    layer = make_layer("lstm", {}, I, H, num_layers=2, dtype=np.float64)
    gru = make_layer("gru", {}, I, H, dtype=np.float64)
    x = np.ones((T, B, I))
    with rnnfast.backend(be):
        y, _ = layer.forward(x, train=True)
        dy_msg = re.escape(f"dy: expected shape {(T, B, H)} (like the forward's output), got ")
        with pytest.raises(ValueError, match="^" + dy_msg + re.escape(f"{(T, B, H + 1)}")):
            layer.backward(np.ones((T, B, H + 1)))
        with pytest.raises(ValueError, match="^" + dy_msg + re.escape(f"{(B, T, H)}")):
            layer.backward(np.ones((B, T, H)))
        with pytest.raises(TypeError, match=r"^dy: expected a float32 or float64 array, got dtype int64"):
            layer.backward(np.ones((T, B, H), np.int64))
        with pytest.raises(TypeError, match=r"^dhx_n: expected a tuple \(dh_n, dc_n\) for LSTM "
                                            r"\(entries may be None\), got ndarray"):
            layer.backward(y, np.ones((2, B, H)))
        with pytest.raises(ValueError, match="^" + re.escape(f"dhx_n[0] (dh_n): expected shape {(2, B, H)}, "
                                                             f"got {(1, B, H)}")):
            layer.backward(y, (np.ones((1, B, H)), None))
        yg, _ = gru.forward(x, train=True)
        with pytest.raises(TypeError, match=r"^dhx_n: expected an array \(the gradient of h_n\) for GRU, got a tuple"):
            gru.backward(yg, (np.ones((1, B, H)), np.ones((1, B, H))))
        with pytest.raises(ValueError, match="^" + re.escape(f"dhx_n: expected shape {(1, B, H)}, got {(2, B, H)}")):
            gru.backward(yg, np.ones((2, B, H)))
        # a failed backward leaves the layer usable
        dx, (dh, dc) = layer.backward(y, (None, np.zeros((2, B, H))))
        assert dx.shape == x.shape and dh.shape == (2, B, H) and dc.shape == (2, B, H)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("be", BACKENDS)
def test_dropout_zero_is_no_dropout(be):
    a = make_layer("lstm", {}, I, H, num_layers=3, dtype=np.float64, seed=1)
    rng = rng_for("train-p0", be)
    x = rng.standard_normal((T, B, I))
    want = torch_grads(torch_layer(a), x, None, None, np.ones((T, B, H)), None)
    a.dropout = 0.0
    got = rnnfast_grads(a, be, x, None, None, np.ones((T, B, H)), None)
    assert_grads_close(got, want, ["y", "dx", *a.parameters()])


@pytest.mark.parametrize("be", BACKENDS)
def test_dropout_one_zeroes_the_inter_layer_signal(be):
    kw = dict(num_layers=2, bidirectional=True, dtype=np.float64, seed=2)
    layer = rnnfast.LSTM(I, H, dropout=1.0, **kw)
    rng = rng_for("train-p1", be)
    x = rng.standard_normal((T, B, I))
    with rnnfast.backend(be):
        y, (_hn, _cn) = layer.forward(x, train=True)
        dx, (dh0, _) = layer.backward(np.ones_like(y))
        # the second layer alone, on zeros
        top = rnnfast.LSTM(2 * H, H, bidirectional=True, dtype=np.float64)
        top.load_state_dict({k.replace("_l1", "_l0"): v for k, v in layer.state_dict().items() if "_l1" in k})
        y_top, _ = top(np.zeros((T, B, 2 * H)))
        y_inf, _ = layer(x)                    # inference: no dropout
    np.testing.assert_allclose(y, y_top, rtol=1e-12, atol=1e-12)
    assert not np.any(dx)
    assert not np.any(layer.grads["weight_ih_l0"]) and not np.any(dh0[:2])
    assert np.any(layer.grads["weight_hh_l1"])
    assert not np.allclose(y_inf, y)


@pytest.mark.parametrize("be", BACKENDS)
def test_dropout_masks_reproducible_with_seed(be):
    def run(seed, backend=be, state=None):
        layer = rnnfast.GRU(I, 20, num_layers=3, dropout=0.4, dtype=np.float64, seed=seed)
        if state is not None:
            layer.load_state_dict(state)
        x = rng_for("train-drop-x").standard_normal((T, B, I))
        r = rnnfast_grads(layer, backend, x, None, [T, 3, 1, 4], np.ones((T, B, 20)), None)
        return r, layer.state_dict()

    a, state = run(11)
    b, _ = run(11)
    c, _ = run(12, state=state)               # same weights, other masks
    ref, _ = run(11, backend="reference")     # masks are drawn before the backend is chosen
    for k in ["y", "dx"] + [k for k in a if k.startswith(("weight", "bias"))]:
        assert np.array_equal(a[k], b[k]), k
        np.testing.assert_allclose(a[k], ref[k], rtol=1e-9, atol=1e-9, err_msg=k)
    assert not np.allclose(a["y"], c["y"])


def test_dropout_finite_differences():
    """Gradients through inverted dropout (masks fixed by the seed) against central differences."""
    base = rnnfast.RNN(2, 4, num_layers=2, dropout=0.5, dtype=np.float64, seed=21)
    state = base.state_dict()
    rng = rng_for("train-drop-fd")
    x = rng.standard_normal((4, 3, 2))
    dy = rng.standard_normal((4, 3, 4))

    def fresh(st):
        layer = rnnfast.RNN(2, 4, num_layers=2, dropout=0.5, dtype=np.float64, seed=21)
        layer.load_state_dict(st)
        return layer

    def loss(st):
        with rnnfast.backend("reference"):
            y, _ = fresh(st).forward(x, train=True)
        return float((y * dy).sum())

    layer = fresh(state)
    with rnnfast.backend("reference"):
        layer.forward(x, train=True)
        layer.backward(dy)
    eps = 1e-6
    for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l1"):
        for i in range(3):
            st_up = {n: v.copy() for n, v in state.items()}
            st_dn = {n: v.copy() for n, v in state.items()}
            st_up[k].reshape(-1)[i] += eps
            st_dn[k].reshape(-1)[i] -= eps
            np.testing.assert_allclose(layer.grads[k].reshape(-1)[i], (loss(st_up) - loss(st_dn)) / (2 * eps),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{k}[{i}]")


# ----------------------------------------------------------------------------- functional API
@pytest.mark.parametrize("be", BACKENDS)
def test_functional_lstm_backward_matches_torch(be):
    rng = rng_for("train-fn-lstm", be)
    m = torch.nn.LSTM(I, H, proj_size=3, batch_first=True).double()
    p = {k: v.detach().numpy() for k, v in m.named_parameters()}
    x = rng.standard_normal((B, T, I))
    h0, c0 = rng.standard_normal((B, 3)), rng.standard_normal((B, H))
    dy, dh, dc = rng.standard_normal((B, T, 3)), rng.standard_normal((B, 3)), rng.standard_normal((B, H))
    with rnnfast.backend(be):
        y, (_hn, _cn), ctx = rnnfast.training.lstm_forward_train(
            x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"], h0=h0, c0=c0,
            w_hr=p["weight_hr_l0"], batch_first=True)
        dx, (dh0, dc0), g = rnnfast.training.lstm_backward(ctx, dy, dh, dc)
    want = torch_grads(m, x, (h0[None], c0[None]), None, dy, (dh[None], dc[None]))
    assert set(g) == {"w_ih", "w_hh", "b_ih", "b_hh", "w_hr"}
    got = {"y": y, "dx": dx, "dh0": dh0[None], "dc0": dc0[None], "weight_ih_l0": g["w_ih"],
           "weight_hh_l0": g["w_hh"], "bias_ih_l0": g["b_ih"], "bias_hh_l0": g["b_hh"], "weight_hr_l0": g["w_hr"]}
    assert_grads_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
def test_functional_reverse_unbatched_and_no_bias(be):
    """reverse=True on an unbatched sequence equals the forward direction on the flipped one."""
    rng = rng_for("train-fn-rev", be)
    w_ih, w_hh = 0.4 * rng.standard_normal((3 * H, I)), 0.4 * rng.standard_normal((3 * H, H))
    x, dy, dh = rng.standard_normal((T, I)), rng.standard_normal((T, H)), rng.standard_normal(H)
    with rnnfast.backend(be):
        y, _hn, ctx = rnnfast.training.gru_forward_train(x, w_ih, w_hh, reverse=True)
        dx, dh0, g = rnnfast.training.gru_backward(ctx, dy, dh)
        y2, _hn2, ctx2 = rnnfast.training.gru_forward_train(x[::-1], w_ih, w_hh)
        dx2, dh02, g2 = rnnfast.training.gru_backward(ctx2, dy[::-1], dh)
    assert set(g) == {"w_ih", "w_hh"} and dx.shape == (T, I) and dh0.shape == (H,)
    np.testing.assert_allclose(y, y2[::-1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx2[::-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh0, dh02, rtol=1e-10, atol=1e-12)
    for k in g:
        np.testing.assert_allclose(g[k], g2[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("be", BACKENDS)
def test_functional_rnn_and_gru_nolbr_against_reference(be, nonlinearity):
    rng = rng_for("train-fn-rnn", be, nonlinearity)
    x, lengths = rng.standard_normal((T, B, I)), [T, 1, 0, 3]
    w = [0.5 * rng.standard_normal(s) for s in ((H, I), (H, H), (H,), (H,))]
    wg = [0.5 * rng.standard_normal(s) for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    dy, dh, h0 = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    out = {}
    for name in ("reference", be):
        with rnnfast.backend(name):
            y, hn, ctx = rnnfast.training.rnn_forward_train(x, *w, h0=h0, lengths=lengths,
                                                            nonlinearity=nonlinearity)
            r = rnnfast.training.rnn_backward(ctx, dy, dh)
            yg, hg, ctxg = rnnfast.training.gru_forward_train(x, *wg, h0=h0, lengths=lengths,
                                                              linear_before_reset=False)
            rg = rnnfast.training.gru_backward(ctxg, dy, dh)
        out[name] = (y, hn, yg, hg, *r[:2], *r[2].values(), *rg[:2], *rg[2].values())
    for a, b_ in zip(out[be], out["reference"]):
        np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-9)
    # the reference itself against torch (RNN)
    m = torch.nn.RNN(I, H, nonlinearity=nonlinearity).double()
    m.load_state_dict({"weight_ih_l0": torch.from_numpy(w[0]), "weight_hh_l0": torch.from_numpy(w[1]),
                       "bias_ih_l0": torch.from_numpy(w[2]), "bias_hh_l0": torch.from_numpy(w[3])})
    want = torch_grads(m, x, h0[None], [T, 1, 1, 3], dy, dh[None])
    with rnnfast.backend(be):
        y, hn, ctx = rnnfast.training.rnn_forward_train(x, *w, h0=h0, lengths=[T, 1, 1, 3],
                                                        nonlinearity=nonlinearity)
        dx, dh0, g = rnnfast.training.rnn_backward(ctx, dy, dh)
    assert_grads_close({"dx": dx, "dh0": dh0[None], "weight_ih_l0": g["w_ih"], "bias_hh_l0": g["b_hh"]}, want)


@pytest.mark.parametrize("be", [b for b in BACKENDS if b != "reference"])
def test_functional_reverse_with_lengths_against_reference(be):
    rng = rng_for("train-fn-rev-len", be)
    x, lengths = rng.standard_normal((T, B, I)), [2, T, 0, 1]
    w = [0.5 * rng.standard_normal(s) for s in ((4 * H, I), (4 * H, 3), (4 * H,), (4 * H,), (3, H))]
    dy, dh, dc = rng.standard_normal((T, B, 3)), rng.standard_normal((B, 3)), rng.standard_normal((B, H))
    h0, c0 = rng.standard_normal((B, 3)), rng.standard_normal((B, H))
    out = {}
    for name in ("reference", be):
        with rnnfast.backend(name):
            y, (hn, cn), ctx = rnnfast.training.lstm_forward_train(x, *w[:4], w_hr=w[4], h0=h0, c0=c0,
                                                                   lengths=lengths, reverse=True)
            dx, (dh0, dc0), g = rnnfast.training.lstm_backward(ctx, dy, dh, dc)
        out[name] = [y, hn, cn, dx, dh0, dc0] + [g[k] for k in sorted(g)]
    for a, b_ in zip(out[be], out["reference"]):
        np.testing.assert_allclose(a, b_, rtol=1e-9, atol=1e-9)


def test_functional_backward_errors():
    x, w_ih, w_hh = np.ones((T, B, I)), np.ones((4 * H, I)), np.ones((4 * H, H))
    y, _, ctx = rnnfast.training.lstm_forward_train(x, w_ih, w_hh)
    with pytest.raises(ValueError, match="^" + re.escape(f"dy: expected shape {(T, B, H)} (like the forward's "
                                                         f"output), got {(T, B, H + 1)}")):
        rnnfast.training.lstm_backward(ctx, np.ones((T, B, H + 1)))
    with pytest.raises(ValueError, match="^" + re.escape(f"dh_n: expected shape {(B, H)}, got {(B + 1, H)}")):
        rnnfast.training.lstm_backward(ctx, y, np.ones((B + 1, H)))
    with pytest.raises(ValueError, match=r"^ctx: this context comes from lstm_forward_train, not gru_forward_train"):
        rnnfast.training.gru_backward(ctx, y)
    with pytest.raises(TypeError, match=r"^ctx: expected the context returned by lstm_forward_train, got NoneType"):
        rnnfast.training.lstm_backward(None, y)


def test_missing_training_kernels_raise_not_implemented():
    with pytest.raises(NotImplementedError):
        training._train_kernels("no-such-backend")


# ----------------------------------------------------------------------------- the example
def test_example_char_lstm_short_run():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_char_lstm.py"),
                           "--steps", "30", "--sample", "40", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.3, proc.stdout
    assert "sample:" in proc.stdout


def _prev_pairs_loop(bsz, offs, rev):
    """The step-by-step twin of _train_fast._prev_pairs (the oracle of its vectorised form)."""
    T = bsz.shape[0]
    segs, g_rows, h_rows = [], [], []

    def add(g0, y0, n):
        if n <= 0:
            return
        if segs and segs[-1][0] + segs[-1][2] == g0 and segs[-1][1] + segs[-1][2] == y0:
            segs[-1][2] += n
        else:
            segs.append([g0, y0, n])

    if not rev:
        g_rows.append(np.arange(int(bsz[0])))
        h_rows.append(np.arange(int(bsz[0])))
        for t in range(1, T):
            add(int(offs[t]), int(offs[t - 1]), int(bsz[t]))
    else:
        for t in range(T):
            nn = int(bsz[t + 1]) if t + 1 < T else 0
            add(int(offs[t]), int(offs[t + 1]), nn)
            if int(bsz[t]) > nn:
                j = np.arange(nn, int(bsz[t]))
                g_rows.append(int(offs[t]) + j)
                h_rows.append(j)
    def cat(r):
        return np.concatenate(r) if r else np.zeros(0, np.int64)

    return [tuple(s) for s in segs], cat(g_rows), cat(h_rows)


@pytest.mark.parametrize("rev", [False, True])
def test_prev_pairs_without_a_loop_over_time_matches_its_twin(rev):
    """Variable-length training pairs gradient rows with previous states without a Python
    loop over T: the same segments, in the same order, as the step-by-step twin."""
    from rnnfast import _engine
    rng = np.random.default_rng(7)
    for _ in range(300):
        T, B = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        lengths = rng.integers(0, T + 1, B)
        if rng.random() < 0.3:
            lengths[rng.integers(0, B)] = T
        if not lengths.any():
            continue
        pk = _engine.make_packing(T, B, lengths)
        bsz = np.ascontiguousarray(pk.bsz, np.int64)
        offs = np.zeros(bsz.size + 1, np.int64)
        np.cumsum(bsz, out=offs[1:])
        got, want = _train_fast._prev_pairs(bsz, offs, rev), _prev_pairs_loop(bsz, offs, rev)
        assert got[0] == want[0], (lengths, got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_prev_pairs_runs_no_python_loop_over_time():
    """The lines _prev_pairs runs do not grow with T (10,000 steps of variable lengths)."""
    import sys

    from rnnfast import _engine
    T, B = 10_000, 6
    lengths = np.array([T, T - 1, 5000, 4999, 17, 1])
    pk = _engine.make_packing(T, B, lengths)
    bsz = np.ascontiguousarray(pk.bsz, np.int64)
    offs = np.zeros(bsz.size + 1, np.int64)
    np.cumsum(bsz, out=offs[1:])
    code = _train_fast._prev_pairs.__code__
    lines = [0]

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None
        def local(frame, event, arg):
            if event == "line":
                lines[0] += 1
            return local
        return local

    for rev in (False, True):
        lines[0] = 0
        sys.settrace(tracer)
        try:
            _train_fast._prev_pairs(bsz, offs, rev)
        finally:
            sys.settrace(None)
        assert 0 < lines[0] < 100, lines[0]
