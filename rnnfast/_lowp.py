"""Low-precision weights for frozen layers: rounding to bfloat16, symmetric int8 per
output row, and the packed layout of kernels/rf_lowp.h (``QMat``).

The NumPy twins here (``bf16_round``, ``int8_quantize``, ``lowp_matmul``) compute what
the kernels compute and are the tests' oracle for them.
"""
from __future__ import annotations

import importlib

import numpy as np

PRECISIONS = ("fp32", "fp64", "bf16", "int8")
_BLOCK = 16


def kernels():
    """rnnfast.kernels.cy_lowp (imported on first use)."""
    return importlib.import_module("rnnfast.kernels.cy_lowp")


_ISA: dict = {}


def isa(prec: str) -> tuple[int, str]:
    """The kernel this CPU runs for `prec`: (code for cy_lowp, name for info/repr).
    ``force_portable`` (tests) selects the plain-C kernel, ``no_amx`` the AVX-512 ones."""
    if _ISA.get("force_portable"):
        return kernels().PORTABLE, "portable C (forced)"
    feats = _ISA.get("features")
    if feats is None:
        feats = _ISA["features"] = kernels().cpu_features()
    if _ISA.get("no_amx") is None and feats.get("amx_int8" if prec == "int8" else "amx_bf16"):
        return kernels().AMX, ("amx-int8 (tdpbusd)" if prec == "int8" else "amx-bf16 (tdpbf16ps)") + \
            (", avx512-vnni under 3 rows" if prec == "int8" else "")
    if prec == "int8" and feats["avx512_vnni"]:
        return kernels().AVX512, "avx512-vnni (vpdpbusd)"
    if prec == "bf16" and feats["avx512_bf16"]:
        return kernels().AVX512, "avx512-bf16 (vdpbf16ps)"
    need = "AVX512-VNNI" if prec == "int8" else "AVX512-BF16"
    return kernels().PORTABLE, f"portable C (this CPU has no {need}: correct, slower)"


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 `w` rounded to bfloat16 (nearest even), as uint16 bit patterns."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_round(w: np.ndarray) -> np.ndarray:
    """float32 `w` rounded to the nearest bfloat16, as float32."""
    return (bf16_bits(w).astype(np.uint32) << 16).view(np.float32)


def int8_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (q int8 (N, K), scale float32 (N,)), w ~ q * scale[:, None]."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' dynamic quantization of activations: (q int32 in [-127, 127], scale)
    per row (twin of rf_lowp_quant_u8, without its +128)."""
    a = np.asarray(a, np.float32)
    amax = np.abs(a).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(a * inv[:, None]), -127, 127).astype(np.int32)
    return q, (amax / np.float32(127)).astype(np.float32)


def lowp_matmul(prec: str, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NumPy twin of the kernels' product a @ w.T in `prec` (float64 sums)."""
    if prec == "bf16":
        return bf16_round(a).astype(np.float64) @ bf16_round(w).astype(np.float64).T
    qw, sw = int8_quantize(w)
    qa, sa = quantize_rows(a)
    acc = qa.astype(np.float64) @ qw.astype(np.float64).T
    return acc * sa[:, None].astype(np.float64) * sw[None, :].astype(np.float64)


def pack(prec: str, w: np.ndarray, gates: int):
    """Weights (gates*H, K) as a cy_lowp.QMat of precision `prec` ("bf16" or "int8")."""
    k = kernels()
    w = np.asarray(w, np.float32)
    GH, K = w.shape
    H = GH // gates
    Hp = -(-H // _BLOCK) * _BLOCK
    if prec == "int8":
        q, scale = int8_quantize(w)
        grp, dt, code = 4, np.int8, k.INT8
    else:
        q, scale = bf16_bits(w), None
        grp, dt, code = 2, np.uint16, k.BF16
    esize = np.dtype(dt).itemsize
    Kp = -(-(K * esize) // 64) * 64 // esize
    full = np.zeros((gates, Hp, Kp), dt)
    full[:, :H, :K] = q.reshape(gates, H, K)
    packed = np.ascontiguousarray(
        full.reshape(gates * Hp // _BLOCK, _BLOCK, Kp // grp, grp).transpose(0, 2, 1, 3)).reshape(-1)
    sc = cp = None
    if prec == "int8":
        sfull = np.zeros((gates, Hp), np.float32)
        sfull[:, :H] = scale.reshape(gates, H)
        sc = sfull.reshape(-1)
        cp = (-128 * full.astype(np.int32).sum(axis=2)).astype(np.int32).reshape(-1)
    return k.QMat(code, gates, H, K, packed, sc, cp)
