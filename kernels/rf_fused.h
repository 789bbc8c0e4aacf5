/* Fused recurrent step: packed-weight micro-kernel + gate math, float (_f) and double (_d).
 *
 * For small and medium batches a recurrent step is n x (G*H) x K with n small, where
 * general BLAS loses most of its speed. Here each thread owns whole *panels*: UP hidden
 * units with all their G gates, packed once per call (rf_pack_*) as K rows of G*UP
 * contiguous values. The micro-kernel keeps an MR x (G*UP) block of recurrent
 * pre-activations in vector registers (GCC/Clang vector extensions: AVX-512, AVX2 or
 * SSE, whatever -march gives), writes it to a small L1 tile, and the gate functions of
 * rf_gates.h (the one C definition of the cells, after rnnfast/cells.py) run on that
 * tile at once, so the gate pre-activations never travel through memory.
 */
#ifndef RF_FUSED_H
#define RF_FUSED_H

#include <string.h>
#include "rf_gates.h"

#define RF_VBYTES 64
typedef float rf_vf __attribute__((vector_size(RF_VBYTES)));
typedef double rf_vd __attribute__((vector_size(RF_VBYTES)));
#define RF_VLF (RF_VBYTES / 4)
#define RF_VLD (RF_VBYTES / 8)
#define RF_MR 6          /* rows per micro-kernel block */
#define RF_MAXNV 4       /* vectors per panel row */

/* Units per panel: a panel row holds G*UP values in NV = G*UP/VL vectors (NV <= 4). */
static inline int rf_panel_units(int G, int is_double) {
    int vl = is_double ? RF_VLD : RF_VLF;
    return G == 1 ? 4 * vl : vl;
}

