"""rnnfast.dask: predict and gradients over dask arrays chunked along the batch (issue 16).

Most cases run on dask's synchronous or threaded scheduler; one module-scoped
``distributed.LocalCluster`` (two single-threaded worker processes) covers what only a
cluster shows: pickling to workers, weights sent once, and a worker lost mid-job.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import rnnfast

from conftest import require_oracle

dask = require_oracle("dask")
distributed = require_oracle("distributed")
da = require_oracle("dask.array")

RNG = np.random.default_rng(0)


def _data(T, B, I, batch_first=False, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    return x


def _chunked(x, layer, n):
    b = 0 if layer.batch_first else 1
    chunks = [-1, -1, -1]
    chunks[b] = n
    return da.from_array(x, chunks=tuple(chunks))


def _assert_states(got, want, tol):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=tol, atol=tol)
    else:
        np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


LAYERS = [
    ("lstm", lambda: rnnfast.LSTM(6, 10, dtype=np.float64, seed=1)),
    ("gru-bidir-2l", lambda: rnnfast.GRU(6, 10, num_layers=2, bidirectional=True, dtype=np.float64, seed=2)),
    ("rnn-bf", lambda: rnnfast.RNN(6, 10, batch_first=True, dtype=np.float64, seed=3)),
    ("lstm-proj", lambda: rnnfast.LSTM(6, 10, proj_size=4, dtype=np.float64, seed=4)),
    ("mingru", lambda: rnnfast.MinGRU(6, 10, dtype=np.float64, seed=5)),
]


@pytest.mark.parametrize("name,make", LAYERS, ids=[n for n, _ in LAYERS])
@pytest.mark.parametrize("use_lengths", [False, True])
def test_predict_equals_local_call(name, make, use_lengths):
    layer = make()
    x = _data(7, 11, 6, layer.batch_first)
    lengths = RNG.integers(0, 8, 11) if use_lengths else None
    want_y, want_h = layer(x, lengths=lengths)
    with dask.config.set(scheduler="sync"):
        y, h = rnnfast.dask.predict(layer, _chunked(x, layer, 4), lengths=lengths, return_state=True)
        assert y.chunks[0 if layer.batch_first else 1] == (4, 4, 3)
        np.testing.assert_allclose(y.compute(), want_y, rtol=1e-12, atol=1e-12)
        _assert_states(dask.compute(h)[0], want_h, 1e-12)
        y_only = rnnfast.dask.predict(layer, _chunked(x, layer, 4), lengths=lengths)
        assert isinstance(y_only, da.Array)


def test_predict_rechunks_time_and_features_and_takes_dask_lengths():
    layer = rnnfast.LSTM(6, 8, dtype=np.float64, seed=0)
    x = _data(9, 10, 6)
    lengths = RNG.integers(0, 10, 10)
    xd = da.from_array(x, chunks=(3, 4, 2))          # time and features split: rechunked
    with dask.config.set(scheduler="threads"):
        y = rnnfast.dask.predict(layer, xd, lengths=da.from_array(lengths, chunks=3))
        np.testing.assert_allclose(y.compute(), layer(x, lengths=lengths)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="3-D"):
        rnnfast.dask.predict(layer, da.zeros((9, 6), chunks=3))


@pytest.mark.parametrize("prec", ["fp32", "bf16", "int8"])
def test_predict_frozen_layers(prec):
    layer = rnnfast.LSTM(6, 12, num_layers=2, seed=0)
    frozen = layer.freeze(prec)
    x = _data(5, 9, 6, dtype=np.float32)
    want = frozen(x)[0]
    with dask.config.set(scheduler="threads"):
        y = rnnfast.dask.predict(frozen, _chunked(x, layer, 4)).compute()
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,make", LAYERS, ids=[n for n, _ in LAYERS])
def test_gradients_equal_whole_batch(name, make):
    layer = make()
    x = _data(6, 10, 6, layer.batch_first)
    lengths = RNG.integers(1, 7, 10)
    y, _ = layer.forward(x, lengths=lengths, train=True)
    dy = np.random.default_rng(7).standard_normal(y.shape)
    want_dx, _ = layer.backward(dy)
    want = {k: v.copy() for k, v in layer.grads.items()}
    layer.grads = {}
    with dask.config.set(scheduler="threads"):
        dx, grads = rnnfast.dask.gradients(layer, _chunked(x, layer, 3), dy, lengths=lengths)
        np.testing.assert_allclose(dx.compute(), want_dx, rtol=1e-6, atol=1e-9)
    assert set(grads) == set(want) and layer.grads == {}
    for k in want:
        assert isinstance(grads[k], np.ndarray)
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-6, atol=1e-9)


def test_gradients_refuse_dropout_and_frozen():
    with pytest.raises(ValueError, match="dropout"):
        rnnfast.dask.gradients(rnnfast.LSTM(3, 4, num_layers=2, dropout=0.5), da.zeros((2, 2, 3), chunks=1),
                               np.zeros((2, 2, 4)))
    with pytest.raises(TypeError, match="trainable"):
        rnnfast.dask.gradients(rnnfast.LSTM(3, 4).freeze(), da.zeros((2, 2, 3), chunks=1), np.zeros((2, 2, 4)))


def test_graph_holds_the_weights_once():
    layer = rnnfast.LSTM(64, 128, seed=0)
    wbytes = sum(v.nbytes for v in layer.parameters().values())
    x = da.zeros((10, 64, 64), chunks=(10, 4, 64), dtype=np.float32)      # 16 tasks
    y, _ = rnnfast.dask.predict(layer, x, return_state=True)
    graph = dict(dask.array.Array.__dask_graph__(y))
    sizes = {k: len(pickle.dumps(v)) for k, v in graph.items()}
    big = [k for k, s in sizes.items() if s > wbytes // 2]
    assert len(big) == 1, big                      # the layer, once
    assert sum(sizes.values()) < wbytes + 200_000
    assert max(s for k, s in sizes.items() if k not in big) < 1 << 20


def test_import_rnnfast_does_not_import_dask():
    code = "import sys, rnnfast; assert 'dask' not in sys.modules; rnnfast.dask; assert 'dask' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------ on a LocalCluster
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)
    cl = distributed.Client(cluster)
    try:
        yield cl
    finally:
        cl.close()
        cluster.close()


def test_cluster_predict_layers_and_frozen(client):
    x = _data(6, 12, 6)
    lengths = RNG.integers(0, 7, 12)
    for layer in (rnnfast.LSTM(6, 8, bidirectional=True, dtype=np.float64, seed=0),
                  rnnfast.GRU(6, 8, num_layers=2, dtype=np.float64, seed=1),
                  rnnfast.RNN(6, 8, dtype=np.float64, seed=2, num_threads=1)):
        y, h = rnnfast.dask.predict(layer, _chunked(x, layer, 3), lengths=lengths, return_state=True)
        y, h = dask.compute(y, h)
        wy, wh = layer(x, lengths=lengths)
        np.testing.assert_allclose(y, wy, rtol=1e-12, atol=1e-12)
        _assert_states(h, wh, 1e-12)
    x32 = x.astype(np.float32)
    for prec in ("fp32", "int8"):
        frozen = rnnfast.LSTM(6, 8, seed=3).freeze(prec)
        y = rnnfast.dask.predict(frozen, _chunked(x32, frozen, 3), lengths=lengths).compute()
        np.testing.assert_allclose(y, frozen(x32, lengths=lengths)[0], rtol=1e-6, atol=1e-6)


def test_cluster_gradients(client):
    layer = rnnfast.LSTM(6, 8, num_layers=2, dtype=np.float64, seed=0)
    x = _data(6, 12, 6)
    y, _ = layer.forward(x, train=True)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    want_dx, _ = layer.backward(dy)
    dx, grads = rnnfast.dask.gradients(layer, _chunked(x, layer, 4), dy)
    np.testing.assert_allclose(dx.compute(), want_dx, rtol=1e-6, atol=1e-9)
    for k, v in layer.grads.items():
        np.testing.assert_allclose(grads[k], v, rtol=1e-6, atol=1e-9)


def test_cluster_weights_sent_once(client):
    layer = rnnfast.LSTM(64, 256, seed=0)                # 0.33 MB of weights, 16 tasks
    x = da.zeros((4, 64, 64), chunks=(4, 4, 64), dtype=np.float32)
    y = rnnfast.dask.predict(layer, x)
    graph = dict(y.__dask_graph__())
    wbytes = sum(v.nbytes for v in layer.parameters().values())
    assert len(pickle.dumps(graph)) < wbytes + 200_000
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no large-graph warning
        np.testing.assert_allclose(y.compute(), layer(np.zeros((4, 64, 64), np.float32))[0], atol=1e-7)


class _Slow:
    """A layer whose calls take a while (so that a worker dies with tasks in flight)."""

    def __init__(self, layer, delay):
        self.layer, self.delay, self.batch_first = layer, delay, layer.batch_first

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.layer(*args, **kwargs)


def test_cluster_worker_killed_mid_job(client):
    """A worker lost while the job runs: the scheduler reruns its tasks on the other
    worker (the layer is in the graph, not only in the lost worker's memory), so the
    result is the whole correct output, or a clear error, never a partial one."""
    layer = rnnfast.GRU(6, 8, dtype=np.float64, seed=0)
    x = _data(5, 16, 6)
    slow = _Slow(layer, 0.3)
    y = rnnfast.dask.predict(slow, _chunked(x, layer, 2))         # 8 tasks of 0.3 s on 2 workers
    fut = client.compute(y)
    time.sleep(0.6)
    victim = next(iter(client.scheduler_info()["workers"]))
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    try:
        got = fut.result(timeout=60)
    except Exception as e:  # noqa: BLE001 - a clear error is acceptable, a partial result is not
        assert "worker" in f"{type(e).__name__}: {e}".lower(), repr(e)
    else:
        np.testing.assert_allclose(got, layer(x)[0], rtol=1e-12, atol=1e-12)
