/* rf_scan.h: the C of the time-parallel scans (kernels/cy_scan.pyx): the OpenMP shims of
 * the scans, the tile scan and reduce kernels (rfs_scan, rfs_red), and the minGRU/minLSTM
 * gate math and fused gate-scan passes (RFS_GRU_COEF, RFS_LSTM_COEF, RFS_GSCAN). Only
 * cy_scan includes it. */
#ifndef RF_SCAN_H
#define RF_SCAN_H

#include <math.h>
#include <string.h>
#include <stdint.h>
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
extern float expf(float) __attribute__((__simd__("notinbranch")));
extern double exp(double) __attribute__((__simd__("notinbranch")));
#endif

/* the OpenMP shims (rf_barrier, rf_team_size, rf_have_openmp) and RF_SIMD are those of
 * every kernel: rf_gates.h */
#include "rf_gates.h"

#if defined(__GNUC__) && !defined(__clang__)
#define RFS_UNROLL _Pragma("GCC unroll 8")
#elif defined(__clang__)
#define RFS_UNROLL _Pragma("unroll")
#else
#define RFS_UNROLL
#endif

/* States are float64 vectors of W = 8, 4, 2 or 1 lanes. */
typedef double rfs_d8 __attribute__((vector_size(64)));
typedef double rfs_d4 __attribute__((vector_size(32)));
typedef double rfs_d2 __attribute__((vector_size(16)));
typedef double rfs_d1;
typedef float rfs_f8 __attribute__((vector_size(32)));
typedef float rfs_f4 __attribute__((vector_size(16)));
typedef float rfs_f2 __attribute__((vector_size(8)));

#if defined(__AVX512F__)
static inline rfs_d8 rfs_ld_f8(const float *p) { return (rfs_d8)_mm512_cvtps_pd(_mm256_loadu_ps(p)); }
static inline void rfs_st_f8(float *p, rfs_d8 v) { _mm256_storeu_ps(p, _mm512_cvtpd_ps((__m512d)v)); }
#else
static inline rfs_d8 rfs_ld_f8(const float *p) { rfs_f8 v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, rfs_d8); }
static inline void rfs_st_f8(float *p, rfs_d8 v) { rfs_f8 w = __builtin_convertvector(v, rfs_f8); memcpy(p, &w, sizeof w); }
#endif
#if defined(__AVX__)
static inline rfs_d4 rfs_ld_f4(const float *p) { return (rfs_d4)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline void rfs_st_f4(float *p, rfs_d4 v) { _mm_storeu_ps(p, _mm256_cvtpd_ps((__m256d)v)); }
#else
static inline rfs_d4 rfs_ld_f4(const float *p) { rfs_f4 v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, rfs_d4); }
static inline void rfs_st_f4(float *p, rfs_d4 v) { rfs_f4 w = __builtin_convertvector(v, rfs_f4); memcpy(p, &w, sizeof w); }
#endif
static inline rfs_d8 rfs_ld_d8(const double *p) { rfs_d8 v; memcpy(&v, p, sizeof v); return v; }
static inline void rfs_st_d8(double *p, rfs_d8 v) { memcpy(p, &v, sizeof v); }
static inline rfs_d4 rfs_ld_d4(const double *p) { rfs_d4 v; memcpy(&v, p, sizeof v); return v; }
static inline void rfs_st_d4(double *p, rfs_d4 v) { memcpy(p, &v, sizeof v); }
#if defined(__SSE2__)
static inline rfs_d2 rfs_ld_f2(const float *p) { return (rfs_d2)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p))); }
static inline void rfs_st_f2(float *p, rfs_d2 v) { _mm_storel_epi64((__m128i *)p, _mm_castps_si128(_mm_cvtpd_ps((__m128d)v))); }
#else
static inline rfs_d2 rfs_ld_f2(const float *p) { rfs_f2 v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, rfs_d2); }
static inline void rfs_st_f2(float *p, rfs_d2 v) { rfs_f2 w = __builtin_convertvector(v, rfs_f2); memcpy(p, &w, sizeof w); }
#endif
static inline rfs_d2 rfs_ld_d2(const double *p) { rfs_d2 v; memcpy(&v, p, sizeof v); return v; }
static inline void rfs_st_d2(double *p, rfs_d2 v) { memcpy(p, &v, sizeof v); }
static inline rfs_d1 rfs_ld_f1(const float *p) { return (double)*p; }
static inline rfs_d1 rfs_ld_d1(const double *p) { return *p; }
static inline void rfs_st_f1(float *p, rfs_d1 v) { *p = (float)v; }
static inline void rfs_st_d1(double *p, rfs_d1 v) { *p = v; }

