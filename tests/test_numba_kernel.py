"""The Numba layer kernel (rnnfast.kernels.numba_rnn) against the float64 reference,
against the Cython kernel, across thread counts and from several Python threads."""
from __future__ import annotations

import itertools
import os
import threading

import numpy as np
import pytest

import rnnfast
from rnnfast import _engine, reference
from rnnfast.cells import cell_code

pytestmark = pytest.mark.skipif("numba" not in rnnfast.available_backends(), reason="numba not installed")

from conftest import F32_TOL, GATES, VARIANT_IDS, VARIANTS, lengths_case, rng_for  # noqa: E402

F64_TOL = dict(rtol=1e-10, atol=1e-10)
LENGTHS = ["none", "unsorted", "with-zero", "short"]
DTYPES = [np.float32, np.float64]


@pytest.fixture
def nb():
    from rnnfast.kernels import numba_rnn
    return numba_rnn


@pytest.fixture(params=["serial", "parallel"])
def gate_mode(request, nb, monkeypatch):
    """Run the gate pass serially (the default for small shapes) or force the prange pass."""
    if request.param == "parallel":
        monkeypatch.setattr(nb, "_SERIAL_WORK", 0)
        rnnfast.set_num_threads(2)
    return request.param


def tol(dtype):
    return F64_TOL if np.dtype(dtype) == np.float64 else F32_TOL


def code_of(kind, opts):
    return cell_code(kind, proj=bool(opts.get("proj")),
                     linear_before_reset=opts.get("linear_before_reset", True),
                     nonlinearity=opts.get("nonlinearity", "tanh"))


def make_dir(kind, opts, rng, dtype, I, H, bias=True):
    """Weights of one direction: a dict of float64 arrays, and H_out."""
    G = GATES[kind]
    Hout = max(1, H // 2) if opts.get("proj") else H
    k = 1 / np.sqrt(H)
    w = {"w_ih": rng.uniform(-k, k, (G * H, I)), "w_hh": rng.uniform(-k, k, (G * H, Hout)),
         "b_ih": rng.uniform(-k, k, G * H) if bias else None,
         "b_hh": rng.uniform(-k, k, G * H) if bias else None,
         "w_hr": rng.uniform(-k, k, (Hout, H)) if opts.get("proj") else None}
    return {n: (None if a is None else a.astype(dtype)) for n, a in w.items()}, Hout


def ref_dir(kind, opts, x, w, h0, c0, lengths, reverse):
    f = {n: (None if a is None else np.asarray(a, np.float64)) for n, a in w.items()}
    return reference.run_direction(
        kind, np.asarray(x, np.float64), f["w_ih"], f["w_hh"], f["b_ih"], f["b_hh"],
        h0=np.asarray(h0, np.float64), c0=None if c0 is None else np.asarray(c0, np.float64),
        w_hr=f["w_hr"], lengths=lengths, reverse=reverse,
        linear_before_reset=opts.get("linear_before_reset", True),
        nonlinearity=opts.get("nonlinearity", "tanh"))


def functional(kind, opts, x, w, h0, c0, lengths, reverse):
    kw = dict(h0=h0, lengths=lengths, reverse=reverse)
    if kind == "lstm":
        y, (h, c) = rnnfast.lstm(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], c0=c0, w_hr=w["w_hr"], **kw)
        return y, h, c
    if kind == "gru":
        y, h = rnnfast.gru(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"],
                           linear_before_reset=opts["linear_before_reset"], **kw)
        return y, h, None
    y, h = rnnfast.rnn(x, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], nonlinearity=opts["nonlinearity"], **kw)
    return y, h, None


def check(got, want, dtype):
    for g, w, name in zip(got, want, ("y", "h_n", "c_n")):
        if w is None:
            assert g is None
            continue
        assert g.dtype == np.dtype(dtype), name
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, err_msg=name, **tol(dtype))


# ------------------------------------------------------------------ functional API, one direction
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths_name", LENGTHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("api", ["functional", "engine"])
def test_one_direction_vs_reference(variant, dtype, reverse, lengths_name, bias, gate_mode, api):
    """One direction through the public functional API (states (B, H) as in SPEC.md) and
    through ``_engine.run_stack`` directly."""
    _, kind, opts = variant
    T, B, I, H = 7, 5, 4, 21          # H not a multiple of the 16-unit block
    rng = rng_for("nbfunc", variant[0], np.dtype(dtype).name, reverse, lengths_name, bias)
    w, Hout = make_dir(kind, opts, rng, dtype, I, H, bias)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((B, Hout))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((B, H))).astype(dtype) if kind == "lstm" else None
    lengths = lengths_case(lengths_name, T, B)
    if api == "functional":
        with rnnfast.backend("numba"):
            got = functional(kind, opts, x, w, h0, c0, lengths, reverse)
    else:
        y, hn, cn = run_engine(kind, opts, x, [[w]], h0[None], None if c0 is None else c0[None],
                               lengths, reverse)
        got = (y, hn[0], None if cn is None else cn[0])
    want = ref_dir(kind, opts, x, w, h0, c0, lengths, reverse)
    check(got, want, dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_larger_shapes(variant, dtype):
    """Shapes above the serial threshold: the prange pass with several unit slices per row."""
    _, kind, opts = variant
    T, B, I, H = 6, 19, 9, 150
    rng = rng_for("nbbig", variant[0], np.dtype(dtype).name)
    w, Hout = make_dir(kind, opts, rng, dtype, I, H)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((B, Hout))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((B, H))).astype(dtype) if kind == "lstm" else None
    lengths = np.array([6, 1, 5, 0, 6, 2, 3, 6, 4, 4, 1, 6, 5, 2, 3, 6, 6, 0, 5])
    rnnfast.set_num_threads(2)
    for lens in (None, lengths):
        for reverse in (False, True):
            y, hn, cn = run_engine(kind, opts, x, [[w]], h0[None], None if c0 is None else c0[None],
                                   lens, reverse)
            got = (y, hn[0], None if cn is None else cn[0])
            check(got, ref_dir(kind, opts, x, w, h0, c0, lens, reverse), dtype)


