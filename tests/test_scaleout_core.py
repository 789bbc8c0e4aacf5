"""Scale-out prerequisites in the core (issue 16): every layer and frozen layer pickles
with its weights once, read-only / memmapped weights are accepted without being written,
and ``num_threads=`` bounds the threads of one object's calls."""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import rnnfast
from rnnfast import threads

MAKERS = {
    "lstm": lambda **k: rnnfast.LSTM(6, 16, **k),
    "lstm-proj-bidir": lambda **k: rnnfast.LSTM(6, 16, num_layers=2, bidirectional=True, proj_size=5, **k),
    "gru": lambda **k: rnnfast.GRU(6, 16, **k),
    "rnn-relu": lambda **k: rnnfast.RNN(6, 16, nonlinearity="relu", **k),
    "mingru": lambda **k: rnnfast.MinGRU(6, 16, **k),
    "minlstm": lambda **k: rnnfast.MinLSTM(6, 16, **k),
}
X = np.random.default_rng(0).standard_normal((5, 3, 6)).astype(np.float32)


def _pbytes(layer) -> int:
    return sum(v.nbytes for v in layer.parameters().values())


@pytest.mark.parametrize("name", list(MAKERS))
def test_every_layer_pickles(name):
    layer = MAKERS[name](seed=0, num_threads=1)
    layer(X)
    back = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(back(X)[0], layer(X)[0])
    assert back.num_threads == 1
    assert len(pickle.dumps(layer)) < _pbytes(layer) + 20_000


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("prec", ["fp32", "bf16", "int8"])
def test_every_frozen_layer_pickles_with_its_weights_once(name, prec):
    """A frozen layer travels as the weights it was made from (once), not also as its
    packed or quantized copies; the receiver packs them once."""
    layer = MAKERS[name](seed=0)
    frozen = layer.freeze(prec)
    frozen.num_threads = 1
    data = pickle.dumps(frozen)
    assert len(data) < _pbytes(layer) + 20_000, (len(data), _pbytes(layer))
    back = pickle.loads(data)
    assert back.precision == prec and back.num_threads == 1
    np.testing.assert_array_equal(back(X)[0], frozen(X)[0])


def _read_only_copy(layer):
    """The layer as an object store hands it out: parameters in read-only buffers."""
    bufs = []
    data = pickle.dumps(layer, protocol=5, buffer_callback=bufs.append)
    return pickle.loads(data, buffers=[memoryview(bytes(b.raw())) for b in bufs])


