"""Frozen layers (fp32 / bf16 / int8) and streams: rnnfast/frozen.py, rnnfast/_lowp.py,
kernels/cy_lowp.pyx + rf_lowp.h.

Oracles: the float64 reference (accuracy bounds of SPEC Part 2), and the NumPy twin of
the low-precision products (rnnfast._lowp.lowp_matmul through reference.run_direction),
which the kernels must follow closely: the kernels quantize float32 activations where
the twin quantizes float64 ones, so a rounding may fall the other way (a few 1e-4).
"""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import rnnfast
from rnnfast import _lowp, reference

from conftest import require_oracle

require_oracle("rnnfast.kernels.cy_lowp")      # the bf16/int8 kernels: CI fails without them

LOWP = ("bf16", "int8")
BOUND = {"bf16": 1e-2, "int8": 2e-2}
TWIN_TOL = 3e-3


@pytest.fixture(params=["native", "avx512", "portable"])
def kernel_isa(request):
    """Run a test on the best kernels this CPU has (AMX where present), on the AVX-512 ones
    (the same where there is no AMX), then on the portable C kernel."""
    old = dict(_lowp._ISA)
    if request.param == "portable":
        _lowp._ISA["force_portable"] = True
    elif request.param == "avx512":
        _lowp._ISA["no_amx"] = True
    yield request.param
    _lowp._ISA.clear()
    _lowp._ISA.update(old)


# ---------------------------------------------------------------- conversions and GEMM
def test_bf16_rounds_to_nearest_even():
    above_tie = np.nextafter(np.float32(1.00390625), np.float32(2))
    x = np.array([1.0, 1.00390625, 1.01171875, above_tie, -2.5, np.inf, -np.inf, np.nan, 0.0, -0.0],
                 np.float32)
    bits = _lowp.bf16_bits(x)
    assert bits[0] == 0x3F80
    assert bits[1] == 0x3F80          # a tie goes to the even neighbour (down)
    assert bits[2] == 0x3F82          # a tie goes to the even neighbour (up)
    assert bits[3] == 0x3F81          # just above a tie rounds up
    assert bits[5] == 0x7F80 and bits[6] == 0xFF80
    assert (bits[7] & 0x7F80) == 0x7F80 and (bits[7] & 0x7F) != 0     # NaN stays NaN
    assert bits[9] == 0x8000


def test_int8_quantize_reconstructs_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 29)).astype(np.float32)
    w[3] = 0.0
    q, s = _lowp.int8_quantize(w)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    assert s[3] == 0 and not q[3].any()
    err = np.abs(q * s[:, None] - w)
    assert (err <= s[:, None] * 0.5 + 1e-7).all()
    assert (np.abs(q).max(axis=1)[np.arange(37) != 3] == 127).all()


