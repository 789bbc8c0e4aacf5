"""The memory rnnfast keeps between calls, its bounds, and :func:`release_memory`.

Buffers outlive a call only to spare the page faults of fresh memory (a fresh buffer of
tens of MB costs a fault per 4 KB page at first touch, a noticeable share of a training
step; commit b34bc51, figures in docs/performance.md). Two stores hold them:

- **Scratch** (:func:`scratch`): each Python thread's buffers for inference calls (input
  projections, state ping-pong, packed weights), one per kind, reused while the shapes
  fit. Together over all threads at most ``SCRATCH_MAX_BYTES``; a buffer that would go
  over it is handed out for one call and not kept.
- **The pool** (:data:`POOL`): training's large temporaries (saved gates and cell states,
  gate gradients, packed weights), kept by size class (four per octave, so that shapes
  that differ a little share buffers), at most ``MAX_PER_CLASS`` per class and
  ``MAX_BYTES`` in all, least recently returned dropped first, and anything unused for
  ``IDLE_S`` seconds freed at the pool's next use.

:func:`release_memory` frees both now, for every thread (a buffer that a call in
flight holds lives until that call ends). Nothing runs in the background.
"""
from __future__ import annotations

import math
import threading
import time
import weakref

import numpy as np

__all__ = ["POOL", "SmallCache", "aligned_empty", "aligned_copy", "memory_info", "release_memory", "scratch"]

SCRATCH_MAX_BYTES = 512 << 20
_SCRATCH_VIEWS = 256

_lock = threading.Lock()
_scratch_bytes = 0          # kept by every thread's workspace
_workspaces: weakref.WeakSet = weakref.WeakSet()
_tls = threading.local()
_small_caches: weakref.WeakSet = weakref.WeakSet()      # the serving path's, one per thread


class SmallCache(dict):
    """One thread's buffers of the serving path (rnnfast._engine.run_small), keyed by
    layer shape and (T, B); registered so that :func:`release_memory` reaches every
    thread's."""

    __slots__ = ("__weakref__",)
    __hash__ = object.__hash__          # by identity, for the registry (a WeakSet)
    __eq__ = object.__eq__

    def __init__(self):
        super().__init__()
        with _lock:
            _small_caches.add(self)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary.

    Whole cache lines and vectors: the kernels store large projections with streaming
    stores, and a weight row read as vectors that straddle two cache lines costs up to
    twice the L2 bandwidth (commit 0fc1b02; figures in docs/performance.md).
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(shape)
    raw = np.empty(n * dtype.itemsize + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray, dtype) -> np.ndarray:
    """`a` converted to `dtype` in a new 64-byte aligned C-contiguous array."""
    out = aligned_empty(a.shape, dtype)
    out[...] = a
    return out


class _Workspace:
    """One Python thread's scratch: its buffers by (kind, dtype), and views of them by
    (kind, shape, dtype). Dies with its thread (a thread-local), giving its bytes back."""

    __slots__ = ("__weakref__", "bufs", "nbytes", "views")

    def __init__(self):
        self.views: dict = {}
        self.bufs: dict = {}
        self.nbytes = 0

    def clear(self) -> None:
        global _scratch_bytes
        with _lock:
            self.views = {}
            self.bufs = {}
            _scratch_bytes -= self.nbytes
            self.nbytes = 0

    def __del__(self):
        global _scratch_bytes
        lock = _lock
        if lock is None:                  # interpreter shutdown: module globals are gone
            return
        with lock:                        # its thread's end
            _scratch_bytes -= self.nbytes


def _workspace() -> _Workspace:
    ws = _tls.__dict__.get("ws")
    if ws is None:
        ws = _tls.ws = _Workspace()
        with _lock:
            _workspaces.add(ws)
    return ws


