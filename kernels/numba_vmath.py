"""exp and tanh in float32 that LLVM vectorises inside Numba loops.

Numba lowers ``math.exp`` / ``np.tanh`` to calls of libm's scalar functions unless Intel's
SVML is installed (``numba -s``: "SVML State"), so a loop of gate math made one call per
element and never vectorised (the custom cells' elementwise step spent most of its time
there; commit message of the change that added this module). These are the C kernels'
``rf_expf`` / ``rf_tanhf`` (kernels/rf_gates.h) written for Numba: Cephes' polynomials,
2^n made by moving n into a float's exponent bits (an LLVM bitcast, the one intrinsic
below), every step an instruction that has a vector form. Same error bounds as the C
ones (exp: 1 ulp relative; tanh: 1.33 ulp), same edges: NaN propagates, exp(x > 88.3) is
+inf so that 1 / (1 + exp(-x)) is exactly 0 at -inf, tanh(+-inf) = +-1.

Float32 only: the float64 paths keep libm's functions (they are the oracle-precision
paths, where speed matters less).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .numba_common import FASTMATH


@intrinsic
def _i32_bits_as_f32(typingctx, v):
    """The float32 whose bits are the low 32 bits of the integer `v` (Numba's integer
    arithmetic is 64-bit)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        val = args[0]
        if v.bitwidth > 32:
            val = builder.trunc(val, ir.IntType(32))
        elif v.bitwidth < 32:
            val = builder.sext(val, ir.IntType(32)) if v.signed else builder.zext(val, ir.IntType(32))
        return builder.bitcast(val, ir.FloatType())

    return types.float32(v), codegen


_F = np.float32
_LO, _HI = _F(-87.3), _F(88.3)
_LOG2E, _LN2_HI, _LN2_LO = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_T0, _T1, _T2 = _F(-5.70498872745e-3), _F(2.06390887954e-2), _F(-5.37397155531e-2)
_T3, _T4 = _F(1.33314422036e-1), _F(-3.33332819422e-1)
_ONE, _TWO, _HALF, _SMALL = _F(1.0), _F(2.0), _F(0.5), _F(0.625)
_INF = _F(np.inf)
_BIAS, _SHIFT = np.int32(127), np.int32(23)

_JIT = dict(fastmath=FASTMATH, error_model="numpy", nogil=True, inline="always")


@njit(**_JIT)
def expf(x0):
    """exp of a float32, vectorisable (rf_expf)."""
    x = x0 if x0 > _LO else _LO            # NaN: the clamp's value; put back at the end
    x = x if x < _HI else _HI
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * (r * r) + r + _ONE
    scale = _i32_bits_as_f32((np.int32(n) + _BIAS) << _SHIFT)
    y = p * scale
    if x0 > _HI:
        return _INF
    return y if x0 == x0 else x0


@njit(**_JIT)
def tanhf(x):
    """tanh of a float32, vectorisable (rf_tanhf)."""
    a = abs(x)
    big = _ONE - _TWO / (expf(a + a) + _ONE)
    z = a * a
    p = _T0
    p = p * z + _T1
    p = p * z + _T2
    p = p * z + _T3
    p = p * z + _T4
    small = p * z * a + a
    t = small if a < _SMALL else big
    return np.copysign(t, x)

