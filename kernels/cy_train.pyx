# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython/OpenMP training kernels: the recurrences of the forward pass that keeps its
activations and of backpropagation through time, for one layer (one or two directions).

Layout (prepared, validated and allocated by rnnfast.training): packed rows, step-major;
step t holds rows [offs[t], offs[t] + bsz[t]) of every (N, ...) buffer, the sequences
sorted by length (longest first), so the live rows of a step are a prefix of the batch.
The previous state of row j at step t is the saved output of the step before (forward
direction: step t-1; reverse: step t+1, for the rows still live there) or else the
initial state: no state is ever copied.

One persistent OpenMP parallel region per call, as in cy_rnn: work items are (direction,
slice of hidden units); each step is a recurrent GEMM of the item's slice with
the packed micro-kernel (kernels/rf_train.h; single-threaded BLAS for large batches)
plus fused gate math, then a barrier (rf_sync, the spin barrier of rf_gates.h, as in
cy_rnn: a crossing costs one cache-line transfer each way, less than GOMP's barrier, and
every step pays one; commits 834b328, a7d93a2; figures in docs/performance.md).
Backward per step: fused gate gradients for the item's units (their column sums, the
bias gradients, accumulated on the way), a barrier, then dh_prev[:, slice] = dG_t @
W_hh[:, slice] (and the dy of the next step added). The weight gradients are not
computed here: rnnfast.training does them afterwards as large GEMMs over all rows
(:func:`pgemm`).

