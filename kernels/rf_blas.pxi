# Single-threaded BLAS products on row-major operands: the one copy every kernel module
# includes (cy_rnn, cy_train, cy_scan). Row-major C = A op(W) is column-major
# C^T = op(W)^T A^T, hence the swapped operands. nogil and no checks: the callers pass
# sizes that fit a C int (rnnfast.backends.fit_sizes) and leading dimensions >= 1.
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv


cdef inline void rf_blas_gemm_nt(int n, int m, int k, const floating *A, int lda, const floating *W, int ldw,
                                 floating *C, int ldc, floating beta) noexcept nogil:
    """C[n, m] = A[n, k] @ W[m, k]^T + beta*C (gemv for one row; k = 0: C = beta*C)."""
    cdef char tr = b'T'
    cdef char nt = b'N'
    cdef floating one = 1
    cdef int inc = 1, i, j
    if n <= 0 or m <= 0:
        return
    if k <= 0:                      # (BLAS would refuse lda < 1)
        for i in range(n):
            for j in range(m):
                C[<size_t>i * ldc + j] = beta * C[<size_t>i * ldc + j] if beta != 0 else 0
        return
    if n == 1:
        if floating is float:
            sgemv(&tr, &k, &m, &one, <float*>W, &ldw, <float*>A, &inc, &beta, C, &inc)
        else:
            dgemv(&tr, &k, &m, &one, <double*>W, &ldw, <double*>A, &inc, &beta, C, &inc)
    elif floating is float:
        sgemm(&tr, &nt, &m, &n, &k, &one, <float*>W, &ldw, <float*>A, &lda, &beta, C, &ldc)
    else:
        dgemm(&tr, &nt, &m, &n, &k, &one, <double*>W, &ldw, <double*>A, &lda, &beta, C, &ldc)


cdef inline void rf_blas_gemm_nn(int n, int m, int k, const floating *A, int lda, const floating *Bm, int ldb,
                                 floating *C, int ldc, floating beta) noexcept nogil:
    """C[n, m] = A[n, k] @ B[k, m] + beta*C (gemv for one row)."""
    cdef char nt = b'N'
    cdef floating one = 1
    cdef int inc = 1
    if n <= 0 or m <= 0:
        return
    if n == 1:
        if floating is float:
            sgemv(&nt, &m, &k, &one, <float*>Bm, &ldb, <float*>A, &inc, &beta, C, &inc)
        else:
            dgemv(&nt, &m, &k, &one, <double*>Bm, &ldb, <double*>A, &inc, &beta, C, &inc)
    elif floating is float:
        sgemm(&nt, &nt, &m, &n, &k, &one, <float*>Bm, &ldb, <float*>A, &lda, &beta, C, &ldc)
    else:
        dgemm(&nt, &nt, &m, &n, &k, &one, <double*>Bm, &ldb, <double*>A, &lda, &beta, C, &ldc)
