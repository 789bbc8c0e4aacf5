"""bf16 and int8 kernels of the frozen layers (kernels/rf_lowp.h): one direction of one
layer over packed rows (the layout of cy_rnn.run_layer), and the GEMM alone (MinGRU /
MinLSTM projections, tests).

rnnfast/frozen.py validates, quantizes and packs the weights once (``QMat``), allocates
every buffer and chooses the instruction set (``cpu_features``); nothing here allocates
for the caller or checks what it was given beyond the sizes a kernel would overrun.
"""
from cython.parallel cimport parallel, threadid
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy
cimport numpy as cnp

cnp.import_array()

cdef extern from "rf_gates.h" nogil:
    ctypedef struct rf_sync_t:
        int n
    void rf_sync_init(rf_sync_t *b, int n)
    int rf_have_openmp()
    int rf_team_size()

include "rf_interrupt.pxi"

cdef extern from "rf_cells.h":
    int RF_LSTM, RF_LSTM_PROJ

cdef extern from "rf_lowp.h" nogil:
    int RF_BF16, RF_INT8, RF_LOWP_PORTABLE, RF_LOWP_AVX512, RF_LOWP_AMX, RF_QB
    ctypedef struct rf_qmat_t:
        int prec, G, H, Hp, K, Kp
        const void *w
        const float *scale
        const int32_t *comp
    ctypedef struct rf_lowp_layer_t:
        int code, G, In, H, Hout, T, N, B, rev, isa
        const int64_t *bsz
        const float *x
        const rf_qmat_t *wih
        const rf_qmat_t *whh
        const rf_qmat_t *whr
        const float *bx
        const float *bh
        float *xg
        float *hbuf
        float *c
        float *y
        int ldy
        float *hg
        float *s2
        void *qx
        float *sx
        void *qh
        float *sh
        size_t qh_stride
        rf_sync_t *bar
        rf_intr_t *intr
    int rf_lowp_cpu()
    int rf_lowp_esize(int prec)
    void rf_lowp_prep(int prec, int M, int K, int Kp, const float *a, int lda, void *q, float *sc)
    void rf_lowp_gemm(int isa, const rf_qmat_t *W, int M, const void *A, const float *as_,
                      int nb0, int nb1, float *C, int ldc, int sgc)
    void rf_lowp_worker(const rf_lowp_layer_t *L, int tid, int nthr)
    void rf_lowp_release()

BF16 = RF_BF16
INT8 = RF_INT8
PORTABLE = RF_LOWP_PORTABLE
AVX512 = RF_LOWP_AVX512
AMX = RF_LOWP_AMX
BLOCK = RF_QB


def cpu_features() -> dict:
    """What this CPU and OS run: {"avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16": bool}
    (AMX once Linux granted this process the tile data: rf_lowp_cpu asks for it)."""
    cdef int f = rf_lowp_cpu()
    return {"avx512_vnni": bool(f & 1), "avx512_bf16": bool(f & 2), "amx_int8": bool(f & 4),
            "amx_bf16": bool(f & 8)}