The per-step products run on weights packed once per call (``wpk``, see rf_train.h:
a register-blocked micro-kernel; BLAS re-packs its operand at every call, which
dominates for the few rows of a step) or, for large batches, on single-threaded BLAS.
"""
from cython cimport floating

include "rf_blas.pxi"
from cython.parallel cimport parallel, threadid
from libc.stdint cimport int64_t
from cpython.exc cimport PyErr_CheckSignals

include "rf_variant.pxi"

cdef extern from "rf_train.h" nogil:
    ctypedef struct rf_sync_t:
        pass
    void rf_sync_init(rf_sync_t *b, int n)
    void rf_sync(rf_sync_t *b, int team)
    int rf_team_size()
    int rf_have_openmp()
    void rft_lstm_fwd_v_f(const rf_var_t *v, const float *ph, float *dv, int lddv, int j0, int j1, int H, int u0,
                          int u1, float *xg, int ldx, const float *hg, int ldg, const float *bx, const float *bh,
                          const float *cp, int ldcp, float *c, int ldc, float *h, int ldh)
    void rft_lstm_fwd_v_d(const rf_var_t *v, const double *ph, double *dv, int lddv, int j0, int j1, int H, int u0,
                          int u1, double *xg, int ldx, const double *hg, int ldg, const double *bx, const double *bh,
                          const double *cp, int ldcp, double *c, int ldc, double *h, int ldh)
    void rft_gru_fwd_v_f(const rf_var_t *v, const float *ph, float *dv, int lddv, int j0, int j1, int H, int u0, int u1,
                         float *xg, int ldx, const float *hg, int ldg, const float *bx, const float *bh,
                         const float *hp, int ldp, float *h, int ldh)
    void rft_gru_fwd_v_d(const rf_var_t *v, const double *ph, double *dv, int lddv, int j0, int j1, int H, int u0,
                         int u1, double *xg, int ldx, const double *hg, int ldg, const double *bx, const double *bh,
                         const double *hp, int ldp, double *h, int ldh)
    void rft_gru_rz_fwd_v_f(const rf_var_t *v, const float *ph, float *dv, int lddv, int j0, int j1, int H, int u0,
                            int u1, float *xg, int ldx, const float *hg, int ldg, const float *bx, const float *bh,
                            const float *hp, int ldp, float *rh, int ldr)
    void rft_gru_rz_fwd_v_d(const rf_var_t *v, const double *ph, double *dv, int lddv, int j0, int j1, int H, int u0,
                            int u1, double *xg, int ldx, const double *hg, int ldg, const double *bx, const double *bh,
                            const double *hp, int ldp, double *rh, int ldr)
    void rft_gru_n_fwd_v_f(const rf_var_t *v, const float *ph, float *dv, int lddv, int j0, int j1, int H, int u0,
                           int u1, float *xg, int ldx, const float *hg, int ldg, const float *bx, const float *bh,
                           const float *hp, int ldp, float *h, int ldh)
    void rft_gru_n_fwd_v_d(const rf_var_t *v, const double *ph, double *dv, int lddv, int j0, int j1, int H, int u0,
                           int u1, double *xg, int ldx, const double *hg, int ldg, const double *bx, const double *bh,
                           const double *hp, int ldp, double *h, int ldh)
    void rft_rnn_fwd_v_f(const rf_var_t *v, const float *ph, float *dv, int lddv, int j0, int j1, int relu, int u0,
                         int u1, const float *xg, int ldx, const float *hg, int ldg, const float *bx, const float *bh,
                         float *h, int ldh)
    void rft_rnn_fwd_v_d(const rf_var_t *v, const double *ph, double *dv, int lddv, int j0, int j1, int relu, int u0,
                         int u1, const double *xg, int ldx, const double *hg, int ldg, const double *bx,
                         const double *bh, double *h, int ldh)
    void rft_lstm_bwd_v_f(const rf_var_t *v, const float *ph, const float *dv, int lddv, int j0, int j1, int H, int u0,
                          int u1, const float *gt, int ldx, const float *c, int ldc, const float *cp, int ldcp,
                          const float *dh, int lddh, float *dc, int lddc, float *dg, int ldg, float *m, int ldm)
    void rft_lstm_bwd_v_d(const rf_var_t *v, const double *ph, const double *dv, int lddv, int j0, int j1, int H,
                          int u0, int u1, const double *gt, int ldx, const double *c, int ldc, const double *cp,
                          int ldcp, const double *dh, int lddh, double *dc, int lddc, double *dg, int ldg, double *m,
                          int ldm)
    void rft_gru_bwd_v_f(const rf_var_t *v, const float *ph, const float *dv, int lddv, int j0, int j1, int H, int u0,
                         int u1, const float *gt, int ldx, const float *hp, int ldp, float *dh, int lddh, float *dg,
                         int ldg)
    void rft_gru_bwd_v_d(const rf_var_t *v, const double *ph, const double *dv, int lddv, int j0, int j1, int H, int u0,
                         int u1, const double *gt, int ldx, const double *hp, int ldp, double *dh, int lddh, double *dg,
                         int ldg)
    void rft_gru_nolbr_bwd1_v_f(const rf_var_t *v, const float *ph, const float *dv, int lddv, int j0, int j1, int H,
                                int u0, int u1, const float *gt, int ldx, const float *hp, int ldp, float *dh, int lddh,
                                float *dg, int ldg, float *rh, int ldr)
    void rft_gru_nolbr_bwd1_v_d(const rf_var_t *v, const double *ph, const double *dv, int lddv, int j0, int j1, int H,
                                int u0, int u1, const double *gt, int ldx, const double *hp, int ldp, double *dh,
                                int lddh, double *dg, int ldg, double *rh, int ldr)
    void rft_gru_nolbr_bwd2_v_f(const rf_var_t *v, const float *ph, const float *dv, int lddv, int j0, int j1, int u0,
                                int u1, const float *gt, int ldx, const float *hp, int ldp, const float *q, int ldq,
                                float *dh, int lddh, float *dg, int ldg)
    void rft_gru_nolbr_bwd2_v_d(const rf_var_t *v, const double *ph, const double *dv, int lddv, int j0, int j1, int u0,
                                int u1, const double *gt, int ldx, const double *hp, int ldp, const double *q, int ldq,
                                double *dh, int lddh, double *dg, int ldg)
    void rft_rnn_bwd_v_f(const rf_var_t *v, const float *ph, const float *dv, int lddv, int j0, int j1, int relu,
                         int u0, int u1, const float *h, int ldh, const float *dh, int lddh, float *dg, int ldg)
    void rft_rnn_bwd_v_d(const rf_var_t *v, const double *ph, const double *dv, int lddv, int j0, int j1, int relu,
                         int u0, int u1, const double *h, int ldh, const double *dh, int lddh, double *dg, int ldg)
    void rft_add_dy_f(int n, int p0, int p1, float *dh, int lddh, const float *dy, int lddy, float *dhs, int lds)
    void rft_add_dy_d(int n, int p0, int p1, double *dh, int lddh, const double *dy, int lddy,
                      double *dhs, int lds)
    void rft_dbsum_f(int j0, int j1, int g0, int g1, int H, int u0, int u1, const float *dg, int ldg,
                     double *db)
    void rft_dbsum_d(int j0, int j1, int g0, int g1, int H, int u0, int u1, const double *dg, int ldg,
                     double *db)
    int RFT_VLF, RFT_VLD
    void rft_pack_f(int K, int M, int b0, int b1, const float *src, size_t sm, size_t sk, float *P)
    void rft_pack_d(int K, int M, int b0, int b1, const double *src, size_t sm, size_t sk, double *P)
    void rft_mm_f(int n, int K, const float *A, int lda, const float *P, size_t bs, int ncols, float *C,
                  int ldc, int beta)
    void rft_mm_d(int n, int K, const double *A, int lda, const double *P, size_t bs, int ncols, double *C,
                  int ldc, int beta)

include "rf_interrupt.pxi"

cdef extern from "rf_gemm.h" nogil:
    int rf_gemm_f(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                  float beta, float *C, int ldc)
    int rf_gemm_d(int ta, int tb, int M, int N, int K, const double *A, int lda, const double *B, int ldb,
                  double beta, double *C, int ldc)

# backward_layer returns the bias gradients in `db` (rnnfast.training checks this flag)
FUSED_BIAS_GRADS = True

# Cell codes: keep in step with rnnfast/cells.py.
cdef extern from "rf_cells.h":
    # the cell codes (rf_cells.h, one copy of rnnfast/cells.py's)
    enum:
        LSTM "RF_LSTM"
        LSTM_PROJ "RF_LSTM_PROJ"
        GRU_LBR "RF_GRU_LBR"
        GRU_NOLBR "RF_GRU_NOLBR"
        RNN_TANH "RF_RNN_TANH"
        RNN_RELU "RF_RNN_RELU"

DEF UNIT_BLOCK = 16
DEF MAX_DIRS = 2


def have_openmp() -> bool:
    """Whether these kernels were compiled with OpenMP."""
    return bool(rf_have_openmp())


# ----------------------------------------------------------------------------- BLAS helpers
cdef inline int _vl(floating dummy) noexcept nogil:
    if floating is float:
        return RFT_VLF
    else:
        return RFT_VLD


cdef inline void _pack(int K, int M, int m0, int m1, const floating *src, size_t sm, size_t sk,
                       floating *P) noexcept nogil:
    """Pack the blocks covering columns [m0, m1) (see rf_train.h)."""
    cdef int vl = _vl(<floating>0)
    if m1 <= m0:
        return
    if floating is float:
        rft_pack_f(K, M, m0 // vl, (m1 + vl - 1) // vl, src, sm, sk, P)
    else:
        rft_pack_d(K, M, m0 // vl, (m1 + vl - 1) // vl, src, sm, sk, P)


cdef inline void _mm(int n, int K, const floating *A, int lda, const floating *P, size_t bs, int ncols,
                     floating *C, int ldc, int beta) noexcept nogil:
    if floating is float:
        rft_mm_f(n, K, A, lda, P, bs, ncols, C, ldc, beta)
    else:
        rft_mm_d(n, K, A, lda, P, bs, ncols, C, ldc, beta)


def packed_size(int code, int H, int Hout, bint is_double, bint backward) -> int:
    """Elements per direction of the packed recurrent weights (the ``wpk`` argument)."""
    cdef int vl = RFT_VLD if is_double else RFT_VLF
    cdef int G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    cdef int nbH = (H + vl - 1) // vl, nbO = (Hout + vl - 1) // vl
    cdef size_t n
    if backward:
        n = <size_t>nbO * G * H * vl
        if code == LSTM_PROJ:
            n += <size_t>nbH * Hout * vl
    else:
        n = <size_t>G * nbH * Hout * vl
        if code == LSTM_PROJ:
            n += <size_t>nbO * H * vl
    return n


cdef inline int _split(int total, int k, int parts) noexcept nogil:
    """Start of part k when [0, total) is cut into `parts` slices of whole blocks."""
    cdef int nb = (total + UNIT_BLOCK - 1) // UNIT_BLOCK
    cdef int s = UNIT_BLOCK * ((nb * k) // parts)
    return s if s < total else total


cdef int _layout(object a, int itemsize, int *trans, int *ld, int *rows, int *cols) except -1:
    """Describe a 2-D array as a (possibly transposed) row-major BLAS operand; -2 if it is not one."""
    cdef Py_ssize_t s0 = a.strides[0], s1 = a.strides[1]
    cdef Py_ssize_t n0 = a.shape[0], n1 = a.shape[1]
    rows[0] = <int>n0
    cols[0] = <int>n1
    if (n1 <= 1 or s1 == itemsize) and (n0 <= 1 or (s0 % itemsize == 0 and s0 >= (n1 if n1 > 1 else 1) * itemsize)):
        trans[0] = 0
        ld[0] = <int>(s0 // itemsize) if n0 > 1 else <int>(n1 if n1 > 1 else 1)
        return 0
    if (n0 <= 1 or s0 == itemsize) and (n1 <= 1 or (s1 % itemsize == 0 and s1 >= (n0 if n0 > 1 else 1) * itemsize)):
        trans[0] = 1
        ld[0] = <int>(s1 // itemsize) if n1 > 1 else <int>(n0 if n0 > 1 else 1)
        return 0
    return -2


# pgemm's interruptible pieces are sized by time, not by flops: the first piece of a long
# product is _PGEMM_FIRST_FLOPS, the next ones what the measured rate does in
# _PGEMM_PIECE_SECONDS. A flops bound alone left 0.6 s pieces at the baseline ISA level
# (SSE2 micro-kernel) where it gave 0.1 s at AVX-512 (CI failure of 4974d90, RNNFAST_ISA=baseline).
# Products up to _PGEMM_FIRST_FLOPS stay whole (every training product of the standard
# workloads); a piece writes at most _PGEMM_PIECE_BYTES of C (a fresh C costs a page fault
# per 4 KB).
cdef double _PGEMM_FIRST_FLOPS = 2e9
cdef double _PGEMM_PIECE_SECONDS = 0.08
cdef double _PGEMM_PIECE_BYTES = 64 << 20


def pgemm(A, B, C, double beta=0.0, int nthreads=1):
    """``C = A @ B + beta * C`` split over ``nthreads`` OpenMP threads, each computing its
    block of C (rows, or columns when C is wider than tall) with the packed micro-kernel
    of ``rf_gemm.h`` (single-threaded BLAS only if its scratch cannot be allocated).

    The BLAS that NumPy and SciPy ship may run below the CPU's vector width (OpenBLAS
    with ``OPENBLAS_CORETYPE=Haswell`` on an AVX-512 machine, as here, runs its AVX2
    kernels, well below ``rf_gemm`` on the training shapes; commit 96e2c55, figures in
    docs/performance.md), and these GEMMs are most of a training step.

    A and B are 2-D float arrays or views with one unit stride (transposed views are read
    as transposed operands, no copy); C is written in place and needs unit column stride. All
    three share one dtype (float32 or float64).

    All the training GEMMs of the Cython backend go through here, so that one thread
    pool (OpenMP's) runs everything and BLAS's own threads never compete with it.
    """
    import numpy as np
    cdef int ta, tb, tc, lda, ldb, ldc, m, k, k2, n, cm, cn
    cdef size_t pa, pb, pc
    if not (isinstance(A, np.ndarray) and isinstance(B, np.ndarray) and isinstance(C, np.ndarray)):
        raise TypeError("pgemm: A, B and C must be NumPy arrays")
    if A.dtype != C.dtype or B.dtype != C.dtype or C.dtype not in (np.float32, np.float64):
        raise TypeError(f"pgemm: dtypes {A.dtype}, {B.dtype}, {C.dtype}")
    if A.ndim != 2 or B.ndim != 2 or C.ndim != 2:
        raise ValueError(f"pgemm: 2-D operands expected, got {A.ndim}-D @ {B.ndim}-D -> {C.ndim}-D")
    if A.shape[1] != B.shape[0] or C.shape != (A.shape[0], B.shape[1]):
        raise ValueError(f"pgemm: shapes {A.shape} @ {B.shape} -> {C.shape}")
    if (max(A.shape + B.shape) > 2**31 - 1
            or max([abs(v) for v in A.strides + B.strides + C.strides]) > (2**31 - 1) * C.itemsize):
        raise ValueError("pgemm: sizes and strides are C ints (at most 2**31 - 1 elements)")
    if not C.flags.writeable:       # written through its raw pointer below
        raise ValueError("pgemm: C is read-only")
    if C.size == 0:
        return
    if A.shape[1] == 0:             # an empty sum
        if beta == 0.0:
            C[...] = 0
        else:
            C *= beta
        return
    isz = C.dtype.itemsize
    if _layout(A, isz, &ta, &lda, &m, &k) != 0:
        A = np.ascontiguousarray(A)
        _layout(A, isz, &ta, &lda, &m, &k)
    if _layout(B, isz, &tb, &ldb, &k2, &n) != 0:
        B = np.ascontiguousarray(B)
        _layout(B, isz, &tb, &ldb, &k2, &n)
    if _layout(C, isz, &tc, &ldc, &cm, &cn) != 0 or tc:
        raise ValueError("pgemm: C needs a unit column stride")
    if k != k2 or cm != m or cn != n:
        raise ValueError(f"pgemm: shapes {A.shape} @ {B.shape} -> {C.shape}")
    pa = A.__array_interface__["data"][0]
    pb = B.__array_interface__["data"][0]
    pc = C.__array_interface__["data"][0]
    # A long product runs in pieces (along m, or along k summing into C when C is small)
    # so that a Ctrl-C between them is honoured (sizes: see _PGEMM_FIRST_FLOPS)
    cdef double flops = 2.0 * m * n * k
    cdef double cbytes = <double>m * n * isz
    cdef size_t iz = isz
    if flops <= _PGEMM_FIRST_FLOPS and cbytes <= _PGEMM_PIECE_BYTES:
        _pgemm_run(iz, ta, tb, m, n, k, pa, lda, pb, ldb, beta, pc, ldc, nthreads)
        return
    from time import perf_counter
    cdef bint along_k = k >= m and cbytes <= _PGEMM_PIECE_BYTES
    cdef int length = k if along_k else m
    cdef double unit_flops = flops / length             # the flops of one k (or m) index
    cdef double most = length if along_k else min(<double>length, _PGEMM_PIECE_BYTES / (<double>n * isz))
    cdef double target = _PGEMM_FIRST_FLOPS, took
    cdef int q0 = 0, q1, qs
    while q0 < length:
        qs = <int>min(most, max(64.0, target / unit_flops)) // 64 * 64
        if qs < 64:
            qs = 64
        q1 = q0 + qs if q0 + qs < length else length
        took = perf_counter()
        if along_k:
            _pgemm_run(iz, ta, tb, m, n, q1 - q0,
                       pa + <size_t>q0 * (<size_t>lda if ta else 1) * iz, lda,
                       pb + <size_t>q0 * (1 if tb else <size_t>ldb) * iz, ldb,
                       beta if q0 == 0 else 1.0, pc, ldc, nthreads)
        else:
            _pgemm_run(iz, ta, tb, q1 - q0, n, k,
                       pa + <size_t>q0 * (1 if ta else <size_t>lda) * iz, lda,
                       pb, ldb, beta, pc + <size_t>q0 * ldc * iz, ldc, nthreads)
        took = perf_counter() - took
        PyErr_CheckSignals()
        # the next piece: what this one's rate does in the target time (at most 4x more)
        target = min(4.0 * (q1 - q0) * unit_flops,
                     (q1 - q0) * unit_flops * _PGEMM_PIECE_SECONDS / max(took, 1e-6))
        q0 = q1


cdef void _pgemm_run(size_t isz, int ta, int tb, int m, int n, int k, size_t pa, int lda, size_t pb, int ldb,
                     double beta, size_t pc, int ldc, int nthreads) noexcept:
    """One product C[m, n] = op(A) op(B) + beta C on pgemm's threads (addresses in bytes)."""
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    cdef float fb = <float>beta, fone = 1
    cdef double done = 1
    cdef size_t oa, ob, oc
    cdef int nthr, tid, part, s0, s1, bm, bn
    cdef bint by_rows = m >= n
    nthr = nthreads if nthreads > 1 and rf_have_openmp() else 1
    # at least 64 rows / columns per part
    if by_rows:
        if nthr > (m + 63) // 64:
            nthr = (m + 63) // 64
    elif nthr > (n + 63) // 64:
        nthr = (n + 63) // 64
    if nthr < 1:
        nthr = 1
    with nogil, parallel(num_threads=nthr):
        tid = threadid()
        part = rf_team_size()
        if by_rows:         # in units of 16 rows (units of 48, whole vectors and whole
            # 6-row slivers, split 800 rows 384 + 416 and 1024 rows 528 + 496)
            s0 = 16 * ((((m + 15) // 16) * tid) // part)
            s1 = 16 * ((((m + 15) // 16) * (tid + 1)) // part)
            if s1 > m:
                s1 = m
            if s0 > m:
                s0 = m
            bm = s1 - s0
            bn = n
            oa = <size_t>s0 if ta else <size_t>s0 * lda
            ob = 0
            oc = <size_t>s0 * ldc
        else:               # whole packed panels (64 floats, 32 doubles)
            s0 = 64 * ((((n + 63) // 64) * tid) // part)
            s1 = 64 * ((((n + 63) // 64) * (tid + 1)) // part)
            if s1 > n:
                s1 = n
            if s0 > n:
                s0 = n
            bm = m
            bn = s1 - s0
            oa = 0
            ob = <size_t>s0 * ldb if tb else <size_t>s0
            oc = <size_t>s0
        if bm > 0 and bn > 0:
            if isz == 4:
                if rf_gemm_f(ta, tb, bm, bn, k, <float*>(pa + oa * 4), lda, <float*>(pb + ob * 4), ldb, fb,
                             <float*>(pc + oc * 4), ldc) != 0:
                    sgemm(&cb, &ca, &bn, &bm, &k, &fone, <float*>(pb + ob * 4), &ldb, <float*>(pa + oa * 4), &lda, &fb,
                          <float*>(pc + oc * 4), &ldc)
            elif rf_gemm_d(ta, tb, bm, bn, k, <double*>(pa + oa * 8), lda, <double*>(pb + ob * 8), ldb, beta,
                           <double*>(pc + oc * 8), ldc) != 0:
                dgemm(&cb, &ca, &bn, &bm, &k, &done, <double*>(pb + ob * 8), &ldb, <double*>(pa + oa * 8), &lda, &beta,
                      <double*>(pc + oc * 8), &ldc)


# ----------------------------------------------------------------------------- forward
cdef void _fwd_worker(int tid, int nthr, int code, int ndir, int cpd, bint rev0,
                      int T, int N, int B, int H, int Hout, int GS,
                      const int64_t *bsz, const int64_t *offs, floating *xg,
                      const floating **w_hh, const floating **bx, const floating **bh,
                      const floating **w_hr, const floating *h0, const floating *c0,
                      floating *y, floating *cb, floating *hg, floating *s2,
                      floating *wpk, size_t wsz, rf_sync_t *bar,
                      rf_intr_t *intr, const rf_var_t *var, const floating **ph, floating *dv) noexcept nogil:
    cdef int G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    cdef int GH = G * H
    cdef int ldy = ndir * Hout
    cdef int nitems = ndir * cpd
    cdef int it, d, k, g, ng, u0, u1, p0, p1, s, t, tp, n, nc, phase
    cdef const floating *phd
    cdef floating *dvt = NULL
    cdef int vl = _vl(<floating>0)
    cdef int nbH = (H + vl - 1) // vl
    cdef size_t bs = <size_t>Hout * vl, bsr = <size_t>H * vl
    cdef floating *WT = NULL
    cdef floating *WrT = NULL
    cdef bint rev
    cdef floating *xgt
    cdef floating *hgd
    cdef floating *yt
    cdef const floating *yp
    cdef const floating *h0d
    cdef const floating *c0d
    cdef floating *ct
    cdef const floating *cpv
    cdef floating *s2d
    cdef const floating *W
    cdef floating zero = 0
    if wpk != NULL:     # pack this item's weight columns once for every step
        it = tid
        while it < nitems:
            d = it // cpd
            k = it % cpd
            u0 = _split(H, k, cpd)
            u1 = _split(H, k + 1, cpd)
            WT = wpk + <size_t>d * wsz
            for g in range(G):
                _pack(Hout, H, u0, u1, w_hh[d] + <size_t>g * H * Hout, Hout, 1, WT + <size_t>g * nbH * bs)
            if code == LSTM_PROJ:
                p0 = _split(Hout, k, cpd)
                p1 = _split(Hout, k + 1, cpd)
                _pack(H, Hout, p0, p1, w_hr[d], H, 1, WT + <size_t>G * nbH * bs)
            it = it + nthr
        rf_sync(bar, nthr)
    for s in range(T):
        if tid == 0 and s % 8 == 0:
            rf_intr_poll(intr, bar, nthr)
        if rf_sync_stopped(bar):        # a Ctrl-C: every thread leaves here (rf_interrupt.h)
            break
        for phase in range(2):
            if phase == 1 and code != LSTM_PROJ and code != GRU_NOLBR:
                break
            it = tid
            while it < nitems:
                d = it // cpd
                k = it % cpd
                rev = rev0 if d == 0 else True
                t = T - 1 - s if rev else s
                n = <int>bsz[t]
                if rev:
                    tp = t + 1
                    nc = <int>bsz[tp] if tp < T else 0
                else:
                    tp = t - 1
                    nc = n if t > 0 else 0
                u0 = _split(H, k, cpd)
                u1 = _split(H, k + 1, cpd)
                xgt = xg + (<size_t>d * N + <size_t>offs[t]) * GS
                hgd = hg + <size_t>d * B * GH
                yt = y + <size_t>offs[t] * ldy + d * Hout
                yp = y + <size_t>offs[tp] * ldy + d * Hout if nc > 0 else y
                h0d = h0 + <size_t>d * B * Hout
                c0d = c0 + <size_t>d * B * H
                ct = cb + (<size_t>d * N + <size_t>offs[t]) * H
                cpv = cb + (<size_t>d * N + <size_t>offs[tp]) * H if nc > 0 else cb
                s2d = s2 + <size_t>d * B * H
                phd = ph[d]
                if dv != NULL:      # a variant's saved gate derivatives
                    dvt = dv + (<size_t>d * N + <size_t>offs[t]) * GH
                if wpk != NULL:
                    WT = wpk + <size_t>d * wsz
                    WrT = WT + <size_t>G * nbH * bs
                if phase == 0:
                    ng = 2 if code == GRU_NOLBR else G
                    for g in range(ng):
                        if wpk != NULL:
                            _mm(nc, Hout, yp, ldy, WT + (<size_t>g * nbH + u0 // vl) * bs, bs, u1 - u0,
                                hgd + g * H + u0, GH, 0)
                            _mm(n - nc, Hout, h0d + <size_t>nc * Hout, Hout, WT + (<size_t>g * nbH + u0 // vl) * bs,
                                bs, u1 - u0, hgd + <size_t>nc * GH + g * H + u0, GH, 0)
                        else:
                            W = w_hh[d] + <size_t>(g * H + u0) * Hout
                            rf_blas_gemm_nt(nc, u1 - u0, Hout, yp, ldy, W, Hout, hgd + g * H + u0, GH, zero)
                            rf_blas_gemm_nt(n - nc, u1 - u0, Hout, h0d + <size_t>nc * Hout, Hout, W, Hout,
                                            hgd + <size_t>nc * GH + g * H + u0, GH, zero)
                    if code == LSTM or code == LSTM_PROJ:
                        if floating is float:
                            if code == LSTM:
                                rft_lstm_fwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 cpv, H, ct, H, yt, ldy)
                                rft_lstm_fwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 c0d, H, ct, H, yt, ldy)
                            else:
                                rft_lstm_fwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 cpv, H, ct, H, s2d, H)
                                rft_lstm_fwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 c0d, H, ct, H, s2d, H)
                        else:
                            if code == LSTM:
                                rft_lstm_fwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 cpv, H, ct, H, yt, ldy)
                                rft_lstm_fwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 c0d, H, ct, H, yt, ldy)
                            else:
                                rft_lstm_fwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 cpv, H, ct, H, s2d, H)
                                rft_lstm_fwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d],
                                                 c0d, H, ct, H, s2d, H)
                    elif code == GRU_LBR:
                        if floating is float:
                            rft_gru_fwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], yp,
                                            ldy, yt, ldy)
                            rft_gru_fwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], h0d,
                                            Hout, yt, ldy)
                        else:
                            rft_gru_fwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], yp,
                                            ldy, yt, ldy)
                            rft_gru_fwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], h0d,
                                            Hout, yt, ldy)
                    elif code == GRU_NOLBR:
                        if floating is float:
                            rft_gru_rz_fwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], yp,
                                               ldy, s2d, H)
                            rft_gru_rz_fwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], h0d,
                                               Hout, s2d, H)
                        else:
                            rft_gru_rz_fwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], yp,
                                               ldy, s2d, H)
                            rft_gru_rz_fwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], h0d,
                                               Hout, s2d, H)
                    else:
                        if floating is float:
                            rft_rnn_fwd_v_f(var, phd, dvt, GH, 0, n, code == RNN_RELU, u0, u1, xgt, GS, hgd, GH, bx[d],
                                            bh[d], yt, ldy)
                        else:
                            rft_rnn_fwd_v_d(var, phd, dvt, GH, 0, n, code == RNN_RELU, u0, u1, xgt, GS, hgd, GH, bx[d],
                                            bh[d], yt, ldy)
                elif code == LSTM_PROJ:
                    p0 = _split(Hout, k, cpd)
                    p1 = _split(Hout, k + 1, cpd)
                    if wpk != NULL:
                        _mm(n, H, s2d, H, WrT + <size_t>(p0 // vl) * bsr, bsr, p1 - p0, yt + p0, ldy, 0)
                    else:
                        rf_blas_gemm_nt(n, p1 - p0, H, s2d, H, w_hr[d] + <size_t>p0 * H, H, yt + p0, ldy, zero)
                else:   # GRU_NOLBR, phase 2
                    if wpk != NULL:
                        _mm(n, H, s2d, H, WT + (<size_t>2 * nbH + u0 // vl) * bs, bs, u1 - u0, hgd + 2 * H + u0, GH, 0)
                    else:
                        rf_blas_gemm_nt(n, u1 - u0, H, s2d, H, w_hh[d] + <size_t>(2 * H + u0) * Hout, Hout,
                                        hgd + 2 * H + u0, GH, zero)
                    if floating is float:
                        rft_gru_n_fwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], yp, ldy,
                                          yt, ldy)
                        rft_gru_n_fwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], h0d,
                                          Hout, yt, ldy)
                    else:
                        rft_gru_n_fwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], yp, ldy,
                                          yt, ldy)
                        rft_gru_n_fwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, xgt, GS, hgd, GH, bx[d], bh[d], h0d,
                                          Hout, yt, ldy)
                it = it + nthr
            rf_sync(bar, nthr)


