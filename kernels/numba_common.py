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
import threading

import numba

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
