"""Backend selection (rnnfast.backends): names, defaults, scoping, dispatch, agreement,
and that ``import rnnfast`` stays light."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import rnnfast
from rnnfast import backends as _backends

from conftest import (
    ALL_BACKENDS,
    BACKENDS,
    F32_TOL,
    FAST_BACKENDS,
    VARIANT_IDS,
    VARIANTS,
    assert_result_close,
    flat_states,
    make_layer,
    random_hx,
    ref_stack,
    rng_for,
)

# the directory holding the rnnfast package under test, so a subprocess imports the same one
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(rnnfast.__file__)))


def _run_python(code: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in [PKG_PARENT, env.get("PYTHONPATH", "")] if p])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_does_not_load_numba_kernels_or_torch():
    out = _run_python(
        "import sys, rnnfast; "
        "print('numba' in sys.modules, 'rnnfast.kernels' in sys.modules, "
        "any(m.startswith('rnnfast.kernels.') for m in sys.modules), 'torch' in sys.modules)")
    assert out == "False False False False", out


def test_inference_never_imports_torch():
    out = _run_python(
        "import sys, numpy as np, rnnfast\n"
        f"for b in {BACKENDS!r}:\n"
        "    with rnnfast.backend(b):\n"
        "        rnnfast.LSTM(3, 4, seed=0)(np.ones((5, 2, 3), np.float32))\n"
        "print('torch' in sys.modules)")
    assert out == "False", out


def test_default_backend_is_auto_in_a_fresh_process():
    assert _run_python("import rnnfast; print(rnnfast.get_backend())") == "auto"


def test_available_backends():
    names = rnnfast.available_backends()
    assert isinstance(names, list)
    assert "reference" in names
    assert set(names) <= {"cython", "numba", "reference"}
    names.append("bogus")                        # a copy: the module's list is not touched
    assert "bogus" not in rnnfast.available_backends()


def test_set_and_get_backend():
    assert rnnfast.get_backend() == "auto"      # the autouse fixture restores it after each test
    for name in ALL_BACKENDS:
        rnnfast.set_backend(name)
        assert rnnfast.get_backend() == name
    rnnfast.set_backend("auto")
    assert rnnfast.get_backend() == "auto"


def test_backend_context_manager_restores():
    rnnfast.set_backend("reference")
    with rnnfast.backend(BACKENDS[0]) as name:
        assert name == BACKENDS[0]
        assert rnnfast.get_backend() == BACKENDS[0]
        with rnnfast.backend("auto"):
            assert rnnfast.get_backend() == "auto"
        assert rnnfast.get_backend() == BACKENDS[0]
    assert rnnfast.get_backend() == "reference"
    with pytest.raises(RuntimeError):
        with rnnfast.backend(BACKENDS[0]):
            raise RuntimeError("boom")
    assert rnnfast.get_backend() == "reference"
    with pytest.raises(ValueError):
        with rnnfast.backend("nope"):
            pass
    assert rnnfast.get_backend() == "reference"


def test_backend_scope_does_not_leak_to_other_threads():
    rnnfast.set_backend("auto")
    seen = []
    with rnnfast.backend("reference"):
        t = threading.Thread(target=lambda: seen.append(rnnfast.get_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]
    # set_backend is process-wide
    rnnfast.set_backend("reference")
    t = threading.Thread(target=lambda: seen.append(rnnfast.get_backend()))
    t.start()
    t.join()
    assert seen[-1] == "reference"


def _spy(monkeypatch):
    """Record which backend runs each call: kernel module names, or 'reference'."""
    from rnnfast import reference
    calls = []
    orig_kernel = _backends.kernel_module
    orig_ref = reference.run_direction

    def kernel_module(name):
        calls.append(name)
        return orig_kernel(name)

    def run_direction(*a, **k):
        calls.append("reference")
        return orig_ref(*a, **k)

    monkeypatch.setattr(_backends, "kernel_module", kernel_module)
    monkeypatch.setattr(reference, "run_direction", run_direction)
    return calls


@pytest.mark.parametrize("be", BACKENDS)
def test_selected_backend_is_the_one_that_runs(be, monkeypatch):
    calls = _spy(monkeypatch)
    layer = rnnfast.GRU(3, 5, num_layers=2, bidirectional=True, seed=0)
    x = np.ones((4, 2, 3), np.float32)
    with rnnfast.backend(be):
        layer(x)
        rnnfast.lstm(x, np.ones((8, 3)), np.ones((8, 2)))
    assert calls and set(calls) == {be}, calls
    calls.clear()
    rnnfast.set_backend(be)
    layer(x, lengths=[4, 1])
    assert calls and set(calls) == {be}, calls


def test_auto_is_a_fixed_choice(monkeypatch):
    """'auto' takes the same path every time for the same call (no run-time timing)."""
    calls = _spy(monkeypatch)
    rng = rng_for("auto-fixed")
    for kind, shape_h, dtype in [("lstm", 5, np.float32), ("gru", 40, np.float64), ("rnn", 3, np.float32)]:
        layer = make_layer(kind, {}, 3, shape_h, num_layers=2, dtype=dtype)
        x = rng.standard_normal((6, 3, 3))
        paths, results = [], []
        for _ in range(4):
            calls.clear()
            results.append(layer(x)[0])
            paths.append(tuple(calls))
        assert len(set(paths)) == 1, paths
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])
        assert set(paths[0]) <= set(rnnfast.available_backends())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_all_backends_agree(variant, dtype):
    """Every backend (and auto) gives the same result within the contract's tolerance:
    float64 1e-9 between backends; float32 rtol 1e-5 atol 1e-6 against the float64 reference."""
    _, kind, opts = variant
    rng = rng_for("agree", kind, repr(opts), np.dtype(dtype).name)
    layer = make_layer(kind, opts, 5, 20, num_layers=2, bidirectional=True, dtype=dtype, seed=7)
    x = rng.standard_normal((8, 5, 5)).astype(dtype)
    hx = random_hx(layer, 5, rng, dtype)
    ln = np.array([8, 3, 1, 0, 6])
    want = ref_stack(layer, x, hx, ln)
    results = {}
    for be in ALL_BACKENDS:
        with rnnfast.backend(be):
            results[be] = layer(x, hx, ln)
        assert_result_close(results[be], want, dtype)
    if dtype == np.float64:
        first = results[ALL_BACKENDS[0]]
        for r in results.values():
            np.testing.assert_allclose(r[0], first[0], rtol=1e-9, atol=1e-9)
            for a, b in zip(flat_states(r[1]), flat_states(first[1])):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_fast_backend_float32_large_hidden(be):
    """A hidden size spanning several unit blocks (and an odd one) in float32, against the
    float64 reference with the contract's tolerance."""
    rng = rng_for("f32-large", be)
    for kind, opts in [("lstm", {}), ("lstm", {"proj": True}), ("gru", {"linear_before_reset": False}),
                       ("gru", {}), ("rnn", {"nonlinearity": "tanh"})]:
        for H in (33, 64):
            layer = make_layer(kind, opts, 7, H, num_layers=1, bidirectional=True, dtype=np.float32, seed=H)
            x = rng.standard_normal((9, 4, 7)).astype(np.float32)
            ln = np.array([9, 4, 1, 7])
            with rnnfast.backend(be):
                got = layer(x, None, ln)
            assert_result_close(got, ref_stack(layer, x, None, ln), np.float32, **F32_TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_fast_backend_wider_batches_and_hidden(be, variant, dtype):
    """Batches wider than a micro-kernel row block (live batch shrinking across block
    boundaries as sequences end) and hidden sizes over several panels with a remainder,
    on sequences long enough for the packed-weights path."""
    _, kind, opts = variant
    rng = rng_for("wide", be, kind, repr(opts), np.dtype(dtype).name)
    for B, H, ln in [(7, 37, [9, 9, 8, 1, 7, 6, 9]), (13, 70, None),
                     (13, 21, [9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 4, 6])]:
        layer = make_layer(kind, opts, 6, H, num_layers=2, bidirectional=True, dtype=dtype, seed=H)
        x = rng.standard_normal((9, B, 6)).astype(dtype)
        hx = random_hx(layer, B, rng, dtype)
        ln = None if ln is None else np.array(ln)
        with rnnfast.backend(be):
            got = layer(x, hx, ln)
        assert_result_close(got, ref_stack(layer, x, hx, ln), dtype)


@pytest.mark.parametrize("be", BACKENDS)
def test_padding_never_read(be):
    """Steps past a sequence's length are never computed: NaN there changes nothing."""
    rng = rng_for("nan-pad", be)
    for _, kind, opts in VARIANTS:
        for dtype in (np.float32, np.float64):
            for batch_first in (False, True):
                layer = make_layer(kind, opts, 3, 20, num_layers=2, bidirectional=True, dtype=dtype,
                                   batch_first=batch_first, seed=1)
                ln = np.array([6, 5, 0, 3, 2, 1, 6])
                x = rng.standard_normal((6, 7, 3)).astype(dtype)
                xn = x.copy()
                for b, n in enumerate(ln):
                    xn[n:, b] = np.nan
                if batch_first:
                    x, xn = x.transpose(1, 0, 2), xn.transpose(1, 0, 2)
                with rnnfast.backend(be):
                    a = layer(x, None, ln)
                    b_ = layer(xn, None, ln)
                for u, v in zip([a[0], *flat_states(a[1])], [b_[0], *flat_states(b_[1])]):
                    np.testing.assert_array_equal(u, v, err_msg=f"{kind} {opts} {np.dtype(dtype).name}")


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_saturated_gates_stay_finite(be):
    """Huge pre-activations saturate the gates (sigmoid -> 0/1, tanh -> +-1) without NaN or
    inf, as in the reference."""
    rng = rng_for("saturate", be)
    for _, kind, opts in VARIANTS:
        if opts.get("nonlinearity") == "relu":
            continue
        for dtype in (np.float32, np.float64):
            for scale in (1e2, 1e4, 1e30):
                layer = make_layer(kind, opts, 3, 20, num_layers=2, bidirectional=True, dtype=dtype, seed=1)
                x = (scale * rng.standard_normal((6, 7, 3))).astype(dtype)
                ln = [6, 5, 4, 3, 2, 1, 6]
                with rnnfast.backend(be):
                    y, _hn = layer(x, None, ln)
                wy, _wh = ref_stack(layer, x, None, ln)
                assert np.all(np.isfinite(y))
                np.testing.assert_allclose(y, wy, rtol=1e-5, atol=1e-5, err_msg=f"{kind} {opts} {scale}")


# A meta-path finder that makes the Cython kernels missing (MODE "missing") or present
# but failing to import (MODE "broken"), as after a failed or partial build.
_CYTHON_GONE = '''
import importlib.abc, importlib.machinery, sys
MODE = {mode!r}
class Gone(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("rnnfast.kernels.") and name.rsplit(".", 1)[1].startswith("cy_"):
            if MODE == "missing":
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError("undefined symbol: GOMP_parallel (a broken build)")
import numpy as np, rnnfast
import rnnfast.kernels                  # its own finder first, then this one before it
sys.meta_path.insert(0, Gone())
from rnnfast import backends
avail = rnnfast.available_backends()
assert "cython" not in avail and "reference" in avail, avail
why = backends.unavailable_backends()["cython"]
assert ("does not import" in why) == (MODE == "broken"), why
x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)
lay = rnnfast.LSTM(3, 4, seed=0)
with rnnfast.backend("reference"):
    want = lay(x)[0]
    one = lay(x[:1])[0]
for name in [b for b in avail if b != "reference"] + ["auto"]:
    with rnnfast.backend(name):
        np.testing.assert_allclose(lay(x)[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lay(x[:1])[0], one, rtol=1e-5, atol=1e-6)
with rnnfast.backend("reference"):
    np.testing.assert_array_equal(lay(x[:1])[0], one)
try:
    rnnfast.set_backend("cython")
except ValueError as e:
    assert "not available" in str(e)
else:
    raise AssertionError("cython accepted")
print("ok")
'''


@pytest.mark.parametrize("mode", ["missing", "broken"])
def test_layers_without_the_cython_kernels(mode):
    """Regressions: a single-layer call needed the Cython kernel even under the "numba"
    or "reference" backend (the serving plan was built before the backend was checked:
    ModuleNotFoundError on every call without it), and a kernel module that exists but
    does not import was listed by available_backends() and chosen by "auto", so every
    layer call failed. Now such a backend is unavailable (with its reason) and every other
    backend, "auto" included, runs single-layer calls and served tokens."""
    assert _run_python(_CYTHON_GONE.format(mode=mode)) == "ok"


def test_sizes_past_the_cython_kernels_32_bit_counts(monkeypatch):
    """The Cython kernels count rows and sizes in C ints: a call past that is a clear
    ValueError under backend("cython") before any kernel runs, and runs on the Numba backend under
    "auto"; the packed weights' size is 64-bit.
    (Here a limit lowered to 30000 rows.)"""
    from rnnfast import _engine, backends
    if not {"cython", "numba"} <= set(rnnfast.available_backends()):
        pytest.fail("this test needs both fast backends built")
    from rnnfast.kernels import cy_rnn
    # LSTM(40000, 40000): 4 * 40000 * 80000 elements, past 2**31 (it wrapped to 32 bits)
    assert cy_rnn.packed_size(0, 40000, 40000, 40000, False, 100) >= 4 * 40000 * 80000
    monkeypatch.setattr(backends, "CYTHON_INDEX_MAX", 30000)
    calls = []
    real = _engine.backends.kernel_module

    class Spy:                                  # records which backend's kernels ran
        def __init__(self, name):
            self._name, self._mod = name, real(name)

        def __getattr__(self, attr):
            fn = getattr(self._mod, attr)
            if attr not in ("run_layer", "run_small", "forward_layer"):
                return fn
            return lambda *a, **k: (calls.append(self._name), fn(*a, **k))[1]

    monkeypatch.setattr(_engine.backends, "kernel_module", Spy)
    layer = rnnfast.LSTM(4, 8, seed=0)
    x = np.random.default_rng(0).standard_normal((3000, 11, 4)).astype(np.float32)     # 33000 rows
    with rnnfast.backend("cython"):
        with pytest.raises(ValueError, match=r"^this call needs 33000 rows or elements in one 32-bit count"):
            layer(x)
        with pytest.raises(ValueError, match=r"backend\('numba'\)"):
            layer.forward(x, train=True)
    assert calls == []
    with rnnfast.backend("auto"):
        y, _ = layer(x)
        assert calls and set(calls) == {"numba"}
    with rnnfast.backend("reference"):
        want, _ = layer(x)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    with rnnfast.backend("cython"):
        y, _ = layer(x[:, :5])                 # within the limit: Cython runs it
    assert calls[-1] == "cython"


@pytest.mark.parametrize("name", [b for b in rnnfast.available_backends() if b != "reference"])
def test_kernel_sets_keep_their_contract(name):
    """Each backend's KernelSet names modules that provide the common entry points, and
    exactly the extras its flags promise (the API branches on the flags, never on hasattr)."""
    ks = _backends.kernel_set(name)
    inf, tr, sc = ks.module("inference"), ks.module("training"), ks.module("scans")
    assert callable(inf.run_layer) and callable(tr.forward_layer) and callable(tr.backward_layer)
    assert callable(sc.linear_scan) and callable(sc.minrnn_forward)
    assert hasattr(inf, "run_small") == ks.serving
    assert hasattr(tr, "pgemm") == ks.own_gemm
    assert hasattr(tr, "packed_size") == ks.packed_training
    with pytest.raises(NotImplementedError, match=r"^backend 'reference' has no kernels"):
        _backends.kernel_set("reference")