@pytest.mark.parametrize("prec", LOWP)
@pytest.mark.parametrize("M,G,H,K", [(1, 4, 16, 64), (7, 3, 17, 37), (13, 1, 40, 130), (64, 4, 64, 256)])
def test_gemm_follows_the_twin(prec, M, G, H, K, kernel_isa):
    rng = np.random.default_rng(M * 1000 + H)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((G * H, K)) * 0.1).astype(np.float32)
    qm = _lowp.pack(prec, w, G)
    code, _ = _lowp.isa(prec)
    out = np.full((M, G * H), np.nan, np.float32)
    es = 1 if prec == "int8" else 2
    _lowp.kernels().gemm(qm, a, out, np.empty(M * qm.Kp * es, np.uint8), np.empty(M, np.float32), code)
    want = _lowp.lowp_matmul(prec, a, w)
    scale = np.abs(a).max() * np.abs(w).max() * np.sqrt(K)
    assert np.isfinite(out).all()      # every real column written, nothing past them
    np.testing.assert_allclose(out, want, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("M", [13, 45, 64])
def test_int8_kernels_agree_exactly(M):
    """vpdpbusd's and AMX's int32 sums and the portable C kernel's are the same integers
    (AMX: 16-row tiles, pairs of column blocks; the rest of the rows and an odd last
    block go to the AVX-512 kernel)."""
    k = _lowp.kernels()
    feats = k.cpu_features()
    codes = [k.PORTABLE] + ([k.AVX512] if feats["avx512_vnni"] else []) + ([k.AMX] if feats["amx_int8"] else [])
    rng = np.random.default_rng(M)
    a = rng.standard_normal((M, 300)).astype(np.float32)
    w = rng.standard_normal((3 * 33, 300)).astype(np.float32)
    qm = _lowp.pack("int8", w, 3)
    outs = []
    for code in codes:
        out = np.empty((M, 99), np.float32)
        k.gemm(qm, a, out, np.empty(M * qm.Kp, np.uint8), np.empty(M, np.float32), code)
        outs.append(out)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("M", [16, 45, 96])
def test_bf16_amx_follows_the_twin(M):
    k = _lowp.kernels()
    if not k.cpu_features()["amx_bf16"]:
        pytest.skip("this CPU has no AMX-BF16 (the other bf16 kernels are tested everywhere)")
    rng = np.random.default_rng(M)
    a = rng.standard_normal((M, 200)).astype(np.float32)
    w = rng.standard_normal((4 * 40, 200)).astype(np.float32)
    qm = _lowp.pack("bf16", w, 4)
    out = np.empty((M, 160), np.float32)
    k.gemm(qm, a, out, np.empty(M * qm.Kp * 2, np.uint8), np.empty(M, np.float32), k.AMX)
    np.testing.assert_allclose(out, _lowp.lowp_matmul("bf16", a, w), atol=1e-4 * 200, rtol=0)


# ---------------------------------------------------------------- frozen layers
def _make(kind, I, H, L=1, bidir=False, proj=0, batch_first=False, lbr=True, relu=False, seed=0):
    if kind == "lstm":
        return rnnfast.LSTM(I, H, L, bidirectional=bidir, proj_size=proj, batch_first=batch_first, seed=seed)
    if kind == "gru":
        return rnnfast.GRU(I, H, L, bidirectional=bidir, batch_first=batch_first, seed=seed,
                           linear_before_reset=lbr)
    return rnnfast.RNN(I, H, L, bidirectional=bidir, batch_first=batch_first, seed=seed,
                       nonlinearity="relu" if relu else "tanh")


def _stack(layer, x, lengths=None, matmul=None, h0=None, c0=None):
    """The layer's stack on time-major x in float64 (products by `matmul`)."""
    p = layer.parameters()
    D = layer.num_directions
    out = x.astype(np.float64)
    hs, cs = [], []
    for li in range(layer.num_layers):
        ys = []
        for d in range(D):
            sfx = f"l{li}" + ("_reverse" if d else "")
            k = li * D + d
            y, h, c = reference.run_direction(
                layer._kind, out, p[f"weight_ih_{sfx}"], p[f"weight_hh_{sfx}"], p.get(f"bias_ih_{sfx}"),
                p.get(f"bias_hh_{sfx}"), w_hr=p.get(f"weight_hr_{sfx}"), lengths=lengths, reverse=d == 1,
                h0=None if h0 is None else h0[k], c0=None if c0 is None else c0[k],
                linear_before_reset=getattr(layer, "linear_before_reset", True),
                nonlinearity=getattr(layer, "nonlinearity", "tanh"), matmul=matmul)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        out = np.concatenate(ys, axis=-1)
        if matmul is not None:
            out = out.astype(np.float32).astype(np.float64)     # the kernels' layers pass float32
    return out, np.stack(hs), (np.stack(cs) if cs[0] is not None else None)


CONFIGS = [
    dict(kind="lstm", I=24, H=32),
    dict(kind="lstm", I=20, H=40, proj=17),
    dict(kind="gru", I=16, H=48),
    dict(kind="gru", I=16, H=33, lbr=False),
    dict(kind="rnn", I=8, H=64),
    dict(kind="rnn", I=8, H=20, relu=True),
    dict(kind="lstm", I=12, H=24, L=2, bidir=True),
    dict(kind="gru", I=12, H=18, L=2, bidir=True, lbr=False),
    dict(kind="lstm", I=10, H=36, L=2, bidir=True, proj=12),
]


@pytest.mark.parametrize("prec", LOWP)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_frozen_lowp_matches_twin_and_bound(prec, cfg, with_lengths, kernel_isa):
    T, B = 9, 5
    layer = _make(**cfg)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, B, cfg["I"])).astype(np.float32)
    lengths = np.array([9, 3, 7, 1, 9]) if with_lengths else None
    LD = layer.num_layers * layer.num_directions
    h0 = (rng.standard_normal((LD, B, layer.output_size)) * 0.5).astype(np.float32)
    c0 = (rng.standard_normal((LD, B, layer.hidden_size)) * 0.5).astype(np.float32)
    hx = (h0, c0) if cfg["kind"] == "lstm" else h0
    frozen = layer.freeze(prec)
    y, hn = frozen(x, hx=hx, lengths=lengths)
    yt, ht, ct = _stack(layer, x, lengths, lambda a, w: _lowp.lowp_matmul(prec, a, w), h0,
                        c0 if cfg["kind"] == "lstm" else None)
    y64, h64, _ = _stack(layer, x, lengths, None, h0, c0 if cfg["kind"] == "lstm" else None)
    h = hn[0] if cfg["kind"] == "lstm" else hn
    assert y.dtype == np.float32 and y.shape == y64.shape
    np.testing.assert_allclose(y, yt, atol=TWIN_TOL)
    np.testing.assert_allclose(h, ht, atol=TWIN_TOL)
    if cfg["kind"] == "lstm":
        np.testing.assert_allclose(hn[1], ct, atol=TWIN_TOL * 3)
    assert np.abs(y - y64).max() <= BOUND[prec]
    assert np.abs(h - h64).max() <= BOUND[prec]
    if lengths is not None:
        assert not y[4:, 1].any() and not y[1:, 3].any()       # padding stays zero


