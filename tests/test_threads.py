"""Thread count (rnnfast.threads) and calls from several Python threads at once."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import rnnfast

from conftest import (
    BACKENDS,
    VARIANT_IDS,
    VARIANTS,
    flat_states,
    make_layer,
    random_hx,
    ref_stack,
    rng_for,
    spy_run_layer,
    tol_for,
)


def test_thread_count_set_get():
    n0 = rnnfast.get_num_threads()
    assert isinstance(n0, int) and n0 >= 1
    for n in (1, 2, 3, 7):
        rnnfast.set_num_threads(n)
        assert rnnfast.get_num_threads() == n
    rnnfast.set_num_threads(np.int64(2))             # any integer type
    assert rnnfast.get_num_threads() == 2
    with pytest.raises(ValueError):
        rnnfast.set_num_threads(0)
    assert rnnfast.get_num_threads() == 2


def test_thread_count_is_process_wide():
    rnnfast.set_num_threads(3)
    seen = []
    t = threading.Thread(target=lambda: seen.append(rnnfast.get_num_threads()))
    t.start()
    t.join()
    assert seen == [3]
    t = threading.Thread(target=lambda: rnnfast.set_num_threads(1))
    t.start()
    t.join()
    assert rnnfast.get_num_threads() == 1


def _result(layer, x, hx=None, ln=None):
    y, h = layer(x, hx, ln)
    return [y, *flat_states(h)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("be", BACKENDS)
def test_results_independent_of_thread_count(be, variant, dtype):
    """1, 2 and 3 threads give the same results within float tolerance (hidden sizes that
    split over several unit blocks, both directions, variable lengths)."""
    _, kind, opts = variant
    rng = rng_for("nthreads", be, kind, repr(opts), np.dtype(dtype).name)
    for H, bidir in [(40, True), (33, False)]:
        layer = make_layer(kind, opts, 6, H, num_layers=2, bidirectional=bidir, dtype=dtype, seed=H)
        x = rng.standard_normal((7, 3, 6)).astype(dtype)
        hx = random_hx(layer, 3, rng, dtype)
        ln = np.array([7, 2, 5])
        res = {}
        with rnnfast.backend(be):
            for n in (1, 2, 3):
                rnnfast.set_num_threads(n)
                res[n] = _result(layer, x, hx, ln)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else tol_for(dtype)
        for n in (2, 3):
            for a, b in zip(res[n], res[1]):
                np.testing.assert_allclose(a, b, err_msg=f"{n} threads vs 1", **tol)


def _jobs(rng, layer, n, B=3, T=6, lengths=True):
    jobs = []
    for i in range(n):
        x = rng.standard_normal((T, B, layer.input_size)).astype(layer.dtype)
        hx = random_hx(layer, B, rng, layer.dtype) if i % 2 else None
        ln = rng.integers(0, T + 1, B) if lengths and i % 3 == 0 else None
        jobs.append((x, hx, ln))
    return jobs


@pytest.mark.parametrize("be", BACKENDS)
def test_concurrent_calls_on_one_layer(be):
    """8 Python threads calling one layer at once: each result identical to the serial one."""
    rng = rng_for("conc-one", be)
    for kind, opts in [("lstm", {"proj": True}), ("gru", {"linear_before_reset": False}), ("rnn", {})]:
        layer = make_layer(kind, opts, 5, 20, num_layers=2, bidirectional=True, dtype=np.float32, seed=1)
        jobs = _jobs(rng, layer, 16)
        with rnnfast.backend(be):
            serial = [_result(layer, *j) for j in jobs]

        def work(j, layer=layer):
            with rnnfast.backend(be):
                return _result(layer, *j)

        with ThreadPoolExecutor(max_workers=8) as ex:
            conc = list(ex.map(work, jobs))
        for i, (a, b) in enumerate(zip(conc, serial)):
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v, err_msg=f"{kind} job {i}")


def test_concurrent_calls_on_different_layers_and_backends():
    """8 threads mixing layers, backends (each thread its own scope) and the functional API."""
    rng = rng_for("conc-many")
    layers = [make_layer("lstm", {}, 4, 18, num_layers=2, bidirectional=True, dtype=np.float64, seed=2),
              make_layer("gru", {}, 4, 20, num_layers=1, bidirectional=True, dtype=np.float32, seed=3),
              make_layer("rnn", {"nonlinearity": "relu"}, 4, 9, num_layers=3, dtype=np.float64, seed=4),
              make_layer("lstm", {"proj": True}, 4, 12, dtype=np.float32, seed=5)]
    tasks = []
    for i in range(32):
        layer = layers[i % len(layers)]
        be = BACKENDS[i % len(BACKENDS)]
        x, hx, ln = _jobs(rng, layer, 1, lengths=i % 2 == 0)[0]
        tasks.append((layer, be, x, hx, ln))
    w_ih, w_hh = rng.standard_normal((12, 4)) * 0.3, rng.standard_normal((12, 4)) * 0.3

    def run(task):
        layer, be, x, hx, ln = task
        with rnnfast.backend(be):
            out = _result(layer, x, hx, ln)
            out.append(rnnfast.gru(x.astype(np.float64), w_ih, w_hh, lengths=ln)[0])
            assert rnnfast.get_backend() == be
        return out

    serial = [run(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=8) as ex:
        conc = list(ex.map(run, tasks))
    for i, (a, b) in enumerate(zip(conc, serial)):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v, err_msg=f"task {i} ({tasks[i][1]})")


@pytest.mark.parametrize("be", BACKENDS)
def test_thread_count_applies_to_calls_from_other_threads(be):
    """The count set in the main thread is what worker threads use: results from a worker
    equal the main thread's at the same count."""
    rng = rng_for("conc-count", be)
    layer = make_layer("lstm", {}, 5, 40, bidirectional=True, dtype=np.float32, seed=9)
    x = rng.standard_normal((6, 2, 5)).astype(np.float32)
    for n in (1, 2):
        rnnfast.set_num_threads(n)
        with rnnfast.backend(be):
            main = _result(layer, x)

        def work(n=n):
            with rnnfast.backend(be):
                assert rnnfast.get_num_threads() == n
                return _result(layer, x)

        with ThreadPoolExecutor(max_workers=2) as ex:
            other = ex.submit(work).result()
        for u, v in zip(other, main):
            np.testing.assert_array_equal(u, v)


