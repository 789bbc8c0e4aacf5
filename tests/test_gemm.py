"""kernels/rf_gemm.h through cy_train.pgemm: every operand layout, dtype, beta and edge
shape against NumPy's product in float64."""
import numpy as np
import pytest

from conftest import require_oracle

cy_train = require_oracle("rnnfast.kernels.cy_train")

# shapes around the blocking: 6-row slivers, 64/32-column panels, 256-deep K blocks,
# 8-panel B blocks, 96-row blocks of a transposed A, and the 48/64 splits between threads
SHAPES = [(1, 1, 1), (5, 7, 3), (6, 64, 16), (37, 70, 45), (97, 129, 257), (200, 600, 513),
          (13, 1030, 31), (1100, 17, 600)]


def _operand(rng, rows, cols, trans, dtype, pad):
    """A (rows x cols) operand, stored transposed when `trans`, in a wider buffer (pad)."""
    if trans:
        store = rng.standard_normal((cols, rows + pad)).astype(dtype)
        return store[:, :rows].T
    store = rng.standard_normal((rows, cols + pad)).astype(dtype)
    return store[:, :cols]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_pgemm_matches_numpy(dtype, ta, tb, shape, nthreads):
    M, N, K = shape
    rng = np.random.default_rng(M * 7 + N * 3 + K)
    A = _operand(rng, M, K, ta, dtype, pad=3)
    B = _operand(rng, K, N, tb, dtype, pad=5)
    a0, b0 = A.copy(), B.copy()
    want = A.astype(np.float64) @ B.astype(np.float64)
    tol = (3e-5 if dtype == np.float32 else 1e-12) * np.sqrt(K)
    # beta = 0 never reads C: garbage (NaN) there must not leak into the result
    C = np.full((M, N), np.nan, dtype)
    cy_train.pgemm(A, B, C, 0.0, nthreads)
    np.testing.assert_allclose(C, want, rtol=0, atol=tol)
    # beta = 1 accumulates, into a view with a row stride wider than its width
    Cbig = rng.standard_normal((M, N + 4)).astype(dtype)
    C1 = Cbig[:, 2:N + 2]
    c_before = C1.astype(np.float64)
    cy_train.pgemm(A, B, C1, 1.0, nthreads)
    np.testing.assert_allclose(C1, want + c_before, rtol=0, atol=tol)
    # any other beta scales
    C2 = rng.standard_normal((M, N)).astype(dtype)
    c2_before = C2.astype(np.float64)
    cy_train.pgemm(A, B, C2, 0.5, nthreads)
    np.testing.assert_allclose(C2, want + 0.5 * c2_before, rtol=0, atol=tol)
    np.testing.assert_array_equal(A, a0)
    np.testing.assert_array_equal(B, b0)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_pgemm_empty_inner_dimension(beta):
    A = np.zeros((4, 0), np.float32)
    B = np.zeros((0, 3), np.float32)
    C = np.ones((4, 3), np.float32)
    cy_train.pgemm(A, B, C, beta, 2)
    np.testing.assert_array_equal(C, np.full((4, 3), beta, np.float32))


def test_pgemm_from_short_lived_threads():
    """Each calling thread has its own packing scratch (freed when it exits): products
    from many short-lived Python threads, at the same time, stay exact."""
    import threading
    rng = np.random.default_rng(7)
    A = rng.standard_normal((70, 300)).astype(np.float32)
    B = rng.standard_normal((300, 90)).astype(np.float32)
    want = A.astype(np.float64) @ B.astype(np.float64)
    errs = []

    def work():
        C = np.empty((70, 90), np.float32)
        for _ in range(5):
            cy_train.pgemm(A, B, C, 0.0, 1)
            errs.append(float(np.abs(C - want).max()))

    for _ in range(4):
        ts = [threading.Thread(target=work) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert len(errs) == 4 * 6 * 5 and max(errs) < 3e-5 * np.sqrt(300)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("shape", [(2100, 2048, 2048), (8300, 1024, 1000), (17000, 1040, 64), (300, 200, 40000)])
def test_pgemm_long_products_run_in_pieces(ta, tb, shape):
    """Products of more than _PGEMM_FIRST_FLOPS (2e9) or C larger than _PGEMM_PIECE_BYTES
    (64 MB) run in pieces sized by their measured time, along k (summed into C with the
    caller's beta first) or along m, so that a Ctrl-C is honoured between them:
    the same product as NumPy's, with beta and operand layouts."""
    M, N, K = shape
    rng = np.random.default_rng(M)
    A = _operand(rng, M, K, ta, np.float32, 3)
    B = _operand(rng, K, N, tb, np.float32, 5)
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    C = C0.copy()
    cy_train.pgemm(A, B, C, 0.5, 2)
    want = A.astype(np.float64) @ B.astype(np.float64) + 0.5 * C0.astype(np.float64)
    np.testing.assert_allclose(C, want, rtol=2e-4, atol=2e-3 * np.sqrt(K))
