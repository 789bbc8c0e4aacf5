"""The vectorisable float32 exp and tanh of the Numba kernels (kernels/numba_vmath.py)
against float64 NumPy, their edges, and the vector code they exist for."""
from __future__ import annotations

import numpy as np
import pytest

from rnnfast.kernels import numba_vmath as vm


def _apply(f, x):
    from numba import njit

    @njit(error_model="numpy")      # as the kernels: no zero-division branch in the loop
    def run(a, out):
        for i in range(a.shape[0]):
            out[i] = f(a[i])
    out = np.empty_like(x)
    run(x, out)
    return out, run


def _grid():
    g = np.linspace(-100, 100, 400001, dtype=np.float32)
    return np.concatenate([g, np.float32([0.0, -0.0, 1e-30, -1e-30, 88.3, 88.4, 88.7, -87.3, -87.4, -104,
                                          np.inf, -np.inf, np.nan])])


def test_expf_matches_float64():
    x = _grid()
    got, _ = _apply(vm.expf, x)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    ok = (x > -87.3) & (x < 88.3)
    rel = np.abs(got[ok] - want[ok]) / want[ok]
    assert rel.max() < 1.5 * 2.0 ** -23, rel.max()
    assert np.all(got[x >= 88.4] == np.inf)           # overflows to +inf (sigmoid(-x) exactly 0)
    assert np.all((got[x <= -87.3] >= 0) & (got[x <= -87.3] < 2e-38))
    assert np.isnan(got[np.isnan(x)]).all()
    assert got[x == -np.inf][0] < 2e-38


def test_tanhf_matches_float64():
    x = _grid()
    got, _ = _apply(vm.tanhf, x)
    want = np.tanh(x.astype(np.float64))
    fin = np.isfinite(x)
    assert np.abs(got[fin] - want[fin]).max() < 1.2e-7
    small = fin & (np.abs(x) < 1) & (x != 0)
    assert (np.abs(got[small] - want[small]) / np.abs(want[small])).max() < 2.5 * 2.0 ** -24
    assert got[x == np.inf][0] == 1.0 and got[x == -np.inf][0] == -1.0
    assert np.isnan(got[np.isnan(x)]).all()
    assert np.signbit(got[np.flatnonzero((x == 0) & np.signbit(x))[0]])   # -0 stays -0


@pytest.mark.parametrize("name", ["expf", "tanhf"])
def test_loops_of_them_vectorise(name):
    """A Numba loop over float32 calling them compiles to vector code with no call of
    libm (what libm's exp/tanh give without SVML: one scalar call per element)."""
    x = np.linspace(-5, 5, 64, dtype=np.float32)
    _, run = _apply(getattr(vm, name), x)
    ir = "\n".join(run.inspect_llvm().values())
    assert "x float>" in ir, "no vector of floats in the loop"
    for libm in ("@expf", "@tanhf", "@llvm.exp.f32", "@numba_expf"):
        assert f"call float {libm}" not in ir and f"call fast float {libm}" not in ir
