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
from rnnfast import _engine, backends

from conftest import VARIANT_IDS, VARIANTS, make_layer, ref_stack, rng_for, spy_run_layer

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


def test_scratch_views_are_reused_and_outgrown_buffers_freed():
    """scratch() hands out the same view for the same (kind, shape), and a kind outgrown
    by a larger shape lets its old buffer go. Regression: the kept views of smaller
    shapes once held every outgrown buffer (inputs of growing lengths: one buffer per
    call kept alive, 0.8 GB after 200 calls of a 4 MB-and-growing buffer)."""
    import gc
    import weakref
    first = _engine.scratch("grow-test", (1000, 64), np.float32)
    assert _engine.scratch("grow-test", (1000, 64), np.float32) is first
    small = _engine.scratch("grow-test", (10, 64), np.float32)
    assert np.shares_memory(small, first)
    gone = weakref.ref(first)
    del first, small
    bigger = _engine.scratch("grow-test", (5000, 64), np.float32)
    gc.collect()
    assert gone() is None
    again = _engine.scratch("grow-test", (1000, 64), np.float32)
    assert np.shares_memory(again, bigger)
    other = _engine.scratch("grow-test", (10, 64), np.float64)    # another dtype: its own buffer
    assert not np.shares_memory(other, bigger)


def _assert_cython_matches_reference(lay, x, lengths, dtype, nthreads=None):
    """Run `lay` on the Cython backend and compare outputs and states with the oracle."""
    want_y, want_h = ref_stack(lay, x, lengths=lengths)
    if nthreads is not None:
        rnnfast.set_num_threads(nthreads)
    with rnnfast.backend("cython"):
        got_y, got_h = lay(x, lengths=lengths)
    tol = _tol(dtype, 1.0)
    np.testing.assert_allclose(got_y, want_y, err_msg="y", **tol)
    for g, w in zip(_flat(got_h), _flat(want_h)):
        np.testing.assert_allclose(g, w, err_msg="state", **tol)