#define RF_DEFINE_FUSED(T, SFX, VT, VL)                                              \
/* Pack panels [p0, p1) of W (G*H x K, gate-major rows) as P[p][k][g*UP + v]. */               \
__attribute__((optimize("no-tree-vectorize")))                                               \
static inline void rf_pack_##SFX(int G, int H, int K, int p0, int p1, const T *W, T *P) {      \
    const int UP = rf_panel_units(G, sizeof(T) == 8), PW = G * UP;                             \
    for (int p = p0; p < p1; ++p) {                                                            \
        T *dst = P + (size_t)p * K * PW;                                                       \
        for (int g = 0; g < G; ++g) {                                                          \
            for (int v0 = 0; v0 < UP; v0 += 8) {                                               \
                int u0 = p * UP + v0;                                                          \
                int nv = H - u0 < 8 ? (H - u0 > 0 ? H - u0 : 0) : 8;                           \
                const T *sb = W + (size_t)(g * H + u0) * K;                                    \
                T *db = dst + g * UP + v0;                                                     \
                if (nv == 8) {                                                                 \
                    for (int k = 0; k < K; ++k) {                                              \
                        T *d = db + (size_t)k * PW;                                            \
                        d[0] = sb[k]; d[1] = sb[K + k]; d[2] = sb[2 * (size_t)K + k];          \
                        d[3] = sb[3 * (size_t)K + k]; d[4] = sb[4 * (size_t)K + k];            \
                        d[5] = sb[5 * (size_t)K + k]; d[6] = sb[6 * (size_t)K + k];            \
                        d[7] = sb[7 * (size_t)K + k];                                          \
                    }                                                                          \
                } else {                                                                       \
                    for (int k = 0; k < K; ++k)                                                \
                        for (int v = 0; v < 8; ++v)                                            \
                            db[(size_t)k * PW + v] = v < nv ? sb[(size_t)v * K + k] : (T)0;    \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline __attribute__((always_inline)) void rf_mk_body_##SFX(const int MR_, const int NV_, \
        int K, const T *A, int lda, const T *P, T *out) {                                      \
    VT acc[RF_MR][RF_MAXNV];                                                                   \
    for (int r = 0; r < MR_; ++r)                                                              \
        for (int v = 0; v < NV_; ++v) acc[r][v] = (VT){0};                                     \
    for (int k = 0; k < K; ++k) {                                                              \
        VT w[RF_MAXNV];                                                                        \
        for (int v = 0; v < NV_; ++v) memcpy(&w[v], P + (size_t)k * NV_ * VL + v * VL, sizeof(VT)); \
        for (int r = 0; r < MR_; ++r) {                                                        \
            VT a = A[(size_t)r * lda + k] - (VT){0};  /* splat (x - 0 == x exactly) */                                           \
            for (int v = 0; v < NV_; ++v) acc[r][v] += a * w[v];                               \
        }                                                                                      \
    }                                                                                          \
    for (int r = 0; r < MR_; ++r)                                                              \
        for (int v = 0; v < NV_; ++v) memcpy(out + r * RF_MAXNV * VL + v * VL, &acc[r][v], sizeof(VT)); \
}                                                                                              \
                                                                                               \
/* out[r][0:NV*VL] (row stride RF_MAXNV*VL) = A[r, :K] @ panel, r < mr <= RF_MR. */            \
static inline void rf_mk_##SFX(int mr, int nv, int K, const T *A, int lda, const T *P, T *out) { \
    if (nv == 4) {                                                                             \
        switch (mr) {                                                                          \
        case 1: rf_mk_body_##SFX(1, 4, K, A, lda, P, out); break;                              \
        case 2: rf_mk_body_##SFX(2, 4, K, A, lda, P, out); break;                              \
        case 3: rf_mk_body_##SFX(3, 4, K, A, lda, P, out); break;                              \
        case 4: rf_mk_body_##SFX(4, 4, K, A, lda, P, out); break;                              \
        case 5: rf_mk_body_##SFX(5, 4, K, A, lda, P, out); break;                              \
        default: rf_mk_body_##SFX(6, 4, K, A, lda, P, out); break;                             \
        }                                                                                      \
    } else {                                                                                   \
        switch (mr) {                                                                          \
        case 1: rf_mk_body_##SFX(1, 3, K, A, lda, P, out); break;                              \
        case 2: rf_mk_body_##SFX(2, 3, K, A, lda, P, out); break;                              \
        case 3: rf_mk_body_##SFX(3, 3, K, A, lda, P, out); break;                              \
        case 4: rf_mk_body_##SFX(4, 3, K, A, lda, P, out); break;                              \
        case 5: rf_mk_body_##SFX(5, 3, K, A, lda, P, out); break;                              \
        default: rf_mk_body_##SFX(6, 3, K, A, lda, P, out); break;                             \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* C[r, g*H + u] = A[r, :K] . W[g*H + u, :K] for rows [0, n) and the units of panels        \
 * [p0, p1) (W packed by rf_pack_*): the input projection of many rows at once. */          \
static inline void rf_gemm_panels_##SFX(int G, int H, int K, int n, int p0, int p1,           \
        const T *A, int lda, const T *P, T *C, int ldc) {                                      \
    const int UP = rf_panel_units(G, sizeof(T) == 8), PW = G * UP, NV = PW / VL;               \
    const int TS = RF_MAXNV * VL;                                                              \
    T tile[RF_MR * RF_MAXNV * VL] __attribute__((aligned(64)));                                \
    for (int p = p0; p < p1; ++p) {                                                            \
        const T *Pp = P + (size_t)p * K * PW;                                                  \
        int ua = p * UP, nu = (ua + UP < H ? ua + UP : H) - ua;                                \
        for (int r0 = 0; r0 < n; r0 += RF_MR) {                                                \
            int mr = n - r0 < RF_MR ? n - r0 : RF_MR;                                          \
            rf_mk_##SFX(mr, NV, K, A + (size_t)r0 * lda, lda, Pp, tile);                       \
            for (int r = 0; r < mr; ++r)                                                       \
                for (int g = 0; g < G; ++g)                                                    \
                    memcpy(C + (size_t)(r0 + r) * ldc + g * H + ua, tile + r * TS + g * UP,    \
                           sizeof(T) * (size_t)nu);                                            \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* One step for panels [p0, p1) and rows [0, n): recurrent product + gates.                   \
 * code: 0/1 LSTM (h written to h1 (ld1) and h2 (ld2, may be NULL)), 2 GRU (lbr),            \
 * 4/5 RNN tanh/relu. xg: this step's input projections (row stride ldx = G*H);               \
 * hp: previous h (ldp), also the GEMM input (K = its width); c: cell state (ldc). */        \
static inline void rf_fused_step_##SFX(int code, int G, int H, int K, int n, int p0, int p1,  \
        const T *P, const T *xg, int ldx, const T *bx, const T *bh, const T *hp, int ldp,     \
        T *c, int ldc, T *h1, int ld1, T *h2, int ld2) {                                       \
    const int UP = rf_panel_units(G, sizeof(T) == 8), PW = G * UP, NV = PW / VL;               \
    T tile[RF_MR * RF_MAXNV * VL] __attribute__((aligned(64)));                                \
    const int TS = RF_MAXNV * VL;                                                              \
    int nblk = (n + RF_MR - 1) / RF_MR;                                                        \
    for (int p = p0; p < p1; ++p) {                                                            \
        const T *Pp = P + (size_t)p * K * PW;                                                  \
        int ua = p * UP, ub = ua + UP < H ? ua + UP : H;                                       \
        for (int b = 0; b < nblk; ++b) {                                                       \
            int r0 = (n * b) / nblk, r1 = (n * (b + 1)) / nblk;                                \
            rf_mk_##SFX(r1 - r0, NV, K, hp + (size_t)r0 * ldp, ldp, Pp, tile);                 \
            {   /* gate math of rf_gates.h on the tile: gate stride UP, row stride TS */       \
                const T *t = tile - ua;                                                        \
                const T *xr = xg + (size_t)r0 * ldx;                                           \
                T *o1 = h1 + (size_t)r0 * ld1, *o2 = h2 ? h2 + (size_t)r0 * ld2 : NULL;        \
                if (code <= 1)                                                                 \
                    rf_lstm_gates_##SFX(r1 - r0, H, ua, ub, xr, ldx, t, TS, UP, bx, bh,       \
                                        c + (size_t)r0 * ldc, ldc, o1, ld1, o2, ld2);          \
                else if (code == 2)                                                            \
                    rf_gru_gates_##SFX(r1 - r0, H, ua, ub, xr, ldx, t, TS, UP, bx, bh,        \
                                       hp + (size_t)r0 * ldp, ldp, o1, ld1, o2, ld2);          \
                else                                                                           \
                    rf_rnn_gates_##SFX(r1 - r0, code == 5, ua, ub, xr, ldx, t, TS, bx, bh,    \
                                       o1, ld1, o2, ld2);                                      \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

RF_DEFINE_FUSED(float, f, rf_vf, RF_VLF)
RF_DEFINE_FUSED(double, d, rf_vd, RF_VLD)

#endif /* RF_FUSED_H */
