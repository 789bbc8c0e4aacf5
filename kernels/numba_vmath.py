"""exp, tanh and the sigmoid in float32 that LLVM vectorises inside Numba loops: one
definition for every Numba kernel (the built-in cells' gates in numba_rnn, the custom
cells' generated steps in rnnfast.custom).

Numba lowers ``math.exp`` / ``np.tanh`` to calls of libm's scalar functions unless Intel's
SVML is installed (``numba -s``: "SVML State"), so a loop of gate math made one call per
element and never vectorised. These are the C kernels' ``rf_expf`` / ``rf_tanhf``
(kernels/rf_gates.h) written for Numba: Cephes' polynomials, 2^n made by moving n into a
float's exponent bits (an LLVM bitcast, the one intrinsic below), every step an
instruction that has a vector form. Edges as the C ones: NaN propagates, exp(x > 88.3) is
+inf so that 1 / (1 + exp(-x)) is exactly 0 at -inf, tanh(+-inf) = +-1, -0 stays -0.

Float32 only: the float64 paths keep libm's functions (the oracle-precision paths).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# The polynomial approximations rely on the exact order of their operations (Cody-Waite
# range reduction): only contraction into FMAs is allowed.
_STRICT = {"contract"}


@intrinsic
def _bits_as_f32(typingctx, v):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        val = args[0]
        if v.bitwidth > 32:
            val = builder.trunc(val, ir.IntType(32))
        return builder.bitcast(val, ir.FloatType())
    return types.float32(v), codegen


@njit(fastmath=_STRICT, error_model="numpy", nogil=True, cache=True)
def expf(x):
    """exp of a float32, Cephes expf: |rel err| ~ 1 ulp; clamps below to the normal range,
    +inf above 88.3 (so that sigmoid(-inf) is exactly 0, as in PyTorch), NaN kept (the
    selects are written so that a NaN compares false and passes through)."""
    x0 = x
    x = np.float32(-87.3) if x < np.float32(-87.3) else x
    x = np.float32(88.3) if x > np.float32(88.3) else x
    fx = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    x = x - fx * np.float32(0.693359375)
    x = x - fx * np.float32(-2.12194440e-4)
    z = x * x
    p = np.float32(1.9875691500e-4)
    p = p * x + np.float32(1.3981999507e-3)
    p = p * x + np.float32(8.3334519073e-3)
    p = p * x + np.float32(4.1665795894e-2)
    p = p * x + np.float32(1.6666665459e-1)
    p = p * x + np.float32(5.0000001201e-1)
    p = p * z + x + np.float32(1.0)
    if x0 > np.float32(88.3):
        return np.float32(np.inf)
    return p * _bits_as_f32((np.int64(fx) + 127) << 23)


@njit(fastmath=_STRICT, error_model="numpy", nogil=True, cache=True)
def sigmoidf(x):
    return np.float32(1.0) / (np.float32(1.0) + expf(-x))


@njit(fastmath=_STRICT, error_model="numpy", nogil=True, cache=True)
def tanhf(x):
    """Cephes tanhf: odd polynomial below 0.625, 1 - 2/(exp(2|x|)+1) above."""
    a = abs(x)      # (not clamped: exp(2|x|) overflows to inf above 44, and 2 / inf is 0)
    z = a * a
    small = ((((np.float32(-5.70498872745e-3) * z + np.float32(2.06390887954e-2)) * z
               - np.float32(5.37397155531e-2)) * z + np.float32(1.33314422036e-1)) * z
             - np.float32(3.33332819422e-1)) * z * a + a
    big = np.float32(1.0) - np.float32(2.0) / (expf(a + a) + np.float32(1.0))
    # on |x|, x's sign put back: -0 stays -0, NaN passes
    return np.copysign(small if a < np.float32(0.625) else big, x)
