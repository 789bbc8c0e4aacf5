"""rnnfast.ray: the map_batches actor, predict and gradients with Ray tasks (issue 16).

The Predictor's batch logic runs locally first (no cluster); everything else on one
module-scoped ``ray.init(num_cpus=2)`` on this machine (loopback only): results equal
a local call, the actor's thread count follows its ``num_cpus``, the layer enters the
object store once and task arguments stay small, and a worker or actor killed mid-job
gives the whole correct result (retried) or a clear error, never part of one.
"""
from __future__ import annotations

import glob
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import rnnfast
import rnnfast.ray as rray
from rnnfast import threads

from conftest import require_oracle

ray = require_oracle("ray")
ray_data = require_oracle("ray.data")

RNG = np.random.default_rng(0)


def _bf(x):
    """Time-major (T, B, I) to rows (B, T, I)."""
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def _close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


LAYERS = [
    ("lstm-2l", lambda: rnnfast.LSTM(6, 10, num_layers=2, dtype=np.float64, seed=1)),
    ("gru-bidir", lambda: rnnfast.GRU(6, 10, bidirectional=True, dtype=np.float64, seed=2)),
    ("rnn-bf", lambda: rnnfast.RNN(6, 10, batch_first=True, dtype=np.float64, seed=3)),
    ("lstm-proj", lambda: rnnfast.LSTM(6, 10, proj_size=4, dtype=np.float64, seed=4)),
    ("mingru", lambda: rnnfast.MinGRU(6, 10, dtype=np.float64, seed=5)),
]


def _rows_result(layer, rows, lengths=None):
    """The local call's outputs and states, per row (batch first)."""
    x = rows if layer.batch_first else np.swapaxes(rows, 0, 1)
    y, st = layer(x, lengths=lengths)
    y = y if layer.batch_first else np.swapaxes(y, 0, 1)
    st = list(st) if isinstance(st, tuple) else [st]
    return y, [np.swapaxes(s, 0, 1) if s.ndim == 3 else s for s in st]


# ------------------------------------------------------------------ Predictor, locally
@pytest.mark.parametrize("name,make", LAYERS, ids=[n for n, _ in LAYERS])
def test_predictor_batch_equals_local_call(name, make):
    layer = make()
    rows = RNG.standard_normal((9, 7, 6))
    lengths = RNG.integers(0, 8, 9)
    st_cols = ("h_n", "c_n") if name.startswith("lstm") else ("h_n",)
    pred = rray.Predictor(layer, state_columns=st_cols)
    assert pred.num_threads is None                     # outside Ray: no bound of its own
    batch = {"x": rows, "lengths": lengths, "id": np.arange(9)}
    keep = {k: v.copy() for k, v in batch.items()}
    out = pred(batch)
    for k, v in keep.items():
        np.testing.assert_array_equal(batch[k], v)      # the caller's batch is not modified
    assert set(out) == {"lengths", "id", "y", *st_cols}
    wy, wst = _rows_result(layer, rows, lengths)
    _close(out["y"], wy, 1e-12)
    for c, w in zip(st_cols, wst):
        assert out[c].shape[0] == 9
        _close(out[c], w, 1e-12)
    np.testing.assert_array_equal(out["id"], np.arange(9))