cdef int _items(int nthreads, int ndir, int H, int *cpd) noexcept nogil:
    """Work split: `cpd` unit slices per direction; returns the thread count to use."""
    cdef int c, nitems, nthr
    if nthreads < 1:
        nthreads = 1
    c = nthreads // ndir
    if c < 1:
        c = 1
    if c > (H + UNIT_BLOCK - 1) // UNIT_BLOCK:
        c = (H + UNIT_BLOCK - 1) // UNIT_BLOCK
    cpd[0] = c
    nitems = ndir * c
    nthr = nthreads if nthreads < nitems else nitems
    if not rf_have_openmp():
        nthr = 1
    return nthr


cdef int _variant_args(const double[::1] vp, const floating[::1] ph0, const floating[::1] ph1,
                       const floating[:, :, ::1] dv, int ndir, int N, int H, int GH, rf_var_t *var,
                       const floating **ph, const floating **dvp) except -1:
    """The kernels' view of a cell variant (rf_variant.pxi): 1 with `var`, the peepholes
    and the derivative rows set, 0 for the standard cell; a clear error when an array is
    missing or too small (the kernels read them unchecked)."""
    ph[0] = ph[1] = NULL
    dvp[0] = NULL
    if not _read_variant(vp, var):
        return 0
    if var.peephole:
        if ph0 is None or ph0.shape[0] < 3 * H or (ndir == 2 and (ph1 is None or ph1.shape[0] < 3 * H)):
            raise ValueError("a peephole variant needs each direction's (3H,) peepholes")
        ph[0] = &ph0[0]
        ph[1] = &ph1[0] if ndir == 2 else ph[0]
    if dv is None or dv.shape[0] < ndir or dv.shape[1] < N or dv.shape[2] != GH:
        raise ValueError(f"a cell variant needs dv of shape ({ndir}, {N}, {GH}) for its gate derivatives")
    dvp[0] = &dv[0, 0, 0]
    return 1


