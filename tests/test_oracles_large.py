"""The fast backends against PyTorch (and ONNX Runtime for the GRU PyTorch lacks) at sizes
that take the kernels' large-shape paths, which the other oracle tests (H <= 6) never
reach: several weight panels per gate (and a partial last one), one and two threads
(the directions' split and the unit and batch splits within a direction), the input
projection computed a chunk of steps at a time, and a projection buffer of 16 MB or more
written with streaming stores (kernels/rf_fused_tmpl.h, rf_gemm_panels; AVX-512 builds).

The oracle is PyTorch in float64 with the rnnfast layer's own (float32) weights; the
float32 results are held to rtol 2e-5 / atol 5e-6 of it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import rnnfast
from rnnfast import _engine

from conftest import (
    FAST_BACKENDS,
    flat_states,
    make_layer,
    random_hx,
    require_oracle,
    rng_for,
    spy_run_layer,
    torch_module,
    torch_run,
)

torch = require_oracle("torch")
# after require_oracle: test_training imports torch at its top
from test_training import assert_grads_close, random_grads, rnnfast_grads, torch_grads  # noqa: E402

I = 200
T = 60
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
F32_TOL = {"rtol": 2e-5, "atol": 5e-6}
STREAM_MIN_BYTES = 16 << 20     # kernels/rf_fused.h RF_STREAM_MIN_BYTES
THREADS = (1, 2)

# (kind, B, H, T): B=1 with a partial last panel (264 = 16.5 LSTM/GRU panels, 4.1 RNN
# panels), B=8 whole panels, B=64 sized so that one direction's input projection
# (T*B rows of G*H floats) is at least STREAM_MIN_BYTES.
SIZES = [
    ("lstm", 1, 264, T), ("lstm", 8, 256, T), ("lstm", 64, 320, T),
    ("gru", 1, 264, T), ("gru", 8, 256, T), ("gru", 64, 384, T),
    ("rnn", 1, 264, T), ("rnn", 8, 256, T), ("rnn", 64, 512, 140),
]
SIZE_IDS = [f"{k}-B{b}-H{h}-T{t}" for k, b, h, t in SIZES]


def _streams(kind, B, H, T_):
    return T_ * B * GATES[kind] * H * 4 >= STREAM_MIN_BYTES


def test_stream_sizes_still_stream():
    """The B=64 sizes keep a projection buffer large enough for the streaming stores."""
    for kind, B, H, T_ in SIZES:
        if B == 64:
            assert _streams(kind, B, H, T_), (kind, B, H, T_)


def torch_twin(layer):
    """A float64 torch module carrying `layer`'s weights exactly (float32 values widened)."""
    m = torch_module(layer._kind, {}, layer.input_size, layer.hidden_size, num_layers=layer.num_layers,
                     bidirectional=layer.bidirectional, batch_first=layer.batch_first, bias=layer.bias,
                     dtype=np.float64)
    m.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in layer.state_dict().items()})
    return m


