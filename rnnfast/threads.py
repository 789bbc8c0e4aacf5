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

import contextlib
import contextvars
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
    global _blas_depth, _blas_saved, _waiting, _blas_lock, _cv
    _inflight.clear()       # calls that were running in other threads of the parent do not exist here
    _waiting = 0
    # regions open in other threads of the parent do not exist here; BLAS keeps the counts
    # it had at the fork (restoring them from an at-fork handler could start BLAS's threads
    # while the child is still single-threaded C)
    _blas_depth = 0
    _blas_saved = None
    _blas_lock = threading.Lock()       # another thread of the parent may have held them
    _cv = threading.Condition(threading.Lock())
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
    if isinstance(n, bool) or (not isinstance(n, (int,)) and not hasattr(n, "__index__")):
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


# The thread counts of the kernel calls running now, from any Python thread, one
# (thread ident, count) entry per call: together they never exceed the set count.
# list.append / remove are atomic (one C call each, also on free-threaded builds), so a
# call that finds no other takes the whole count without a lock (a lock-protected
# counter was a measurable share of serving one token; commit 5f57ed9; figures in
# docs/performance.md); calls that meet others settle under _cv, and wait while every
# thread is taken.
_inflight: list = []
_get_ident = threading.get_ident
_cv = threading.Condition(threading.Lock())
_waiting = 0


# A bound on the threads of the calls made in this context (a layer's or frozen layer's
# ``num_threads``), set by :func:`limit` for the duration of one object's call: a
# context variable, so that it reaches only the calls of the thread (or task) that set
# it and never changes the process-wide count the caller sees afterwards.
_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("rnnfast_num_threads", default=None)


def check_num_threads(n, name: str = "num_threads") -> int | None:
    """`n` validated as a per-object thread bound: None or an int >= 1."""
    if n is None:
        return None
    if isinstance(n, bool) or (not isinstance(n, int) and not hasattr(n, "__index__")):
        raise TypeError(f"{name}: expected None or an int, got {type(n).__name__}")
    n = int(n.__index__())
    if n < 1:
        raise ValueError(f"{name}: expected None or an int >= 1, got {n}")
    return n


@contextlib.contextmanager
def limit(n: int | None):
    """Bound the thread count of the rnnfast calls made inside the ``with`` block (in
    this thread or task only) to ``min(n, get_num_threads())``; None: no bound. Nests:
    an inner bound never raises an outer one. BLAS counts are still set per call and
    restored after it, as without a bound, so threadpoolctl's limits compose as before."""
    if n is None:
        yield
        return
    outer = _limit.get()
    token = _limit.set(n if outer is None else min(n, outer))
    try:
        yield
    finally:
        _limit.reset(token)