@pytest.mark.parametrize("name", list(MAKERS))
def test_read_only_parameters_run_train_freeze_and_reload(name):
    layer = MAKERS[name](seed=0)
    ro = _read_only_copy(layer)
    assert not any(p.flags.writeable for p in ro.parameters().values())
    keep = {k: v.copy() for k, v in ro.parameters().items()}
    np.testing.assert_allclose(ro(X)[0], layer(X)[0], rtol=1e-6, atol=1e-7)
    y, _ = ro.forward(X, train=True)
    ro.backward(np.ones_like(y))
    layer.forward(X, train=True)
    layer.backward(np.ones_like(y))
    for k, g in layer.grads.items():
        np.testing.assert_allclose(ro.grads[k], g, rtol=1e-5, atol=1e-6)
    for prec in ("fp32", "int8"):
        np.testing.assert_allclose(ro.freeze(prec)(X)[0], layer.freeze(prec)(X)[0], rtol=1e-6, atol=1e-6)
    if getattr(layer, "bidirectional", False) is False and hasattr(layer, "num_layers"):
        s = ro.stream(3)
        np.testing.assert_allclose(s(X[0]), layer(X[:1])[0][0], rtol=1e-6, atol=1e-7)
    for k, v in ro.parameters().items():
        np.testing.assert_array_equal(v, keep[k])          # never written
    new = {k: np.full_like(v, 0.01) for k, v in keep.items()}
    ro.load_state_dict(new)
    layer.load_state_dict(new)
    np.testing.assert_allclose(ro(X)[0], layer(X)[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="missing"):
        _read_only_copy(layer).load_state_dict({})


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru"])
def test_load_state_dict_from_memmap(name, tmp_path):
    layer = MAKERS[name](seed=0)
    other = MAKERS[name](seed=1)
    sd = other.state_dict()
    maps = {}
    for k, v in sd.items():
        m = np.lib.format.open_memmap(tmp_path / f"{k}.npy", mode="w+", dtype=v.dtype, shape=v.shape)
        m[...] = v
        m.flush()
        maps[k] = np.load(tmp_path / f"{k}.npy", mmap_mode="r")
    live = layer.parameters()
    layer.load_state_dict(maps)
    assert all(layer.parameters()[k] is live[k] for k in live)      # copied into the live arrays
    np.testing.assert_array_equal(layer(X)[0], other(X)[0])
    assert all(not m.flags.writeable for m in maps.values())


# ------------------------------------------------------------------ num_threads
def _recording(monkeypatch):
    seen = []
    real = threads.enter_call

    def enter(most=0):
        n = real(most)
        seen.append(n)
        return n
    monkeypatch.setattr(threads, "enter_call", enter)
    return seen


@pytest.mark.parametrize("name", list(MAKERS))
def test_num_threads_bounds_one_objects_calls(name, monkeypatch):
    if rnnfast.get_num_threads() < 2:
        pytest.skip("needs a process thread count of 2 or more")
    seen = _recording(monkeypatch)
    x = np.random.default_rng(0).standard_normal((40, 16, 6)).astype(np.float32)
    one = MAKERS[name](seed=0, num_threads=1)
    free = MAKERS[name](seed=0)
    before = rnnfast.get_num_threads()
    y1 = one(x)[0]
    assert seen and max(seen) == 1
    assert rnnfast.get_num_threads() == before
    yt, _ = one.forward(x, train=True)
    one.backward(np.ones_like(yt))
    assert max(seen) == 1
    seen.clear()
    np.testing.assert_allclose(free(x)[0], y1, rtol=1e-5, atol=1e-6)
    frozen = one.freeze()
    assert frozen.num_threads == 1
    seen.clear()
    frozen(x)
    assert max(seen, default=1) == 1
    frozen.num_threads = None
    one.num_threads = None
    assert one.num_threads is None and rnnfast.get_num_threads() == before


def test_num_threads_validation_and_process_setting_untouched():
    with pytest.raises(ValueError, match="num_threads"):
        rnnfast.LSTM(2, 3, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        rnnfast.GRU(2, 3, num_threads=1.5)
    lay = rnnfast.MinLSTM(2, 3, num_threads=np.int64(2))
    assert lay.num_threads == 2 and type(lay.num_threads) is int
    with pytest.raises(ValueError):
        lay.freeze().num_threads = -1
    before = rnnfast.get_num_threads()
    with threads.limit(1):
        assert rnnfast.get_num_threads() == 1
        with threads.limit(4):              # an inner bound never raises an outer one
            assert rnnfast.get_num_threads() == 1
    assert rnnfast.get_num_threads() == before


def test_num_threads_is_per_thread_of_the_caller():
    """A bound set by one thread's call is not seen by calls from other threads."""
    seen = {}
    started = threading.Event()
    release = threading.Event()

    def bounded():
        with threads.limit(1):
            started.set()
            release.wait(5)

    t = threading.Thread(target=bounded)
    t.start()
    started.wait(5)
    seen["other"] = rnnfast.get_num_threads()
    release.set()
    t.join()
    assert seen["other"] == threads._num_threads


def test_num_threads_composes_with_threadpoolctl():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    lay = rnnfast.LSTM(32, 64, seed=0, num_threads=1)
    x = np.random.default_rng(0).standard_normal((20, 32, 32)).astype(np.float32)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        inside = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        lay(x)
        y, _ = lay.forward(x, train=True)
        lay.backward(np.ones_like(y))
        after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        assert after == inside
