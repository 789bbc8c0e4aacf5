"""linear_scan (SPEC "Recurrences that run in parallel over time") on every backend,
against a sequential float64 loop written out here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rnnfast
from rnnfast.scan import linear_scan

BACKENDS = rnnfast.available_backends()
ALL = ["auto", *BACKENDS]


def seq_scan(a, b, h0=None, reverse=False):
    """The oracle: h_t = a_t h_{t-1} + b_t one step after another, float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    h = np.zeros(a.shape[1:]) if h0 is None else np.broadcast_to(np.asarray(h0, np.float64), a.shape[1:]).copy()
    out = np.empty_like(a)
    steps = range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])
    for t in steps:
        h = a[t] * h + b[t]
        out[t] = h
    return out




def data(T, trailing, dtype=np.float64, seed=0, lo=-1.0, hi=1.0):
    rng = np.random.default_rng([seed, T, len(trailing), *trailing])
    a = rng.uniform(lo, hi, (T, *trailing)).astype(dtype)
    b = rng.standard_normal((T, *trailing)).astype(dtype)
    h0 = rng.standard_normal(trailing).astype(dtype)
    return a, b, h0


SHAPES = [(1, ()), (1, (5,)), (2, (3,)), (3, (1,)), (7, (4,)), (17, (2, 3)), (64, (9,)), (255, (7,)),
          (1001, (4,)), (257, (2, 3, 5)), (99, (33,)), (130, (1, 16)), (600, (3, 13)), (50, (100,))]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("T,trailing", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_against_sequential_loop(backend, T, trailing, reverse, nthreads, parallel_small):
    rnnfast.set_num_threads(nthreads)
    a, b, h0 = data(T, trailing)
    with rnnfast.backend(backend):
        got = linear_scan(a, b, h0, reverse=reverse)
    assert got.dtype == np.float64 and got.shape == a.shape
    np.testing.assert_allclose(got, seq_scan(a, b, h0, reverse), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("T,trailing", [(20001, (4,)), (3001, (40,)), (70000, ()), (5000, (2, 9))])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_default_thresholds_large(backend, T, trailing, nthreads):
    rnnfast.set_num_threads(nthreads)
    a, b, h0 = data(T, trailing, seed=1)
    for reverse in (False, True):
        with rnnfast.backend(backend):
            got = linear_scan(a, b, h0, reverse=reverse)
        np.testing.assert_allclose(got, seq_scan(a, b, h0, reverse), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trailing", [(3,), (2, 5), (16,)])
def test_float32_against_float64(backend, trailing, parallel_small):
    rnnfast.set_num_threads(2)
    a, b, h0 = data(3000, trailing, np.float32)
    with rnnfast.backend(backend):
        got = linear_scan(a, b, h0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, seq_scan(a, b, h0), rtol=1e-5, atol=1e-6)


def _f32_cases():
    T = 100_000
    rng = np.random.default_rng(7)
    return {
        "a=1,b=0.1 (constant drift)": (np.ones((T, 4)), np.full((T, 4), 0.1)),
        "a=1-1e-5,b=0.3": (np.full((T, 4), 1 - 1e-5), np.full((T, 4), 0.3)),
        "a=1,b=U(0,1)": (np.ones((T, 4)), rng.uniform(0, 1, (T, 4))),
        "a=U(0.99,1),b=N": (rng.uniform(0.99, 1, (T, 4)), rng.standard_normal((T, 4))),
        "a=U(-1,1),b=N": (rng.uniform(-1, 1, (T, 4)), rng.standard_normal((T, 4))),
        "a=U(0,1),b=N, one column": (rng.uniform(0, 1, (T, 1)), rng.standard_normal((T, 1))),
    }


@pytest.mark.parametrize("backend,nthreads", [(b, n) for b in ALL for n in (1, 2) if b != "reference" or n == 1])
@pytest.mark.parametrize("case", list(_f32_cases()))
def test_float32_accuracy_long(backend, case, nthreads):
    """float32 over T = 100 000 within 1e-4 * max|h| of the float64 result (|a| <= 1)."""
    rnnfast.set_num_threads(nthreads)
    a, b = _f32_cases()[case]
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    want = seq_scan(a32, b32)
    with rnnfast.backend(backend):
        got = linear_scan(a32, b32)
    assert got.dtype == np.float32
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= 1e-4, err
    for _reverse in (True,):
        with rnnfast.backend(backend):
            got = linear_scan(a32, b32, reverse=True)
        want = seq_scan(a32, b32, reverse=True)
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_agree(backend, parallel_small):
    a, b, h0 = data(5003, (6,), seed=3)
    res = []
    for n in (1, 2, 3):
        rnnfast.set_num_threads(n)
        with rnnfast.backend(backend):
            res.append(linear_scan(a, b, h0))
    for r in res[1:]:
        np.testing.assert_allclose(r, res[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_reverse_is_flipped_forward(backend):
    a, b, h0 = data(300, (2, 3), seed=4)
    with rnnfast.backend(backend):
        r = linear_scan(a, b, h0, reverse=True)
        f = linear_scan(a[::-1], b[::-1], h0)[::-1]
    np.testing.assert_allclose(r, f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_h0_broadcast_and_default(backend):
    a, b, _ = data(40, (3, 4), seed=5)
    with rnnfast.backend(backend):
        np.testing.assert_allclose(linear_scan(a, b), seq_scan(a, b), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(linear_scan(a, b, 0.5), seq_scan(a, b, 0.5), rtol=1e-12, atol=1e-12)
        h = np.arange(4.0)
        np.testing.assert_allclose(linear_scan(a, b, h), seq_scan(a, b, h), rtol=1e-12, atol=1e-12)
        h = np.arange(3.0)[:, None]
        np.testing.assert_allclose(linear_scan(a, b, h, reverse=True), seq_scan(a, b, h, True),
                                   rtol=1e-12, atol=1e-12)


def test_one_dimensional_and_empty():
    a = np.array([0.5, 0.5, 0.5])
    b = np.array([1.0, 1.0, 1.0])
    np.testing.assert_allclose(linear_scan(a, b, 2.0), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(linear_scan(a, b, 2.0, reverse=True), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(linear_scan(a, b), [1.0, 1.5, 1.75])
    e = linear_scan(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert e.shape == (0, 3) and e.dtype == np.float32
    e = linear_scan(np.zeros((4, 0)), np.zeros((4, 0)))
    assert e.shape == (4, 0)


@pytest.mark.parametrize("backend", ALL)
def test_dtype_rules(backend):
    a, b, h0 = data(10, (3,), seed=6)
    with rnnfast.backend(backend):
        assert linear_scan(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32
        assert linear_scan(a.astype(np.float32), b.astype(np.float32), h0).dtype == np.float32
        assert linear_scan(a.astype(np.float32), b).dtype == np.float64
        assert linear_scan(a, b.astype(np.float32)).dtype == np.float64
        got = linear_scan(a.astype(np.float32), b)
    np.testing.assert_allclose(got, seq_scan(a.astype(np.float32), b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [np.int64, np.int32, np.bool_, np.complex128, object])
def test_non_float_raises_type_error(bad):
    a, b, h0 = data(5, (2,))
    dtype_msg = rf"^{{}}: expected a float32 or float64 array, got dtype {np.dtype(bad)}$"
    with pytest.raises(TypeError, match=dtype_msg.format("a")):
        linear_scan(a.astype(bad), b)
    with pytest.raises(TypeError, match=dtype_msg.format("b")):
        linear_scan(a, b.astype(bad))
    with pytest.raises(TypeError, match=dtype_msg.format("h0")):
        linear_scan(a, b, h0.astype(bad))
    with pytest.raises(TypeError):
        linear_scan([[1, 2]], [[1, 2]])


def test_shape_errors_name_argument():
    a, b, _ = data(5, (2, 3))
    with pytest.raises(ValueError, match=r"b: expected shape \(5, 2, 3\).*got \(5, 3, 2\)"):
        linear_scan(a, b.reshape(5, 3, 2))
    with pytest.raises(ValueError, match=r"b: expected shape \(5, 2, 3\).*got \(4, 2, 3\)"):
        linear_scan(a, b[:4])
    with pytest.raises(ValueError, match=r"h0: .*\(2, 3\).*got \(4,\)"):
        linear_scan(a, b, np.zeros(4))
    with pytest.raises(ValueError, match=r"h0: .*got \(2, 2, 3\)"):
        linear_scan(a, b, np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"^a: expected an array of shape \(T, \.\.\.\) with at least 1 dimension, "
                                         r"got shape \(\)$"):
        linear_scan(np.float64(1.0), np.float64(1.0))


@pytest.mark.parametrize("backend", ALL)
def test_array_likes_and_inputs_untouched(backend):
    a, b, h0 = data(50, (3,), seed=8)
    a_f = np.asfortranarray(a)
    b_nc = np.repeat(b, 2, axis=1)[:, ::2]
    h_ro = h0.copy()
    h_ro.flags.writeable = False
    copies = [a.copy(), b.copy(), h0.copy()]
    want = seq_scan(a, b, h0)
    with rnnfast.backend(backend):
        np.testing.assert_allclose(linear_scan(a_f, b_nc, h_ro), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(linear_scan(a.tolist(), b.tolist(), h0.tolist()), want,
                                   rtol=1e-12, atol=1e-12)
        at = torch.tensor(a, requires_grad=True)
        np.testing.assert_allclose(linear_scan(at, torch.tensor(b), torch.tensor(h0)), want,
                                   rtol=1e-12, atol=1e-12)
        a32 = a.astype(np.float32)
        a32c = a32.copy()
        linear_scan(a32, b.astype(np.float32), h0.astype(np.float32))
    np.testing.assert_array_equal(a32, a32c)
    for orig, c in zip((a_f, b_nc, h_ro), copies):
        np.testing.assert_array_equal(orig, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_a_reverse_scan(backend):
    """d/db of sum(h*g) is the reverse scan of g with a shifted by one step."""
    a, b, h0 = data(200, (3,), seed=9)
    g = np.random.default_rng(1).standard_normal(a.shape)
    a_next = np.ones_like(a)
    a_next[:-1] = a[1:]
    with rnnfast.backend(backend):
        db = linear_scan(a_next, g, reverse=True)
    at = torch.tensor(a)
    bt = torch.tensor(b, requires_grad=True)
    h = torch.tensor(h0)
    out = []
    for t in range(a.shape[0]):
        h = at[t] * h + bt[t]
        out.append(h)
    (torch.stack(out) * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_concurrent_calls_from_threads():
    import concurrent.futures as cf
    a, b, h0 = data(20000, (8,), seed=10)
    want = seq_scan(a, b, h0)
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: linear_scan(a, b, h0), range(8)))
    for o in outs:
        np.testing.assert_allclose(o, want, rtol=1e-9, atol=1e-12)


def test_underflowing_products_stay_exact_enough():
    """Long runs of small a (products far below the float64 range) and huge chunk counts."""
    rnnfast.set_num_threads(2)
    T = 50000
    a = np.full((T, 3), 0.01)
    b = np.random.default_rng(2).standard_normal((T, 3))
    for be in BACKENDS:
        with rnnfast.backend(be):
            np.testing.assert_allclose(linear_scan(a, b, 1.0), seq_scan(a, b, 1.0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("T,trailing", [(1, (5000,)), (5, (3001,)), (40, (2, 1500)), (300, (130,))])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_few_steps_many_features(backend, T, trailing, nthreads):
    """Short scans over wide features (the threads split the features with the default tuning)."""
    rnnfast.set_num_threads(nthreads)
    a, b, h0 = data(T, trailing, seed=11)
    for reverse in (False, True):
        with rnnfast.backend(backend):
            got = linear_scan(a, b, h0, reverse=reverse)
        np.testing.assert_allclose(got, seq_scan(a, b, h0, reverse), rtol=1e-9, atol=1e-12)
