/* Fused per-step gate math of the training kernels (kernels/cy_train.pyx), float (_f)
 * and double (_d). The equations are those of rnnfast/cells.py.
 *
 * Every function handles rows [j0, j1) and hidden units [u0, u1) of one direction for
 * one step. Row j of an operand lives at base + j * ld (the caller passes bases
 * already offset to the step), so the previous state of a row can come from the saved
 * outputs of the step before (rows < nc) or from the initial state (rows >= nc) with
 * two calls. Loops are written for `#pragma omp simd`; exp and tanh are rf_gates.h's
 * (inline rf_expf / rf_tanhf in float, libmvec in double). The gate functions are kept out of line:
 * inlined into the large kernel workers, GCC vectorised them with gathers and scatters.
 *
 * Saved activations ("gates" rows, post-activation, written over the input projection):
 *   LSTM   i, f, g, o                    (4H)   plus c_t in its own buffer
 *   GRU    r, z, n, W_hn h + b_hn        (4H)   linear_before_reset=True
 *   GRU    r, z, n                       (3H)   linear_before_reset=False
 *   RNN    nothing (h_t itself is the layer output)
 * Gradient rows "dg" (pre-activation; rft_dbsum then adds a step's rows into the float64
 * column sums db, the bias gradients, each work item owning its columns):
 *   LSTM [di, df, dg, do];  GRU lbr [dr, dz, dn, dn*r] (the last is the hidden side of n);
 *   GRU no-lbr [dr, dz, dn];  RNN [da].
 * The cell variants' twins of the gate functions (rft_*_v_f / _d, rf_train_var_tmpl.h)
 * also save each gate's derivative in rows of G*H beside them.
 */
#ifndef RF_TRAIN_H
#define RF_TRAIN_H

#include "rf_gates.h"
#include "rf_fused.h"      /* the ISA level's vector width, named accumulators */

#define RFT_DEFINE(T, SFX, EXP, TANH)                                                         \
/* ---------------------------------------------------------------- forward, saving */    \
static __attribute__((noinline)) void rft_lstm_fwd_##SFX(int j0, int j1, int H, int u0, int u1, \
        T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                      \
        const T *cp, int ldcp, T *c, int ldc, T *h, int ldh) {                               \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        T *xr = xg + (size_t)j * ldx; const T *gr = hg + (size_t)j * ldg;                    \
        const T *cpr = cp + (size_t)j * ldcp; T *cr = c + (size_t)j * ldc;                   \
        T *hr = h + (size_t)j * ldh;                                                         \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T i = (T)1 / ((T)1 + EXP(-(xr[u] + gr[u] + bx[u] + bh[u])));                     \
            T f = (T)1 / ((T)1 + EXP(-(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])));     \
            T g = TANH(xr[H2 + u] + gr[H2 + u] + bx[H2 + u] + bh[H2 + u]);       \
            T o = (T)1 / ((T)1 + EXP(-(xr[H3 + u] + gr[H3 + u] + bx[H3 + u]        \
                                        + bh[H3 + u])));                                  \
            T cn = f * cpr[u] + i * g;                                                       \
            xr[u] = i; xr[H1 + u] = f; xr[H2 + u] = g; xr[H3 + u] = o;                  \
            cr[u] = cn; hr[u] = o * TANH(cn);                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static __attribute__((noinline)) void rft_gru_fwd_##SFX(int j0, int j1, int H, int u0, int u1, \
        T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                      \
        const T *hp, int ldp, T *h, int ldh) {                                               \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        T *xr = xg + (size_t)j * ldx; const T *gr = hg + (size_t)j * ldg;                    \
        const T *pr = hp + (size_t)j * ldp; T *hr = h + (size_t)j * ldh;                     \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T r = (T)1 / ((T)1 + EXP(-(xr[u] + gr[u] + bx[u] + bh[u])));                     \
            T z = (T)1 / ((T)1 + EXP(-(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])));     \
            T hn = gr[H2 + u] + bh[H2 + u];                                            \
            T n = TANH(xr[H2 + u] + bx[H2 + u] + r * hn);                              \
            xr[u] = r; xr[H1 + u] = z; xr[H2 + u] = n; xr[H3 + u] = hn;                 \
            hr[u] = n + z * (pr[u] - n);                                                     \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU no-lbr, phase 1: r, z saved; r*h_prev into rh. */                                    \