_FEWER_THREADS_SCRIPT = """
import numpy as np, rnnfast
rnnfast.set_num_threads(4)
rng = np.random.default_rng(0)
worst = 0.0
for cls in (rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN):
    for kw, T in ((dict(num_layers=2, bidirectional=True), 7), ({}, 1), ({}, 12)):
        lay = cls(24, 48, dtype=np.float64, seed=1, **kw)
        x = rng.standard_normal((T, 9, 24))
        with rnnfast.backend("cython"):
            y, _ = lay.forward(x, train=True)
            dx, _ = lay.backward(np.ones_like(y))
            g = dict(lay.grads)
        with rnnfast.backend("reference"):
            yr, _ = lay.forward(x, train=True)
            dxr, _ = lay.backward(np.ones_like(yr))
        errs = [np.abs(y - yr).max(), np.abs(dx - dxr).max()]
        errs += [np.abs(g[k] - lay.grads[k]).max() for k in g]
        worst = max(worst, *errs)
print(worst)
"""


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_cython_kernels_correct_when_openmp_gives_fewer_threads():
    """OpenMP may give a parallel region fewer threads than asked for (OMP_THREAD_LIMIT,
    nested regions); the kernels split the work by the team they get. Regression: the
    layer kernels once split it by the count asked for and skipped the work of the
    missing threads (LSTM outputs off by 1e35 under OMP_THREAD_LIMIT=1)."""
    import os
    import subprocess
    import sys
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rnnfast.__file__)))
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in [pkg_parent, env.get("PYTHONPATH", "")] if p])
    out = subprocess.run([sys.executable, "-c", _FEWER_THREADS_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-9, out.stdout


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_forked_child_after_parallel_kernels_runs_on_one_thread():
    """GNU OpenMP cannot open parallel regions in a child forked after the parent ran
    some: the child would wait forever. Regression: a pre-fork server (model loaded and
    warmed up, then workers forked) hung on its first call. Such a child runs on one
    thread, gets the same answers, and is warned when it asks for more threads."""
    import multiprocessing as mp
    rnnfast.set_num_threads(2)
    lay = make_layer("lstm", {}, 32, 64, dtype=np.float32, seed=3)
    x = rng_for("fork").standard_normal((1, 2, 32)).astype(np.float32)
    xl = rng_for("fork-long").standard_normal((50, 9, 32)).astype(np.float32)
    want, want_long = lay(x)[0], lay(xl)[0]          # the parent runs parallel kernels
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        nthreads, warned, got, got_long = pool.apply_async(_child_calls, (lay, x, xl)).get(timeout=60)
    assert nthreads == 1 and warned
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_long, want_long, rtol=1e-5, atol=1e-6)
    assert rnnfast.get_num_threads() == 2                # the parent keeps its threads
    np.testing.assert_array_equal(lay(x)[0], want)


def _child_calls(lay, x, xl):
    import warnings
    n = rnnfast.get_num_threads()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rnnfast.set_num_threads(2)
    warned = any(issubclass(i.category, RuntimeWarning) and "spawn" in str(i.message) for i in w)
    ys = [lay(x)[0] for _ in range(20)]
    return n, warned and rnnfast.get_num_threads() == 1, ys[-1], lay(xl)[0]


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_serving_calls_after_idle_and_other_team_sizes():
    """Serving calls after the kernels' threads have gone idle (asleep), and with the
    team size changing between calls, give the oracle's answers."""
    import time
    lay = make_layer("gru", {}, 48, 96, dtype=np.float64, seed=5)
    x = rng_for("idle").standard_normal((1, 3, 48))
    want = ref_stack(lay, x)[0]
    for n in (2, 4, 3, 2, 1, 4):
        rnnfast.set_num_threads(n)
        for _ in range(3):
            np.testing.assert_allclose(lay(x)[0], want, rtol=1e-10, atol=1e-12)
            time.sleep(0.005)


class _Held:
    """A kernel call in flight on another Python thread, holding at most `most` threads
    until released."""

    def __init__(self, most: int = 0):
        from rnnfast import threads
        self._go, self._got = threading.Event(), threading.Event()
        self.n = None

        def run():
            self.n = threads.enter_call(most)
            self._got.set()
            self._go.wait(30)
            threads.leave_call(self.n)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        assert self._got.wait(30)

    def release(self):
        self._go.set()
        self._t.join(30)


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_calls_in_flight_share_the_thread_count(monkeypatch):
    """A kernel call that starts while others run takes its share of the threads they
    leave free (min(free, max(1, n // k)) for k calls), so that several serving threads
    never use more threads than the set count; the threads come back when the calls end,
    also after a call that raised."""
    from rnnfast import threads
    seen = []
    fail = []

    def on_call(a, k):
        seen.append(a[-1])          # the thread count, run_layer's last positional argument
        if fail:
            raise RuntimeError("kernel failed")

    spy_run_layer(monkeypatch, on_call)
    prev = rnnfast.get_num_threads()
    lay = rnnfast.LSTM(8, 16, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 3, 8)).astype(np.float32)
    try:
        rnnfast.set_num_threads(4)
        with rnnfast.backend("cython"):
            want = lay(x)[0]
            assert seen[-1] == 4
            a = _Held(2)                         # another call in flight, on 2 threads
            assert a.n == 2
            np.testing.assert_array_equal(lay(x)[0], want)
            assert seen[-1] == 2
            b = _Held(1)                         # two others: one thread left
            assert b.n == 1
            lay(x)
            assert seen[-1] == 1
            b.release()
            a.release()
            fail.append(True)
            with pytest.raises(RuntimeError, match="kernel failed"):
                lay(x)
            fail.clear()
            assert len(threads._inflight) == 0
            lay(x)
            assert seen[-1] == 4
    finally:
        rnnfast.set_num_threads(prev)
    # the lean serving path and training take part too
    counts = []
    real_enter = threads.enter_call
    monkeypatch.setattr(threads, "enter_call", lambda most=0: counts.append(len(threads._inflight)) or real_enter(most))
    with rnnfast.backend("cython"):
        lay(x[:1])
        y, _ = lay.forward(x, train=True)
        lay.backward(np.ones_like(y))
    assert len(counts) == 3 and len(threads._inflight) == 0


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_call_waits_while_every_thread_is_taken(monkeypatch):
    """Regression: the first call kept all the threads while later ones took a share on
    top (two callers used 3 threads on 2 cores). A call that finds every thread taken
    waits until one is free, then runs on what is free."""
    from rnnfast import threads
    seen = []
    spy_run_layer(monkeypatch, lambda a, k: seen.append(a[-1]))
    prev = rnnfast.get_num_threads()
    lay = rnnfast.GRU(8, 16, seed=0)
    x = np.random.default_rng(1).standard_normal((6, 3, 8)).astype(np.float32)
    done = threading.Event()
    out = []
    try:
        rnnfast.set_num_threads(2)
        want = lay(x)[0]
        seen.clear()
        held = _Held()                           # alone: takes both threads
        assert held.n == 2

        def call():
            with rnnfast.backend("cython"):
                out.append(lay(x)[0])
            done.set()

        t = threading.Thread(target=call)
        t.start()
        assert not done.wait(0.3)                # no thread free: the call waits
        assert seen == []
        held.release()
        assert done.wait(30)
        t.join()
        assert seen == [2]
        np.testing.assert_array_equal(out[0], want)
        assert threads._inflight == []
    finally:
        rnnfast.set_num_threads(prev)