# ------------------------------------------------------------------ two directions through the engine
def run_engine(kind, opts, x, dirs, h0, c0, lengths, rev0, backend="numba"):
    dws = [[_engine.DirWeights(w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_hr"]) for w in layer]
           for layer in dirs]
    with rnnfast.backend(backend):
        return _engine.run_stack(kind, code_of(kind, opts), x, dws, h0, c0, lengths, rev0=rev0)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("rev0", [False, True], ids=["fwd-rev", "rev-rev"])
@pytest.mark.parametrize("lengths_name", LENGTHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_two_directions_vs_reference(variant, dtype, rev0, lengths_name, bias, gate_mode):
    _, kind, opts = variant
    T, B, I, H = 6, 5, 3, 18
    rng = rng_for("nbbidir", variant[0], np.dtype(dtype).name, rev0, lengths_name, bias)
    (w0, Hout), (w1, _) = (make_dir(kind, opts, rng, dtype, I, H, bias) for _ in range(2))
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((2, B, Hout))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((2, B, H))).astype(dtype) if kind == "lstm" else None
    lengths = lengths_case(lengths_name, T, B)
    y, hn, cn = run_engine(kind, opts, x, [[w0, w1]], h0, c0, lengths, rev0)
    for d, (w, rev) in enumerate(((w0, rev0), (w1, True))):
        want = ref_dir(kind, opts, x, w, h0[d], None if c0 is None else c0[d], lengths, rev)
        got = (y[..., d * Hout:(d + 1) * Hout], hn[d], None if cn is None else cn[d])
        check(got, want, dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_two_layers_two_directions(variant, dtype):
    """Layer 2 reads layer 1's (writable) output: exercises the read-only view wrapper."""
    _, kind, opts = variant
    T, B, I, H = 5, 4, 3, 10
    rng = rng_for("nb2l", variant[0], np.dtype(dtype).name)
    l0 = [make_dir(kind, opts, rng, dtype, I, H)[0] for _ in range(2)]
    Hout = l0[0]["w_hh"].shape[1]
    l1 = [make_dir(kind, opts, rng, dtype, 2 * Hout, H)[0] for _ in range(2)]
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((4, B, Hout))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((4, B, H))).astype(dtype) if kind == "lstm" else None
    lengths = np.array([5, 0, 2, 4])
    y, hn, cn = run_engine(kind, opts, x, [l0, l1], h0, c0, lengths, False)
    inp = x
    for li, layer in enumerate((l0, l1)):
        outs = []
        for d, w in enumerate(layer):
            k = 2 * li + d
            yr, hr, cr = ref_dir(kind, opts, inp, w, h0[k], None if c0 is None else c0[k], lengths, bool(d))
            outs.append(yr)
            np.testing.assert_allclose(hn[k], hr, **tol(dtype))
            if cn is not None:
                np.testing.assert_allclose(cn[k], cr, **tol(dtype))
        inp = np.concatenate(outs, axis=-1)
    np.testing.assert_allclose(y, inp, **tol(dtype))


# ------------------------------------------------------------------ numba vs cython, threads
def _random_case(variant, dtype, seed, T=9, B=6, I=5, H=40):
    _, kind, opts = variant
    rng = rng_for("nbcase", variant[0], np.dtype(dtype).name, seed)
    dirs = [make_dir(kind, opts, rng, dtype, I, H)[0] for _ in range(2)]
    Hout = dirs[0]["w_hh"].shape[1]
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((2, B, Hout))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((2, B, H))).astype(dtype) if kind == "lstm" else None
    lengths = rng.integers(0, T + 1, B)
    lengths[:3] = [T, 0, 1][:B]
    return kind, opts, x, dirs, h0, c0, lengths


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("rev0", [False, True], ids=["fwd-rev", "rev-rev"])
def test_numba_matches_cython(variant, dtype, rev0):
    kind, opts, x, dirs, h0, c0, lengths = _random_case(variant, dtype, 1)
    for lens in (None, lengths):
        a = run_engine(kind, opts, x, [dirs], h0, c0, lens, rev0, "numba")
        b = run_engine(kind, opts, x, [dirs], h0, c0, lens, rev0, "cython")
        t = dict(rtol=1e-12, atol=1e-12) if np.dtype(dtype) == np.float64 else dict(rtol=1e-5, atol=1e-6)
        for g, w in zip(a, b):
            if w is None:
                assert g is None
            else:
                np.testing.assert_allclose(g, w, **t)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", ["small", "large"])
def test_same_results_one_and_two_threads(variant, dtype, shape):
    T, B, I, H = (9, 6, 5, 40) if shape == "small" else (5, 6, 16, 300)
    kind, opts, x, dirs, h0, c0, lengths = _random_case(variant, dtype, 2, T, B, I, H)
    res = []
    for n in (1, 2):
        rnnfast.set_num_threads(n)
        res.append(run_engine(kind, opts, x, [dirs], h0, c0, lengths, False))
    for g, w in zip(*res):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, w)