static __attribute__((noinline)) void rft_gru_rz_fwd_##SFX(int j0, int j1, int H, int u0, int u1, \
        T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                      \
        const T *hp, int ldp, T *rh, int ldr) {                                              \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        T *xr = xg + (size_t)j * ldx; const T *gr = hg + (size_t)j * ldg;                    \
        const T *pr = hp + (size_t)j * ldp; T *rr = rh + (size_t)j * ldr;                    \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T r = (T)1 / ((T)1 + EXP(-(xr[u] + gr[u] + bx[u] + bh[u])));                     \
            T z = (T)1 / ((T)1 + EXP(-(xr[H1 + u] + gr[H1 + u] + bx[H1 + u] + bh[H1 + u])));     \
            xr[u] = r; xr[H1 + u] = z; rr[u] = r * pr[u];                                     \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU no-lbr, phase 2: hg's n slot holds (r*h) W_hn^T. */                                  \
static __attribute__((noinline)) void rft_gru_n_fwd_##SFX(int j0, int j1, int H, int u0, int u1, \
        T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                      \
        const T *hp, int ldp, T *h, int ldh) {                                               \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        T *xr = xg + (size_t)j * ldx; const T *gr = hg + (size_t)j * ldg;                    \
        const T *pr = hp + (size_t)j * ldp; T *hr = h + (size_t)j * ldh;                     \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T z = xr[H1 + u];                                                                 \
            T n = TANH(xr[H2 + u] + bx[H2 + u] + gr[H2 + u] + bh[H2 + u]);       \
            xr[H2 + u] = n;                                                               \
            hr[u] = n + z * (pr[u] - n);                                                     \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static __attribute__((noinline)) void rft_rnn_fwd_##SFX(int j0, int j1, int relu, int u0, int u1, \
        const T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                \
        T *h, int ldh) {                                                                     \
    for (int j = j0; j < j1; ++j) {                                                          \
        const T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;                      \
        T *hr = h + (size_t)j * ldh;                                                         \
        if (relu) {                                                                          \
            RF_SIMD                                                                          \
            for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
                T a = xr[u] + gr[u] + bx[u] + bh[u];                                         \
                hr[u] = a < (T)0 ? (T)0 : a;     /* NaN stays NaN */              \
            }                                                                                \
        } else {                                                                             \
            RF_SIMD                                                                          \
            for (size_t u = (size_t)u0; u < (size_t)u1; ++u) \
                hr[u] = TANH(xr[u] + gr[u] + bx[u] + bh[u]);                                 \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* ---------------------------------------------------------------- backward */           \
/* LSTM: dh = gradient of m = o*tanh(c) (of h without projection); dc in/out.             \
 * Writes dg; with m != NULL also m = o*tanh(c) (for the projection's weight gradient). */ \
static __attribute__((noinline)) void rft_lstm_bwd_##SFX(int j0, int j1, int H, int u0, int u1, \
        const T *gt, int ldx, const T *c, int ldc, const T *cp, int ldcp,                    \
        const T *dh, int lddh, T *dc, int lddc, T *dg, int ldg, T *m, int ldm) {             \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        const T *xr = gt + (size_t)j * ldx, *cr = c + (size_t)j * ldc;                       \
        const T *cpr = cp + (size_t)j * ldcp, *dhr = dh + (size_t)j * lddh;                  \
        T *dcr = dc + (size_t)j * lddc, *dgr = dg + (size_t)j * ldg;                         \
        T *mr = m ? m + (size_t)j * ldm : NULL;                                              \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T i = xr[u], f = xr[H1 + u], g = xr[H2 + u], o = xr[H3 + u];                \
            T tc = TANH(cr[u]);                                                              \
            T d = dhr[u];                                                                    \
            T dct = dcr[u] + d * o * ((T)1 - tc * tc);                                       \
            T di = dct * g * i * ((T)1 - i), df = dct * cpr[u] * f * ((T)1 - f);             \
            T dgg = dct * i * ((T)1 - g * g), dov = d * tc * o * ((T)1 - o);                 \
            dgr[u] = di; dgr[H1 + u] = df; dgr[H2 + u] = dgg; dgr[H3 + u] = dov;        \
            dcr[u] = dct * f;                                                                \
        }                                                                                    \
        if (mr) {                                                                            \
            RF_SIMD                                                                          \
            for (size_t u = (size_t)u0; u < (size_t)u1; ++u) mr[u] = xr[H3 + u] * TANH(cr[u]); \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU lbr: dh in = total gradient of h_t, out = its direct part dh*z (the recurrent GEMM  \
 * adds the rest). */                                                                        \
static __attribute__((noinline)) void rft_gru_bwd_##SFX(int j0, int j1, int H, int u0, int u1, \
        const T *gt, int ldx, const T *hp, int ldp, T *dh, int lddh, T *dg, int ldg) {       \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        const T *xr = gt + (size_t)j * ldx, *pr = hp + (size_t)j * ldp;                      \
        T *dhr = dh + (size_t)j * lddh, *dgr = dg + (size_t)j * ldg;                         \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T r = xr[u], z = xr[H1 + u], n = xr[H2 + u], hn = xr[H3 + u];               \
            T d = dhr[u];                                                                    \
            T dn = d * ((T)1 - z) * ((T)1 - n * n);                                          \
            T dr = dn * hn * r * ((T)1 - r), dz = d * (pr[u] - n) * z * ((T)1 - z);          \
            dgr[u] = dr; dgr[H1 + u] = dz; dgr[H2 + u] = dn; dgr[H3 + u] = dn * r;      \
            dhr[u] = d * z;                                                                  \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU no-lbr, phase 1: dz, dn into dg, r*h_prev into rh, dh := dh*z. */                   \
static __attribute__((noinline)) void rft_gru_nolbr_bwd1_##SFX(int j0, int j1, int H, int u0, int u1, \
        const T *gt, int ldx, const T *hp, int ldp, T *dh, int lddh, T *dg, int ldg,         \
        T *rh, int ldr) {                                                                    \
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1; (void)H2; (void)H3; (void)H1;     \
    for (int j = j0; j < j1; ++j) {                                                          \
        const T *xr = gt + (size_t)j * ldx, *pr = hp + (size_t)j * ldp;                      \
        T *dhr = dh + (size_t)j * lddh, *dgr = dg + (size_t)j * ldg;                         \
        T *rr = rh + (size_t)j * ldr;                                                        \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T r = xr[u], z = xr[H1 + u], n = xr[H2 + u];                                   \
            T d = dhr[u];                                                                    \
            T dz = d * (pr[u] - n) * z * ((T)1 - z), dn = d * ((T)1 - z) * ((T)1 - n * n);   \
            dgr[H1 + u] = dz; dgr[H2 + u] = dn;                                            \
            rr[u] = r * pr[u];                                                               \
            dhr[u] = d * z;                                                                  \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU no-lbr, phase 2: q = d(r*h) = dn W_hn; dr and dh += q*r. */                         \
static __attribute__((noinline)) void rft_gru_nolbr_bwd2_##SFX(int j0, int j1, int u0, int u1, \
        const T *gt, int ldx, const T *hp, int ldp, const T *q, int ldq,                     \
        T *dh, int lddh, T *dg, int ldg) {                                                   \
    for (int j = j0; j < j1; ++j) {                                                          \
        const T *xr = gt + (size_t)j * ldx, *pr = hp + (size_t)j * ldp;                      \
        const T *qr = q + (size_t)j * ldq;                                                   \
        T *dhr = dh + (size_t)j * lddh, *dgr = dg + (size_t)j * ldg;                         \
        RF_SIMD                                                                              \
        for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
            T r = xr[u];                                                                     \
            T dr = qr[u] * pr[u] * r * ((T)1 - r);                                           \
            dgr[u] = dr;                                                                     \
            dhr[u] += qr[u] * r;                                                             \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static __attribute__((noinline)) void rft_rnn_bwd_##SFX(int j0, int j1, int relu, int u0, int u1, \
        const T *h, int ldh, const T *dh, int lddh, T *dg, int ldg) {                        \
    for (int j = j0; j < j1; ++j) {                                                          \
        const T *hr = h + (size_t)j * ldh, *dhr = dh + (size_t)j * lddh;                     \
        T *dgr = dg + (size_t)j * ldg;                                                       \
        if (relu) {                                                                          \
            RF_SIMD                                                                          \
            for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
                T v = hr[u] > (T)0 ? dhr[u] : (T)0;                                          \
                dgr[u] = v;                                                                  \
            }                                                                                \
        } else {                                                                             \
            RF_SIMD                                                                          \
            for (size_t u = (size_t)u0; u < (size_t)u1; ++u) { \
                T v = dhr[u] * ((T)1 - hr[u] * hr[u]);                                       \
                dgr[u] = v;                                                                  \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* dh[j, p] += dy[j, p] for rows [0, n), columns [p0, p1); with dhs, also dhs = dh. */     \
static __attribute__((noinline)) void rft_add_dy_##SFX(int n, int p0, int p1, T *dh, int lddh, \
        const T *dy, int lddy, T *dhs, int lds) {                                            \
    for (int j = 0; j < n; ++j) {                                                            \
        T *dhr = dh + (size_t)j * lddh; const T *dyr = dy + (size_t)j * lddy;                \
        RF_SIMD                                                                              \
        for (size_t p = (size_t)p0; p < (size_t)p1; ++p) dhr[p] += dyr[p]; \
        if (dhs) memcpy(dhs + (size_t)j * lds + p0, dhr + p0, sizeof(T) * (size_t)(p1 - p0));\
    }                                                                                        \
}

RFT_DEFINE(float, f, rf_expf, rf_tanhf)
RFT_DEFINE(double, d, exp, tanh)

/* the cell variants' twins of the gate functions above (rft_*_v_f / _d) */
#define RF_TMPL "rf_train_var_tmpl.h"
#include "rf_each_type.h"
#undef RF_TMPL

/* ------------------------------------------------------------------------------------
 * Small-batch recurrent products: C[n, ncols] (=|+=) A[n, K] @ Wp, where Wp holds the
 * weight columns packed in blocks of one vector (VL columns): block b, row k at
 * Wp + b*bs + k*VL (zero-padded past the last column). Packing once per call keeps
 * the weights in their streaming order for every step; the micro-kernel keeps an
 * MR x (NV*VL) block of C in vector registers (GCC vector extensions: whatever
 * -march gives). BLAS re-packs the weights at every call, which dominates for the
 * few rows of a small-batch step.
 */
#define RFT_VBYTES RF_VBYTES     /* the ISA level's width and blocking (rf_fused.h) */
typedef float rft_vf __attribute__((vector_size(RFT_VBYTES)));
typedef double rft_vd __attribute__((vector_size(RFT_VBYTES)));
#define RFT_VLF (RFT_VBYTES / 4)
#define RFT_VLD (RFT_VBYTES / 8)
/* Row blocks: up to RFT_MR3 rows take one block of 3-vector columns (the weights read
 * once per step), more rows balanced blocks of at most RFT_MR4 rows x 4 vectors: as many
 * accumulators as rf_fused.h's blocks (24 of 32 registers for AVX-512, 12 of 16). */
#if RF_VBYTES == 64
#define RFT_MR3 8
#define RFT_MR4 6
#else
#define RFT_MR3 4
#define RFT_MR4 3
#endif

#define RFT_DEFINE_MM(T, SFX, VT, VL)                                                          \
/* Pack columns [b0*VL, b1*VL) of a logical (K x M) matrix, element (k, m) at                 \
 * src[m*sm + k*sk], columns >= M zero. */                                                   \
static inline void rft_pack_##SFX(int K, int M, int b0, int b1, const T *src, size_t sm,      \
                                  size_t sk, T *P) {                                         \
    for (int b = b0; b < b1; ++b) {                                                          \
        T *dst = P + (size_t)b * K * VL;                                                     \
        int nv = M - b * VL < VL ? M - b * VL : VL;                                          \
        const T *s = src + (size_t)b * VL * sm;                                              \
        if (nv == VL && sm == 1) {          /* the block's columns are contiguous: copy */   \
            for (int k = 0; k < K; ++k)                                                      \
                memcpy(dst + (size_t)k * VL, s + (size_t)k * sk, sizeof(T) * VL);            \
        } else {                            /* transposing: write each row contiguously */   \
            for (int k = 0; k < K; ++k) {                                                    \
                T *d = dst + (size_t)k * VL;                                                 \
                const T *sr = s + (size_t)k * sk;                                            \
                for (int v = 0; v < VL; ++v) d[v] = v < nv ? sr[(size_t)v * sm] : (T)0;      \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
static inline __attribute__((always_inline)) void rft_mk_##SFX(const int MR_, const int NV_,   \
        int K, const T *A, int lda, const T *P, size_t bs, T *C, int ldc, int beta,          \
        int ncols) {                                                                         \
    typedef VT rf_acc_t;                                                                     \
    typedef T rf_elt_t;                                                                      \
    const int rf_vl_ = VL;                                                                   \
    RF_R8(RF_ACC_DECL)                                                                       \
    for (int k = 0; k < K; ++k) {                                                            \
        RF_LOAD_W(P + (size_t)k * VL, bs)                                                    \
        RF_R8(RF_ACC_FMA)                                                                    \
    }                                                                                        \
    RF_R8(RF_ACC_PUT)                                                                        \
}                                                                                            \
                                                                                             \
RFT_SPECS(T, SFX)                                                                            \
/* C[n, ncols] (=|+=) A[n, K] @ (packed blocks from P, block stride bs). */                  \
static inline void rft_mm_##SFX(int n, int K, const T *A, int lda, const T *P, size_t bs,    \
                                int ncols, T *C, int ldc, int beta) {                        \
    if (n <= 0 || ncols <= 0) return;                                                        \
    if (K <= 0) {                                                                            \
        if (!beta) for (int r = 0; r < n; ++r) memset(C + (size_t)r * ldc, 0, sizeof(T) * ncols); \
        return;                                                                              \
    }                                                                                        \
    /* up to RFT_MR3 rows: one block of 3 vectors (the weights read once per step);          \
     * more: balanced blocks of at most RFT_MR4 rows x 4 vectors */                          \
    int nvmax = n <= RFT_MR3 ? 3 : 4;                                                        \
    int nrb = n <= RFT_MR3 ? 1 : (n + RFT_MR4 - 1) / RFT_MR4;                                \
    int mrb = (n + nrb - 1) / nrb;                                                           \
    for (int c0 = 0; c0 < ncols; c0 += nvmax * VL) {                                         \
        int nc = ncols - c0;                                                                 \
        int nv = nc >= nvmax * VL ? nvmax : (nc + VL - 1) / VL;                              \
        const T *Pc = P + (size_t)(c0 / VL) * bs;                                            \
        for (int r0 = 0; r0 < n; r0 += mrb) {                                                \
            int mr = n - r0 < mrb ? n - r0 : mrb;                                            \
            const T *Ar = A + (size_t)r0 * lda;                                              \
            T *Cr = C + (size_t)r0 * ldc + c0;                                               \
            switch (mr * 8 + nv) {                                                           \
            RFT_CASES(SFX)                                                                   \
            default: break;                                                                  \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

/* (row counts above the ISA level's blocks never occur there; capped, they compile to
 * blocks that fit its registers) */
#define RFT_CMR(MR_, NV_) ((NV_) == 4 ? ((MR_) < RFT_MR4 ? (MR_) : RFT_MR4) : ((MR_) < RFT_MR3 ? (MR_) : RFT_MR3))
#define RFT_CASE(SFX, MR_, NV_)                                                                \
    case (MR_) * 8 + (NV_): rft_mk_##SFX##_##MR_##_##NV_(K, Ar, lda, Pc, bs, Cr, ldc, beta, nc); break;
#define RFT_CASES_MR(SFX, MR_) RFT_CASE(SFX, MR_, 1) RFT_CASE(SFX, MR_, 2) RFT_CASE(SFX, MR_, 3) \
    RFT_CASE(SFX, MR_, 4)
#define RFT_CASES(SFX) RFT_CASES_MR(SFX, 1) RFT_CASES_MR(SFX, 2) RFT_CASES_MR(SFX, 3)           \
    RFT_CASES_MR(SFX, 4) RFT_CASES_MR(SFX, 5) RFT_CASES_MR(SFX, 6)                           \
    RFT_CASE(SFX, 7, 1) RFT_CASE(SFX, 7, 2) RFT_CASE(SFX, 7, 3)                              \
    RFT_CASE(SFX, 8, 1) RFT_CASE(SFX, 8, 2) RFT_CASE(SFX, 8, 3)

/* One out-of-line function per block shape, each with a register allocation of its own
 * (see rf_gemm_tmpl.h). */
#define RFT_SPEC(T, SFX, MR_, NV_)                                                             \
static __attribute__((noinline)) void rft_mk_##SFX##_##MR_##_##NV_(int K, const T *A, int lda, \
        const T *P, size_t bs, T *C, int ldc, int beta, int ncols) {                           \
    rft_mk_##SFX(RFT_CMR(MR_, NV_), NV_, K, A, lda, P, bs, C, ldc, beta, ncols);               \
}
#define RFT_SPECS_MR(T, SFX, MR_) RFT_SPEC(T, SFX, MR_, 1) RFT_SPEC(T, SFX, MR_, 2)             \
    RFT_SPEC(T, SFX, MR_, 3) RFT_SPEC(T, SFX, MR_, 4)
#define RFT_SPECS(T, SFX) RFT_SPECS_MR(T, SFX, 1) RFT_SPECS_MR(T, SFX, 2) RFT_SPECS_MR(T, SFX, 3) \
    RFT_SPECS_MR(T, SFX, 4) RFT_SPECS_MR(T, SFX, 5) RFT_SPECS_MR(T, SFX, 6)                   \
    RFT_SPEC(T, SFX, 7, 1) RFT_SPEC(T, SFX, 7, 2) RFT_SPEC(T, SFX, 7, 3)                      \
    RFT_SPEC(T, SFX, 8, 1) RFT_SPEC(T, SFX, 8, 2) RFT_SPEC(T, SFX, 8, 3)

/* rft_mk's row values and its output: C (=|+=) the block, columns past ncols untouched */
#define RF_AVAL(r) A[(size_t)(r) * lda + k]
#define RF_PUT(r, v, acc) do {                                                                 \
        rf_elt_t *c_ = C + (size_t)(r) * ldc + (v) * rf_vl_;                                   \
        const int nc_ = ncols - (v) * rf_vl_;                                                  \
        if (nc_ >= rf_vl_) {                                                                   \
            rf_acc_t o_ = (acc);                                                               \
            if (beta) { rf_acc_t old_; memcpy(&old_, c_, sizeof old_); o_ += old_; }           \
            memcpy(c_, &o_, sizeof o_);                                                        \
        } else if (nc_ > 0) {                                                                  \
            rf_elt_t tmp_[sizeof(rf_acc_t) / sizeof(rf_elt_t)];                                \
            memcpy(tmp_, &(acc), sizeof(rf_acc_t));                                            \
            for (int e = 0; e < nc_; ++e) c_[e] = beta ? c_[e] + tmp_[e] : tmp_[e];            \
        }                                                                                      \
    } while (0)
RFT_DEFINE_MM(float, f, rft_vf, RFT_VLF)
RFT_DEFINE_MM(double, d, rft_vd, RFT_VLD)
#undef RF_AVAL
#undef RF_PUT

/* db[g*H + u] += dg[j, g*H + u] for rows j in [j0, j1) (in that order), gate slots g in
 * [g0, g1), units u in [u0, u1): a step's bias gradients. The running sums stay in
 * registers over the rows, as float64 vectors; added inside the gate loops instead, each
 * row's read-modify-write of db waited on the row before, a dependency through memory
 * that slowed the backward recurrence (commit 639d2d7; figures in docs/performance.md).
 * The sums are those of the former loops, in the same order (bitwise the same gradients). */
typedef float rft_v8f __attribute__((vector_size(RFT_VBYTES / 2)));
#define RFT_DEFINE_DBSUM(T, SFX, LT)                                                          \
static inline void rft_dbsum_##SFX(int j0, int j1, int g0, int g1, int H, int u0, int u1,    \
                                   const T *dg, int ldg, double *db) {                       \
    for (int g = g0; g < g1; ++g) {                                                          \
        const T *d = dg + (size_t)g * H;                                                     \
        double *b = db + (size_t)g * H;                                                      \
        int u = u0;                                                                          \
        for (; u + RFT_VLD <= u1; u += RFT_VLD) {    /* RFT_VLD units: one float64 vector */ \
            rft_vd a;                                                                        \
            memcpy(&a, b + u, sizeof a);                                                     \
            for (int j = j0; j < j1; ++j) {                                                  \
                LT v;                                                                        \
                memcpy(&v, d + (size_t)j * ldg + u, sizeof v);                               \
                a += __builtin_convertvector(v, rft_vd);                                     \
            }                                                                                \
            memcpy(b + u, &a, sizeof a);                                                     \
        }                                                                                    \
        for (; u < u1; ++u) {                                                                \
            double a = b[u];                                                                 \
            for (int j = j0; j < j1; ++j) a += d[(size_t)j * ldg + u];                       \
            b[u] = a;                                                                        \
        }                                                                                    \
    }                                                                                        \
}

RFT_DEFINE_DBSUM(float, f, rft_v8f)
RFT_DEFINE_DBSUM(double, d, rft_vd)

#endif /* RF_TRAIN_H */