def test_threads_in_use_never_exceed_the_count():
    """Eight Python threads calling layers at once: the kernels' thread counts in flight
    never add up to more than the set count, and a call nested in another on the same
    Python thread runs on that call's threads instead of waiting for itself."""
    from rnnfast import threads
    prev = rnnfast.get_num_threads()
    peak = []
    real_enter = threads.enter_call

    def enter(most=0):
        n = real_enter(most)
        peak.append(sum(e[1] for e in list(threads._inflight)))
        return n

    lay = rnnfast.LSTM(16, 48, seed=1)
    x = np.random.default_rng(2).standard_normal((12, 5, 16)).astype(np.float32)
    want = lay(x)[0]
    try:
        rnnfast.set_num_threads(2)
        threads.enter_call = enter
        with ThreadPoolExecutor(8) as ex:
            ys = list(ex.map(lambda i: lay(x)[0] if i % 2 else lay(x[:1])[0], range(64)))
        threads.enter_call = real_enter
        assert max(peak) <= 2, max(peak)
        n = threads.enter_call()
        try:
            assert threads.enter_call() == n      # nested: no wait
            threads.leave_call(n)
        finally:
            threads.leave_call(n)
    finally:
        threads.enter_call = real_enter
        rnnfast.set_num_threads(prev)
    assert threads._inflight == []
    for i, y in enumerate(ys):
        np.testing.assert_allclose(y, want if i % 2 else lay(x[:1])[0], rtol=1e-5, atol=1e-6)