/* Products of many |a| < 1 underflow; denormal operands cost ~100 cycles each on x86,
 * so a product below 2^-600 (it scales a carry by less than 1e-180) is set to 0. */
#define RFS_TINY 0x1p-600
typedef int64_t rfs_l8 __attribute__((vector_size(64)));
typedef int64_t rfs_l4 __attribute__((vector_size(32)));
typedef int64_t rfs_l2 __attribute__((vector_size(16)));
static inline rfs_d8 rfs_flush8(rfs_d8 v) { rfs_l8 m = (v < RFS_TINY) & (v > -RFS_TINY); return (rfs_d8)((rfs_l8)v & ~m); }
static inline rfs_d4 rfs_flush4(rfs_d4 v) { rfs_l4 m = (v < RFS_TINY) & (v > -RFS_TINY); return (rfs_d4)((rfs_l4)v & ~m); }
static inline rfs_d2 rfs_flush2(rfs_d2 v) { rfs_l2 m = (v < RFS_TINY) & (v > -RFS_TINY); return (rfs_d2)((rfs_l2)v & ~m); }
static inline rfs_d1 rfs_flush1(rfs_d1 v) { return (v < RFS_TINY && v > -RFS_TINY) ? 0.0 : v; }

/* K chains of one W-wide tile each, advanced together for L steps.
 * Chain k reads a[j*lda + aoff[k]], b[j*lda + aoff[k]] and writes o[j*ldo + ooff[k]];
 * it is live for its first lv[k] steps (past them its state is frozen and it writes 0).
 * scan: hs (K*W doubles) is the state in and out.
 * red:  (As, Hs) (K*W doubles each) compose the chain's steps onto them. */