def forward_layer(int code, const int64_t[::1] bsz, const int64_t[::1] offs, int ndir, bint rev0,
                  floating[:, :, ::1] xg,
                  const floating[:, ::1] w_hh0, const floating[::1] bx0, const floating[::1] bh0,
                  const floating[:, ::1] w_hr0,
                  const floating[:, ::1] w_hh1, const floating[::1] bx1, const floating[::1] bh1,
                  const floating[:, ::1] w_hr1,
                  const floating[:, :, ::1] h0, const floating[:, :, ::1] c0,
                  floating[:, ::1] y, floating[:, :, ::1] cb,
                  floating[:, :, ::1] hg, floating[:, :, ::1] s2, floating[::1] wpk, int nthreads,
                  const double[::1] vp=None, const floating[::1] ph0=None, const floating[::1] ph1=None,
                  floating[:, :, ::1] dv=None):
    """Recurrence of a training forward for one layer (one or two directions).

    Parameters
    ----------
    code : cell code.  bsz : (T,) live rows per step (non-increasing, >= 1).
    offs : (T+1,) first packed row of each step.  ndir : 1 or 2.  rev0 : direction 0 reversed.
    xg : (ndir, N, GS) input projections x W_ih^T (no bias) in columns [0, G*H); overwritten
        with the saved activations (see rf_train.h).
    w_hh*, bx*, bh*, w_hr* : the directions' recurrent weights and biases (zeros when the
        layer has none; w_hr only read for LSTM with projection).
    h0 : (ndir, B, Hout), c0 : (ndir, B, H) initial states (sorted rows).
    y : (N, ndir*Hout) outputs.  cb : (ndir, N, H) cell states (LSTM).
    hg : (ndir, B, G*H) and s2 : (ndir, B, H) scratch.
    wpk : scratch of ndir * packed_size(..., backward=False) elements: the recurrent products
        then run on weights packed once per call (small batches), or size 0: BLAS per step.
    nthreads : threads to use.
    vp, ph0, ph1, dv : a cell variant (rnnfast.cells.variant_vector; None or a zero flag:
        the standard cell), the directions' (3H,) peepholes, and dv (ndir, N, G*H) out:
        the gates' derivatives, which backward_layer reads.
    """
    cdef int T = bsz.shape[0]
    cdef int N = xg.shape[1]
    cdef size_t wsz = packed_size(code, s2.shape[2], h0.shape[2], floating is double, False)
    cdef rf_var_t var
    cdef const rf_var_t *varp = NULL
    cdef const floating *ph[MAX_DIRS]
    cdef const floating *dvp = NULL
    cdef floating *wp = &wpk[0] if wpk.shape[0] > 0 and <size_t>wpk.shape[0] >= ndir * wsz else NULL
    cdef int GS = xg.shape[2]
    cdef int B = h0.shape[1]
    cdef int Hout = h0.shape[2]
    cdef int H = s2.shape[2]
    cdef int cpd = 1, nthr, tid
    cdef rf_sync_t bar
    cdef rf_intr_t intr
    cdef const floating *w_hh[MAX_DIRS]
    cdef const floating *bx[MAX_DIRS]
    cdef const floating *bh[MAX_DIRS]
    cdef const floating *w_hr[MAX_DIRS]
    if T == 0 or N == 0:
        return
    w_hh[0] = &w_hh0[0, 0]
    bx[0] = &bx0[0]
    bh[0] = &bh0[0]
    w_hr[0] = &w_hr0[0, 0]
    w_hh[1] = &w_hh1[0, 0]
    bx[1] = &bx1[0]
    bh[1] = &bh1[0]
    w_hr[1] = &w_hr1[0, 0]
    if _variant_args(vp, ph0, ph1, dv, ndir, N, H, hg.shape[2], &var, ph, &dvp):
        varp = &var
    nthr = _items(nthreads, ndir, H, &cpd)
    rf_sync_init(&bar, nthr)
    rf_intr_init(&intr, _main_ident)
    if nthr == 1:
        with nogil:
            _fwd_worker(0, 1, code, ndir, cpd, rev0, T, N, B, H, Hout, GS, &bsz[0], &offs[0], &xg[0, 0, 0],
                        w_hh, bx, bh, w_hr, &h0[0, 0, 0], &c0[0, 0, 0], &y[0, 0], &cb[0, 0, 0],
                        &hg[0, 0, 0], &s2[0, 0, 0], wp, wsz, &bar, &intr, varp, ph, <floating *>dvp)
    else:
        with nogil, parallel(num_threads=nthr):
            tid = threadid()
            _fwd_worker(tid, rf_team_size(), code, ndir, cpd, rev0, T, N, B, H, Hout, GS, &bsz[0], &offs[0],
                        &xg[0, 0, 0], w_hh, bx, bh, w_hr, &h0[0, 0, 0], &c0[0, 0, 0], &y[0, 0],
                        &cb[0, 0, 0], &hg[0, 0, 0], &s2[0, 0, 0], wp, wsz, &bar, &intr, varp, ph, <floating *>dvp)
    rf_intr_raise(&intr)     # a signal handler raised during the call (Ctrl-C)