cdef class QMat:
    """Packed low-precision weights (rf_qmat_t) and the arrays that hold them.

    packed: int8 (prec INT8) or uint16 (BF16) array of G*Hp*Kp elements in the layout of
    rf_lowp.h; scale (float32) and comp (int32): G*Hp each for INT8, None for BF16.
    """
    cdef rf_qmat_t m
    cdef readonly object packed, scale, comp
    cdef readonly int prec, G, H, Hp, K, Kp

    def __cinit__(self, int prec, int G, int H, int K, cnp.ndarray packed, scale=None, comp=None):
        cdef int esize = 1 if prec == RF_INT8 else 2
        if prec != RF_INT8 and prec != RF_BF16:
            raise ValueError(f"QMat: unknown precision {prec}")
        Hp = (H + RF_QB - 1) // RF_QB * RF_QB
        Kp = (K * esize + 63) // 64 * 64 // esize
        if not packed.flags.c_contiguous or packed.itemsize != esize or packed.size != G * Hp * Kp:
            raise ValueError(f"QMat: packed holds {packed.size} elements of {packed.itemsize} bytes, "
                             f"{G * Hp * Kp} of {esize} needed")
        self.packed = packed
        self.prec, self.G, self.H, self.Hp, self.K, self.Kp = prec, G, H, Hp, K, Kp
        self.m.prec, self.m.G, self.m.H, self.m.Hp, self.m.K, self.m.Kp = prec, G, H, Hp, K, Kp
        self.m.w = cnp.PyArray_DATA(packed)
        self.m.scale = NULL
        self.m.comp = NULL
        if prec == RF_INT8:
            sc = <cnp.ndarray>scale
            cp = <cnp.ndarray>comp
            if (sc is None or cp is None or sc.dtype.num != cnp.NPY_FLOAT32 or cp.dtype.num != cnp.NPY_INT32
                    or sc.size != G * Hp or cp.size != G * Hp
                    or not sc.flags.c_contiguous or not cp.flags.c_contiguous):
                raise ValueError("QMat: int8 weights need float32 scale and int32 comp of G*Hp elements")
            self.scale, self.comp = sc, cp
            self.m.scale = <const float *>cnp.PyArray_DATA(sc)
            self.m.comp = <const int32_t *>cnp.PyArray_DATA(cp)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.packed, self.scale, self.comp) if a is not None)


def prep_bytes(int prec, int M, int Kp) -> int:
    """Bytes of M rows of prepared activations for a QMat of Kp."""
    return M * Kp * rf_lowp_esize(prec)