@pytest.mark.parametrize("prec", LOWP)
def test_frozen_layouts_unbatched_and_batch_first(prec):
    layer = rnnfast.LSTM(6, 20, batch_first=True, seed=2)
    x = np.random.default_rng(0).standard_normal((3, 7, 6)).astype(np.float32)
    frozen = layer.freeze(prec)
    y, (h, _) = frozen(x)
    y64, _ = layer(x)
    assert y.shape == (3, 7, 20) and h.shape == (1, 3, 20)
    assert np.abs(y - y64).max() <= BOUND[prec]
    yu, (hu, _) = frozen(x[1])          # unbatched (T, I) of the batch_first layer: (L, I)
    assert yu.shape == (7, 20) and hu.shape == (1, 20)
    np.testing.assert_allclose(yu, y[1], atol=1e-6)


def test_frozen_fp32_equals_layer_and_holds_copies():
    layer = rnnfast.GRU(8, 16, num_layers=2, bidirectional=True, seed=1)
    x = np.random.default_rng(0).standard_normal((12, 3, 8)).astype(np.float32)
    frozen = layer.freeze()
    assert frozen.precision == "fp32"
    y0, h0 = layer(x)
    y1, h1 = frozen(x)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(h0, h1)
    layer.parameters()["weight_ih_l0"][...] = 0.0     # later changes do not reach it
    layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
    y2, _ = frozen(x)
    np.testing.assert_array_equal(y1, y2)
    assert "copy" in repr(frozen) and "fp32" in repr(frozen)


def test_frozen_fp64_and_fp32_of_a_float64_layer():
    layer = rnnfast.LSTM(5, 9, dtype=np.float64, seed=3)
    x = np.random.default_rng(0).standard_normal((6, 2, 5))
    assert layer.freeze().precision == "fp64"
    y64, _ = layer.freeze()(x)
    np.testing.assert_array_equal(y64, layer(x)[0])
    f32 = layer.freeze("fp32")
    y32, _ = f32(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, atol=1e-5)


@pytest.mark.parametrize("prec", [*LOWP, "fp32"])
@pytest.mark.parametrize("cls", ["MinGRU", "MinLSTM"])
def test_frozen_minrnn(cls, prec, kernel_isa):
    layer = getattr(rnnfast, cls)(12, 40, seed=4)
    x = np.random.default_rng(1).standard_normal((30, 4, 12)).astype(np.float32)
    lengths = np.array([30, 11, 1, 25])
    frozen = layer.freeze(prec)
    y, h = frozen(x, lengths=lengths)
    y64, h64 = layer(x.astype(np.float64).astype(np.float32), lengths=lengths)
    assert y.shape == y64.shape and h.shape == h64.shape
    assert np.abs(y - y64).max() <= (BOUND.get(prec, 1e-6))
    assert np.abs(h - h64).max() <= (BOUND.get(prec, 1e-6))