def call_limited(n: int | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under :func:`limit` (n). The layers' entry points call it
    only when their ``num_threads`` is set, so that unbounded calls pay nothing."""
    outer = _limit.get()
    token = _limit.set(n if outer is None else min(n, outer))
    try:
        return fn(*args, **kwargs)
    finally:
        _limit.reset(token)


def enter_call(most: int = 0) -> int:
    """Threads for a kernel call that starts now, at most `most` (0: no limit of its own);
    pair it with :func:`leave_call`.

    A call alone takes the set count n. A call that starts while k - 1 others run (several
    Python threads serving at once) takes ``min(free, max(1, n // k))`` of the threads
    the others leave free, and waits until one is free when none is: the calls' threads
    together never outnumber n. Oversubscribed, the kernels' per-step barriers wait on
    threads that have no core, and every call becomes many times slower than one caller
    alone (commits f2f02a8 and d32bc62; figures in docs/performance.md). A call made from
    inside another on the same Python thread shares that call's threads.
    """
    global _parallel_ran
    bound = _limit.get()
    if bound is not None and (not most or bound < most):
        most = bound
    n = _num_threads if not most or most > _num_threads else most
    entry = (_get_ident(), n)
    _inflight.append(entry)
    if len(_inflight) != 1:
        n = _enter_contended(entry)
    if n > 1:
        _parallel_ran = True
    return n


def _enter_contended(entry: tuple) -> int:
    global _waiting
    ident, most = entry
    with _cv:
        _inflight.remove(entry)
        for other in _inflight:
            if other[0] == ident:       # nested in a call of this thread: run on its threads
                take = min(most, max(1, other[1]))
                _inflight.append((ident, take))     # counted twice while it runs: others may wait
                return take
        while True:
            n = _num_threads
            free = n - sum(e[1] for e in _inflight)
            if free >= 1:
                take = min(free, most, max(1, n // (len(_inflight) + 1)))
                mine = (ident, take)
                _inflight.append(mine)
                # a call that found no other meanwhile took its count without the lock
                if sum(e[1] for e in _inflight) <= n:
                    return take
                _inflight.remove(mine)
            _waiting += 1
            try:
                _cv.wait(0.01)
            finally:
                _waiting -= 1


# When a call that ran OpenMP's threads last ended (time.monotonic_ns). For milliseconds
# after a parallel region OpenMP's threads spin waiting for the next one; a served token
# handed to the serving path's own helper thread (kernels/rf_pool.h) meanwhile competes
# with them for the two cores, and tokens served right after such a call ran slower than
# with OpenMP regions only, hence the quiet period below (commit 302e335; figures in
# docs/performance.md).
_region_end_ns = 0
POOL_QUIET_NS = 20_000_000
_monotonic_ns = time.monotonic_ns


def leave_call(n: int, ran_region: bool = True) -> None:
    """End a kernel call started with :func:`enter_call`, which gave it `n` threads;
    `ran_region`: it ran an OpenMP parallel region (or may have)."""
    global _region_end_ns
    _inflight.remove((_get_ident(), n))     # entries of equal value are interchangeable
    if ran_region:
        _region_end_ns = _monotonic_ns()
    if _waiting:
        with _cv:
            _cv.notify_all()


def pool_ok() -> bool:
    """Whether a served token may go to the helper thread of kernels/rf_pool.h: no call
    ran an OpenMP region in the last POOL_QUIET_NS."""
    return _monotonic_ns() - _region_end_ns > POOL_QUIET_NS


def call_with_threads(fn, *args):
    """``fn(*args, n)`` with n from :func:`enter_call`, the call ended however fn returns."""
    n = enter_call()
    blas_enter()
    try:
        return fn(*args, n)
    finally:
        blas_exit()
        leave_call(n, n > 1)


def get_num_threads() -> int:
    """Return the process-wide thread count used by rnnfast kernels.

    Inside a call of a layer or frozen layer whose ``num_threads`` is set (and so in
    rnnfast's own code only), the smaller of that bound and the process-wide count: the
    strategy choices made from it then match the threads the call gets."""
    global _parallel_ran
    n = _num_threads
    bound = _limit.get()
    if bound is not None and bound < n:
        n = bound
    if n > 1:
        _parallel_ran = True      # the caller is about to run kernels on several threads
    return n


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


# rnnfast's limits on the loaded BLAS libraries hold only inside its calls. A call opens
# a region (blas_enter / blas_exit, counted over every Python thread); the first limit
# set in it reads the libraries' counts as the caller left them, and the last region to
# end puts those back. Read afresh in every outermost region, so a count the caller
# changes between calls is neither lost nor mistaken for rnnfast's own.
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved: list | None = None     # the caller's counts, one per library, once a limit is set


def blas_enter() -> None:
    """Open a region in which :func:`set_blas_threads` may limit BLAS (nothing is read
    or set until it does)."""
    global _blas_depth
    with _blas_lock:
        _blas_depth += 1


def blas_exit() -> None:
    """Close a region of :func:`blas_enter`; the last one open restores the caller's BLAS
    thread counts if a limit was set."""
    global _blas_depth, _blas_saved
    with _blas_lock:
        _blas_depth -= 1
        if _blas_depth or _blas_saved is None:
            return
        saved, _blas_saved = _blas_saved, None
        _blas["current"] = None
        for lib, n in zip(_blas_libs(), saved):
            if n is not None:
                try:
                    lib.set_num_threads(n)
                except Exception:  # noqa: BLE001 - a library that cannot be set was not changed
                    pass


def set_blas_threads(n: int) -> None:
    """Limit every loaded BLAS to `n` threads for the rest of the current region (cheap
    when it is already so). Only inside :func:`blas_enter` / :func:`blas_exit`."""
    global _blas_saved
    if _blas["current"] == n:
        return
    with _blas_lock:
        if not _blas_depth:
            raise RuntimeError("rnnfast.threads.set_blas_threads outside a call's BLAS region")
        libs = _blas_libs()
        if _blas_saved is None:
            saved = []
            for lib in libs:
                try:
                    saved.append(lib.get_num_threads())
                except Exception:  # noqa: BLE001
                    saved.append(None)
            _blas_saved = saved
        for lib in libs:
            try:
                lib.set_num_threads(n)
            except Exception:  # noqa: BLE001
                pass
        _blas["current"] = n


@contextlib.contextmanager
def blas_threads(n: int):
    """Every loaded BLAS on `n` threads inside the ``with`` block, the caller's counts
    restored after it (the bench's peer measurements)."""
    blas_enter()
    try:
        set_blas_threads(n)
        yield
    finally:
        blas_exit()


def blas_info() -> list[dict]:
    """Describe the loaded BLAS libraries (for ``python -m rnnfast info``)."""
    return [lib.info() for lib in _blas_libs()]