def test_forked_child_starts_with_no_calls_in_flight():
    """A child forked while the parent had a kernel call running (another thread) starts
    with none in flight: it does not share its thread count with calls it does not have."""
    import multiprocessing as mp

    from rnnfast import threads
    n = threads.enter_call()
    try:
        with mp.get_context("fork").Pool(1) as pool:
            assert pool.apply_async(_child_inflight).get(timeout=60) == 0
        assert len(threads._inflight) == 1
    finally:
        threads.leave_call(n)


def _child_inflight():
    from rnnfast import threads
    return len(threads._inflight)


# ------------------------------------------------- served tokens on the helper thread
def _pool_forced(monkeypatch):
    """Let every served token of 2 threads go to kernels/rf_pool.h's helper (the suite's
    other calls run OpenMP regions all the time, which keep it off: threads.pool_ok)."""
    from rnnfast import _engine, threads
    monkeypatch.setattr(threads, "POOL_QUIET_NS", -1)
    monkeypatch.setattr(_engine, "_SMALL_1T_WBYTES", 0)
    rnnfast.set_num_threads(2)


def _spy_pooled(lay):
    """Wrap the layer's lean-path kernel; returns the list of its results (pooled or not)."""
    import dataclasses
    plan = lay._splan
    seen = []
    lay._splan = dataclasses.replace(plan, kernel=lambda *a: seen.append(bool(plan.kernel(*a))) or seen[-1])
    return seen


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v[2].get("proj")], ids=lambda v: v[0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_served_tokens_on_the_pool_match_reference(variant, dtype, monkeypatch):
    """One token on two threads, the second half on the helper thread (or on the caller
    when the helper is late): every token of a served sequence matches the oracle and
    gives the bits of the same call through an OpenMP region. GRU without
    linear_before_reset has a barrier inside its step and never takes the pool."""
    _pool_forced(monkeypatch)
    _, kind, opts = variant
    lay = make_layer(kind, opts, 37, 70, dtype=dtype, seed=6)
    rng = rng_for("pool", kind, str(opts), np.dtype(dtype).name)
    x = rng.standard_normal((8, 1, 37)).astype(dtype)
    lay(x[:1])
    seen = _spy_pooled(lay)
    state, outs = None, []
    for t in range(8):
        got = lay(x[t:t + 1], state)
        want = ref_stack(lay, x[t:t + 1], state)
        np.testing.assert_allclose(got[0], want[0], **tol_for(dtype))
        outs.append(got)
        state = got[1]
    assert any(seen) == (opts.get("linear_before_reset") is not False)
    from rnnfast import threads
    monkeypatch.setattr(threads, "POOL_QUIET_NS", 1 << 62)      # now OpenMP regions only
    state = None
    for t in range(8):
        got = lay(x[t:t + 1], state)
        for a, b in zip([got[0], *flat_states(got[1])], [outs[t][0], *flat_states(outs[t][1])]):
            np.testing.assert_array_equal(a, b)
        state = got[1]
    assert not any(seen[8:])


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_pool_shared_by_concurrent_servers(monkeypatch):
    """Four Python threads serving tokens at once: one holds the helper at a time, the
    others take OpenMP regions; every caller gets its own sequence's bits."""
    _pool_forced(monkeypatch)
    lays = [make_layer("lstm", {}, 48, 96, dtype=np.float32, seed=20 + i) for i in range(4)]
    xs = [rng_for("pool-conc", i).standard_normal((30, 1, 48)).astype(np.float32) for i in range(4)]

    def serve(i):
        hx, ys = None, []
        for t in range(30):
            y, hx = lays[i](xs[i][t:t + 1], hx)
            ys.append(y)
        return np.concatenate(ys)

    want = [serve(i) for i in range(4)]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(5):
            got = list(ex.map(serve, range(4)))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def test_pool_kept_off_after_openmp_regions(monkeypatch):
    """A call that ran an OpenMP region keeps served tokens off the helper thread for
    POOL_QUIET_NS (OpenMP's threads still spin); single-threaded calls do not."""
    from rnnfast import threads
    monkeypatch.setattr(threads, "POOL_QUIET_NS", 10 ** 9)
    rnnfast.set_num_threads(2)
    lay = make_layer("lstm", {}, 16, 64, dtype=np.float32, seed=1)
    monkeypatch.setattr(threads, "_region_end_ns", 0)
    assert threads.pool_ok()
    rnnfast.set_num_threads(1)
    lay(np.zeros((20, 2, 16), np.float32))
    assert threads.pool_ok()
    rnnfast.set_num_threads(2)
    lay(np.zeros((20, 2, 16), np.float32))
    assert not threads.pool_ok()
    monkeypatch.setattr(threads, "POOL_QUIET_NS", -1)
    assert threads.pool_ok()


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_forked_child_after_pooled_tokens(monkeypatch):
    """A child forked after the parent served tokens on the helper thread (which the
    child does not have) serves the same tokens."""
    import multiprocessing as mp
    _pool_forced(monkeypatch)
    lay = make_layer("gru", {}, 32, 80, dtype=np.float32, seed=4)
    x = rng_for("pool-fork").standard_normal((10, 1, 32)).astype(np.float32)
    lay(x[:1])
    seen = _spy_pooled(lay)
    want = _serve_tokens(lay, x)
    assert any(seen)
    del lay._splan          # (the spy does not pickle; the child builds its own plan)
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_serve_tokens, (lay, x)).get(timeout=60)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _serve_tokens(lay, x):
    hx, ys = None, []
    for t in range(x.shape[0]):
        y, hx = lay(x[t:t + 1], hx)
        ys.append(y)
    return np.concatenate(ys)