def test_concurrent_calls_from_python_threads():
    """8 Python threads calling the numba kernel at once get the results of serial calls."""
    variant = VARIANTS[0]
    cases = [_random_case(variant, np.float32, s, T=12, B=8, I=16, H=64) for s in range(8)]
    rnnfast.set_num_threads(2)
    def run(c):
        kind, opts, x, dirs, h0, c0, lengths = c
        return run_engine(kind, opts, x, [dirs], h0, c0, lengths, False)

    want = [run(c) for c in cases]
    got = [None] * len(cases)
    errors = []
    barrier = threading.Barrier(len(cases))

    def work(i):
        try:
            barrier.wait()
            for _ in range(5):
                got[i] = run(cases[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            if b is not None:
                np.testing.assert_array_equal(a, b)


_WORKQUEUE_CHILD = """
import threading
import numba
numba.config.THREADING_LAYER = "workqueue"     # the user's choice, made before rnnfast loads
import numpy as np
import rnnfast
from rnnfast.kernels import numba_rnn, numba_scan, numba_train  # noqa: F401
assert numba.config.THREADING_LAYER == "workqueue", numba.config.THREADING_LAYER
rnnfast.set_num_threads(2)
lay = rnnfast.GRU(16, 64, seed=0)
x = np.random.default_rng(0).standard_normal((40, 8, 16)).astype(np.float32)
with rnnfast.backend("reference"):
    want = lay(x)[0]
out = {}
def work(i):
    with rnnfast.backend("numba"):
        for _ in range(5):
            out[i] = lay(x)[0]
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
assert numba.threading_layer() == "workqueue"
for y in out.values():
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
print("ok", len(out))
"""


def test_threading_layer_left_to_the_user(nb):
    """Importing the Numba kernels keeps the threading layer the user chose, and under
    Numba's workqueue layer (not safe for parallel launches from several threads) calls
    from four Python threads at once take turns and stay correct."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    r = subprocess.run([sys.executable, "-c", _WORKQUEUE_CHILD], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", "4"]


def test_numba_thread_count_of_the_caller_restored(nb):
    """A kernel call sets Numba's thread count for itself and gives the calling thread
    its own count back."""
    import numba
    kind, opts, x, dirs, h0, c0, lengths = _random_case(VARIANTS[0], np.float32, 3, H=300)
    prev = rnnfast.get_num_threads()
    numba.set_num_threads(1)
    try:
        rnnfast.set_num_threads(2)
        run_engine(kind, opts, x, [dirs], h0, c0, lengths, False)
        assert numba.get_num_threads() == 1
    finally:
        rnnfast.set_num_threads(prev)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_readonly_inputs_and_no_input_modification():
    kind, opts, x, dirs, h0, c0, lengths = _random_case(VARIANTS[0], np.float32, 4)
    want = run_engine(kind, opts, x, [dirs], h0, c0, lengths, False)
    arrays = [x, h0, c0, *[a for w in dirs for a in w.values() if a is not None]]
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    got = run_engine(kind, opts, x, [dirs], h0, c0, lengths, False)
    for a, b in zip(arrays, copies):
        np.testing.assert_array_equal(a, b)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_run_layer_signature_matches_cython(nb):
    """Same positional parameters as the Cython kernel (introspected from its docstring
    when the extension exposes no signature)."""
    import inspect
    params = list(inspect.signature(nb.run_layer).parameters)
    assert params[:22] == ["code", "x", "bsz", "w_ih0", "w_hh0", "bx0", "bh0", "w_hr0", "w_ih1", "w_hh1",
                           "bx1", "bh1", "w_hr1", "ndir", "rev0", "xg", "hbuf", "cst", "y", "hg", "s2",
                           "nthreads"]


def test_pieces_grow_to_the_time_target():
    from rnnfast.kernels.numba_common import interruptible_pieces, next_piece
    assert next_piece(10, 10, 0.008) == 40          # at most 4x
    assert next_piece(100, 100, 0.16) == 50         # halved when twice too long
    assert next_piece(5, 5, 0.0) == 20
    assert next_piece(1, 1, 10.0) == 1
    pieces = list(interruptible_pieces(1000, 1e8))   # 2 steps first; instant pieces grow 4x
    assert pieces[0] == (0, 2) and pieces[1] == (2, 10) and pieces[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