def test_frozen_errors_and_inference_only():
    layer = rnnfast.LSTM(4, 8, seed=0)
    with pytest.raises(ValueError, match="precision"):
        layer.freeze("fp16")
    frozen = layer.freeze("int8")
    x = np.zeros((3, 2, 4), np.float32)
    with pytest.raises(TypeError, match="inference-only"):
        frozen(x, train=True)
    with pytest.raises(TypeError, match="inference-only"):
        frozen.backward(np.zeros((3, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"input feature size|expected"):
        frozen(np.zeros((3, 2, 5), np.float32))
    bad = rnnfast.LSTM(4, 8, seed=0)
    bad.parameters()["weight_hh_l0"][0, 0] = np.nan
    with pytest.raises(ValueError, match="inf or NaN"):
        bad.freeze("int8")
    y, _ = bad.freeze("fp32")(np.ones((2, 1, 4), np.float32))     # fp32 keeps NaN as PyTorch does
    assert np.isnan(y).any()


def test_frozen_nonfinite_input_propagates():
    frozen = rnnfast.GRU(4, 16, seed=0).freeze("int8")
    x = np.ones((3, 2, 4), np.float32)
    x[1, 0, 2] = np.inf
    y, _ = frozen(x)
    assert np.isnan(y[1:, 0]).all() and np.isfinite(y[:, 1]).all() and np.isfinite(y[0, 0]).all()


@pytest.mark.parametrize("prec,ratio", [("int8", 0.3), ("bf16", 0.55)])
def test_frozen_weights_bytes(prec, ratio):
    layer = rnnfast.LSTM(256, 256, seed=0)
    fp32 = sum(p.nbytes for p in layer.parameters().values())
    assert layer.freeze(prec).nbytes <= ratio * fp32


@pytest.mark.parametrize("prec", ["fp32", *LOWP])
def test_frozen_pickles(prec):
    layer = rnnfast.LSTM(6, 12, proj_size=5, seed=0)
    frozen = layer.freeze(prec)
    back = pickle.loads(pickle.dumps(frozen))
    x = np.random.default_rng(0).standard_normal((5, 2, 6)).astype(np.float32)
    np.testing.assert_array_equal(back(x)[0], frozen(x)[0])
    assert back.precision == prec


def test_frozen_leaves_input_untouched():
    frozen = rnnfast.LSTM(4, 8, seed=0).freeze("bf16")
    x = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)
    h0 = np.ones((1, 2, 8), np.float32)
    c0 = np.ones((1, 2, 8), np.float32)
    keep = (x.copy(), h0.copy(), c0.copy())
    frozen(x, hx=(h0, c0), lengths=[5, 2])
    for a, b in zip((x, h0, c0), keep):
        np.testing.assert_array_equal(a, b)


def test_frozen_threads_agree():
    frozen = rnnfast.LSTM(16, 64, seed=0).freeze("int8")
    x = np.random.default_rng(0).standard_normal((20, 8, 16)).astype(np.float32)
    want = frozen(x)[0]
    outs = [None] * 4

    def run(i):
        outs[i] = frozen(x)[0]
    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for o in outs:
        np.testing.assert_array_equal(o, want)


# ---------------------------------------------------------------- streams
@pytest.mark.parametrize("prec", [None, "fp32", *LOWP])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "lstm-proj-2l", "MinGRU"])
def test_stream_equals_whole_sequence(kind, prec):
    if kind == "MinGRU":
        layer = rnnfast.MinGRU(6, 20, seed=0)
    elif kind == "lstm-proj-2l":
        layer = rnnfast.LSTM(6, 20, num_layers=2, proj_size=7, seed=0)
    else:
        layer = _make(kind, 6, 20)
    model = layer if prec is None else layer.freeze(prec)
    x = np.random.default_rng(5).standard_normal((11, 3, 6)).astype(np.float32)
    y_all, h_all = model(x)
    st = model.stream(batch=3)
    parts, t = [], 0
    for n in (1, 1, 3, 2, 1, 4):       # any split of the steps
        chunk = x[t:t + n]
        parts.append(st(chunk[0])[None] if n == 1 else st(chunk))
        t += n
    np.testing.assert_allclose(np.concatenate(parts), y_all, atol=1e-6)
    state = st.state
    if kind.startswith("lstm"):
        np.testing.assert_allclose(state[0], h_all[0], atol=1e-6)
        np.testing.assert_allclose(state[1], h_all[1], atol=1e-6)
    else:
        np.testing.assert_allclose(state, h_all, atol=1e-6)


