"""Code paths of the Cython layer kernel (rnnfast.kernels.cy_rnn) that only large
shapes reach, against the float64 reference:

- input projections of 16 MB or more are written with streaming stores
  (rf_fused_tmpl.h, RF_STREAM_MIN_BYTES), which need 64-byte aligned scratch;
- a thread's slice of packed weights above 1 MB is prefetched panel by panel
  (RF_L2_KEEP_BYTES);
- the projection GEMM walks the rows in chunks of about 1 MB of inputs.
"""
from __future__ import annotations

import numpy as np
import pytest

import rnnfast
from rnnfast import _engine

from conftest import VARIANT_IDS, VARIANTS, make_layer, ref_stack, rng_for  # noqa: E402

pytestmark = pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")

# (T, B, I, H): projection T*B*G*H*itemsize >= 16 MB for LSTM/GRU in float32, weight slice
# (G*H*H*itemsize per thread) above 1 MB, and B not a multiple of the 6-row block.
LARGE = (40, 103, 200, 400)


def _tol(dtype, scale):
    if np.dtype(dtype) == np.float64:
        return dict(rtol=1e-9, atol=1e-10 * scale)
    return dict(rtol=2e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_large_shapes_match_reference(variant, dtype, nthreads):
    _, kind, opts = variant
    T, B, I, H = LARGE
    if kind == "rnn":
        B = 4 * B + 1       # G = 1: more rows to reach the streaming-store size
    lay = make_layer(kind, opts, I, H, dtype=dtype, seed=3)
    rng = rng_for("cy-large", kind, str(opts), np.dtype(dtype).name)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    want_y, want_h = ref_stack(lay, x)
    rnnfast.set_num_threads(nthreads)
    with rnnfast.backend("cython"):
        got_y, got_h = lay(x)
    tol = _tol(dtype, 1.0)
    np.testing.assert_allclose(got_y, want_y, err_msg="y", **tol)
    for g, w in zip(_flat(got_h), _flat(want_h)):
        np.testing.assert_allclose(g, w, err_msg="state", **tol)


def test_large_varlen_bidirectional():
    """Streaming stores and prefetch with packed rows of different lengths, both directions."""
    T, B, I, H = 48, 96, 160, 384
    lay = make_layer("lstm", {}, I, H, bidirectional=True, dtype=np.float32, seed=5)
    rng = rng_for("cy-large-varlen")
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    want_y, (wh, wc) = ref_stack(lay, x, lengths=lengths)
    with rnnfast.backend("cython"):
        got_y, (gh, gc) = lay(x, lengths=lengths)
    tol = _tol(np.float32, 1.0)
    np.testing.assert_allclose(got_y, want_y, **tol)
    np.testing.assert_allclose(gh, wh, **tol)
    np.testing.assert_allclose(gc, wc, **tol)


def test_scratch_is_cache_line_aligned():
    for n in (1, 7, 1000, 123457):
        for dt in (np.float32, np.float64):
            a = _engine.scratch(f"align-test-{n}", (n,), dt)
            assert a.ctypes.data % 64 == 0
            assert a.dtype == np.dtype(dt) and a.shape == (n,)


def _flat(h):
    return list(h) if isinstance(h, tuple) else [h]
