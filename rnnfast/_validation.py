"""Input conversion and checks shared by the functional API and the layers.

Everything here runs before any kernel: bad input raises ``TypeError``/``ValueError``
naming the argument with the expected and given values. Nothing the caller passed is
modified (arrays are converted, never written).
"""
from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)


def to_numpy(a, name: str) -> np.ndarray:
    """Any array-like (lists, torch tensors, objects with __array__) as an ndarray.
    Masked arrays are refused: their mask has no meaning for a recurrence (padding is
    given with ``lengths``)."""
    if isinstance(a, np.ndarray):
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name}: masked arrays are not accepted (their mask would be ignored); "
                            "give padded sequences' lengths with lengths=, or pass a.filled() or a.data")
        return a
    if hasattr(a, "detach") and callable(a.detach):      # torch tensors (duck-typed)
        a = a.detach()
        if hasattr(a, "cpu"):
            a = a.cpu()
        if hasattr(a, "numpy"):
            try:
                return a.numpy()
            except Exception:  # noqa: BLE001 - e.g. bfloat16: fall back to __array__
                pass
    try:
        return np.asarray(a)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"{name}: cannot convert {type(a).__name__} to an array ({e})") from None


def check_float(a: np.ndarray, name: str) -> np.ndarray:
    """`a` if it holds floats rnnfast computes in without losing precision: float16, float32
    or float64 in either byte order (long double would be rounded to float64: refused)."""
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {a.dtype}")
    if a.dtype.itemsize > 8:
        raise TypeError(f"{name}: long double ({a.dtype}) is not supported (rnnfast computes in float32 "
                        "or float64); convert with .astype(np.float64)")
    return a


def weight_dtype(*weights: np.ndarray) -> np.dtype:
    """Compute dtype decided by the weights: float64 if any weight is 8-byte float (in
    either byte order), else float32."""
    for w in weights:
        if w is not None and w.dtype.kind == "f" and w.dtype.itemsize == 8:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def as_compute(a, name: str, dtype: np.dtype, shape: tuple | None = None) -> np.ndarray:
    """Float array of `dtype` (C-contiguous; a copy only when needed), shape-checked."""
    arr = check_float(to_numpy(a, name), name)
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_lengths(lengths, T: int, B: int, unbatched: bool) -> np.ndarray | None:
    """Validate `lengths` (ints in [0, T], shape (B,)) and return them as int64."""
    if lengths is None:
        return None
    arr = to_numpy(lengths, "lengths")
    if arr.dtype.kind not in "iu":
        if arr.dtype == object and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                       for v in arr.ravel()):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"lengths: expected integers, got dtype {arr.dtype}")
    if unbatched and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},), got {arr.shape}")
    # checked in the given integer type (uint64 above 2**63 would wrap in int64)
    if arr.size and (arr.min() < 0 or arr.max() > T):
        raise ValueError(f"lengths: every length must be in [0, {T}], got min {arr.min()} max {arr.max()}")
    return arr.astype(np.int64)


def check_input(x, name: str, dtype: np.dtype, feature: int, batch_first: bool):
    """Return (x as (T, B, F) compute-dtype array, unbatched flag)."""
    arr = check_float(to_numpy(x, name), name)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D (T, F) or 3-D input, got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[-1] != feature:
        raise ValueError(f"{name}: expected input feature size {feature}, got {arr.shape[-1]} (shape {arr.shape})")
    unbatched = arr.ndim == 2
    if unbatched:
        arr = arr[:, None, :]
    elif batch_first:
        arr = arr.transpose(1, 0, 2)
    return np.ascontiguousarray(arr, dtype=dtype), unbatched


def check_state(s, name: str, dtype: np.dtype, shape: tuple, unbatched: bool) -> np.ndarray | None:
    """A state of `shape` (its batched form), given batched or (if unbatched) without B."""
    if s is None:
        return None
    arr = check_float(to_numpy(s, name), name)
    want = shape[:-2] + shape[-1:] if unbatched else shape
    if arr.shape != tuple(want):
        raise ValueError(f"{name}: expected shape {tuple(want)}, got {arr.shape}")
    if unbatched:
        arr = np.expand_dims(arr, -2)
    return np.array(arr, dtype=dtype, order="C")   # always a copy: kernels update states in place


def load_params(params: dict, shapes: dict, mapping) -> None:
    """Strict ``load_state_dict`` shared by every layer: copy `mapping` into the live arrays.

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped key and
    ``TypeError`` for a non-mapping or a non-numeric value; on error nothing is changed.
    Values may be any array-like (torch tensors included); they are copied in place so
    that live references from ``parameters()`` stay valid.
    """
    if not hasattr(mapping, "keys"):
        raise TypeError(f"load_state_dict: expected a mapping, got {type(mapping).__name__}")
    keys = set(mapping.keys())
    missing = sorted(set(shapes) - keys)
    unexpected = sorted(str(k) for k in keys - set(shapes))
    converted, bad = {}, []
    for k in shapes:
        if k not in keys:
            continue
        arr = to_numpy(mapping[k], k)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"load_state_dict: {k} has non-numeric dtype {arr.dtype}")
        if arr.shape != shapes[k]:
            bad.append(f"{k} (expected shape {shapes[k]}, got {arr.shape})")
        converted[k] = arr
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if bad:
            parts.append(f"shape mismatch: {bad}")
        raise ValueError("load_state_dict: " + "; ".join(parts))
    for k, arr in converted.items():
        params[k][...] = arr
