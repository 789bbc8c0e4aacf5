"""rnnfast.memory: what is kept between calls stays bounded, is freed by
``rnnfast.release_memory()`` for every thread, and never changes a result."""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

import rnnfast
from rnnfast import memory


def _kept() -> int:
    info = rnnfast.memory_info()
    return info["scratch"] + info["serving"] + info["pool"]


def _lstm_case(T=30, B=4, I=16, H=32, seed=0):
    layer = rnnfast.LSTM(I, H, seed=seed)
    x = np.random.default_rng(seed).standard_normal((T, B, I)).astype(np.float32)
    return layer, x


def test_release_memory_frees_every_threads_buffers():
    """Buffers kept by two other live threads (inference scratch, the serving path's
    buffers) and by training's pool are all freed by one release_memory() call here."""
    rnnfast.release_memory()
    assert _kept() == 0
    layer, x = _lstm_case()
    big = rnnfast.LSTM(64, 256, seed=1)
    xb = np.random.default_rng(1).standard_normal((40, 16, 64)).astype(np.float32)
    ran, done = threading.Barrier(3), threading.Event()

    def work():
        layer(x)
        layer(x[:1, :1])                        # a served token: the serving path
        ran.wait()
        done.wait()

    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    ran.wait()
    y, _ = big.forward(xb, train=True)           # training: pooled saved gates
    big.backward(np.ones_like(y))
    big._ctx = None
    gc.collect()
    info = rnnfast.memory_info()
    assert info["scratch"] > 0 and info["pool"] > 0, info
    rnnfast.release_memory()
    assert rnnfast.memory_info() == {"scratch": 0, "serving": 0, "pool": 0}
    done.set()
    for w in workers:
        w.join()
    # and nothing is lost: later calls allocate afresh and agree with the reference
    with rnnfast.backend("reference"):
        want, _ = layer(x)
    got, _ = layer(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_threads_scratch_is_given_back_when_it_ends():
    rnnfast.release_memory()
    layer, x = _lstm_case(T=50, B=8, H=64)

    def work():
        layer(x)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    gc.collect()
    assert rnnfast.memory_info()["scratch"] == 0


def test_scratch_over_its_bound_is_not_kept(monkeypatch):
    """A call whose buffers would take the scratch past SCRATCH_MAX_BYTES gets them for
    that call alone: the result is right and nothing more is kept."""
    rnnfast.release_memory()
    monkeypatch.setattr(memory, "SCRATCH_MAX_BYTES", 64 << 10)
    layer, x = _lstm_case(T=60, B=16, H=64)
    with rnnfast.backend("reference"):
        want, _ = layer(x)
    for _ in range(3):
        got, _ = layer(x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert rnnfast.memory_info()["scratch"] <= 64 << 10
    monkeypatch.undo()
    rnnfast.release_memory()


def test_pool_stays_bounded_over_many_shapes():
    """1000 buffers of random sizes taken and given back: at most MAX_PER_CLASS per size
    class and MAX_BYTES in all are kept, and a buffer fits what was asked for."""
    pool = memory.ScratchPool()
    pool.MAX_BYTES = 64 << 20
    rng = np.random.default_rng(0)
    held = []
    for _ in range(1000):
        n = int(rng.integers(1 << 20, 24 << 20))
        a = pool.take((n // 4,), np.float32)
        assert a.shape == (n // 4,) and a.nbytes <= pool.raw(a).nbytes < 1.26 * a.nbytes + 4096
        held.append(a)
        if len(held) > 3 or rng.random() < 0.5:
            pool.give(held.pop(0))
        assert pool.nbytes <= pool.MAX_BYTES
        assert all(len(v) <= pool.MAX_PER_CLASS for v in pool._free.values())
        assert pool.nbytes == sum(c * len(v) for c, v in pool._free.items())
    pool.give(*held)
    assert pool.nbytes <= pool.MAX_BYTES


def test_pool_reuses_and_expires(monkeypatch):
    pool = memory.ScratchPool()
    a = pool.take((1 << 20,), np.float32)
    raw = pool.raw(a)
    pool.give(a)
    assert pool.nbytes == raw.nbytes
    b = pool.take((1 << 20,), np.float32)
    assert pool.raw(b) is raw and pool.nbytes == 0            # the same buffer again
    pool.give(b)
    pool.give(b)                                                # twice: kept once
    assert pool.nbytes == raw.nbytes
    pool.IDLE_S = 0.0
    pool.take((5,), np.float32)                                 # small: not pooled, but expires
    pool.give(pool.take((3 << 20,), np.float32))
    pool.take((10,), np.float32)
    pool._lock.acquire()
    pool._expire(float("inf"))
    pool._lock.release()
    assert pool.nbytes == 0
    foreign = np.empty(1 << 21, np.float32)
    pool.give(foreign)                                          # not the pool's: ignored
    assert pool.nbytes == 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from Linux's /proc")
def test_resident_memory_flat_over_many_calls():
    """10,000 inference calls and 2,000 training steps over changing shapes: once every
    shape has been seen, the process's resident memory does not grow."""
    rng = np.random.default_rng(0)
    layers = [rnnfast.LSTM(8, 16, seed=0), rnnfast.GRU(8, 16, num_layers=2, seed=1)]
    shapes = [(int(rng.integers(1, 20)), int(rng.integers(1, 6))) for _ in range(12)]
    xs = [rng.standard_normal((T, B, 8)).astype(np.float32) for T, B in shapes]

    def run(n_inf, n_train):
        for i in range(n_inf):
            layers[i % 2](xs[i % len(xs)])
        for i in range(n_train):
            layer = layers[i % 2]
            y, _ = layer.forward(xs[i % len(xs)], train=True)
            layer.backward(y)

    run(1000, 200)                 # every shape seen, every buffer kept
    gc.collect()
    before = _rss()
    run(10_000, 2_000)
    gc.collect()
    grown = _rss() - before
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.1f} MB"
