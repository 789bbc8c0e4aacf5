"""Property tests (hypothesis, derandomized): random shapes, stacks, directions, lengths
and options; each fast backend against the float64 reference, plus metamorphic
properties that hold for every backend."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnfast

from conftest import (
    BACKENDS,
    FAST_BACKENDS,
    VARIANTS,
    assert_result_close,
    flat_states,
    layer_kwargs,
    ref_stack,
    tol_for,
)

SETTINGS = settings(max_examples=int(__import__("os").environ.get("RNNFAST_HYPOTHESIS_EXAMPLES", "40")),
                    deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the reference backend is the oracle itself: properties are checked on the fast ones
PROP_BACKENDS = FAST_BACKENDS or BACKENDS


@st.composite
def cases(draw, max_T=9, max_B=8):
    _, kind, opts = draw(st.sampled_from(VARIANTS))
    T = draw(st.integers(0, max_T))
    B = draw(st.integers(1, max_B))
    I = draw(st.integers(1, 6))
    H = draw(st.sampled_from([1, 2, 3, 5, 8, 17]))
    L = draw(st.integers(1, 3))
    bidir = draw(st.booleans())
    bias = draw(st.booleans())
    batch_first = draw(st.booleans())
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    proj = 0
    if opts.get("proj"):
        if H < 2:
            H = 2
        proj = draw(st.integers(1, H - 1))
    unbatched = draw(st.booleans()) and B == 1
    lengths = None
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    with_hx = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return dict(kind=kind, opts=opts, T=T, B=B, I=I, H=H, L=L, bidir=bidir, bias=bias,
                batch_first=batch_first, dtype=dtype, proj=proj, unbatched=unbatched,
                lengths=lengths, with_hx=with_hx, seed=seed)


def build(c):
    kw = layer_kwargs(c["kind"], c["opts"])
    if c["proj"]:
        kw["proj_size"] = c["proj"]
    cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[c["kind"]]
    layer = cls(c["I"], c["H"], num_layers=c["L"], bias=c["bias"], batch_first=c["batch_first"],
                bidirectional=c["bidir"], dtype=c["dtype"], seed=c["seed"], **kw)
    rng = np.random.default_rng(c["seed"])
    T, B = c["T"], c["B"]
    if c["unbatched"]:
        x = rng.standard_normal((T, c["I"]))
    else:
        x = rng.standard_normal((B, T, c["I"]) if c["batch_first"] else (T, B, c["I"]))
    x = x.astype(c["dtype"])
    hx = None
    if c["with_hx"]:
        LD = c["L"] * (2 if c["bidir"] else 1)
        pre = (LD,) if c["unbatched"] else (LD, B)
        h = (0.5 * rng.standard_normal((*pre, layer.output_size))).astype(c["dtype"])
        hx = (h, (0.5 * rng.standard_normal((*pre, c["H"]))).astype(c["dtype"])) if c["kind"] == "lstm" else h
    lengths = c["lengths"]
    if lengths is not None and c["unbatched"]:
        lengths = lengths[0]
    return layer, x, hx, lengths


@pytest.mark.parametrize("be", PROP_BACKENDS)
def test_property_backend_matches_reference(be):
    @SETTINGS
    @given(cases())
    def check(c):
        layer, x, hx, lengths = build(c)
        with rnnfast.backend(be):
            got = layer(x, hx, lengths)
        want = ref_stack(layer, x, hx, lengths)
        assert_result_close(got, want, c["dtype"])
        if lengths is not None and not c["unbatched"]:
            y = got[0].transpose(1, 0, 2) if c["batch_first"] else got[0]
            for b, n in enumerate(lengths):
                assert np.all(y[n:, b] == 0)
    check()


@pytest.mark.parametrize("be", BACKENDS)
def test_property_packed_equals_each_sequence_alone(be):
    """A batch with lengths gives, for each sequence, the result of running that sequence
    alone over its valid steps (PyTorch's packed-sequence semantics)."""
    @SETTINGS
    @given(cases(max_T=7, max_B=4))
    def check(c):
        c = dict(c, unbatched=False, batch_first=False, with_hx=True,
                 lengths=c["lengths"] or [c["T"]] * c["B"])
        layer, x, hx, lengths = build(c)
        tol = tol_for(c["dtype"]) if c["dtype"] == np.float64 else dict(rtol=1e-4, atol=1e-5)
        with rnnfast.backend(be):
            y, hn = layer(x, hx, lengths)
            for b, n in enumerate(lengths):
                hb = None if hx is None else (tuple(s[:, b] for s in hx) if isinstance(hx, tuple) else hx[:, b])
                yb, hnb = layer(x[:n, b], hb)
                np.testing.assert_allclose(y[:n, b], yb, **tol)
                for s_all, s_one in zip(flat_states(hn), flat_states(hnb)):
                    np.testing.assert_allclose(s_all[:, b], s_one, **tol)
    check()


@pytest.mark.parametrize("be", BACKENDS)
def test_property_batch_permutation(be):
    """Permuting the batch (with its lengths and states) permutes the results."""
    @SETTINGS
    @given(cases(), st.randoms(use_true_random=False))
    def check(c, rnd):
        c = dict(c, unbatched=False, batch_first=False)
        layer, x, hx, lengths = build(c)
        perm = list(range(c["B"]))
        rnd.shuffle(perm)
        perm = np.array(perm)
        px = x[:, perm]
        phx = None if hx is None else (tuple(s[:, perm] for s in hx) if isinstance(hx, tuple) else hx[:, perm])
        pl = None if lengths is None else list(np.asarray(lengths)[perm])
        tol = tol_for(c["dtype"]) if c["dtype"] == np.float64 else dict(rtol=1e-4, atol=1e-5)
        with rnnfast.backend(be):
            y, hn = layer(x, hx, lengths)
            py, phn = layer(px, phx, pl)
        np.testing.assert_allclose(py, y[:, perm], **tol)
        for a, b in zip(flat_states(phn), flat_states(hn)):
            np.testing.assert_allclose(a, b[:, perm], **tol)
    check()


@pytest.mark.parametrize("be", BACKENDS)
def test_property_functional_reverse_is_flipped_forward(be):
    """Without lengths, reverse=True equals running the time-flipped input forward and
    flipping the output back."""
    @SETTINGS
    @given(st.sampled_from(VARIANTS), st.integers(1, 8), st.integers(1, 4), st.integers(1, 5),
           st.integers(1, 9), st.integers(0, 2 ** 16))
    def check(variant, T, B, I, H, seed):
        _, kind, opts = variant
        rng = np.random.default_rng(seed)
        G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
        k = 1 / np.sqrt(H)
        w_ih, w_hh = rng.uniform(-k, k, (G * H, I)), rng.uniform(-k, k, (G * H, H))
        b = rng.uniform(-k, k, G * H)
        x = rng.standard_normal((T, B, I))
        kw = {}
        if kind == "gru":
            kw["linear_before_reset"] = opts["linear_before_reset"]
        if kind == "rnn":
            kw["nonlinearity"] = opts["nonlinearity"]
        fn = getattr(rnnfast, kind)
        with rnnfast.backend(be):
            yr, hr = fn(x, w_ih, w_hh, b, b, reverse=True, **kw)
            yf, hf = fn(np.ascontiguousarray(x[::-1]), w_ih, w_hh, b, b, **kw)
        np.testing.assert_allclose(yr, yf[::-1], rtol=1e-12, atol=1e-12)
        for a, e in zip(flat_states(hr), flat_states(hf)):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)
    check()