def gemm(QMat W, const float[:, ::1] a, float[:, ::1] out, cnp.ndarray qa, float[::1] sa, int isa):
    """out[:, :G*H] (gate g at columns g*H) = a @ W^T in W's precision; qa (uint8, at least
    prep_bytes(prec, M, Kp)) and sa (M) are scratch. One thread."""
    cdef int M = a.shape[0]
    if a.shape[1] != W.K or out.shape[0] < M or out.shape[1] < W.G * W.H or sa.shape[0] < M \
            or qa.nbytes < prep_bytes(W.prec, M, W.Kp):
        raise ValueError("gemm: sizes do not match")
    if M == 0:
        return
    cdef void *q = cnp.PyArray_DATA(qa)
    with nogil:
        rf_lowp_prep(W.prec, M, W.K, W.Kp, &a[0, 0], W.K, q, &sa[0])
        rf_lowp_gemm(isa, &W.m, M, q, &sa[0], 0, W.G * W.Hp // RF_QB, &out[0, 0], out.shape[1], W.H)
        rf_lowp_release()


def run_direction(int code, int isa, const float[:, ::1] x, const int64_t[::1] bsz,
                  QMat wih, QMat whh, QMat whr, const float[::1] bx, const float[::1] bh,
                  float[:, ::1] xg, float[:, :, ::1] hbuf, float[:, ::1] c, float[:, ::1] y, int ycol,
                  float[:, ::1] hg, float[:, ::1] s2, cnp.ndarray qx, float[::1] sx,
                  cnp.ndarray qh, float[::1] sh, bint rev, int nthreads):
    """One direction of one layer over packed rows (rf_lowp_worker).

    x (N, I) packed rows; bsz (T,) live rows per step, non-increasing; hbuf (2, B, Hout)
    with h0 in both halves (after the call, half L % 2 of row j holds its final state for
    a forward direction of length L, half T % 2 for a reverse one); c (B, H) c0 in, c_n out
    (LSTM); y (N, F) written at columns [ycol, ycol + Hout); xg (N, G*H), hg (B, G*H),
    s2 (B, H), sx (N) and sh (nthreads*B) scratch; qx and qh uint8 scratch of
    prep_bytes(prec, N, wih.Kp) and nthreads * prep_bytes(prec, B, max Kp of whh, whr).
    whr: the projection (LSTM with proj_size), else None.
    """
    cdef rf_lowp_layer_t L
    cdef rf_sync_t bar
    cdef rf_intr_t intr
    cdef int T = bsz.shape[0], N = x.shape[0], B = hbuf.shape[1], Hout = hbuf.shape[2]
    cdef int H = whh.H, G = whh.G, nthr, tid
    cdef int kq = whh.Kp if whr is None or whh.Kp >= whr.Kp else whr.Kp
    if T == 0 or N == 0:
        return
    if nthreads < 1 or not rf_have_openmp():
        nthreads = 1
    if (x.shape[1] != wih.K or xg.shape[0] < N or xg.shape[1] != G * H or hg.shape[0] < B
            or hg.shape[1] != G * H or s2.shape[0] < B or s2.shape[1] != H or y.shape[0] < N
            or ycol + Hout > y.shape[1] or sx.shape[0] < N or sh.shape[0] < nthreads * B
            or qx.nbytes < prep_bytes(wih.prec, N, wih.Kp)
            or qh.nbytes < nthreads * prep_bytes(wih.prec, B, kq) or whh.K != Hout
            or (whr is not None and (whr.K != H or whr.H != Hout)) or bx.shape[0] != G * H
            or bh.shape[0] != G * H or ((code == RF_LSTM or code == RF_LSTM_PROJ) and c.shape[0] < B)):
        raise ValueError("run_direction: sizes do not match")
    L.code, L.G, L.In, L.H, L.Hout, L.T, L.N, L.B = code, G, wih.K, H, Hout, T, N, B
    L.rev, L.isa = rev, isa
    L.bsz = &bsz[0]
    L.x = &x[0, 0]
    L.wih, L.whh = &wih.m, &whh.m
    L.whr = &whr.m if whr is not None else NULL
    L.bx, L.bh = &bx[0], &bh[0]
    L.xg, L.hbuf = &xg[0, 0], &hbuf[0, 0, 0]
    L.c = &c[0, 0]
    L.y, L.ldy = &y[0, ycol], y.shape[1]
    L.hg, L.s2 = &hg[0, 0], &s2[0, 0]
    L.qx, L.sx = cnp.PyArray_DATA(qx), &sx[0]
    L.qh, L.sh = cnp.PyArray_DATA(qh), &sh[0]
    L.qh_stride = prep_bytes(wih.prec, B, kq)
    nthr = nthreads
    rf_sync_init(&bar, nthr)
    rf_intr_init(&intr, _main_ident)
    L.bar, L.intr = &bar, &intr
    if nthr == 1:
        with nogil:
            rf_lowp_worker(&L, 0, 1)
    else:
        with nogil, parallel(num_threads=nthr):
            tid = threadid()
            rf_lowp_worker(&L, tid, rf_team_size())
    rf_intr_raise(&intr)


cdef class StepPlan:
    """One direction of one layer, one step of B rows a call (streams): the kernel's
    configuration is set up once, with the buffers the caller allocated; ``run`` takes a
    step's input and output only (a token served costs no argument parsing of a dozen
    buffers). hbuf (2, B, Hout): half 0 holds the state before a call and after it; c
    (B, H) for LSTM. The other buffers are run_direction's, for N = B rows."""
    cdef rf_lowp_layer_t L
    cdef int64_t bsz1
    cdef int nmax, nin, Hout, B    # (`I` is taken: complex.h)
    cdef size_t hbytes
    cdef readonly object keep

    def __cinit__(self, int code, int isa, QMat wih, QMat whh, QMat whr, cnp.ndarray bx, cnp.ndarray bh,
                  cnp.ndarray xg, cnp.ndarray hbuf, cnp.ndarray c, cnp.ndarray hg, cnp.ndarray s2,
                  cnp.ndarray qx, cnp.ndarray sx, cnp.ndarray qh, cnp.ndarray sh, int nmax):
        cdef int G = whh.G, H = whh.H, B = hbuf.shape[1], Hout = hbuf.shape[2]
        cdef int kq = whh.Kp if whr is None or whh.Kp >= whr.Kp else whr.Kp
        arrays = (bx, bh, xg, hbuf, c, hg, s2, sx, sh)
        for k, a in enumerate(arrays):
            if a.dtype.num != cnp.NPY_FLOAT32 or not a.flags.c_contiguous or (k > 1 and not a.flags.writeable):
                raise ValueError("StepPlan: biases and buffers must be C-contiguous float32 arrays "
                                 "(the buffers writeable)")
        if (hbuf.ndim != 3 or hbuf.shape[0] != 2 or xg.size < B * G * H or hg.size < B * G * H
                or s2.size < B * H or bx.size != G * H or bh.size != G * H or sx.size < B
                or sh.size < nmax * B or whh.K != Hout or qx.nbytes < prep_bytes(wih.prec, B, wih.Kp)
                or qh.nbytes < nmax * prep_bytes(wih.prec, B, kq)
                or ((code == RF_LSTM or code == RF_LSTM_PROJ) and c.size < B * H)
                or (whr is not None and (whr.K != H or whr.H != Hout))):
            raise ValueError("StepPlan: sizes do not match")
        self.keep = (wih, whh, whr, *arrays, qx, qh)
        self.bsz1 = B
        self.nmax, self.nin, self.Hout, self.B = (nmax if nmax >= 1 else 1), wih.K, Hout, B
        self.hbytes = <size_t>B * Hout * sizeof(float)
        self.L.code, self.L.G, self.L.In, self.L.H, self.L.Hout = code, G, wih.K, H, Hout
        self.L.T, self.L.N, self.L.B, self.L.rev, self.L.isa = 1, B, B, 0, isa
        self.L.bsz = &self.bsz1
        self.L.wih, self.L.whh = &wih.m, &whh.m
        self.L.whr = &whr.m if whr is not None else NULL
        self.L.bx = <const float *>cnp.PyArray_DATA(bx)
        self.L.bh = <const float *>cnp.PyArray_DATA(bh)
        self.L.xg = <float *>cnp.PyArray_DATA(xg)
        self.L.hbuf = <float *>cnp.PyArray_DATA(hbuf)
        self.L.c = <float *>cnp.PyArray_DATA(c)
        self.L.hg = <float *>cnp.PyArray_DATA(hg)
        self.L.s2 = <float *>cnp.PyArray_DATA(s2)
        self.L.qx, self.L.sx = cnp.PyArray_DATA(qx), <float *>cnp.PyArray_DATA(sx)
        self.L.qh, self.L.sh = cnp.PyArray_DATA(qh), <float *>cnp.PyArray_DATA(sh)
        self.L.qh_stride = prep_bytes(wih.prec, B, kq)
        self.L.ldy = Hout

    def run(self, cnp.ndarray x, cnp.ndarray y, int nthreads):
        """One step: x (B, I) float32 in, y (B, Hout) float32 out, the state advanced."""
        cdef rf_sync_t bar
        cdef rf_intr_t intr
        cdef int nthr = nthreads, tid
        if (x.dtype.num != cnp.NPY_FLOAT32 or y.dtype.num != cnp.NPY_FLOAT32 or not x.flags.c_contiguous
                or not y.flags.c_contiguous or not y.flags.writeable or x.size != <size_t>self.B * self.nin
                or y.size != <size_t>self.B * self.Hout):
            raise ValueError("StepPlan.run: x (B, I) and y (B, Hout) must be C-contiguous float32")
        if nthr < 1 or not rf_have_openmp():
            nthr = 1
        if nthr > self.nmax:
            nthr = self.nmax
        self.L.x = <const float *>cnp.PyArray_DATA(x)
        self.L.y = <float *>cnp.PyArray_DATA(y)
        rf_sync_init(&bar, nthr)
        rf_intr_init(&intr, _main_ident)
        self.L.bar, self.L.intr = &bar, &intr
        if nthr == 1:
            with nogil:
                rf_lowp_worker(&self.L, 0, 1)
        else:
            with nogil, parallel(num_threads=nthr):
                tid = threadid()
                rf_lowp_worker(&self.L, tid, rf_team_size())
        rf_intr_raise(&intr)
        memcpy(self.L.hbuf, self.L.hbuf + <size_t>self.B * self.Hout, self.hbytes)
