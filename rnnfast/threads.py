"""One process-wide thread policy for Numba, OpenMP (Cython kernels) and BLAS.

Numba's and OpenMP's thread counts are per calling thread and threadpoolctl's limits
are process-global, so every kernel entry applies the count itself (``apply_*``),
never once at start-up. BLAS runs single-threaded inside rnnfast's own parallel
regions (OpenMP threads each call BLAS on their slice) and with the rnnfast count
when it is called from one thread only.

After ``fork()``: GNU OpenMP (libgomp) cannot open a parallel region in a child forked
after the parent ran one (the child waits forever on threads it does not have). A child
forked after rnnfast ran kernels on several threads therefore runs them on one thread,
and asking it for more warns and keeps one. Processes started with the "spawn" or
"forkserver" methods of multiprocessing have no such limit.
"""
from __future__ import annotations

import os
import threading
import time
import warnings

_lock = threading.Lock()
_num_threads: int = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
_blas = {"libs": None, "current": None}
_parallel_ran = False     # a kernel was given more than one thread in this process
_forked_after_parallel = False


def _after_fork_in_child() -> None:
    global _num_threads, _forked_after_parallel
    _inflight.clear()       # calls that were running in other threads of the parent do not exist here
    if _parallel_ran:
        _forked_after_parallel = True
        _num_threads = 1
    _blas["current"] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(n: int) -> None:
    """Set the number of threads every rnnfast kernel uses (process-wide).

    Parameters
    ----------
    n : int
        Thread count, at least 1.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    if n > 1 and _forked_after_parallel:
        warnings.warn("rnnfast runs on one thread in a process forked after its parent ran parallel "
                      "kernels (GNU OpenMP cannot start threads there); start workers with the "
                      "'spawn' or 'forkserver' method to use several", RuntimeWarning, stacklevel=2)
        n = 1
    _num_threads = n


# One entry per kernel call running now, from any Python thread: list.append / pop are
# atomic (one C call each, also on free-threaded builds), so no lock is taken (a
# lock-protected counter cost 0.35 us a call, 2 % of serving one token).
_inflight: list = []


def enter_call() -> int:
    """Threads for a kernel call that starts now; pair it with :func:`leave_call`.

    The set count, divided among the calls in flight: a call that starts while others
    run (several Python threads serving at once) gets ``max(1, n // k)`` for k calls,
    so that the threads never outnumber the cores by much. Oversubscribed, the kernels'
    per-step barriers wait on threads that have no core: two Python threads each
    running 2-thread GRU(256) calls of 100 steps on 2 cores took 10.3 ms a call against
    0.4 for one caller alone; sharing the count, 0.7 ms a call (one thread each).
    """
    global _parallel_ran
    _inflight.append(None)
    k = len(_inflight)
    n = _num_threads if k == 1 else max(1, _num_threads // k)
    if n > 1:
        _parallel_ran = True
    return n


# When a call that ran OpenMP's threads last ended (time.monotonic_ns). For milliseconds
# after a parallel region OpenMP's threads spin waiting for the next one; a served token
# handed to the serving path's own helper thread (kernels/rf_pool.h) meanwhile competes
# with them for the two cores: 20 tokens right after each 2-thread LSTM b8 call took
# 18.5-19.3 ms for 100 tokens and 5 calls, against 13.4-13.7 with OpenMP regions only.
_region_end_ns = 0
POOL_QUIET_NS = 20_000_000
_monotonic_ns = time.monotonic_ns


def leave_call(ran_region: bool = True) -> None:
    """End a kernel call started with :func:`enter_call`; `ran_region`: it ran an
    OpenMP parallel region (or may have)."""
    global _region_end_ns
    _inflight.pop()
    if ran_region:
        _region_end_ns = _monotonic_ns()


def pool_ok() -> bool:
    """Whether a served token may go to the helper thread of kernels/rf_pool.h: no call
    ran an OpenMP region in the last POOL_QUIET_NS."""
    return _monotonic_ns() - _region_end_ns > POOL_QUIET_NS


def call_with_threads(fn, *args):
    """``fn(*args, n)`` with n from :func:`enter_call`, the call ended however fn returns."""
    n = enter_call()
    try:
        return fn(*args, n)
    finally:
        leave_call(n > 1)


def get_num_threads() -> int:
    """Return the process-wide thread count used by rnnfast kernels."""
    global _parallel_ran
    if _num_threads > 1:
        _parallel_ran = True      # the caller is about to run kernels on several threads
    return _num_threads


def _blas_libs():
    if _blas["libs"] is None:
        with _lock:
            if _blas["libs"] is None:
                try:
                    import scipy.linalg.cython_blas  # noqa: F401 - load scipy's BLAS first
                    from threadpoolctl import ThreadpoolController
                    ctl = ThreadpoolController()
                    _blas["libs"] = [lib for lib in ctl.lib_controllers if lib.user_api == "blas"]
                except Exception:  # noqa: BLE001 - no threadpoolctl support: leave BLAS alone
                    _blas["libs"] = []
    return _blas["libs"]


def set_blas_threads(n: int) -> None:
    """Set the thread count of every loaded BLAS (cheap when it is unchanged)."""
    if _blas["current"] == n:
        return
    for lib in _blas_libs():
        try:
            lib.set_num_threads(n)
        except Exception:  # noqa: BLE001
            pass
    _blas["current"] = n


def blas_info() -> list[dict]:
    """Describe the loaded BLAS libraries (for ``python -m rnnfast info``)."""
    return [lib.info() for lib in _blas_libs()]
