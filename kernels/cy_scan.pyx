# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython/OpenMP kernels of the time-parallel recurrences: ``linear_scan``, minGRU, minLSTM.

A first-order linear recurrence h_t = a_t * h_{t-1} + b_t (elementwise) is scanned in
parallel over time, one persistent OpenMP region per call. ``linear_scan`` cuts the
steps into P+1 chunks for P threads:

1. thread 0 scans chunk 0 from the known initial state while every other thread p
   *reduces* chunk p to the pair (A, H) = (prod a, the chunk's result from a zero state),
   which composes as (A1, H1) then (A2, H2) = (A1*A2, A2*H1 + H2);
2. one barrier; the thread of chunk p folds the pairs of chunks 1..p-1 onto chunk 0's
   final state (a few vector operations per chunk) to get its carry-in;
3. the P threads scan chunks 1..P from their carries (the last chunk needs no reduction).
   Chunk 0 is about half as long as the others (``rho``, measured: reducing a step costs
   about half of scanning it), so both phases are balanced: the time is about
   (reduce + scan) / (P + rho) of the steps.

minGRU / minLSTM cut the steps into P chunks instead (their projection GEMM dominates and
must not be left to one thread): thread 0 projects and scans chunk 0, the others project
and reduce theirs, then scan them again from their carries.

Inside a thread the work is vectorised over features and *interleaved over time*: the
features of each batch row are cut into tiles of 8 (then one each of 4, 2, 1 for the
rest; a row narrower than 32 gets ceil(NU/W) overlapping tiles of one width W instead),
kept as float64 vectors of W lanes (GCC vector extensions: AVX-512, AVX2 or SSE, whatever
-march gives), and 4 to 8 independent *chains* advance together, each chain one tile
over one run of steps. With enough tiles the chains are different tiles; with few (a
narrow feature axis) a block of steps (~96 KiB) is cut into sub-chunks that are reduced
first, their carries combined, then scanned together from cache, so the dependency
chain of the recurrence (one FMA latency per step) does not limit a thread. When the
range streams from memory and one chain already moves 48+ bytes a step, one plain pass
is taken instead (it is bandwidth-bound; a second pass would only cost more).

States, carries and (A, H) pairs are kept in float64 whatever the data type: a float32
scan over 100 000 steps stays within 1e-5 of the float64 result, where a float32 state
drifts by 1e-3 on long runs of a ~ 1 (the drift of adding small terms to a large sum).

minGRU / minLSTM project their inputs for all gates with one GEMM per block of steps
(single-threaded BLAS inside the region, each thread its own chunk of steps), turn the
block's projections into (a, b) in place while they are in cache (or into a per-thread
scratch block when the projections must be kept for training), and scan or reduce the
block at once. Sequences with ``lengths`` stop at their length: the state is frozen and
the output is zero past it.
"""
from cython cimport floating

include "rf_blas.pxi"
from cython.parallel cimport parallel, threadid
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)
from libc.string cimport memcpy

include "rf_fused_decl.pxi"

cdef extern from "rf_scan.h":
    void rf_barrier() nogil
    int rf_team_size() nogil
    int rf_have_openmp() nogil
    void rfs_scan_f(int W, int K, int64_t L, int64_t lda, int64_t ldo, const float *a, const float *b,
                    float *o, const int64_t *aoff, const int64_t *ooff, const int64_t *lv, double *hs) nogil
    void rfs_scan_d(int W, int K, int64_t L, int64_t lda, int64_t ldo, const double *a, const double *b,
                    double *o, const int64_t *aoff, const int64_t *ooff, const int64_t *lv, double *hs) nogil
    void rfs_red_f(int W, int K, int64_t L, int64_t lda, const float *a, const float *b,
                   const int64_t *aoff, const int64_t *lv, double *As, double *Hs) nogil
    void rfs_red_d(int W, int K, int64_t L, int64_t lda, const double *a, const double *b,
                   const int64_t *aoff, const int64_t *lv, double *As, double *Hs) nogil
    void rfs_gates_gru_f(int64_t n, int64_t H, const float *p, int64_t lds, const float *bias,
                         float *q, int64_t ldd) nogil
    void rfs_gates_gru_d(int64_t n, int64_t H, const double *p, int64_t lds, const double *bias,
                         double *q, int64_t ldd) nogil
    void rfs_gates_lstm_f(int64_t n, int64_t H, const float *p, int64_t lds, const float *bias,
                          float *q, int64_t ldd) nogil
    void rfs_gates_lstm_d(int64_t n, int64_t H, const double *p, int64_t lds, const double *bias,
                          double *q, int64_t ldd) nogil
    void rfs_gates_gru_s_f(int64_t n, int64_t nu, int64_t gs, int64_t bs, const float *p, int64_t lds,
                           const float *bias, float *q, int64_t ldd) nogil
    void rfs_gates_gru_s_d(int64_t n, int64_t nu, int64_t gs, int64_t bs, const double *p, int64_t lds,
                           const double *bias, double *q, int64_t ldd) nogil
    void rfs_gates_lstm_s_f(int64_t n, int64_t nu, int64_t gs, int64_t bs, const float *p, int64_t lds,
                            const float *bias, float *q, int64_t ldd) nogil
    void rfs_gates_lstm_s_d(int64_t n, int64_t nu, int64_t gs, int64_t bs, const double *p, int64_t lds,
                            const double *bias, double *q, int64_t ldd) nogil
    void rfs_gscan_gru_f(int64_t nt, int64_t B, int64_t nu, int64_t H, const float *p, int64_t ldp,
                         const float *bias, const int64_t *lens, int64_t t0, float *y, int64_t ldy,
                         double *hc) nogil
    void rfs_gscan_gru_d(int64_t nt, int64_t B, int64_t nu, int64_t H, const double *p, int64_t ldp,
                         const double *bias, const int64_t *lens, int64_t t0, double *y, int64_t ldy,
                         double *hc) nogil
    void rfs_gscan_lstm_f(int64_t nt, int64_t B, int64_t nu, int64_t H, const float *p, int64_t ldp,
                          const float *bias, const int64_t *lens, int64_t t0, float *y, int64_t ldy,
                          double *hc) nogil
    void rfs_gscan_lstm_d(int64_t nt, int64_t B, int64_t nu, int64_t H, const double *p, int64_t ldp,
                          const double *bias, const int64_t *lens, int64_t t0, double *y, int64_t ldy,
                          double *hc) nogil


DEF MAXC = 8            # chains per kernel call
DEF BLOCK_BYTES = 98304  # bytes of (a, b, out) per time block kept in L1/L2 between passes
DEF MIN_SUB = 16        # shortest sub-chunk worth interleaving
DEF STREAM_BYTES = 1048576  # a range of more (a, b, out) bytes than this streams from L3/DRAM
DEF LATENCY_BYTES = 48  # one chain moving this many bytes a step is bandwidth-bound when streaming

# Layout of one scan problem (all strides in elements; NB batch rows of NU units):
#   a[t*ldt + bb*ldb + u], b likewise (same offsets), out[t*oldt + bb*oldb + u]
#   lens: valid steps of each batch row (NULL: all), tg: global step of the problem's step 0.
cdef struct Layout:
    int64_t ldt
    int64_t ldb
    int64_t oldt
    int64_t oldb
    int64_t NB
    int64_t NU
    const int64_t *lens
    int64_t tg


def have_openmp() -> bool:
    """Whether these kernels were compiled with OpenMP."""
    return bool(rf_have_openmp())


# ------------------------------------------------------------------------------ tiles
cdef inline int64_t _ntiles(int W, int64_t NB, int64_t NU) noexcept nogil:
    """Tiles of width W: each batch row is cut into NU // 8 tiles of 8, then at most one
    tile each of 4, 2 and 1 for the rest."""
    cdef int64_t q8 = NU // 8
    cdef int64_t r = NU - 8 * q8
    if W == 8:
        return NB * q8
    if W == 4:
        return NB if r >= 4 else 0
    if W == 2:
        return NB if (r & 2) else 0
    return NB if (r & 1) else 0


cdef inline void _tile(int W, int64_t i, int64_t NU, int64_t *bb, int64_t *u0) noexcept nogil:
    cdef int64_t q8 = NU // 8
    cdef int64_t r = NU - 8 * q8
    if W == 8:
        bb[0] = i // q8
        u0[0] = (i % q8) * 8
    else:
        bb[0] = i
        u0[0] = q8 * 8 + (r & (~(2 * W - 1)))   # the wider tail tiles come first


cdef inline int64_t _live(const Layout *ly, int64_t bb, int64_t t) noexcept nogil:
    """Live steps of batch row bb from problem step t on (may be <= 0 or huge)."""
    if ly.lens == NULL:
        return <int64_t>1 << 60
    return ly.lens[bb] - ly.tg - t


cdef inline void _sc(int W, int K, int64_t L, const Layout *ly, const floating *a, const floating *b,
                     floating *o, const int64_t *aoff, const int64_t *ooff, const int64_t *lv,
                     double *hs) noexcept nogil:
    if floating is float:
        rfs_scan_f(W, K, L, ly.ldt, ly.oldt, a, b, o, aoff, ooff, lv, hs)
    else:
        rfs_scan_d(W, K, L, ly.ldt, ly.oldt, a, b, o, aoff, ooff, lv, hs)


cdef inline void _rd(int W, int K, int64_t L, const Layout *ly, const floating *a, const floating *b,
                     const int64_t *aoff, const int64_t *lv, double *As, double *Hs) noexcept nogil:
    if floating is float:
        rfs_red_f(W, K, L, ly.ldt, a, b, aoff, lv, As, Hs)
    else:
        rfs_red_d(W, K, L, ly.ldt, a, b, aoff, lv, As, Hs)


# ------------------------------------------------------------------------------ groups
cdef void _group_scan(const Layout *ly, const floating *a, const floating *b, floating *o,
                      int W, const int64_t *tb, const int64_t *tu, int m, int S, int64_t t, int64_t ln,
                      double *carry) noexcept nogil:
    """Scan steps [t, t+ln) of the m tiles (batch row tb[i], first unit tu[i], width W) from
    `carry` (updated), with the steps cut into S interleaved sub-chunks (reduced first, then
    scanned). Tiles of one row may overlap: they compute identical values there."""
    cdef int64_t aoff[MAXC]
    cdef int64_t ooff[MAXC]
    cdef int64_t lv[MAXC]
    cdef double hs[MAXC * 8]
    cdef double As[MAXC * 8]
    cdef double Hs[MAXC * 8]
    cdef int i, s, c, w, Se
    cdef int64_t L, rem, col
    cdef double v
    cdef const floating *at = a + t * ly.ldt
    cdef const floating *bt = b + t * ly.ldt
    cdef floating *ot = o + t * ly.oldt
    Se = S
    L = ln // Se
    if Se > 1 and L < MIN_SUB:
        Se = 1
    if Se == 1:   # one pass, chains = tiles
        for i in range(m):
            aoff[i] = tb[i] * ly.ldb + tu[i]
            ooff[i] = tb[i] * ly.oldb + tu[i]
            lv[i] = _live(ly, tb[i], t)
            memcpy(&hs[i * W], &carry[tb[i] * ly.NU + tu[i]], W * sizeof(double))
        _sc(W, m, ln, ly, at, bt, ot, aoff, ooff, lv, hs)
        for i in range(m):
            memcpy(&carry[tb[i] * ly.NU + tu[i]], &hs[i * W], W * sizeof(double))
        return
    if Se > 1:   # (A, H) of sub-chunks 0 .. Se-2
        for s in range(Se - 1):
            for i in range(m):
                c = s * m + i
                aoff[c] = s * L * ly.ldt + tb[i] * ly.ldb + tu[i]
                lv[c] = _live(ly, tb[i], t + s * L)
                for w in range(W):
                    As[c * W + w] = 1.0
                    Hs[c * W + w] = 0.0
        _rd(W, (Se - 1) * m, L, ly, at, bt, aoff, lv, As, Hs)
    for i in range(m):   # carries into every sub-chunk
        col = tb[i] * ly.NU + tu[i]
        for w in range(W):
            v = carry[col + w]
            for s in range(Se):
                c = s * m + i
                hs[c * W + w] = v
                if s < Se - 1:
                    v = As[c * W + w] * v + Hs[c * W + w]
    for s in range(Se):
        for i in range(m):
            c = s * m + i
            aoff[c] = s * L * ly.ldt + tb[i] * ly.ldb + tu[i]
            ooff[c] = s * L * ly.oldt + tb[i] * ly.oldb + tu[i]
            lv[c] = _live(ly, tb[i], t + s * L)
    _sc(W, Se * m, L, ly, at, bt, ot, aoff, ooff, lv, hs)
    if Se > 1:   # final states of the last sub-chunk to the front
        for i in range(m):
            c = (Se - 1) * m + i
            for w in range(W):
                hs[i * W + w] = hs[c * W + w]
    rem = ln - Se * L
    if rem > 0:
        for i in range(m):
            aoff[i] = Se * L * ly.ldt + tb[i] * ly.ldb + tu[i]
            ooff[i] = Se * L * ly.oldt + tb[i] * ly.oldb + tu[i]
            lv[i] = _live(ly, tb[i], t + Se * L)
        _sc(W, m, rem, ly, at, bt, ot, aoff, ooff, lv, hs)
    for i in range(m):
        col = tb[i] * ly.NU + tu[i]
        for w in range(W):
            carry[col + w] = hs[i * W + w]


cdef void _group_reduce(const Layout *ly, const floating *a, const floating *b,
                        int W, const int64_t *tb, const int64_t *tu, int m, int S, int64_t t, int64_t ln,
                        double *Acol, double *Hcol) noexcept nogil:
    """Compose steps [t, t+ln) of the m tiles onto the column pairs (Acol, Hcol); a column
    covered by two overlapping tiles (same row, tu ascending) is composed once."""
    cdef int64_t aoff[MAXC]
    cdef int64_t lv[MAXC]
    cdef double As[MAXC * 8]
    cdef double Hs[MAXC * 8]
    cdef int i, s, c, w, Se
    cdef int64_t L, rem, col
    cdef const floating *at = a + t * ly.ldt
    cdef const floating *bt = b + t * ly.ldt
    cdef int w0
    Se = S
    L = ln // Se
    if Se > 1 and L < MIN_SUB:
        Se = 1
    if Se == 1:
        L = ln
    for s in range(Se):
        for i in range(m):
            c = s * m + i
            aoff[c] = s * L * ly.ldt + tb[i] * ly.ldb + tu[i]
            lv[c] = _live(ly, tb[i], t + s * L)
            for w in range(W):
                As[c * W + w] = 1.0
                Hs[c * W + w] = 0.0
    _rd(W, Se * m, L, ly, at, bt, aoff, lv, As, Hs)
    for s in range(1, Se):   # fold the sub-chunks into chain slot i
        for i in range(m):
            c = s * m + i
            for w in range(W):
                Hs[i * W + w] = As[c * W + w] * Hs[i * W + w] + Hs[c * W + w]
                As[i * W + w] = As[i * W + w] * As[c * W + w]
    rem = ln - Se * L
    if rem > 0:
        for i in range(m):
            aoff[i] = Se * L * ly.ldt + tb[i] * ly.ldb + tu[i]
            lv[i] = _live(ly, tb[i], t + Se * L)
        _rd(W, m, rem, ly, at, bt, aoff, lv, As, Hs)
    for i in range(m):
        col = tb[i] * ly.NU + tu[i]
        w0 = 0
        if i > 0 and tb[i] == tb[i - 1] and tu[i - 1] + W > tu[i]:
            w0 = <int>(tu[i - 1] + W - tu[i])
        for w in range(w0, W):
            Hcol[col + w] = As[i * W + w] * Hcol[col + w] + Hs[i * W + w]
            Acol[col + w] = Acol[col + w] * As[i * W + w]


cdef inline int64_t _block_steps(const Layout *ly, int itemsize) noexcept nogil:
    cdef int64_t row = 3 * ly.NB * ly.NU * itemsize
    cdef int64_t tb = BLOCK_BYTES // (row if row > 0 else 1)
    if tb < 8:
        tb = 8
    if tb > 65536:
        tb = 65536
    return tb


cdef inline int _row_tiles(int64_t NU, int64_t bb, int64_t *tb, int64_t *tu, int *Wout) noexcept nogil:
    """Tiles of one narrow batch row (NU < 32): ceil(NU/W) tiles of the widest W <= NU,
    the last one shifted to end at NU (overlapping its neighbour). Returns their count."""
    cdef int W = 8 if NU >= 8 else (4 if NU >= 4 else (2 if NU >= 2 else 1))
    cdef int m = <int>((NU + W - 1) // W)
    cdef int k
    for k in range(m):
        tb[k] = bb
        tu[k] = k * W if k * W + W <= NU else NU - W
    Wout[0] = W
    return m


cdef void _scan_range(const Layout *ly, const floating *a, const floating *b, floating *o,
                      int64_t t0, int64_t t1, double *carry) noexcept nogil:
    """Scan problem steps [t0, t1) from `carry` (NB*NU doubles, updated to the final state).

    Rows of NU >= 32 units: tiles of 8 in groups of up to 8 chains (more independent
    chains in flight: 8 beat 4 on wide rows; commit fb0dc6a; figures in
    docs/performance.md), tails of 4, 2, 1. Narrower rows: one group of overlapping tiles
    per row. A group of fewer tiles than chains is cut into sub-chunks (two passes over
    each block, the second from cache) unless the range streams from memory and the group
    moves enough bytes per step that one pass is bound by bandwidth rather than by the FMA
    latency."""
    cdef int64_t TB = _block_steps(ly, sizeof(floating))
    cdef int64_t t, ln, nt, g, bb, i, cb, cu
    cdef int W, G, ci, S, m
    cdef int Ws[4]
    cdef int64_t tb[MAXC]
    cdef int64_t tu[MAXC]
    cdef bint streams = (t1 - t0) * 3 * ly.NB * ly.NU * <int64_t>sizeof(floating) > STREAM_BYTES
    Ws[0] = 8
    Ws[1] = 4
    Ws[2] = 2
    Ws[3] = 1
    t = t0
    while t < t1:
        ln = t1 - t if t1 - t < TB else TB
        if ly.NU < 32:
            for bb in range(ly.NB):
                m = _row_tiles(ly.NU, bb, tb, tu, &W)
                G = 4 if W >= 4 else 8
                S = G // m if G // m > 1 else 1
                if streams and 3 * m * W * <int>sizeof(floating) >= LATENCY_BYTES:
                    S = 1
                _group_scan(ly, a, b, o, W, tb, tu, m, S, t, ln, carry)
            t += ln
            continue
        for ci in range(4):
            W = Ws[ci]
            G = 4 if W >= 4 else 8      # chains wanted to hide the FMA latency
            nt = _ntiles(W, ly.NB, ly.NU)
            g = 0
            cb = 0
            cu = 0
            while g < nt:
                m = <int>(nt - g if nt - g < MAXC else MAXC)   # up to 8 tiles a group
                for i in range(m):
                    if W == 8:      # walk the tiles of 8 row by row (no divisions)
                        tb[i] = cb
                        tu[i] = cu
                        cu += 8
                        if cu + 8 > ly.NU:
                            cu = 0
                            cb += 1
                    else:
                        _tile(W, g + i, ly.NU, &tb[i], &tu[i])
                S = G // m if G > m else 1
                if S > 1 and streams and 3 * m * W * <int>sizeof(floating) >= LATENCY_BYTES:
                    S = 1
                _group_scan(ly, a, b, o, W, tb, tu, m, S, t, ln, carry)
                g += m
        t += ln


cdef void _reduce_range(const Layout *ly, const floating *a, const floating *b,
                        int64_t t0, int64_t t1, double *Acol, double *Hcol) noexcept nogil:
    """Compose problem steps [t0, t1) onto (Acol, Hcol) (NB*NU doubles each)."""
    cdef int64_t TB = _block_steps(ly, sizeof(floating))
    cdef int64_t t, ln, nt, g, bb, i, cb, cu
    cdef int W, G, ci, S, m
    cdef int Ws[4]
    cdef int64_t tb[MAXC]
    cdef int64_t tu[MAXC]
    Ws[0] = 8
    Ws[1] = 4
    Ws[2] = 2
    Ws[3] = 1
    t = t0
    while t < t1:
        ln = t1 - t if t1 - t < TB else TB
        if ly.NU < 32:
            for bb in range(ly.NB):
                m = _row_tiles(ly.NU, bb, tb, tu, &W)
                G = 4 if W >= 4 else 8
                S = G // m if G // m > 1 else 1
                _group_reduce(ly, a, b, W, tb, tu, m, S, t, ln, Acol, Hcol)
            t += ln
            continue
        for ci in range(4):
            W = Ws[ci]
            G = 4 if W >= 4 else 8      # chains wanted to hide the FMA latency
            nt = _ntiles(W, ly.NB, ly.NU)
            g = 0
            cb = 0
            cu = 0
            while g < nt:
                m = <int>(nt - g if nt - g < MAXC else MAXC)   # up to 8 tiles a group
                for i in range(m):
                    if W == 8:
                        tb[i] = cb
                        tu[i] = cu
                        cu += 8
                        if cu + 8 > ly.NU:
                            cu = 0
                            cb += 1
                    else:
                        _tile(W, g + i, ly.NU, &tb[i], &tu[i])
                _group_reduce(ly, a, b, W, tb, tu, m, G // m if G > m else 1, t, ln, Acol, Hcol)
                g += m
        t += ln


cdef inline void _carry_in(int p, int64_t N, double *carry0, double *work) noexcept nogil:
    """Carry into chunk p >= 1: chunk 0's final state, then the pairs of chunks 1..p-1.
    work rows: 3*q = A_q, 3*q+1 = H_q, 3*q+2 = carry of chunk q."""
    cdef double *c = work + (3 * p + 2) * N
    cdef double *A
    cdef double *Hq
    cdef int q
    cdef int64_t n
    for n in range(N):
        c[n] = carry0[n]
    for q in range(1, p):
        A = work + (3 * q) * N
        Hq = work + (3 * q + 1) * N
        for n in range(N):
            c[n] = A[n] * c[n] + Hq[n]


cdef void _chunk_bounds(int64_t T, int P, double rho, int64_t *bounds) noexcept nogil:
    """Chunk 0 gets weight 1, the others rho (< 1: they make two passes)."""
    cdef double tot = 1.0 + (P - 1) * rho
    cdef int p
    cdef int64_t v
    bounds[0] = 0
    for p in range(1, P):
        v = <int64_t>(T * (1.0 + (p - 1) * rho) / tot + 0.5)
        bounds[p] = v if v < T else T
    bounds[P] = T


# ------------------------------------------------------------------------------ linear_scan
cdef void _ls_bounds(int64_t T, int P, double rho, int64_t *bounds) noexcept nogil:
    """P+1 chunks: chunk 0 of rho*L steps, chunks 1..P of L steps (T = (rho + P) * L)."""
    cdef double L = T / (rho + P)
    cdef int k
    cdef int64_t v
    bounds[0] = 0
    for k in range(1, P + 1):
        v = <int64_t>(rho * L + (k - 1) * L + 0.5)
        bounds[k] = v if v < T else T
    bounds[P + 1] = T


cdef void _ls_worker(int tid, int nt, int P, const Layout *ly, const floating *a,
                     const floating *b, floating *o, const int64_t *bounds, double *carry,
                     double *work) noexcept nogil:
    """Phase A: thread 0 scans chunk 0 from the initial state while threads 1..P-1 reduce
    chunks 1..P-1; phase B: the P threads scan chunks 1..P (chunk P needs no reduction).
    Balanced when reducing rho*L steps costs what scanning L steps does (rho ~ 0.5)."""
    cdef int p
    cdef int64_t N = ly.NB * ly.NU
    cdef int64_t n
    p = tid
    while p < P:
        if p == 0:
            _scan_range(ly, a, b, o, bounds[0], bounds[1], carry)
        else:
            for n in range(N):
                work[3 * p * N + n] = 1.0
                work[(3 * p + 1) * N + n] = 0.0
            _reduce_range(ly, a, b, bounds[p], bounds[p + 1], work + 3 * p * N, work + (3 * p + 1) * N)
        p += nt
    rf_barrier()
    p = tid + 1
    while p <= P:
        _carry_in(p, N, carry, work)
        _scan_range(ly, a, b, o, bounds[p], bounds[p + 1], work + (3 * p + 2) * N)
        p += nt


cdef void _ls_columns(int tid, int nt, int P, const Layout *ly0, const floating *a, const floating *b,
                      floating *o, int64_t T, double *carry) noexcept nogil:
    """Slice p of the features (a multiple of 8 wide) over all steps, for each p of this thread."""
    cdef Layout ly = ly0[0]
    cdef int64_t N = ly0.NU
    cdef int64_t n0, n1
    cdef int p = tid
    while p < P:
        n0 = (N * p // P) // 8 * 8
        n1 = N if p == P - 1 else (N * (p + 1) // P) // 8 * 8
        if n1 > n0:
            ly.NU = n1 - n0
            _scan_range(&ly, a + n0, b + n0, o + n0, 0, T, carry + n0)
        p += nt


def linear_scan(const floating[:, ::1] a, const floating[:, ::1] b, floating[:, ::1] out,
                double[::1] carry, bint reverse, int nthreads, double rho=0.6,
                int64_t min_steps=256, int64_t min_work=32768):
    """h_t = a_t * h_{t-1} + b_t over the rows of a, b (T, N) into out (T, N).

    carry : (N,) float64, the initial state in, the final state out.
    reverse : scan from the last row down (the state after the last row is `carry`).
    nthreads : threads. rho : length of chunk 0 against the P others (see _ls_worker).
    Runs on one thread when T*N < min_work; with T < min_steps*nthreads the threads
    split the features instead (when there are at least 1024 per thread), else one runs.
    """
    cdef int64_t T = a.shape[0]
    cdef int64_t N = a.shape[1]
    cdef Layout ly
    cdef int P, nt, tid
    cdef int64_t *bounds
    cdef double *work
    cdef const floating *pa
    cdef const floating *pb
    cdef floating *po
    cdef int64_t n
    if T == 0 or N == 0:
        return
    ly.NB = 1
    ly.NU = N
    ly.ldb = 0
    ly.oldb = 0
    ly.lens = NULL
    ly.tg = 0
    if reverse:
        ly.ldt = -N
        ly.oldt = -N
        pa = &a[T - 1, 0]
        pb = &b[T - 1, 0]
        po = &out[T - 1, 0]
    else:
        ly.ldt = N
        ly.oldt = N
        pa = &a[0, 0]
        pb = &b[0, 0]
        po = &out[0, 0]
    P = nthreads if nthreads > 1 else 1
    if not rf_have_openmp() or T * N < min_work:
        P = 1
    if P > 1 and T < min_steps * P:
        if N >= 1024 * P:   # few steps, many features: split the features instead
            with nogil, parallel(num_threads=P):
                tid = threadid()
                nt = rf_team_size()
                _ls_columns(tid, nt, P, &ly, pa, pb, po, T, &carry[0])
            return
        P = 1
    if P == 1:
        with nogil:
            _scan_range(&ly, pa, pb, po, 0, T, &carry[0])
        return
    bounds = <int64_t*>malloc((P + 2) * sizeof(int64_t))
    work = <double*>malloc(3 * (P + 1) * N * sizeof(double))
    if bounds == NULL or work == NULL:
        free(bounds)
        free(work)
        raise MemoryError()
    _ls_bounds(T, P, rho, bounds)
    with nogil, parallel(num_threads=P):
        tid = threadid()
        nt = rf_team_size()
        _ls_worker(tid, nt, P, &ly, pa, pb, po, bounds, &carry[0], work)
    for n in range(N):
        carry[n] = work[(3 * P + 2) * N + n]
    free(bounds)
    free(work)


# ------------------------------------------------------------------------------ minGRU / minLSTM
cdef inline void _gates(int kind, int64_t n, int64_t H, const floating *p, int64_t lds,
                        const floating *bias, floating *q, int64_t ldd) noexcept nogil:
    if floating is float:
        if kind == 0:
            rfs_gates_gru_f(n, H, p, lds, bias, q, ldd)
        else:
            rfs_gates_lstm_f(n, H, p, lds, bias, q, ldd)
    else:
        if kind == 0:
            rfs_gates_gru_d(n, H, p, lds, bias, q, ldd)
        else:
            rfs_gates_lstm_d(n, H, p, lds, bias, q, ldd)


cdef struct MinJob:
    int kind            # 0 minGRU (G=2), 1 minLSTM (G=3)
    int64_t T           # steps stored in x / proj / y
    int64_t B
    int64_t nin
    int64_t H
    int64_t GH
    bint batch_first
    bint keep           # keep proj intact (gates into per-thread scratch)
    bint do_gemm        # project x here (else proj already holds x W^T)
    int64_t Tsub        # steps per block
    const int64_t *lens
    void *wpk           # w packed as G=1 panels of rf_fused.h (NULL: BLAS), shared by the team
    int npan


cdef inline void _proj(const MinJob *jb, int64_t n, const floating *x, const floating *w,
                       floating *out) noexcept nogil:
    """out[n, GH] = x[n, I] @ w^T: the packed micro-kernel of rf_fused.h when w is packed
    (measured on mingru-long: faster than single-threaded BLAS on these 512-row blocks),
    else BLAS."""
    if jb.wpk != NULL:
        if floating is float:
            rf_gemm_panels_f(1, <int>jb.GH, <int>jb.nin, <int>n, 0, jb.npan, x, <int>jb.nin,
                             <const float*>jb.wpk, out, <int>jb.GH)
        else:
            rf_gemm_panels_d(1, <int>jb.GH, <int>jb.nin, <int>n, 0, jb.npan, x, <int>jb.nin,
                             <const double*>jb.wpk, out, <int>jb.GH)
    else:
        rf_blas_gemm_nt(<int>n, <int>jb.GH, <int>jb.nin, x, <int>jb.nin, w, <int>jb.nin, out, <int>jb.GH, <floating>0)


cdef void _min_block(const MinJob *jb, int64_t s0, int64_t s1, const floating *x, const floating *w,
                     const floating *bias, floating *proj, floating *scr, bint gemm, bint gates,
                     Layout *ly, floating **pa) noexcept nogil:
    """Project (optionally) and gate steps [s0, s1); set `ly`/`pa` to where (a, b) now are."""
    cdef int64_t ns = s1 - s0
    cdef int64_t B = jb.B, H = jb.H, GH = jb.GH, I = jb.nin, T = jb.T
    cdef int64_t bb
    cdef floating *dst
    if gemm:
        if not jb.batch_first:
            _proj(jb, ns * B, x + s0 * B * I, w, proj + s0 * B * GH)
        else:
            for bb in range(B):
                _proj(jb, ns, x + (bb * T + s0) * I, w, proj + (bb * T + s0) * GH)
    ly.NB = B
    ly.NU = H
    ly.lens = jb.lens
    ly.tg = s0
    if jb.keep:   # (a, b) of the block into the thread's scratch, time-major (ns, B, 2H)
        dst = scr
        ly.ldt = B * 2 * H
        ly.ldb = 2 * H
        if gates:
            if not jb.batch_first:
                _gates(jb.kind, ns * B, H, proj + s0 * B * GH, GH, bias, scr, 2 * H)
            else:
                for bb in range(B):
                    _gates(jb.kind, ns, H, proj + (bb * T + s0) * GH, GH, bias, scr + bb * 2 * H, B * 2 * H)
    else:         # in place
        if not jb.batch_first:
            dst = proj + s0 * B * GH
            ly.ldt = B * GH
            ly.ldb = GH
            if gates:
                _gates(jb.kind, ns * B, H, dst, GH, bias, dst, GH)
        else:
            dst = proj + s0 * GH
            ly.ldt = GH
            ly.ldb = T * GH
            if gates:
                for bb in range(B):
                    _gates(jb.kind, ns, H, proj + (bb * T + s0) * GH, GH, bias, proj + (bb * T + s0) * GH, GH)
    pa[0] = dst


cdef void _min_worker(int tid, int nt, int P, const MinJob *jb, const floating *x, const floating *w,
                      const floating *bias, floating *proj, floating *scratch, floating *y,
                      const int64_t *bounds, double *carry, double *work) noexcept nogil:
    cdef int p
    cdef int64_t N = jb.B * jb.H
    cdef int64_t n, s0, s1
    cdef Layout ly
    cdef floating *pa
    cdef floating *scr = scratch + <int64_t>tid * jb.Tsub * jb.B * 2 * jb.H if jb.keep else NULL
    cdef int64_t oldt = jb.H if jb.batch_first else jb.B * jb.H
    cdef int64_t oldb = jb.T * jb.H if jb.batch_first else jb.H
    if jb.wpk != NULL:   # pack the weights once, each thread its share of the panels
        if floating is float:
            rf_pack_f(1, <int>jb.GH, <int>jb.nin, jb.npan * tid // nt, jb.npan * (tid + 1) // nt, w,
                      <float*>jb.wpk)
        else:
            rf_pack_d(1, <int>jb.GH, <int>jb.nin, jb.npan * tid // nt, jb.npan * (tid + 1) // nt, w,
                      <double*>jb.wpk)
        rf_barrier()
    p = tid
    while p < P:
        if p > 0:
            for n in range(N):
                work[3 * p * N + n] = 1.0
                work[(3 * p + 1) * N + n] = 0.0
        s0 = bounds[p]
        while s0 < bounds[p + 1]:
            s1 = s0 + jb.Tsub if s0 + jb.Tsub < bounds[p + 1] else bounds[p + 1]
            _min_block(jb, s0, s1, x, w, bias, proj, scr, jb.do_gemm, True, &ly, &pa)
            if p == 0:
                ly.oldt = oldt
                ly.oldb = oldb
                _scan_range(&ly, pa, pa + jb.H, y + s0 * oldt, 0, s1 - s0, carry)
            else:
                _reduce_range(&ly, pa, pa + jb.H, 0, s1 - s0, work + 3 * p * N, work + (3 * p + 1) * N)
            s0 = s1
        p += nt
    rf_barrier()
    p = tid
    while p < P:
        if p > 0:
            _carry_in(p, N, carry, work)
            if jb.keep:
                s0 = bounds[p]
                while s0 < bounds[p + 1]:
                    s1 = s0 + jb.Tsub if s0 + jb.Tsub < bounds[p + 1] else bounds[p + 1]
                    _min_block(jb, s0, s1, x, w, bias, proj, scr, False, True, &ly, &pa)
                    ly.oldt = oldt
                    ly.oldb = oldb
                    _scan_range(&ly, pa, pa + jb.H, y + s0 * oldt, 0, s1 - s0, work + (3 * p + 2) * N)
                    s0 = s1
            else:
                s0 = bounds[p]
                _min_block(jb, s0, bounds[p + 1], x, w, bias, proj, scr, False, False, &ly, &pa)
                ly.oldt = oldt
                ly.oldb = oldb
                _scan_range(&ly, pa, pa + jb.H, y + s0 * oldt, 0, bounds[p + 1] - s0,
                            work + (3 * p + 2) * N)
        p += nt


cdef inline void _panels(int G, int64_t H, int64_t I, int64_t n, int p0, int p1, const floating *x,
                         const void *wpk, floating *out, int64_t ldo) noexcept nogil:
    """out[:n, g*H + u] = x[:n] @ w^T for the units of panels [p0, p1) (w packed in wpk)."""
    if floating is float:
        rf_gemm_panels_f(G, <int>H, <int>I, <int>n, p0, p1, x, <int>I, <const float*>wpk, out, <int>ldo)
    else:
        rf_gemm_panels_d(G, <int>H, <int>I, <int>n, p0, p1, x, <int>I, <const double*>wpk, out, <int>ldo)


cdef inline void _gates_units(int kind, int64_t n, int64_t nu, int64_t H, const floating *p, int64_t lds,
                              const floating *bias, floating *q, int64_t ldd) noexcept nogil:
    """_gates on units [0, nu) of rows whose gates are H apart (pointers at the first unit)."""
    if floating is float:
        if kind == 0:
            rfs_gates_gru_s_f(n, nu, H, H, p, lds, bias, q, ldd)
        else:
            rfs_gates_lstm_s_f(n, nu, H, H, p, lds, bias, q, ldd)
    else:
        if kind == 0:
            rfs_gates_gru_s_d(n, nu, H, H, p, lds, bias, q, ldd)
        else:
            rfs_gates_lstm_s_d(n, nu, H, H, p, lds, bias, q, ldd)


cdef inline void _gate_scan_units(int kind, int64_t nt, int64_t B, int64_t nu, int64_t H,
                                  const floating *p, int64_t ldp, const floating *bias,
                                  const int64_t *lens, int64_t t0, floating *y, int64_t ldy,
                                  double *hc) noexcept nogil:
    """Gates and scan of units [0, nu) over nt time-major steps of B rows in one pass
    (pointers at the first unit): the coefficients never go through memory."""
    if floating is float:
        if kind == 0:
            rfs_gscan_gru_f(nt, B, nu, H, p, ldp, bias, lens, t0, y, ldy, hc)
        else:
            rfs_gscan_lstm_f(nt, B, nu, H, p, ldp, bias, lens, t0, y, ldy, hc)
    else:
        if kind == 0:
            rfs_gscan_gru_d(nt, B, nu, H, p, ldp, bias, lens, t0, y, ldy, hc)
        else:
            rfs_gscan_lstm_d(nt, B, nu, H, p, ldp, bias, lens, t0, y, ldy, hc)


cdef void _min_worker_units(int tid, int nt, const MinJob *jb, const floating *x, const floating *w,
                            const floating *bias, floating *proj, floating *y, double *carry,
                            double *tmpc, int64_t tmax) noexcept nogil:
    """minGRU / minLSTM with the *units* split across threads (inference, time-major):
    each thread packs its panels of w (G gates of UP units each), then block by block of
    steps projects its units and runs gates and scan over them in one pass, for the whole
    batch. No thread reads another's data: no barrier, no second pass, no reduction."""
    cdef int G = 3 if jb.kind else 2
    cdef int UP = rf_panel_units(G, floating is double)
    cdef int p0 = jb.npan * tid // nt, p1 = jb.npan * (tid + 1) // nt
    cdef int64_t u0 = <int64_t>p0 * UP
    cdef int64_t u1 = <int64_t>p1 * UP
    cdef int64_t B = jb.B, H = jb.H, GH = jb.GH, I = jb.nin
    cdef int64_t nu, s0, s1, bb, u, rows
    cdef floating *pb
    if u1 > H:
        u1 = H
    nu = u1 - u0
    if nu <= 0:
        return
    if floating is float:
        rf_pack_f(G, <int>H, <int>I, p0, p1, w, <float*>jb.wpk)
    else:
        rf_pack_d(G, <int>H, <int>I, p0, p1, w, <double*>jb.wpk)
    for bb in range(B):
        for u in range(nu):
            tmpc[bb * nu + u] = carry[bb * H + u0 + u]
    s0 = 0
    while s0 < tmax:
        s1 = s0 + jb.Tsub if s0 + jb.Tsub < tmax else tmax
        rows = (s1 - s0) * B
        pb = proj + s0 * B * GH
        _panels(G, H, I, rows, p0, p1, x + s0 * B * I, jb.wpk, pb, GH)
        _gate_scan_units(jb.kind, s1 - s0, B, nu, H, pb + u0, GH, bias + u0, jb.lens, s0,
                         y + s0 * B * H + u0, H, tmpc)
        s0 = s1
    for bb in range(B):
        for u in range(nu):
            carry[bb * H + u0 + u] = tmpc[bb * nu + u]