# ------------------------------------------------- BLAS thread limits: inside calls only
def _blas_counts():
    import scipy.linalg.cython_blas  # noqa: F401 - the kernels' BLAS is loaded
    from threadpoolctl import threadpool_info
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def _every_entry(backend):
    """Calls of every public kind that use BLAS: inference (general and serving paths),
    training, a time-parallel scan and the minGRU layer."""
    rng = np.random.default_rng(5)
    lstm = rnnfast.LSTM(32, 64, seed=0)
    gru = rnnfast.GRU(32, 64, num_layers=2, bidirectional=True, seed=0)
    mg = rnnfast.MinGRU(32, 64, seed=0)
    x = rng.standard_normal((40, 24, 32)).astype(np.float32)
    with rnnfast.backend(backend):
        lstm(x)
        lstm(x[:3])                              # lean serving path with BLAS (72 rows)
        gru(x, lengths=np.arange(24) % 40 + 1)
        y, _ = lstm.forward(x, train=True)
        lstm.backward(np.ones_like(y))
        mg(np.repeat(x, 20, axis=0))
        y, _ = mg.forward(x, train=True)
        mg.backward(np.ones_like(y))
        rnnfast.linear_scan(rng.random((3000, 64)), rng.standard_normal((3000, 64)))


@pytest.mark.parametrize("be", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("user", [1, 2, 3])
def test_blas_threads_of_the_caller_restored(be, user):
    """Regression: NumPy's BLAS stayed on one thread for the whole process after any
    rnnfast call (the user's np.dot then ran on one core). rnnfast limits BLAS inside its
    calls only: the caller's counts are back after every kind of call."""
    from threadpoolctl import threadpool_limits
    prev = rnnfast.get_num_threads()
    lim = threadpool_limits(limits=user, user_api="blas")
    try:
        rnnfast.set_num_threads(2)
        before = _blas_counts()
        assert before and all(n == user for n in before)
        _every_entry(be)
        assert _blas_counts() == before
    finally:
        lim.restore_original_limits()
        rnnfast.set_num_threads(prev)


@pytest.mark.skipif("cython" not in rnnfast.available_backends(), reason="cython kernels not built")
def test_blas_limited_inside_calls_after_the_caller_changes_it(monkeypatch):
    """Regression: rnnfast remembered the BLAS count it last set and, once the user put
    their own back, never limited BLAS again (its kernels then called a threaded BLAS from
    their own threads: GRU B=32 T=200 2.2-3.5x slower, once 74x). The limit is applied
    in every call, whatever the caller set between calls."""
    from threadpoolctl import threadpool_limits
    inside = []
    spy_run_layer(monkeypatch, lambda a, k: inside.append(_blas_counts()))
    prev = rnnfast.get_num_threads()
    lay = rnnfast.GRU(16, 64, seed=0)
    x = np.random.default_rng(0).standard_normal((20, 32, 16)).astype(np.float32)
    lim = threadpool_limits(limits=2, user_api="blas")
    try:
        rnnfast.set_num_threads(2)
        with rnnfast.backend("cython"):
            for user in (2, 3, 2):
                threadpool_limits(limits=user, user_api="blas")
                lay(x)
                assert all(n == 1 for n in inside[-1]), inside[-1]
                assert all(n == user for n in _blas_counts())
    finally:
        lim.restore_original_limits()
        rnnfast.set_num_threads(prev)


def test_blas_restored_after_concurrent_calls():
    """Calls from several Python threads at once, starting and ending in every order,
    do not restore each other's limits: once all have ended, BLAS has the caller's
    counts again."""
    from threadpoolctl import threadpool_limits
    prev = rnnfast.get_num_threads()
    lim = threadpool_limits(limits=2, user_api="blas")
    lay = rnnfast.LSTM(16, 64, seed=0)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(t), 16, 16)).astype(np.float32) for t in rng.integers(1, 40, 48)]
    try:
        rnnfast.set_num_threads(2)
        before = _blas_counts()

        def work(i):
            x = xs[i]
            if i % 3 == 0:
                _y, _ = lay.forward(x, train=True)
                return None
            return lay(x)[0]

        with ThreadPoolExecutor(6) as ex:
            list(ex.map(work, range(len(xs))))
        assert _blas_counts() == before
        from rnnfast import threads
        assert threads._blas_depth == 0 and threads._blas_saved is None
    finally:
        lim.restore_original_limits()
        rnnfast.set_num_threads(prev)