@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_stream_reset_rows_and_errors(prec):
    layer = rnnfast.LSTM(4, 8, seed=0)
    frozen = layer.freeze(prec)
    st = frozen.stream(batch=3)
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    st(x)
    st.reset(rows=[1])
    h, c = st.state
    assert not h[:, 1].any() and not c[:, 1].any() and h[:, 0].any() and h[:, 2].any()
    y = st(x[0])
    # row 1 restarted: its output is that of a fresh sequence
    fresh, _ = frozen(x[:1, 1:2])
    np.testing.assert_allclose(y[1], fresh[0, 0], atol=1e-6)
    st.reset()
    assert not st.state[0].any()
    with pytest.raises(ValueError, match="batch of 3"):
        st(np.zeros((2, 4), np.float32))
    with pytest.raises(IndexError):
        st.reset(rows=[3])
    with pytest.raises(ValueError, match="bidirectional"):
        rnnfast.GRU(4, 8, bidirectional=True).stream(batch=1)
    with pytest.raises(ValueError):
        layer.stream(batch=0)


def test_stream_refuses_two_threads_at_once():
    st = rnnfast.GRU(4, 8, seed=0).stream(batch=1)
    st._lock.acquire()          # another thread in the middle of a call
    try:
        with pytest.raises(RuntimeError, match="two threads"):
            st(np.zeros((1, 4), np.float32))
    finally:
        st._lock.release()
    st(np.zeros((1, 4), np.float32))


def test_unfrozen_stream_sees_weight_updates():
    layer = rnnfast.RNN(3, 5, seed=0)
    st = layer.stream(batch=1)
    x = np.ones((1, 3), np.float32)
    a = st(x)
    st.reset()
    layer.parameters()["weight_ih_l0"][...] *= 2
    b = st(x)
    assert not np.allclose(a, b)


# ---------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("prec", LOWP)
def test_frozen_against_torch_fp32(prec):
    torch = require_oracle("torch")
    torch.manual_seed(0)
    m = torch.nn.LSTM(64, 128, num_layers=2, proj_size=48)
    layer = rnnfast.from_torch(m)
    x = np.random.default_rng(0).standard_normal((200, 8, 64)).astype(np.float32)
    with torch.no_grad():
        yt, (ht, ct) = m(torch.from_numpy(x))
    y, (h, c) = layer.freeze(prec)(x)
    assert np.abs(y - yt.numpy()).max() <= BOUND[prec]
    assert np.abs(h - ht.numpy()).max() <= BOUND[prec]
    assert np.abs(c - ct.numpy()).max() <= 2 * BOUND[prec]


@pytest.mark.parametrize("prec", LOWP)
def test_lowp_stream_threads_and_state_roundtrip(prec):
    """A bf16/int8 stream on 1 and 2 threads (its one-thread rule aside), its state read and
    carried through a multi-step call, equals the whole sequence."""
    layer = rnnfast.GRU(16, 160, num_layers=2, seed=3)      # weights past the one-thread bound
    frozen = layer.freeze(prec)
    x = np.random.default_rng(2).standard_normal((8, 2, 16)).astype(np.float32)
    want, h_all = frozen(x)
    before = rnnfast.get_num_threads()
    for n in (1, 2):
        rnnfast.set_num_threads(n)
        try:
            st = frozen.stream(batch=2)
            ys = [st(x[t]) for t in range(3)]
            _ = st.state                           # reading it changes nothing
            ys += list(st(x[3:6]))
            ys += [st(x[t]) for t in range(6, 8)]
        finally:
            rnnfast.set_num_threads(before)
        np.testing.assert_allclose(np.stack(ys), want, atol=1e-6)
        np.testing.assert_allclose(st.state, h_all, atol=1e-6)