def minrnn_forward(int kind, const floating[:, ::1] x, const floating[:, ::1] w,
                   const floating[::1] bias, floating[:, ::1] proj, floating[:, ::1] scratch,
                   floating[:, ::1] y, double[::1] carry, const int64_t[::1] lens,
                   int64_t T, int64_t B, int64_t tmax, bint batch_first, bint keep, bint do_gemm,
                   int64_t Tsub, int nthreads, double rho=0.95):
    """minGRU (kind 0) / minLSTM (kind 1) forward over steps [0, tmax).

    x : (T*B, I) rows in x's layout (t*B + b, or b*T + t with batch_first).
    w : (G*H, I) stacked gate weights ([W_z; W_h] or [W_f; W_i; W_h]); bias (G*H,).
    proj : (T*B, G*H) projections (written when do_gemm; left intact when keep).
    scratch : (nthreads*Tsub*B, 2H) when keep, else anything.
    y : (T*B, H) output rows, same layout as x; rows of steps >= tmax are not touched.
    carry : (B*H,) float64 h0 in, h_n out.  lens : (B,) valid steps of each row.
    """
    cdef MinJob jb
    cdef int P, nt, tid
    cdef int64_t *bounds
    cdef double *work
    cdef int64_t N = B * w.shape[0] // (3 if kind else 2)
    cdef int64_t n
    jb.kind = kind
    jb.T = T
    jb.B = B
    jb.nin = x.shape[1]
    jb.GH = w.shape[0]
    jb.H = jb.GH // (3 if kind else 2)
    jb.batch_first = batch_first
    jb.keep = keep
    jb.do_gemm = do_gemm
    jb.Tsub = Tsub if Tsub > 0 else 1
    jb.lens = &lens[0]
    jb.wpk = NULL
    if tmax <= 0 or N == 0:
        return
    P = nthreads if nthreads > 1 else 1
    if not rf_have_openmp():
        P = 1
    if P > tmax:
        P = <int>tmax
    if keep and scratch.shape[0] < P * jb.Tsub * B:
        raise ValueError("scratch too small")
    bounds = <int64_t*>malloc((P + 1) * sizeof(int64_t))
    work = <double*>malloc(3 * P * N * sizeof(double))
    if bounds == NULL or work == NULL:
        free(bounds)
        free(work)
        raise MemoryError()
    _chunk_bounds(tmax, P, rho, bounds)
    cdef int G = 3 if kind else 2
    cdef int up = rf_panel_units(1, floating is double)
    cdef int upg = rf_panel_units(G, floating is double)
    cdef size_t pk_bytes
    # the units split across threads when there are panels for every thread (and the work is
    # not kept for training, time-major rows); else the steps are cut into chunks
    cdef bint units = (do_gemm and not keep and not batch_first and P > 1 and jb.nin > 0
                       and (jb.H + upg - 1) // upg >= P and jb.GH < (1 << 30))
    if units:
        jb.npan = <int>((jb.H + upg - 1) // upg)
        pk_bytes = (<size_t>jb.npan * jb.nin * G * upg * sizeof(floating) + 63) // 64 * 64
        jb.wpk = aligned_alloc(64, pk_bytes)
        if jb.wpk == NULL:
            free(bounds)
            free(work)
            raise MemoryError()
        with nogil, parallel(num_threads=P):
            tid = threadid()
            nt = rf_team_size()
            _min_worker_units(tid, nt, &jb, &x[0, 0], &w[0, 0], &bias[0], &proj[0, 0], &y[0, 0],
                              &carry[0], work + <size_t>tid * N, tmax)
        free(jb.wpk)
        free(bounds)
        free(work)
        return
    if do_gemm and jb.nin > 0 and jb.GH < (1 << 30):
        jb.npan = <int>((jb.GH + up - 1) // up)
        pk_bytes = (<size_t>jb.npan * jb.nin * up * sizeof(floating) + 63) // 64 * 64
        jb.wpk = aligned_alloc(64, pk_bytes)     # NULL on failure: BLAS
    if P == 1:
        with nogil:
            _min_worker(0, 1, 1, &jb, &x[0, 0], &w[0, 0], &bias[0], &proj[0, 0],
                        &scratch[0, 0], &y[0, 0], bounds, &carry[0], work)
    else:
        with nogil, parallel(num_threads=P):
            tid = threadid()
            nt = rf_team_size()
            _min_worker(tid, nt, P, &jb, &x[0, 0], &w[0, 0], &bias[0], &proj[0, 0],
                        &scratch[0, 0], &y[0, 0], bounds, &carry[0], work)
        for n in range(N):
            carry[n] = work[(3 * (P - 1) + 2) * N + n]
    free(jb.wpk)
    free(bounds)
    free(work)
