"""What the Numba kernel modules share: each call's thread count, and Numba's threading layer.

Numba's thread count is per calling thread: every kernel entry sets it for its call and
puts the caller's back afterwards (``kernel_threads``), so the user's own Numba code on
that thread keeps its count.

The threading layer is the user's choice (``NUMBA_THREADING_LAYER`` or
``numba.config.THREADING_LAYER``, before Numba's first parallel launch): rnnfast does not
set it. Numba's default takes TBB or OpenMP where installed. Its fallback, the workqueue
layer, cannot run parallel regions launched from several Python threads at once (Numba
terminates the process): while that layer, or a layer not yet known, is in force, rnnfast's
Numba kernels take turns.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time

import numba
from numba import njit

from ..cells import (
    VARIANT_CANDIDATE,
    VARIANT_CLIP,
    VARIANT_GATE,
    VARIANT_INPUT_FORGET,
    VARIANT_OUTPUT,
    VARIANT_PEEPHOLE,
)

_serial = threading.Lock()
_layer: list = []       # the threading layer once Numba has launched one


# The fast-math flags of every Numba kernel, defined once. Never "nnan"/"ninf": NaN and
# inf must propagate as IEEE (exp overflowing to inf gives sigmoid 0, not garbage).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# ... and of the scans, without "reassoc": the order of a recurrence is its meaning.
FASTMATH_ORDERED = FASTMATH - {"reassoc"}

def _thread_safe_layer() -> bool:
    if not _layer:
        try:
            _layer.append(numba.threading_layer())
        except ValueError:      # no parallel region launched yet
            return False
    return _layer[0] != "workqueue"


@contextlib.contextmanager
def kernel_threads(n: int):
    """Numba's thread count for one kernel call: ``min(n, NUMBA_NUM_THREADS)``, at least 1
    (yielded); the calling thread's previous count restored on exit."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    prev = numba.get_num_threads()
    numba.set_num_threads(n)
    lock = None if _thread_safe_layer() else _serial
    if lock is not None:
        lock.acquire()
    try:
        yield n
    finally:
        if lock is not None:
            lock.release()
        numba.set_num_threads(prev)


# A long kernel call runs in pieces of steps of about this many seconds (the first of
# _FIRST_PIECE_FLOPS, each next one sized from the rate measured, growing at most 4x):
# Python's signal handlers (Ctrl-C) run between them, as the Cython kernels poll between
# steps.
_PIECE_SECONDS = 0.08
_FIRST_PIECE_FLOPS = 2e8


def next_piece(steps: int, done: int, seconds: float) -> int:
    """Steps of the next piece after `done` steps took `seconds`."""
    if seconds <= 0.0:
        return 4 * steps
    return max(1, min(4 * steps, int(done * _PIECE_SECONDS / seconds)))


def interruptible_pieces(T: int, step_flops: float):
    """Yield ``(s0, s1)`` ranges covering steps [0, T), timing each piece's run (the
    caller's, between two yields) to size the next."""
    steps = max(1, int(_FIRST_PIECE_FLOPS / max(step_flops, 1.0)))
    s0 = 0
    while s0 < T:
        s1 = min(T, s0 + steps)
        t0 = time.perf_counter()
        yield s0, s1
        steps = next_piece(steps, s1 - s0, time.perf_counter() - t0)
        s0 = s1


# ------------------------------------------------------------------------ cell variants
# The activations of rnnfast.cells.ACTIVATION_CODES (a variant vector's codes, see
# rnnfast.cells.variant_vector), their derivatives and the clip, in float64: one copy for
# the inference and the training kernels. The derivatives are the reference's
# (rnnfast.reference.backward.activation_grad), kinks and NaN included.
_VJIT = dict(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)


@njit(**_VJIT)
def act(k, a, b, x):
    """Activation code k with parameters a, b at x."""
    if k == 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    if k == 1.0:
        return math.tanh(x)
    if k == 2.0:
        return 0.0 if x < 0.0 else x
    if k == 3.0:
        return a * x + b
    if k == 4.0:
        return x if x >= 0.0 else a * x
    if k == 5.0:
        return x if x > a else 0.0
    if k == 6.0:
        return a * math.tanh(b * x)
    if k == 7.0:
        v = a * x + b
        return 0.0 if v < 0.0 else (1.0 if v > 1.0 else v)
    if k == 8.0:
        return x if x >= 0.0 else a * math.expm1(x)
    if k == 9.0:
        return x / (1.0 + abs(x))
    # softplus, log(1 + e^x) without overflow
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@njit(**_VJIT)
def dact(k, a, b, x):
    """The derivative of activation code k at x (0 at NaN where the reference has 0)."""
    if k == 0.0:
        s = 1.0 / (1.0 + math.exp(-x))
        return s * (1.0 - s)
    if k == 1.0:
        t = math.tanh(x)
        return 1.0 - t * t
    if k == 2.0:
        return 1.0 if x > 0.0 else 0.0
    if k == 3.0:
        return a
    if k == 4.0:
        return 1.0 if x >= 0.0 else a
    if k == 5.0:
        return 1.0 if x > a else 0.0
    if k == 6.0:
        t = math.tanh(b * x)
        return a * b * (1.0 - t * t)
    if k == 7.0:
        v = a * x + b
        return a if (v > 0.0 and v < 1.0) else 0.0
    if k == 8.0:
        return 1.0 if x >= 0.0 else a * math.exp(min(x, 0.0))
    if k == 9.0:
        d = 1.0 + abs(x)
        return 1.0 / (d * d)
    return 1.0 / (1.0 + math.exp(-x))


@njit(**_VJIT)
def clip(x, c):
    """x clamped to [-c, c] (NaN passes; c = inf: none)."""
    return c if x > c else (-c if x < -c else x)


@njit(**_VJIT)
def dclip(x, c):
    """The clip's derivative: 1 inside [-c, c] (bounds included, as torch.clamp), else 0
    (NaN: 0, as the reference)."""
    return 1.0 if (x >= -c and x <= c) else 0.0


@njit(**_VJIT)
def variant_fields(vp):
    """A variant vector's fields: the gate, candidate and output activations as (code,
    alpha, beta) each, then clip, input_forget, peephole (rnnfast.cells.variant_vector)."""
    g, c, o = VARIANT_GATE, VARIANT_CANDIDATE, VARIANT_OUTPUT
    return (vp[g], vp[g + 1], vp[g + 2], vp[c], vp[c + 1], vp[c + 2], vp[o], vp[o + 1], vp[o + 2],
            vp[VARIANT_CLIP], vp[VARIANT_INPUT_FORGET] != 0.0, vp[VARIANT_PEEPHOLE] != 0.0)