def scratch(key: str, shape: tuple, dtype) -> np.ndarray:
    """A per-thread scratch array, reused across calls (no fresh pages, no page faults).

    Only for buffers that never leave the engine: each Python thread has its own, so
    concurrent calls never share one. The largest buffer of each kind is kept, within
    ``SCRATCH_MAX_BYTES`` over all threads; the view of each (kind, shape) asked for is
    kept too, at most _SCRATCH_VIEWS of them, so that a call (five a layer) does not build
    it again (commit dc1a55e; figures in docs/performance.md); a kind's views go when its
    buffer is outgrown, so that the old buffer is freed.
    """
    global _scratch_bytes
    ws = _tls.__dict__.get("ws") or _workspace()
    v = ws.views.get((key, shape, dtype))
    if v is not None:
        return v
    n = math.prod(shape)
    dt = np.dtype(dtype)
    buf = ws.bufs.get((key, dt))
    if buf is None or buf.shape[0] < n:
        if buf is not None:         # views of the outgrown buffer would keep it alive
            views = ws.views
            for k in [k for k in views if k[0] == key and np.dtype(k[2]) == dt]:
                views.pop(k, None)
        buf = aligned_empty(max(n, 16), dt)
        with _lock:                 # release_memory() may have cleared ws meanwhile
            cur = ws.bufs.pop((key, dt), None)
            if cur is not None:
                _scratch_bytes -= cur.nbytes
                ws.nbytes -= cur.nbytes
            keep = _scratch_bytes + buf.nbytes <= SCRATCH_MAX_BYTES
            if keep:
                _scratch_bytes += buf.nbytes
                ws.nbytes += buf.nbytes
                ws.bufs[(key, dt)] = buf
        if not keep:                # over the bound: this call's alone
            return buf[:n].reshape(shape)
    if len(ws.views) >= _SCRATCH_VIEWS:
        ws.views.clear()
    v = ws.views[(key, shape, dtype)] = buf[:n].reshape(shape)
    return v


def _size_class(n: int) -> int:
    """`n` bytes rounded up to one of four sizes per octave (at most 25 % more)."""
    if n <= 4096:
        return 4096
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


class ScratchPool:
    """Large buffers kept for reuse between training calls (see the module's docstring).

    Only buffers that never reach the caller go through it: the saved gates and cell
    states (given back when their context dies), the gate gradients and the other
    temporaries of backward, the packed weights.
    """

    MIN_BYTES = 1 << 20          # smaller ones come from the malloc heap without faults
    MAX_PER_CLASS = 2
    MAX_BYTES = 512 << 20
    IDLE_S = 60.0

    def __init__(self):
        self._free: dict[int, list] = {}      # size class -> [(raw, time given back)]
        self._bytes = 0
        self._lock = threading.Lock()
        self._mine: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # id -> raw handed out

    def take(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        if n < self.MIN_BYTES:
            return np.empty(shape, dtype)
        c = _size_class(n)
        raw = None
        with self._lock:
            self._expire(time.monotonic())
            lst = self._free.get(c)
            if lst:
                raw = lst.pop()[0]
                self._bytes -= c
        if raw is None:
            raw = np.empty(c, np.uint8)
        self._mine[id(raw)] = raw
        return raw[:n].view(dtype).reshape(shape)

    def raw(self, a):
        """The pooled buffer behind `a` (from :meth:`take`), or None."""
        if a is None:
            return None
        b = a.base
        if b is not None and self._mine.get(id(b)) is b:
            return b
        return None

    def give(self, *arrays) -> None:
        """Return buffers from :meth:`take` (their owner must not use them any more)."""
        self.give_raw([self.raw(a) for a in arrays])

    def give_raw(self, raws) -> None:
        now = time.monotonic()
        with self._lock:
            for r in raws:
                if r is None or self._mine.pop(id(r), None) is not r:
                    continue
                c = r.nbytes
                if c > self.MAX_BYTES:
                    continue
                lst = self._free.setdefault(c, [])
                if len(lst) >= self.MAX_PER_CLASS:
                    continue
                lst.append((r, now))
                self._bytes += c
            while self._bytes > self.MAX_BYTES:         # least recently given back first
                c, lst = min(((c, lst) for c, lst in self._free.items() if lst), key=lambda e: e[1][0][1])
                lst.pop(0)
                self._bytes -= c
            self._expire(now)

    def _expire(self, now: float) -> None:
        cut = now - self.IDLE_S
        for c, lst in self._free.items():
            while lst and lst[0][1] < cut:
                lst.pop(0)
                self._bytes -= c

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes kept now."""
        return self._bytes


POOL = ScratchPool()


def release_memory() -> None:
    """Free every buffer rnnfast keeps between calls: each thread's inference scratch,
    the serving path's buffers and training's pool. Calls in flight keep what they hold
    until they end; later calls allocate afresh."""
    with _lock:
        spaces = list(_workspaces)
        smalls = list(_small_caches)
    for ws in spaces:
        ws.clear()
    for c in smalls:
        c.clear()
    POOL.clear()


def memory_info() -> dict:
    """Bytes kept between calls: ``scratch`` (inference, all threads), ``serving`` (the
    short-call path's buffers, all threads) and ``pool`` (training)."""
    with _lock:
        smalls = list(_small_caches)
    serving = 0
    for c in smalls:
        for bufs in list(c.values()):
            serving += sum(b.nbytes for b in bufs)
    return {"scratch": _scratch_bytes, "serving": serving, "pool": POOL.nbytes}