def _flat(h):
    return list(h) if isinstance(h, tuple) else [h]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("rows", [0, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recurrent_rowdot_and_packed_steps_match_reference(variant, rows, dtype, monkeypatch):
    """The step's recurrent product from packed panels (rows=0) or by rf_rowdot on the
    row-major weights with only the input weights packed (rows=100), varlen, two
    directions, against the oracle."""
    from rnnfast import _engine
    _, kind, opts = variant
    monkeypatch.setattr(_engine, "_REC_ROWDOT_ROWS", rows)
    T, B, I, H = 9, 6, 11, 40
    lay = make_layer(kind, opts, I, H, bidirectional=True, dtype=dtype, seed=12)
    rng = rng_for("recrow", kind, str(opts), rows, np.dtype(dtype).name)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    ln = rng.integers(1, T + 1, B)
    _assert_cython_matches_reference(lay, x, ln, dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_live_row_count_matches_reference(variant, dtype, monkeypatch):
    """Steps of 1 to 20 live rows (the micro-kernel's row blocks: 6-row blocks, a
    remainder of 1 or 4 taking a row from the block before: 5 + 2, 5 + 5; 7 and 8 float
    rows in one block, rf_mkh: LSTM and RNN panels in two halves, GRU's whole) from
    packed panels, each sequence one step shorter than the one before. RNN panels hold 64 float units, so
    H=70 there: a whole panel (both halves) and a partial one."""
    from rnnfast import _engine
    _, kind, opts = variant
    monkeypatch.setattr(_engine, "_REC_ROWDOT_ROWS", 0)
    T, B, I, H = 21, 20, 7, (70 if kind == "rnn" else 20)
    lay = make_layer(kind, opts, I, H, dtype=dtype, seed=14)
    rng = rng_for("liverows", kind, str(opts), np.dtype(dtype).name)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    ln = rng.permutation(np.arange(2, B + 2))
    _assert_cython_matches_reference(lay, x, ln, dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("nthreads", [2, 3, 4])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_batch_split_steps_match_reference(variant, nthreads, bidirectional, monkeypatch):
    """Threads splitting the batch rows of each step (rows k, k + P, ...; some threads run
    out of live rows first with varlen) give the reference results, with projections in
    chunks too (barriers at chunk boundaries)."""
    from rnnfast import _engine
    _, kind, opts = variant
    monkeypatch.setattr(_engine, "_BSPLIT_MIN_ROWS", 1)
    monkeypatch.setattr(_engine, "_BSPLIT_MAX_WBYTES", 1 << 40)
    monkeypatch.setattr(_engine, "_REC_ROWDOT_ROWS", 0)
    monkeypatch.setattr(_engine, "_CHUNK_ABOVE", 0)
    monkeypatch.setattr(_engine, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(_engine, "_CHUNK_MIN_ROWS", 11)
    T, B, I, H = 12, 7, 9, 24
    lay = make_layer(kind, opts, I, H, num_layers=2, bidirectional=bidirectional, dtype=np.float64, seed=13)
    rng = rng_for("bsplit", kind, str(opts), nthreads, bidirectional)
    x = rng.standard_normal((T, B, I))
    ln = rng.integers(0, T + 1, B)
    ln[2] = T
    _assert_cython_matches_reference(lay, x, ln, np.float64, nthreads)


def test_batch_split_rule(monkeypatch):
    """Which calls split the batch: >= 8 rows, recurrent weights <= 1.25 MB, 2 threads per
    direction, and not a thread's rows that leave a 1-row micro-kernel block (7 or 13 rows
    at the AVX-512 level's 6-row blocks; 4, 7 or 13 at the 3-row blocks of AVX2/SSE2)."""
    from rnnfast import _engine
    mr = backends.kernel_module("cython").build_info()["rows_per_block"]
    seen = []
    spy_run_layer(monkeypatch, lambda a, k: seen.append(k.get("batch_split")))
    monkeypatch.setattr(_engine, "_BSPLIT_MAX_WBYTES", 1280 << 10)     # the rule itself (off by default)
    rnnfast.set_num_threads(2)
    with rnnfast.backend("cython"):
        for B, H, bidir, want in ((8, 256, False, True), (7, 256, False, False), (8, 512, False, False),
                                  (8, 256, True, False), (13, 256, False, False), (14, 256, False, False),
                                  (12, 256, False, True), (16, 256, False, True), (26, 256, False, False)):
            want = want and (-(-B // 2)) % mr != 1
            seen.clear()
            lay = rnnfast.LSTM(16, H, bidirectional=bidir)
            lay(np.zeros((6, B, 16), np.float32))
            assert seen == [want], (B, H, bidir, seen)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_float32_gates_saturate_and_propagate_nan(variant, train, backend):
    """The float gates' inline exp (rf_gates.h rf_expf, clamped to [-87.3, 88.3]): gate
    pre-activations far outside that range (|x| up to ~1e3) saturate like the reference,
    and a NaN in one sequence's input makes that sequence's outputs NaN from that step on
    while the other sequences stay exact; inference and the training forward alike.
    Regression: relu RNNs turned NaN into 0 (``a > 0 ? a : 0``; np.maximum and
    torch.relu keep NaN)."""
    if backend not in rnnfast.available_backends():
        pytest.skip(f"{backend} backend not available")
    _, kind, opts = variant
    T, B, I, H = 7, 5, 6, 16
    lay = make_layer(kind, opts, I, H, dtype=np.float32, seed=21)
    rng = rng_for("saturate", kind, str(opts), train)
    x = (rng.standard_normal((T, B, I)) * 300).astype(np.float32)
    x[:, 0] *= 1e-3                                   # one sequence in the ordinary range
    want = ref_stack(lay, x.astype(np.float64))[0]

    def run(inp):
        with rnnfast.backend(backend):
            return lay.forward(inp, train=train)[0]

    got = run(x)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    xn = x.copy()
    xn[3, 2, 1] = np.nan
    got = np.asarray(run(xn))
    assert np.isnan(got[3:, 2]).all()
    ok = np.ones(B, bool)
    ok[2] = False
    np.testing.assert_allclose(got[:, ok], want[:, ok], rtol=2e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    np.testing.assert_allclose(got[:3, 2], want[:3, 2], rtol=2e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_cell_codes_are_one_definition():
    """The kernels' cell enum (kernels/rf_cells.h, compiled into cy_rnn and cy_train) has
    the values of rnnfast/cells.py, and no .pyx or C header repeats them as DEF or numbers."""
    import pathlib
    import re

    from rnnfast import cells
    from rnnfast.kernels import cy_rnn
    codes = cy_rnn.build_info()["cell_codes"]
    assert codes == {n: getattr(cells, n) for n in ("LSTM", "LSTM_PROJ", "GRU_LBR", "GRU_NOLBR", "RNN_TANH",
                                                     "RNN_RELU")}
    assert cy_rnn.build_info()["activation_codes"] == cells.ACTIVATION_CODES     # the cell variants' (rf_act)
    kdir = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if not kdir.is_dir():
        pytest.fail(f"the kernels' sources are not beside the tests ({kdir})")
    for f in [*kdir.glob("*.pyx"), *kdir.glob("*.h")]:
        text = f.read_text()
        assert not re.search(r"^DEF (LSTM|GRU|RNN)", text, re.M), f.name
        assert not re.search(r"\bcode\s*(==|<=|>=|!=|<|>)\s*\d", text), f.name


_SCALAR_MATH_CALL = r"call\s+[0-9a-f]+\s+<(rf_expf|rf_tanhf|rf_sigmoid_f)[>.@]"


def test_float_gate_math_is_inlined_in_every_built_level():
    """The float exp / tanh / sigmoid of the gate math are inlined where they are used, in
    every ISA level's built kernels: where GCC left rf_expf out of line (the variant-aware
    fused step grew past its inlining limits), each vectorised gate loop became a loop of
    scalar calls and the gate math of lstm-b64 took 2x longer; this reads the shipped code,
    as the slowdown was found (objdump of the installed modules)."""
    import glob
    import os
    import re
    import shutil
    import subprocess

    from rnnfast import kernels
    if shutil.which("objdump") is None:
        pytest.fail("objdump (binutils) is needed to read the built kernels")
    kdir = os.path.dirname(os.path.abspath(kernels.__file__))
    mods = glob.glob(os.path.join(kdir, "*", "cy_*.so")) + glob.glob(os.path.join(kdir, "cy_*.so"))
    assert mods, f"no built Cython kernels under {kdir}"
    bad = {}
    for so in mods:
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                             check=True).stdout
        calls = re.findall(_SCALAR_MATH_CALL, dis)
        if calls:
            bad[os.path.relpath(so, kdir)] = len(calls)
    assert not bad, f"out-of-line calls of the float gate math (not vectorised): {bad}"