def test_blas_limit_needs_a_region():
    """set_blas_threads outside a call's region would change the caller's BLAS for good:
    it is refused."""
    from rnnfast import threads
    with pytest.raises(RuntimeError, match="outside a call's BLAS region"):
        threads.set_blas_threads(1)
    with threads.blas_threads(1):
        assert all(n == 1 for n in _blas_counts())


_EXIT_CHILD = r"""
import sys, threading, time
import numpy as np
import rnnfast
rnnfast.set_num_threads(2)
layer = rnnfast.LSTM(64, 64, seed=0)
x = np.random.default_rng(0).standard_normal((50, 8, 64)).astype(np.float32)
layer(x)                                        # OpenMP region
for t in range(20):
    layer(x[:1, :1])                            # served tokens (the helper thread of rf_pool.h)
y, _ = layer.forward(x, train=True)
layer.backward(y)                               # training kernels and pgemm
rnnfast.mingru(x, np.ones((64, 64), np.float32), np.ones((64, 64), np.float32))
with rnnfast.backend("numba"):
    layer(x)                                    # Numba's threads
print([t.name for t in threading.enumerate() if t is not threading.main_thread()])
sys.stdout.flush()
"""


def test_nothing_left_running_when_the_work_ends():
    """After every kind of call (OpenMP regions, served tokens on the helper thread,
    training, scans, Numba), no Python thread of rnnfast's is left, and the process exits
    at once with status 0 (no thread keeps it alive or hangs its shutdown)."""
    import os
    import subprocess
    import sys
    import time
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rnnfast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _EXIT_CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert time.monotonic() - t0 < 60