def test_predictor_ragged_rows_and_float32_frozen():
    layer = rnnfast.LSTM(5, 8, seed=0)
    frozen = layer.freeze("fp32")
    seqs = [RNG.standard_normal((t, 5)).astype(np.float32) for t in (3, 7, 1, 5)]
    col = np.empty(4, dtype=object)
    col[:] = seqs
    out = rray.Predictor(frozen, input_column="seq", output_column="out", state_columns=("h", "c"))({"seq": col})
    assert out["out"].dtype == object
    for i, s in enumerate(seqs):
        wy, (wh, wc) = frozen(s[:, None])
        assert out["out"][i].shape == (len(s), 8)
        np.testing.assert_allclose(out["out"][i], wy[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["h"][i], wh[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["c"][i], wc[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="own lengths"):
        rray.Predictor(frozen, input_column="seq")({"seq": col, "lengths": np.ones(4, int)})


def test_predictor_refuses_bad_input_before_work():
    layer = rnnfast.GRU(4, 6, seed=0)
    with pytest.raises(TypeError, match="rnnfast layer"):
        rray.Predictor(object())
    with pytest.raises(ValueError, match="final state"):
        rray.Predictor(layer, state_columns=("h_n", "c_n"))
    with pytest.raises(ValueError, match="no output"):
        rray.Predictor(layer, output_column=None)
    with pytest.raises(ValueError, match="distinct"):
        rray.Predictor(layer, output_column="x")
    with pytest.raises(ValueError, match="num_threads"):
        rray.Predictor(layer, num_threads=0)
    p = rray.Predictor(layer, num_threads=1)
    assert p.num_threads == 1
    with pytest.raises(KeyError, match="no column 'x'"):
        p({"data": np.zeros((2, 3, 4))})
    with pytest.raises(ValueError, match=r"\(rows, T, I\)"):
        p({"x": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="lengths"):
        p({"x": np.zeros((2, 3, 4)), "lengths": np.array([1, 5])})
    with pytest.raises(ValueError, match="feature size"):
        p({"x": np.zeros((2, 3, 5))})


def test_import_rnnfast_does_not_import_ray():
    code = ("import sys, rnnfast, rnnfast.ray; assert 'ray' not in sys.modules, 'imported';"
            "import numpy as np; p = rnnfast.ray.Predictor(rnnfast.GRU(2, 3)); p({'x': np.zeros((1, 2, 2))});"
            "assert 'ray' not in sys.modules, 'used'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def test_calls_before_ray_init_fail_clearly(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"ray\.init"):
        rray.predict(rnnfast.GRU(2, 3), np.zeros((2, 2, 2)))
    with pytest.raises(RuntimeError, match=r"ray\.init"):
        rray.gradients(rnnfast.GRU(2, 3), np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


# ------------------------------------------------------------------ on ray.init(num_cpus=2)
@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        pytest.fail("Ray was initialized before this module's fixture", pytrace=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    # the test's own classes (subclasses of Predictor and of a layer) travel by value:
    # Ray's workers cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ctx = ray_data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


class _Reporting(rray.Predictor):
    """A Predictor whose batches also report the thread counts its kernel calls got,
    its thread bound and whether its weights are read-only."""

    def __call__(self, batch):
        seen = []
        real = threads.enter_call

        def enter(most=0):
            n = real(most)
            seen.append(n)
            return n
        threads.enter_call = enter
        try:
            out = super().__call__(batch)
        finally:
            threads.enter_call = real
        n = len(batch[self.input_column])
        ro = not any(p.flags.writeable for p in self.layer.parameters().values())
        out.update(seen=np.full(n, max(seen)), bound=np.full(n, self.num_threads), readonly=np.full(n, ro))
        return out


def _dataset(rows, lengths=None, blocks=4):
    items = [{"id": i, "x": rows[i]} | ({} if lengths is None else {"lengths": int(lengths[i])})
             for i in range(len(rows))]
    return ray_data.from_items(items, override_num_blocks=blocks)


def _sorted(out):
    out = sorted(out, key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(len(out))), "rows lost or repeated"
    return out


@pytest.mark.parametrize("num_cpus,size", [(1, 2), (2, 1)])
def test_map_batches_equals_local_call_and_binds_threads(cluster, num_cpus, size):
    layer = rnnfast.LSTM(6, 12, num_layers=2, dtype=np.float64, seed=0)
    rows = RNG.standard_normal((24, 9, 6))
    lengths = RNG.integers(0, 10, 24)
    out = _dataset(rows, lengths).map_batches(
        _Reporting, fn_constructor_args=(ray.put(layer),), fn_constructor_kwargs={"state_columns": ("h_n", "c_n")},
        num_cpus=num_cpus, compute=ray_data.ActorPoolStrategy(size=size), batch_size=6,
        batch_format="numpy").take_all()
    out = _sorted(out)
    wy, (wh, wc) = _rows_result(layer, rows, lengths)
    _close(np.stack([r["y"] for r in out]), wy, 1e-12)
    _close(np.stack([r["h_n"] for r in out]), wh, 1e-12)
    _close(np.stack([r["c_n"] for r in out]), wc, 1e-12)
    assert {int(r["bound"]) for r in out} == {num_cpus}
    assert {int(r["seen"]) for r in out} == {num_cpus}          # 2 only where 2 were given
    assert all(bool(r["readonly"]) for r in out)                # zero-copy from the object store


def test_map_batches_float32_layer_passed_directly(cluster):
    layer = rnnfast.GRU(6, 16, batch_first=True, seed=1)
    rows = RNG.standard_normal((10, 8, 6)).astype(np.float32)
    out = ray_data.from_numpy(rows).map_batches(
        rray.Predictor, fn_constructor_args=(layer,), fn_constructor_kwargs={"input_column": "data"},
        num_cpus=1, compute=ray_data.ActorPoolStrategy(size=1), batch_size=4, batch_format="numpy").take_all()
    y = np.stack([r["y"] for r in out])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, layer(rows)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_predict_tasks_equal_local_call(cluster, dtype):
    tol = 1e-12 if dtype == np.float64 else 1e-5
    x = RNG.standard_normal((7, 11, 6)).astype(dtype)
    lengths = RNG.integers(0, 8, 11)
    for layer in (rnnfast.LSTM(6, 8, num_layers=2, bidirectional=True, dtype=dtype, seed=0),
                  rnnfast.MinGRU(6, 8, dtype=dtype, seed=1)):
        y, h = rray.predict(layer, x, lengths, chunks=4, return_state=True)
        wy, wh = layer(x, lengths=lengths)
        _close(y, wy, tol)
        for g, w in zip(h if isinstance(h, tuple) else [h], wh if isinstance(wh, tuple) else [wh]):
            _close(g, w, tol)
    frozen = rnnfast.GRU(6, 8, seed=2).freeze("int8")
    _close(rray.predict(frozen, x.astype(np.float32), chunks=(5, 6)), frozen(x.astype(np.float32))[0], 1e-5)


@pytest.mark.parametrize("name,make", LAYERS, ids=[n for n, _ in LAYERS])
def test_gradients_equal_whole_batch(cluster, name, make):
    layer = make()
    b = 0 if layer.batch_first else 1
    x = RNG.standard_normal((10, 6, 6) if b == 0 else (6, 10, 6))
    lengths = RNG.integers(1, 7, 10)
    y, _ = layer.forward(x, lengths=lengths, train=True)
    dy = np.random.default_rng(7).standard_normal(y.shape)
    want_dx, _ = layer.backward(dy)
    want = {k: v.copy() for k, v in layer.grads.items()}
    layer.grads = {}
    keep = {k: v.copy() for k, v in layer.parameters().items()}
    # 10 rows in chunks of 2: five parts, summed in a tree of fan-in 2
    dx, grads = rray.gradients(layer, x, dy, lengths, chunks=2, split_every=2)
    _close(dx, want_dx, 1e-6)
    assert set(grads) == set(want) and layer.grads == {}
    for k in want:
        assert isinstance(grads[k], np.ndarray) and grads[k].flags.writeable
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-6, atol=1e-9)
    for k, v in layer.parameters().items():
        np.testing.assert_array_equal(v, keep[k])


def test_gradients_refuse_bad_input_before_work(cluster):
    with pytest.raises(ValueError, match="dropout"):
        rray.gradients(rnnfast.LSTM(3, 4, num_layers=2, dropout=0.5), np.zeros((2, 2, 3)), np.zeros((2, 2, 4)))
    with pytest.raises(TypeError, match="trainable"):
        rray.gradients(rnnfast.LSTM(3, 4).freeze(), np.zeros((2, 2, 3)), np.zeros((2, 2, 4)))
    lay = rnnfast.GRU(3, 4)
    with pytest.raises(ValueError, match="dy"):
        rray.gradients(lay, np.zeros((2, 2, 3)), np.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match="add up"):
        rray.gradients(lay, np.zeros((2, 4, 3)), np.zeros((2, 4, 4)), chunks=(1, 2))
    with pytest.raises(ValueError, match="lengths"):
        rray.gradients(lay, np.zeros((2, 4, 3)), np.zeros((2, 4, 4)), lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="3-D"):
        rray.predict(lay, np.zeros((2, 3)))


def test_layer_enters_the_object_store_once_and_task_args_stay_small(cluster, monkeypatch):
    layer = rnnfast.LSTM(64, 256, seed=0)               # 0.33 MB of weights
    wbytes = sum(v.nbytes for v in layer.parameters().values())
    puts, calls = [], []
    real_put, real_remote = ray.put, rray._remote

    def put(value, **kw):
        puts.append(value)
        return real_put(value, **kw)

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def options(self, **kw):
            return Spy(self.fn.options(**kw))

        def remote(self, *args):
            calls.append(args)
            return self.fn.remote(*args)

    monkeypatch.setattr(ray, "put", put)
    monkeypatch.setattr(rray, "_remote", lambda name: Spy(real_remote(name)))
    x = np.zeros((4, 64, 64), np.float32)
    rray.predict(layer, x, chunks=4)                    # 16 tasks
    dy = np.ones((4, 64, 256), np.float32)
    rray.gradients(layer, x, dy, chunks=8)              # 8 tasks and a tree of sums
    assert sum(p is layer for p in puts) == 2           # once per call, not once per task
    others = [p for p in puts if p is not layer]
    assert all(isinstance(p, np.ndarray) and p.nbytes <= 4 * 64 * 256 * 4 for p in others)   # data chunks
    assert len(calls) >= 16 + 8
    for args in calls:
        small = [a for a in args if not isinstance(a, ray.ObjectRef)]
        assert len(pickle.dumps(small)) < 1000, [type(a) for a in args]
    assert wbytes > 300_000


# ------------------------------------------------------------------ killed mid-job
def _kill_first_pid(pid_dir, after, out):
    """Wait for a pid file in `pid_dir`, then SIGKILL that process `after` s later."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        files = glob.glob(os.path.join(pid_dir, "*"))
        if files:
            time.sleep(after)
            pid = int(os.path.basename(files[0]))
            os.kill(pid, signal.SIGKILL)
            out.append(pid)
            return
        time.sleep(0.02)


class _SlowGRU(rnnfast.GRU):
    """A GRU whose training forward takes a while and leaves its process id in a folder
    (so that a worker is killed with its chunk in flight)."""

    pid_dir = ""
    delay = 0.0

    def forward(self, *args, **kwargs):
        open(os.path.join(self.pid_dir, str(os.getpid())), "w").close()
        time.sleep(self.delay)
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("max_retries", [3, 0])
def test_gradients_with_a_worker_killed_mid_job(cluster, tmp_path, max_retries):
    """A task whose worker dies is rerun (max_retries) and the result is whole and
    correct; without retries the call raises WorkerLostError, never returns part."""
    layer = _SlowGRU(6, 8, dtype=np.float64, seed=0)
    layer.pid_dir, layer.delay = str(tmp_path), 0.0
    x = RNG.standard_normal((5, 8, 6))
    y, _ = layer.forward(x, train=True)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    want_dx, _ = layer.backward(dy)
    want = {k: v.copy() for k, v in layer.grads.items()}
    for f in glob.glob(str(tmp_path / "*")):
        os.remove(f)
    layer.delay = 0.4
    killed = []
    th = threading.Thread(target=_kill_first_pid, args=(str(tmp_path), 0.1, killed))
    th.start()
    try:
        if max_retries == 0:
            with pytest.raises(rray.WorkerLostError, match="max_retries=0"):
                rray.gradients(layer, x, dy, chunks=2, max_retries=0)
        else:
            dx, grads = rray.gradients(layer, x, dy, chunks=2, max_retries=max_retries)
            _close(dx, want_dx, 1e-6)
            for k, v in want.items():
                np.testing.assert_allclose(grads[k], v, rtol=1e-6, atol=1e-9)
    finally:
        th.join()
    assert killed, "no worker was killed"


class _SlowPredictor(rray.Predictor):
    """A Predictor that leaves its process id in a folder and takes a while a batch."""

    def __init__(self, layer, pid_dir, **kw):
        super().__init__(layer, **kw)
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()

    def __call__(self, batch):
        time.sleep(0.25)
        return super().__call__(batch)


# Ray 2.60 takes max_restarts only through map_batches' catch-all remote arguments,
# which it flags as deprecated
@pytest.mark.filterwarnings("ignore:`ray_remote_args` is deprecated")
@pytest.mark.parametrize("max_restarts", [None, 0])
def test_map_batches_with_an_actor_killed_mid_job(cluster, tmp_path, max_restarts):
    """Ray Data restarts a killed actor and reruns its batches by default: every row
    comes back once, correct. With max_restarts=0 the job raises ActorDiedError."""
    layer = rnnfast.GRU(6, 8, dtype=np.float64, seed=0)
    rows = RNG.standard_normal((16, 5, 6))
    killed = []
    th = threading.Thread(target=_kill_first_pid, args=(str(tmp_path), 0.4, killed))
    th.start()
    extra = {} if max_restarts is None else {"max_restarts": max_restarts}
    ds = _dataset(rows, blocks=8).map_batches(
        _SlowPredictor, fn_constructor_args=(ray.put(layer), str(tmp_path)), num_cpus=1,
        compute=ray_data.ActorPoolStrategy(size=2), batch_size=2, batch_format="numpy", **extra)
    try:
        if max_restarts == 0:
            with pytest.raises(ray.exceptions.ActorDiedError):
                ds.take_all()
        else:
            out = _sorted(ds.take_all())
            _close(np.stack([r["y"] for r in out]), _rows_result(layer, rows)[0], 1e-12)
    finally:
        th.join()
    assert killed, "no actor was killed"
    if max_restarts is None:
        assert len(os.listdir(tmp_path)) >= 3            # the killed actor was started again