# ----------------------------------------------------------------------------- backward
cdef void _bwd_worker(int tid, int nthr, int code, int ndir, int cpd, bint rev0,
                      int T, int N, int B, int H, int Hout, int GS, int GSb,
                      const int64_t *bsz, const int64_t *offs, const floating *xg,
                      const floating *cb, const floating *y, const floating *h0, const floating *c0,
                      const floating **w_hh, const floating **w_hr, const floating *dy,
                      floating *dh, floating *dc, floating *dg, floating *aux, floating *dhs,
                      floating *scr, floating *wpk, size_t wsz, double *db, rf_sync_t *bar,
                      rf_intr_t *intr, const rf_var_t *var, const floating **ph,
                      const floating *dv) noexcept nogil:
    cdef int G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    cdef int GH = G * H
    cdef int ldy = ndir * Hout
    cdef int nitems = ndir * cpd
    cdef int it, d, k, u0, u1, p0, p1, s, t, tp, tn, n, nc, phase, nphase, g0, g1
    cdef bint rev, relu = code == RNN_RELU
    cdef const floating *gt
    cdef const floating *ct
    cdef const floating *cpv
    cdef const floating *yt
    cdef const floating *yp
    cdef const floating *h0d
    cdef const floating *c0d
    cdef floating *dhd
    cdef floating *dcd
    cdef floating *dgt
    cdef floating *auxt
    cdef floating *scrd
    cdef floating *dhsn
    cdef floating zero = 0, one = 1
    cdef int vl = _vl(<floating>0)
    cdef int nbO = (Hout + vl - 1) // vl
    cdef size_t bs = <size_t>GH * vl, bsr = <size_t>Hout * vl
    cdef floating *Wb = NULL
    cdef floating *Wrb = NULL
    cdef double *dbd
    cdef const floating *phd
    cdef const floating *dvt = NULL
    if wpk != NULL:     # pack this item's weight columns once for every step
        it = tid
        while it < nitems:
            d = it // cpd
            k = it % cpd
            u0 = _split(H, k, cpd)
            u1 = _split(H, k + 1, cpd)
            p0 = _split(Hout, k, cpd)
            p1 = _split(Hout, k + 1, cpd)
            Wb = wpk + <size_t>d * wsz
            _pack(GH, Hout, p0, p1, w_hh[d], 1, Hout, Wb)
            if code == LSTM_PROJ:
                _pack(Hout, H, u0, u1, w_hr[d], 1, H, Wb + <size_t>nbO * bs)
            it = it + nthr
        rf_sync(bar, nthr)
    # the dy of the first step each direction processes
    it = tid
    while it < nitems:
        d = it // cpd
        k = it % cpd
        rev = rev0 if d == 0 else True
        t = 0 if rev else T - 1
        p0 = _split(Hout, k, cpd)
        p1 = _split(Hout, k + 1, cpd)
        dhsn = dhs + (<size_t>d * N + <size_t>offs[t]) * Hout if code == LSTM_PROJ else NULL
        if floating is float:
            rft_add_dy_f(<int>bsz[t], p0, p1, dh + <size_t>d * B * Hout, Hout,
                         dy + <size_t>offs[t] * ldy + d * Hout, ldy, dhsn, Hout)
        else:
            rft_add_dy_d(<int>bsz[t], p0, p1, dh + <size_t>d * B * Hout, Hout,
                         dy + <size_t>offs[t] * ldy + d * Hout, ldy, dhsn, Hout)
        it = it + nthr
    rf_sync(bar, nthr)
    nphase = 3 if code == GRU_NOLBR else 2
    # gate slots of dg summed into db after the gate phase (GRU no-lbr's dr: after phase 1)
    g0 = 1 if code == GRU_NOLBR else 0
    g1 = 3 if code == GRU_NOLBR else (1 if code >= RNN_TANH else 4)
    for s in range(T):
        if tid == 0 and s % 8 == 0:
            rf_intr_poll(intr, bar, nthr)
        if rf_sync_stopped(bar):        # a Ctrl-C: every thread leaves here (rf_interrupt.h)
            break
        for phase in range(nphase):
            it = tid
            while it < nitems:
                d = it // cpd
                k = it % cpd
                rev = rev0 if d == 0 else True
                t = s if rev else T - 1 - s
                n = <int>bsz[t]
                if rev:
                    tp = t + 1
                    nc = <int>bsz[tp] if tp < T else 0
                    tn = tp
                else:
                    tp = t - 1
                    nc = n if t > 0 else 0
                    tn = tp
                u0 = _split(H, k, cpd)
                u1 = _split(H, k + 1, cpd)
                gt = xg + (<size_t>d * N + <size_t>offs[t]) * GS
                dgt = dg + (<size_t>d * N + <size_t>offs[t]) * GSb
                yt = y + <size_t>offs[t] * ldy + d * Hout
                yp = y + <size_t>offs[tp] * ldy + d * Hout if nc > 0 else y
                h0d = h0 + <size_t>d * B * Hout
                c0d = c0 + <size_t>d * B * H
                ct = cb + (<size_t>d * N + <size_t>offs[t]) * H
                cpv = cb + (<size_t>d * N + <size_t>offs[tp]) * H if nc > 0 else cb
                dhd = dh + <size_t>d * B * Hout
                dcd = dc + <size_t>d * B * H
                scrd = scr + <size_t>d * B * H
                auxt = aux + (<size_t>d * N + <size_t>offs[t]) * H
                dbd = db + <size_t>d * GSb
                phd = ph[d]
                if dv != NULL:      # a variant's saved gate derivatives
                    dvt = dv + (<size_t>d * N + <size_t>offs[t]) * GH
                if wpk != NULL:
                    Wb = wpk + <size_t>d * wsz
                    Wrb = Wb + <size_t>nbO * bs
                if phase == 0:
                    if code == LSTM:
                        if floating is float:
                            rft_lstm_bwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, ct, H, cpv, H, dhd, Hout, dcd,
                                             H, dgt, GSb, NULL, 0)
                            rft_lstm_bwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, ct, H, c0d, H, dhd, Hout, dcd,
                                             H, dgt, GSb, NULL, 0)
                        else:
                            rft_lstm_bwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, ct, H, cpv, H, dhd, Hout, dcd,
                                             H, dgt, GSb, NULL, 0)
                            rft_lstm_bwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, ct, H, c0d, H, dhd, Hout, dcd,
                                             H, dgt, GSb, NULL, 0)
                    elif code == LSTM_PROJ:
                        # dm = dh @ W_hr (the gradient of o*tanh(c))
                        if wpk != NULL:
                            _mm(n, Hout, dhd, Hout, Wrb + <size_t>(u0 // vl) * bsr, bsr, u1 - u0, scrd + u0, H, 0)
                        else:
                            rf_blas_gemm_nn(n, u1 - u0, Hout, dhd, Hout, w_hr[d] + u0, H, scrd + u0, H, zero)
                        if floating is float:
                            rft_lstm_bwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, ct, H, cpv, H, scrd, H, dcd,
                                             H, dgt, GSb, auxt, H)
                            rft_lstm_bwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, ct, H, c0d, H, scrd, H, dcd,
                                             H, dgt, GSb, auxt, H)
                        else:
                            rft_lstm_bwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, ct, H, cpv, H, scrd, H, dcd,
                                             H, dgt, GSb, auxt, H)
                            rft_lstm_bwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, ct, H, c0d, H, scrd, H, dcd,
                                             H, dgt, GSb, auxt, H)
                    elif code == GRU_LBR:
                        if floating is float:
                            rft_gru_bwd_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, yp, ldy, dhd, Hout, dgt, GSb)
                            rft_gru_bwd_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, h0d, Hout, dhd, Hout, dgt, GSb)
                        else:
                            rft_gru_bwd_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, yp, ldy, dhd, Hout, dgt, GSb)
                            rft_gru_bwd_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, h0d, Hout, dhd, Hout, dgt, GSb)
                    elif code == GRU_NOLBR:
                        if floating is float:
                            rft_gru_nolbr_bwd1_v_f(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, yp, ldy, dhd, Hout, dgt,
                                                   GSb, auxt, H)
                            rft_gru_nolbr_bwd1_v_f(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, h0d, Hout, dhd, Hout,
                                                   dgt, GSb, auxt, H)
                        else:
                            rft_gru_nolbr_bwd1_v_d(var, phd, dvt, GH, 0, nc, H, u0, u1, gt, GS, yp, ldy, dhd, Hout, dgt,
                                                   GSb, auxt, H)
                            rft_gru_nolbr_bwd1_v_d(var, phd, dvt, GH, nc, n, H, u0, u1, gt, GS, h0d, Hout, dhd, Hout,
                                                   dgt, GSb, auxt, H)
                    else:
                        if floating is float:
                            rft_rnn_bwd_v_f(var, phd, dvt, GH, 0, n, relu, u0, u1, yt, ldy, dhd, Hout, dgt, GSb)
                        else:
                            rft_rnn_bwd_v_d(var, phd, dvt, GH, 0, n, relu, u0, u1, yt, ldy, dhd, Hout, dgt, GSb)
                    # this step's gate gradients into the bias gradients (slots [g0, g1))
                    if floating is float:
                        rft_dbsum_f(0, n, g0, g1, H, u0, u1, dgt, GSb, dbd)
                    else:
                        rft_dbsum_d(0, n, g0, g1, H, u0, u1, dgt, GSb, dbd)
                elif phase == 1 and code == GRU_NOLBR:
                    # q = d(r*h) = dn @ W_hn, then dr and the q*r part of dh_prev
                    if wpk != NULL:
                        _mm(n, H, dgt + 2 * H, GSb, Wb + <size_t>(u0 // vl) * bs + <size_t>2 * H * vl, bs, u1 - u0,
                            scrd + u0, H, 0)
                    else:
                        rf_blas_gemm_nn(n, u1 - u0, H, dgt + 2 * H, GSb, w_hh[d] + <size_t>(2 * H) * Hout + u0, Hout,
                                        scrd + u0, H, zero)
                    if floating is float:
                        rft_gru_nolbr_bwd2_v_f(var, phd, dvt, GH, 0, nc, u0, u1, gt, GS, yp, ldy, scrd, H, dhd, Hout,
                                               dgt, GSb)
                        rft_gru_nolbr_bwd2_v_f(var, phd, dvt, GH, nc, n, u0, u1, gt, GS, h0d, Hout, scrd, H, dhd, Hout,
                                               dgt, GSb)
                    else:
                        rft_gru_nolbr_bwd2_v_d(var, phd, dvt, GH, 0, nc, u0, u1, gt, GS, yp, ldy, scrd, H, dhd, Hout,
                                               dgt, GSb)
                        rft_gru_nolbr_bwd2_v_d(var, phd, dvt, GH, nc, n, u0, u1, gt, GS, h0d, Hout, scrd, H, dhd, Hout,
                                               dgt, GSb)
                    if floating is float:
                        rft_dbsum_f(0, n, 0, 1, H, u0, u1, dgt, GSb, dbd)
                    else:
                        rft_dbsum_d(0, n, 0, 1, H, u0, u1, dgt, GSb, dbd)
                else:
                    # dh_prev[:, p] (=|+=) dG_t @ W_hh[:, p]; then the dy of the next step
                    p0 = _split(Hout, k, cpd)
                    p1 = _split(Hout, k + 1, cpd)
                    if wpk != NULL:
                        if code == GRU_LBR:
                            _mm(n, 2 * H, dgt, GSb, Wb + <size_t>(p0 // vl) * bs, bs, p1 - p0, dhd + p0, Hout, 1)
                            _mm(n, H, dgt + 3 * H, GSb, Wb + <size_t>(p0 // vl) * bs + <size_t>2 * H * vl, bs, p1 - p0,
                                dhd + p0, Hout, 1)
                        elif code == GRU_NOLBR:
                            _mm(n, 2 * H, dgt, GSb, Wb + <size_t>(p0 // vl) * bs, bs, p1 - p0, dhd + p0, Hout, 1)
                        else:
                            _mm(n, GH, dgt, GSb, Wb + <size_t>(p0 // vl) * bs, bs, p1 - p0, dhd + p0, Hout, 0)
                    elif code == GRU_LBR:
                        rf_blas_gemm_nn(n, p1 - p0, 2 * H, dgt, GSb, w_hh[d] + p0, Hout, dhd + p0, Hout, one)
                        rf_blas_gemm_nn(n, p1 - p0, H, dgt + 3 * H, GSb, w_hh[d] + <size_t>(2 * H) * Hout + p0, Hout,
                                        dhd + p0, Hout, one)
                    elif code == GRU_NOLBR:
                        rf_blas_gemm_nn(n, p1 - p0, 2 * H, dgt, GSb, w_hh[d] + p0, Hout, dhd + p0, Hout, one)
                    else:
                        rf_blas_gemm_nn(n, p1 - p0, GH, dgt, GSb, w_hh[d] + p0, Hout, dhd + p0, Hout, zero)
                    if 0 <= tn < T:
                        dhsn = dhs + (<size_t>d * N + <size_t>offs[tn]) * Hout if code == LSTM_PROJ else NULL
                        if floating is float:
                            rft_add_dy_f(<int>bsz[tn], p0, p1, dhd, Hout, dy + <size_t>offs[tn] * ldy + d * Hout,
                                         ldy, dhsn, Hout)
                        else:
                            rft_add_dy_d(<int>bsz[tn], p0, p1, dhd, Hout, dy + <size_t>offs[tn] * ldy + d * Hout,
                                         ldy, dhsn, Hout)
                it = it + nthr
            # barriers: after the gate phases always (the GEMMs read every unit of dG);
            # after the dh phase only with projection (its next GEMM reads every column of dh)
            if phase < nphase - 1 or code == LSTM_PROJ:
                rf_sync(bar, nthr)


def backward_layer(int code, const int64_t[::1] bsz, const int64_t[::1] offs, int ndir, bint rev0,
                   const floating[:, :, ::1] xg, const floating[:, :, ::1] cb, const floating[:, ::1] y,
                   const floating[:, :, ::1] h0, const floating[:, :, ::1] c0,
                   const floating[:, ::1] w_hh0, const floating[:, ::1] w_hr0,
                   const floating[:, ::1] w_hh1, const floating[:, ::1] w_hr1,
                   const floating[:, ::1] dy, floating[:, :, ::1] dh, floating[:, :, ::1] dc,
                   floating[:, :, ::1] dg, floating[:, :, ::1] aux, floating[:, :, ::1] dhs,
                   floating[:, :, ::1] scr, floating[::1] wpk, double[:, ::1] db, int nthreads,
                   const double[::1] vp=None, const floating[::1] ph0=None, const floating[::1] ph1=None,
                   const floating[:, :, ::1] dv=None):
    """Recurrence of backpropagation through time for one layer (one or two directions).

    Parameters
    ----------
    code, bsz, offs, ndir, rev0 : as :func:`forward_layer`.
    xg, cb, y, h0, c0 : what :func:`forward_layer` saved and its initial states.
    w_hh*, w_hr* : recurrent weights now (w_hr only read with projection).
    dy : (N, ndir*Hout) gradient of the outputs.
    dh : (ndir, B, Hout) in: gradient of h_n; out: of h0.  dc : (ndir, B, H) the same for c.
    dg : (ndir, N, GSb) out: pre-activation gate gradients (layout in rf_train.h).
    aux : (ndir, N, H) out: o*tanh(c) (projection) or r*h_prev (GRU no-lbr).
    dhs : (ndir, N, Hout) out: total gradient of each h (projection only).
    scr : (ndir, B, H) scratch.
    wpk : ndir * packed_size(..., backward=True) elements (packed weights), or size 0 (BLAS).
    db : (ndir, GSb) float64, zeros in; out: the column sums of dg (the bias gradients).
    nthreads : threads to use.
    vp, ph0, ph1, dv : the cell variant, peepholes and gate derivatives of the forward.
    """
    cdef int T = bsz.shape[0]
    cdef int N = dg.shape[1]
    cdef size_t wsz = packed_size(code, scr.shape[2], h0.shape[2], floating is double, True)
    cdef floating *wp = &wpk[0] if wpk.shape[0] > 0 and <size_t>wpk.shape[0] >= ndir * wsz else NULL
    cdef int GS = xg.shape[2]
    cdef int GSb = dg.shape[2]
    cdef int B = h0.shape[1]
    cdef int Hout = h0.shape[2]
    cdef int H = scr.shape[2]
    cdef int cpd = 1, nthr, tid
    cdef rf_sync_t bar
    cdef rf_intr_t intr
    cdef const floating *w_hh[MAX_DIRS]
    cdef const floating *w_hr[MAX_DIRS]
    cdef rf_var_t var
    cdef const rf_var_t *varp = NULL
    cdef const floating *ph[MAX_DIRS]
    cdef const floating *dvp = NULL
    cdef int G = 4 if code <= LSTM_PROJ else (3 if code <= GRU_NOLBR else 1)
    if T == 0 or N == 0:
        return
    w_hh[0] = &w_hh0[0, 0]
    w_hr[0] = &w_hr0[0, 0]
    w_hh[1] = &w_hh1[0, 0]
    w_hr[1] = &w_hr1[0, 0]
    if _variant_args(vp, ph0, ph1, dv, ndir, N, H, G * H, &var, ph, &dvp):
        varp = &var
    nthr = _items(nthreads, ndir, H, &cpd)
    rf_sync_init(&bar, nthr)
    rf_intr_init(&intr, _main_ident)
    if nthr == 1:
        with nogil:
            _bwd_worker(0, 1, code, ndir, cpd, rev0, T, N, B, H, Hout, GS, GSb, &bsz[0], &offs[0],
                        &xg[0, 0, 0], &cb[0, 0, 0], &y[0, 0], &h0[0, 0, 0], &c0[0, 0, 0], w_hh, w_hr,
                        &dy[0, 0], &dh[0, 0, 0], &dc[0, 0, 0], &dg[0, 0, 0], &aux[0, 0, 0],
                        &dhs[0, 0, 0], &scr[0, 0, 0], wp, wsz, &db[0, 0], &bar, &intr, varp, ph, dvp)
    else:
        with nogil, parallel(num_threads=nthr):
            tid = threadid()
            _bwd_worker(tid, rf_team_size(), code, ndir, cpd, rev0, T, N, B, H, Hout, GS, GSb, &bsz[0], &offs[0],
                        &xg[0, 0, 0], &cb[0, 0, 0], &y[0, 0], &h0[0, 0, 0], &c0[0, 0, 0], w_hh, w_hr,
                        &dy[0, 0], &dh[0, 0, 0], &dc[0, 0, 0], &dg[0, 0, 0], &aux[0, 0, 0],
                        &dhs[0, 0, 0], &scr[0, 0, 0], wp, wsz, &db[0, 0], &bar, &intr, varp, ph, dvp)
    rf_intr_raise(&intr)     # a signal handler raised during the call (Ctrl-C)