@contextlib.contextmanager
def torch_one_thread():
    """PyTorch on one thread: no idle OpenMP workers of its own spinning against the
    rnnfast threads timed next on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _oracle(layer, x, hx, lengths):
    hx64 = None if hx is None else (tuple(np.asarray(s, np.float64) for s in hx) if isinstance(hx, tuple)
                                     else np.asarray(hx, np.float64))
    with torch_one_thread():
        return torch_run(torch_twin(layer), np.asarray(x, np.float64), hx64, lengths)


def _check(layer, be, x, hx, lengths, want, threads=THREADS, tol=None):
    tol = tol or F32_TOL
    wy, wh = want
    for nt in threads:
        rnnfast.set_num_threads(nt)
        with rnnfast.backend(be):
            y, hn = layer(x, hx, lengths)
        assert y.dtype == np.float32 and y.shape == wy.shape
        np.testing.assert_allclose(y, wy, err_msg=f"y, {nt} threads", **tol)
        for i, (g, w) in enumerate(zip(flat_states(hn), flat_states(wh))):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, err_msg=f"state {i}, {nt} threads", **tol)
        if lengths is not None:     # outputs past each length are exactly zero
            for b, n in enumerate(lengths):
                assert not np.any(y[n:, b])


_ORACLES: dict = {}


def _case(kind, B, H, T_, bidirectional, varlen):
    """Layer, inputs and the torch result of one case (computed once, shared by backends)."""
    key = (kind, B, H, T_, bidirectional, varlen)
    if key not in _ORACLES:
        rng = rng_for("large", *key)
        layer = make_layer(kind, {}, I, H, num_layers=2, bidirectional=bidirectional, dtype=np.float32, seed=11)
        x = rng.standard_normal((T_, B, I)).astype(np.float32)
        hx = random_hx(layer, B, rng, dtype=np.float32)
        lengths = None
        if varlen:      # unsorted, a length 1 and T among them (PyTorch has no length 0)
            lengths = rng.integers(1, T_ + 1, B)
            lengths[0], lengths[-1] = T_, 1
        _ORACLES.clear()        # keep one case's arrays at a time
        _ORACLES[key] = (layer, x, hx, lengths, _oracle(layer, x, hx, lengths))
    return _ORACLES[key]


# the backend varies fastest, so that consecutive tests share a case's torch result
@pytest.mark.parametrize("be", FAST_BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind,B,H,T_", SIZES, ids=SIZE_IDS)
def test_two_layers_match_torch(be, kind, B, H, T_, bidirectional):
    """Two layers, initial states, float32, one and two threads."""
    layer, x, hx, lengths, want = _case(kind, B, H, T_, bidirectional, False)
    _check(layer, be, x, hx, lengths, want)


@pytest.mark.parametrize("be", FAST_BACKENDS)
@pytest.mark.parametrize("kind,H", [("lstm", 320), ("gru", 384), ("rnn", 264)])
def test_variable_lengths_match_torch(be, kind, H):
    """Unsorted lengths (1 and T among them), two bidirectional layers, B=64."""
    layer, x, hx, lengths, want = _case(kind, 64, H, T, True, True)
    _check(layer, be, x, hx, lengths, want)


# --------------------------------------------------------------------- forced Cython paths
FORCED = {
    # the input projection in chunks of 7 steps (8 chunks and a short one over T=60)
    "chunked": ({"_CHUNK_ABOVE": 0, "_CHUNK_BYTES": 1, "_CHUNK_MIN_ROWS": None}, ("chunk", 7)),
    # the threads of one direction split the batch rows instead of the units (2 threads)
    "batch-split": ({"_BSPLIT_MAX_WBYTES": 1 << 40}, ("batch_split", True)),
    # the recurrent product of few rows by rf_rowdot from the row-major weights
    "rowdot": ({"_REC_ROWDOT_ROWS": 2}, ("rec_rowdot", True)),
}


@pytest.mark.parametrize("varlen", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("path", list(FORCED))
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cython_forced_paths_match_torch(kind, path, varlen, monkeypatch):
    """The Cython engine's shape-dependent strategies, each forced on at a large H."""
    if "cython" not in FAST_BACKENDS:
        pytest.skip("the Cython backend is not under test")
    B = 2 if path == "rowdot" else 16
    bidirectional = path == "chunked"
    consts, (flag, on) = FORCED[path]
    for name, value in consts.items():
        monkeypatch.setattr(_engine, name, 7 * B if value is None else value)
    seen = []
    spy_run_layer(monkeypatch, lambda a, k: seen.append(k.get(flag)))
    layer, x, hx, lengths, want = _case(kind, B, 256, T, bidirectional, varlen)
    _check(layer, "cython", x, hx, lengths, want)
    assert seen and on in seen, f"{flag}={on} never reached the kernel: {seen}"     # the path was taken


# --------------------------------------------------------------------- GRU lbr=0 vs ORT
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_gru_no_lbr_matches_onnxruntime(be):
    """GRU linear_before_reset=False (which PyTorch lacks) against ONNX Runtime's GRU:
    bidirectional, H=384, B=64 (a streamed projection), full and variable lengths."""
    require_oracle("onnx")
    require_oracle("onnxruntime")
    from test_onnx import make_session, run_session
    B, H = 64, 384
    rng = rng_for("large-ort", be)
    layer = rnnfast.GRU(I, H, bidirectional=True, linear_before_reset=False, dtype=np.float32, seed=12)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((2, B, H))).astype(np.float32)
    lengths = rng.integers(0, T + 1, B)
    lengths[0], lengths[1], lengths[2] = T, 1, 0
    for hx, ln, sess in [(None, None, make_session(layer)),
                         (h0, lengths, make_session(layer, with_h0=True, with_seq=True))]:
        want_y, want_h = run_session(sess, layer, x, hx, ln)
        if ln is not None:      # length 0 keeps the initial state (SPEC.md); ORT gives zeros
            want_h[:, ln == 0] = h0[:, ln == 0]
        _check(layer, be, x, hx, ln, (want_y, want_h), tol={"rtol": 1e-4, "atol": 1e-5})


# --------------------------------------------------------------------- training
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_training_matches_torch_autograd(be, kind, dtype):
    """forward(train=True) + backward against torch autograd: H=256, B=32, T=40, two
    bidirectional layers, initial states, unsorted lengths; one and two threads."""
    Tt, B, H = 40, 32, 256
    rng = rng_for("large-train", be, kind, np.dtype(dtype).name)
    layer = make_layer(kind, {}, I, H, num_layers=2, bidirectional=True, dtype=dtype, seed=13)
    x = rng.standard_normal((Tt, B, I)).astype(dtype)
    hx = random_hx(layer, B, rng, dtype=dtype)
    lengths = rng.integers(1, Tt + 1, B)
    lengths[0], lengths[-1] = Tt, 1
    dy, dhx_n = random_grads(layer, x, rng)
    with torch_one_thread():
        want = torch_grads(torch_twin(layer), x, hx, lengths, dy, dhx_n)
    keys = ["y", "dx", "dh0"] + (["dc0"] if kind == "lstm" else []) + list(layer.parameters())
    for nt in THREADS:
        rnnfast.set_num_threads(nt)
        got = rnnfast_grads(layer, be, x, hx, lengths, dy.astype(dtype), dhx_n)
        assert set(layer.grads) == set(layer.state_dict())
        if dtype == np.float64:
            assert_grads_close(got, want, keys, rtol=1e-8, atol=1e-8)
            continue
        for k in keys:
            assert got[k].dtype == np.float32, k
            scale = max(1.0, float(np.abs(want[k]).max()))
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5 * scale, err_msg=f"{k}, {nt} threads")