#define RFS_CHAIN_KERNELS(DT, S, W, K)                                                      \
static void rfs_scan_##S##W##_##K(int64_t L, int64_t lda, int64_t ldo, const DT *a,         \
        const DT *b, DT *o, const int64_t *aoff, const int64_t *ooff, const int64_t *lv,    \
        double *hs) {                                                                       \
    rfs_d##W h[K]; const rfs_d##W zero = {0};                                               \
    int64_t jf = L, j = 0;                                                                  \
    for (int k = 0; k < K; ++k) { memcpy(&h[k], hs + k * W, sizeof(rfs_d##W)); if (lv[k] < jf) jf = lv[k]; } \
    for (; j < jf; ++j) {                                                                   \
        const DT *aj = a + j * lda, *bj = b + j * lda; DT *oj = o + j * ldo;                \
        RFS_UNROLL                                                                          \
        for (int k = 0; k < K; ++k) {                                                       \
            h[k] = rfs_ld_##S##W(aj + aoff[k]) * h[k] + rfs_ld_##S##W(bj + aoff[k]);        \
            rfs_st_##S##W(oj + ooff[k], h[k]);                                              \
        }                                                                                   \
    }                                                                                       \
    for (; j < L; ++j) {                                                                    \
        const DT *aj = a + j * lda, *bj = b + j * lda; DT *oj = o + j * ldo;                \
        for (int k = 0; k < K; ++k) {                                                       \
            if (j < lv[k]) {                                                                \
                h[k] = rfs_ld_##S##W(aj + aoff[k]) * h[k] + rfs_ld_##S##W(bj + aoff[k]);    \
                rfs_st_##S##W(oj + ooff[k], h[k]);                                          \
            } else {                                                                        \
                rfs_st_##S##W(oj + ooff[k], zero);                                          \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    for (int k = 0; k < K; ++k) memcpy(hs + k * W, &h[k], sizeof(rfs_d##W));               \
}                                                                                           \
static void rfs_red_##S##W##_##K(int64_t L, int64_t lda, const DT *a, const DT *b,           \
        const int64_t *aoff, const int64_t *lv, double *As, double *Hs) {                   \
    rfs_d##W A[K], H[K];                                                                    \
    int64_t jf = L, j = 0;                                                                  \
    for (int k = 0; k < K; ++k) {                                                           \
        memcpy(&A[k], As + k * W, sizeof(rfs_d##W)); memcpy(&H[k], Hs + k * W, sizeof(rfs_d##W)); \
        if (lv[k] < jf) jf = lv[k];                                                         \
    }                                                                                       \
    while (j < jf) {                                                                        \
        int64_t je = j + 8 < jf ? j + 8 : jf;                                               \
        for (; j < je; ++j) {                                                               \
            const DT *aj = a + j * lda, *bj = b + j * lda;                                  \
            RFS_UNROLL                                                                      \
            for (int k = 0; k < K; ++k) {                                                   \
                rfs_d##W av = rfs_ld_##S##W(aj + aoff[k]);                                  \
                H[k] = av * H[k] + rfs_ld_##S##W(bj + aoff[k]);                             \
                A[k] = A[k] * av;                                                           \
            }                                                                               \
        }                                                                                   \
        RFS_UNROLL                                                                          \
        for (int k = 0; k < K; ++k) A[k] = rfs_flush##W(A[k]);                              \
    }                                                                                       \
    for (; j < L; ++j) {                                                                    \
        const DT *aj = a + j * lda, *bj = b + j * lda;                                      \
        for (int k = 0; k < K; ++k) {                                                       \
            if (j < lv[k]) {                                                                \
                rfs_d##W av = rfs_ld_##S##W(aj + aoff[k]);                                  \
                H[k] = av * H[k] + rfs_ld_##S##W(bj + aoff[k]);                             \
                A[k] = rfs_flush##W(A[k] * av);                                             \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    for (int k = 0; k < K; ++k) {                                                           \
        memcpy(As + k * W, &A[k], sizeof(rfs_d##W)); memcpy(Hs + k * W, &H[k], sizeof(rfs_d##W)); \
    }                                                                                       \
}

#define RFS_ALL_K(DT, S, W) RFS_CHAIN_KERNELS(DT, S, W, 1) RFS_CHAIN_KERNELS(DT, S, W, 2)  \
    RFS_CHAIN_KERNELS(DT, S, W, 3) RFS_CHAIN_KERNELS(DT, S, W, 4) RFS_CHAIN_KERNELS(DT, S, W, 5) \
    RFS_CHAIN_KERNELS(DT, S, W, 6) RFS_CHAIN_KERNELS(DT, S, W, 7) RFS_CHAIN_KERNELS(DT, S, W, 8)
RFS_ALL_K(float, f, 8) RFS_ALL_K(float, f, 4) RFS_ALL_K(float, f, 2) RFS_ALL_K(float, f, 1)
RFS_ALL_K(double, d, 8) RFS_ALL_K(double, d, 4) RFS_ALL_K(double, d, 2) RFS_ALL_K(double, d, 1)

#define RFS_SC(S, W, K) case W * 16 + K: rfs_scan_##S##W##_##K(L, lda, ldo, a, b, o, aoff, ooff, lv, hs); break;
#define RFS_RC(S, W, K) case W * 16 + K: rfs_red_##S##W##_##K(L, lda, a, b, aoff, lv, As, Hs); break;
#define RFS_CASES(M, S, W) M(S, W, 1) M(S, W, 2) M(S, W, 3) M(S, W, 4) M(S, W, 5) M(S, W, 6) M(S, W, 7) M(S, W, 8)
#define RFS_DISPATCH(DT, S)                                                                 \
static void rfs_scan_##S(int W, int K, int64_t L, int64_t lda, int64_t ldo, const DT *a,    \
        const DT *b, DT *o, const int64_t *aoff, const int64_t *ooff, const int64_t *lv,    \
        double *hs) {                                                                       \
    if (L <= 0) return;                                                                     \
    switch (W * 16 + K) { RFS_CASES(RFS_SC, S, 8) RFS_CASES(RFS_SC, S, 4) RFS_CASES(RFS_SC, S, 2) RFS_CASES(RFS_SC, S, 1) default: break; } \
}                                                                                           \
static void rfs_red_##S(int W, int K, int64_t L, int64_t lda, const DT *a, const DT *b,     \
        const int64_t *aoff, const int64_t *lv, double *As, double *Hs) {                   \
    if (L <= 0) return;                                                                     \
    switch (W * 16 + K) { RFS_CASES(RFS_RC, S, 8) RFS_CASES(RFS_RC, S, 4) RFS_CASES(RFS_RC, S, 2) RFS_CASES(RFS_RC, S, 1) default: break; } \
}
RFS_DISPATCH(float, f)
RFS_DISPATCH(double, d)

/* Gate math of n rows: src row r at p + r*lds, (a, b) written to q + r*ldd (a in [0, H),
 * b in [H, 2H)); q may equal p (in place). minGRU: src [pz | ph];
 * a = 1 - z, b = z * h~ with z = sigmoid(pz + bz). minLSTM: src [pf | pi | ph];
 * a = f/(f+i) = (1+ei)/(2+ei+ef), b = i/(f+i) * h~ with ef = exp(-pf), ei = exp(-pi),
 * numerator and denominator scaled by exp(-m), m = max(-pf, -pi, 0), so that nothing
 * overflows and the denominator stays >= 1 (exact where f and i both underflow).
 * Infinite pre-activations give what the reference's formulas give in IEEE arithmetic
 * (sigmoid(-inf) = 0 exactly, so 0 * inf = NaN where h~ is infinite; f = i = 0: NaN):
 * exp overflowing to inf makes z = 0 and a = 1, and the term of the largest exponent
 * is 1 without evaluating inf - inf. */
/* The coefficients (a, b) of one unit from its projections (no bias yet): the one
 * definition of the gate math, used by the gate pass and the fused gate-scan pass. */
#define RFS_GRU_COEF(DT, EXP, pz, bz, ph, bh, A, BB) {                                 \
    DT v_ = -((pz) + (bz));                                                                 \
    DT e_ = EXP(v_);                                                                        \
    DT z_ = (DT)1 / ((DT)1 + e_);                                                           \
    A = e_ == (DT)INFINITY ? (DT)1 : e_ * z_; BB = z_ * ((ph) + (bh));                      \
}
#define RFS_LSTM_COEF(DT, EXP, pf, bf, pi, bi, ph, bh, A, BB) {                            \
    DT vf_ = -((pf) + (bf)), vi_ = -((pi) + (bi));                                          \
    DT m_ = vf_ > vi_ ? vf_ : vi_;                                                          \
    m_ = m_ > (DT)0 ? m_ : (DT)0;                                                           \
    DT e0_ = EXP(-m_);                                                                      \
    DT ef_ = vf_ == m_ ? (DT)1 : EXP(vf_ - m_), ei_ = vi_ == m_ ? (DT)1 : EXP(vi_ - m_);    \
    DT r2_ = m_ == (DT)INFINITY && vf_ == vi_ ? (DT)NAN : (DT)1 / ((DT)2 * e0_ + ef_ + ei_); \
    A = (e0_ + ei_) * r2_; BB = (e0_ + ef_) * r2_ * ((ph) + (bh));                          \
}
#define RFS_GSCAN(DT, S, KIND, COEF)                                                        \
static void rfs_gscan_##KIND##_##S(int64_t nt, int64_t B, int64_t nu, int64_t H, const DT *p, \
        int64_t ldp, const DT *bias, const int64_t *lens, int64_t t0, DT *y, int64_t ldy,    \
        double *hc) {                                                                       \
    const DT *b1 = bias + H, *b2 = bias + 2 * H;                                            \
    (void)b2;                                                                               \
    for (int64_t t = 0; t < nt; ++t)                                                        \
        for (int64_t b = 0; b < B; ++b) {                                                   \
            const DT *pr = p + (t * B + b) * ldp, *p1 = pr + H, *p2 = p1 + H;               \
            DT *yr = y + (t * B + b) * ldy;                                                 \
            double *h = hc + b * nu;                                                        \
            (void)p2;                                                                       \
            if (t0 + t >= lens[b]) { memset(yr, 0, (size_t)nu * sizeof(DT)); continue; }    \
            RF_SIMD                                                                        \
            for (int64_t u = 0; u < nu; ++u) {                                              \
                DT A, BB;                                                                   \
                COEF                                                                        \
                double hv = (double)A * h[u] + (double)BB;                                  \
                h[u] = hv; yr[u] = (DT)hv;                                                  \
            }                                                                               \
        }                                                                                   \
}
#define RFS_GATES(DT, S, EXP)                                                           \
/* units [0, nu) of n rows; gate stride gs in p and q, bs in bias */                       \
static void rfs_gates_gru_s_##S(int64_t n, int64_t nu, int64_t gs, int64_t bs, const DT *p,  \
        int64_t lds, const DT *bias, DT *q, int64_t ldd) {                                  \
    const DT *b1 = bias + bs;                                                               \
    for (int64_t r = 0; r < n; ++r) {                                                       \
        const DT *pr = p + r * lds, *p1 = pr + gs; DT *qr = q + r * ldd, *q1 = qr + gs;     \
        RF_SIMD                                                                            \
        for (int64_t u = 0; u < nu; ++u) {                                                  \
            DT A, BB;                                                                       \
            RFS_GRU_COEF(DT, EXP, pr[u], bias[u], p1[u], b1[u], A, BB)                  \
            qr[u] = A; q1[u] = BB;                                                          \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
static void rfs_gates_lstm_s_##S(int64_t n, int64_t nu, int64_t gs, int64_t bs, const DT *p, \
        int64_t lds, const DT *bias, DT *q, int64_t ldd) {                                  \
    const DT *b1 = bias + bs, *b2 = bias + 2 * bs;                                          \
    for (int64_t r = 0; r < n; ++r) {                                                       \
        const DT *pr = p + r * lds, *p1 = pr + gs, *p2 = pr + 2 * gs;                       \
        DT *qr = q + r * ldd, *q1 = qr + gs;                                                \
        RF_SIMD                                                                            \
        for (int64_t u = 0; u < nu; ++u) {                                                  \
            DT A, BB;                                                                       \
            RFS_LSTM_COEF(DT, EXP, pr[u], bias[u], p1[u], b1[u], p2[u], b2[u], A, BB)       \
            qr[u] = A; q1[u] = BB;                                                          \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
/* Gates and scan in one pass over nt steps of B time-major rows (row t*B + b at        \
 * p + (t*B + b)*ldp, gates H apart; units [0, nu)), from and into the float64 state hc  \
 * (B*nu): y row = h_t, or 0 and the state kept from step t0 + t = lens[b] on. */         \
RFS_GSCAN(DT, S, gru, RFS_GRU_COEF(DT, EXP, pr[u], bias[u], p1[u], b1[u], A, BB))     \
RFS_GSCAN(DT, S, lstm, RFS_LSTM_COEF(DT, EXP, pr[u], bias[u], p1[u], b1[u], p2[u], b2[u], A, BB)) \
static void rfs_gates_gru_##S(int64_t n, int64_t H, const DT *p, int64_t lds,                \
        const DT *bias, DT *q, int64_t ldd) {                                               \
    rfs_gates_gru_s_##S(n, H, H, H, p, lds, bias, q, ldd);                                  \
}                                                                                           \
static void rfs_gates_lstm_##S(int64_t n, int64_t H, const DT *p, int64_t lds,               \
        const DT *bias, DT *q, int64_t ldd) {                                               \
    rfs_gates_lstm_s_##S(n, H, H, H, p, lds, bias, q, ldd);                                 \
}
RFS_GATES(float, f, expf)
RFS_GATES(double, d, exp)

#endif /* RF_SCAN_H */
