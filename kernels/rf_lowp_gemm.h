/* rf_lowp_gemm.h: the bf16 and int8 products of the frozen layers (kernels/rf_lowp.h has
 * the layer around them): packing, activations, and the portable, AVX-512 and AMX
 * kernels. No Python here (tools/spill_check compiles it alone). */
#ifndef RF_LOWP_GEMM_H
#define RF_LOWP_GEMM_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include "rf_gates.h"     /* RF_SIMD */

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#define RF_LOWP_X86 1
#include <immintrin.h>
#else
#define RF_LOWP_X86 0
#endif

enum { RF_BF16 = 1, RF_INT8 = 2 };
enum { RF_LOWP_PORTABLE = 0, RF_LOWP_AVX512 = 1, RF_LOWP_AMX = 2 };
#define RF_QB 16          /* output columns of a packed block */
#define RF_QMR 4          /* rows of the AVX-512 micro-tile */
#define RF_QNV 4          /* blocks of the AVX-512 micro-tile (4 x 4 accumulators) */
#define RF_QROWS 192      /* rows of activations kept hot while the column groups pass */

typedef struct {
    int prec;               /* RF_BF16 | RF_INT8 */
    int G, H, Hp;           /* gates, columns per gate, padded to a multiple of RF_QB */
    int K, Kp;              /* inner size and its padded size (Kp * esize % 64 == 0) */
    const void *w;          /* packed weights (above) */
    const float *scale;     /* int8: weight scale of each packed column (G*Hp), else NULL */
    const int32_t *comp;    /* int8: -128 * the sum of each packed column's weights */
} rf_qmat_t;

static inline int rf_lowp_esize(int prec) { return prec == RF_INT8 ? 1 : 2; }

#if RF_LOWP_X86 && defined(__linux__)
#include <cpuid.h>
#include <unistd.h>
#include <sys/syscall.h>
#define RF_LOWP_HAVE_AMX 1
#else
#define RF_LOWP_HAVE_AMX 0
#endif

/* What this CPU (and its OS) can run: bit 0 AVX512-VNNI, bit 1 AVX512-BF16, bit 2 AMX-INT8,
 * bit 3 AMX-BF16. AMX counts only once Linux has granted this process the tile data state
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, asked here: without it the
 * first tile instruction kills the process with SIGILL). The permission is per process
 * and changes nothing else. */
static inline int rf_lowp_cpu(void) {
    int f = 0;
#if RF_LOWP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
        if (__builtin_cpu_supports("avx512vnni")) f |= 1;
        if (__builtin_cpu_supports("avx512bf16")) f |= 2;
    }
#endif
#if RF_LOWP_HAVE_AMX
    unsigned a, b, c, d;
    if ((f & 1) && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1u)) {   /* AMX-TILE */
        long ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
        if (ok == 0) {
            if (d >> 25 & 1u) f |= 4;              /* AMX-INT8 */
            if ((d >> 22 & 1u) && (f & 2)) f |= 8; /* AMX-BF16 */
        }
    }
#endif
    return f;
}

/* ------------------------------------------------------------------ activations */
/* bf16 of x, rounded to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t rf_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Rows [0, M) of a (ld lda) as bf16 rows of Kp (zeros past K). */
static inline void rf_lowp_cvt_bf16(int M, int K, int Kp, const float *a, int lda, uint16_t *q) {
    for (int m = 0; m < M; ++m) {
        const float *ar = a + (size_t)m * lda;
        uint16_t *qr = q + (size_t)m * Kp;
        for (int k = 0; k < K; ++k) qr[k] = rf_bf16(ar[k]);
        for (int k = K; k < Kp; ++k) qr[k] = 0;
    }
}

/* Rows [0, M) of a quantized: q = round(a / s) + 128 with s = max|a_row| / 127 (rows of
 * Kp bytes, 128 = zero past K); sc[m] = s. A row of zeros gets s = 0; a row holding inf
 * or NaN gets s = NaN, so that its products are NaN (as they are in fp32). */
static inline void rf_lowp_quant_u8(int M, int K, int Kp, const float *a, int lda, uint8_t *q, float *sc) {
    for (int m = 0; m < M; ++m) {
        const float *ar = a + (size_t)m * lda;
        uint8_t *qr = q + (size_t)m * Kp;
        /* max |a| as bits (order-preserving for non-negative floats: vectorises as an
         * integer max); bits past inf's are NaN */
        uint32_t mbits = 0;
        for (int k = 0; k < K; ++k) {
            uint32_t u;
            memcpy(&u, ar + k, 4);
            u &= 0x7fffffffu;
            mbits = u > mbits ? u : mbits;
        }
        if (mbits >= 0x7f800000u) {
            memset(qr, 128, (size_t)Kp);
            sc[m] = NAN;
            continue;
        }
        float amax;
        memcpy(&amax, &mbits, 4);
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        sc[m] = amax / 127.0f;
        RF_SIMD
        for (int k = 0; k < K; ++k) {
            float v = nearbyintf(ar[k] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            qr[k] = (uint8_t)((int)v + 128);
        }
        for (int k = K; k < Kp; ++k) qr[k] = 128;
    }
}

static inline void rf_lowp_prep(int prec, int M, int K, int Kp, const float *a, int lda, void *q, float *sc) {
    if (prec == RF_INT8) rf_lowp_quant_u8(M, K, Kp, a, lda, (uint8_t *)q, sc);
    else rf_lowp_cvt_bf16(M, K, Kp, a, lda, (uint16_t *)q);
}

/* Where packed column block nb goes in C (gate g at column offset g*sgc) and its mask of
 * real columns (the padding of a gate past H is not stored). */
static inline float *rf_lowp_dst(const rf_qmat_t *W, int nb, float *C, int sgc, unsigned *mask) {
    int n0 = nb * RF_QB, g = n0 / W->Hp, u0 = n0 - g * W->Hp;
    int left = W->H - u0;
    *mask = left >= RF_QB ? 0xffffu : (left <= 0 ? 0u : ((1u << left) - 1u));
    return C + (size_t)g * sgc + u0;
}

/* ------------------------------------------------------------------ portable kernel */
static void rf_lowp_gemm_portable(const rf_qmat_t *W, int M, const void *A, const float *as,
                                  int nb0, int nb1, float *C, int ldc, int sgc) {
    const int grp = W->prec == RF_INT8 ? 4 : 2, KG = W->Kp / grp;
    for (int nb = nb0; nb < nb1; ++nb) {
        unsigned mask;
        float *dst = rf_lowp_dst(W, nb, C, sgc, &mask);
        if (!mask) continue;
        for (int m = 0; m < M; ++m) {
            float out[RF_QB];
            if (W->prec == RF_INT8) {
                const int8_t *wb = (const int8_t *)W->w + (size_t)nb * KG * 64;
                const uint8_t *ar = (const uint8_t *)A + (size_t)m * W->Kp;
                int32_t acc[RF_QB] = {0};
                for (int kg = 0; kg < KG; ++kg)
                    for (int i = 0; i < RF_QB; ++i)
                        for (int e = 0; e < 4; ++e)
                            acc[i] += (int32_t)ar[kg * 4 + e] * (int32_t)wb[(size_t)kg * 64 + i * 4 + e];
                for (int i = 0; i < RF_QB; ++i)
                    out[i] = (float)(acc[i] + W->comp[nb * RF_QB + i]) * (W->scale[nb * RF_QB + i] * as[m]);
            } else {
                const uint16_t *wb = (const uint16_t *)W->w + (size_t)nb * KG * 32;
                const uint16_t *ar = (const uint16_t *)A + (size_t)m * W->Kp;
                float acc[RF_QB] = {0};
                for (int kg = 0; kg < KG; ++kg)
                    for (int i = 0; i < RF_QB; ++i)
                        for (int e = 0; e < 2; ++e) {
                            uint32_t ua = (uint32_t)ar[kg * 2 + e] << 16;
                            uint32_t uw = (uint32_t)wb[(size_t)kg * 32 + i * 2 + e] << 16;
                            float fa, fw;
                            memcpy(&fa, &ua, 4);
                            memcpy(&fw, &uw, 4);
                            acc[i] += fa * fw;
                        }
                for (int i = 0; i < RF_QB; ++i) out[i] = acc[i];
            }
            float *dr = dst + (size_t)m * ldc;
            for (int i = 0; i < RF_QB; ++i)
                if (mask >> i & 1u) dr[i] = out[i];
        }
    }
}

/* ------------------------------------------------------------------ AVX-512 kernels */
#if RF_LOWP_X86
#define RF_T_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define RF_T_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* acc += the u8 x s8 products of a and b, in place. GCC 12 compiled the intrinsic's
 * (_mm512_dpbusd_epi32) 4 x 4 tile with a register copy per accumulator and product and
 * spilled accumulators to the stack (perf annotate of rf_lowp_gemm_vnni: half the cycles
 * in vmovdqa); as an in-place asm operand each stays in its register. */
#define RF_DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* MR rows x NV blocks of C. MR and NV are constants at every call (the loops unroll and
 * the MR*NV accumulators live in registers: check with tools/spill_check, issue 13). */
static inline __attribute__((always_inline)) RF_T_VNNI
void rf_lowp_tile_vnni(const int MR, const int NV, const rf_qmat_t *W, int KG, const uint8_t *A,
                       const float *as, int nb, float *C, int ldc, int sgc) {
    __m512i acc[RF_QMR][RF_QNV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
    const int8_t *wb = (const int8_t *)W->w + (size_t)nb * KG * 64;
    const size_t bs = (size_t)KG * 64;
    const int Kp = W->Kp;
    for (int kg = 0; kg < KG; ++kg) {
        __m512i b[RF_QNV];
        for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512((const void *)(wb + v * bs + (size_t)kg * 64));
        for (int r = 0; r < MR; ++r) {
            int32_t a4;
            memcpy(&a4, A + (size_t)r * Kp + (size_t)kg * 4, 4);
            __m512i a = _mm512_set1_epi32(a4);
            for (int v = 0; v < NV; ++v) RF_DPBUSD(acc[r][v], a, b[v]);
        }
    }
    for (int v = 0; v < NV; ++v) {
        unsigned mask;
        float *dst = rf_lowp_dst(W, nb + v, C, sgc, &mask);
        __m512i comp = _mm512_loadu_si512((const void *)(W->comp + (size_t)(nb + v) * RF_QB));
        __m512 ws = _mm512_loadu_ps(W->scale + (size_t)(nb + v) * RF_QB);
        for (int r = 0; r < MR; ++r) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][v], comp));
            f = _mm512_mul_ps(f, _mm512_mul_ps(ws, _mm512_set1_ps(as[r])));
            _mm512_mask_storeu_ps(dst + (size_t)r * ldc, (__mmask16)mask, f);
        }
    }
}

static inline __attribute__((always_inline)) RF_T_BF16
void rf_lowp_tile_bf16(const int MR, const int NV, const rf_qmat_t *W, int KG, const uint16_t *A,
                       int nb, float *C, int ldc, int sgc) {
    __m512 acc[RF_QMR][RF_QNV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const uint16_t *wb = (const uint16_t *)W->w + (size_t)nb * KG * 32;
    const size_t bs = (size_t)KG * 32;
    const int Kp = W->Kp;
    for (int kg = 0; kg < KG; ++kg) {
        __m512i b[RF_QNV];
        for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512((const void *)(wb + v * bs + (size_t)kg * 32));
        for (int r = 0; r < MR; ++r) {
            int32_t a2;
            memcpy(&a2, A + (size_t)r * Kp + (size_t)kg * 2, 4);
            __m512i a = _mm512_set1_epi32(a2);
            for (int v = 0; v < NV; ++v)
                acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
        }
    }
    for (int v = 0; v < NV; ++v) {
        unsigned mask;
        float *dst = rf_lowp_dst(W, nb + v, C, sgc, &mask);
        for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(dst + (size_t)r * ldc, (__mmask16)mask, acc[r][v]);
    }
}

/* Rows in chunks of RF_QROWS (their activations stay in L1/L2 while every column group of
 * the range passes over them), groups of RF_QNV blocks (RF_QNV * 64 bytes of weights per
 * k group, reused by every row of the chunk). */
#define RF_LOWP_DRIVER(NAME, TILE, ATYPE, TGT, ...)                                            \
static TGT void NAME(const rf_qmat_t *W, int M, const void *Av, const float *as,               \
                     int nb0, int nb1, float *C, int ldc, int sgc) {                           \
    const ATYPE *A = (const ATYPE *)Av;                                                        \
    const int KG = W->Kp / (W->prec == RF_INT8 ? 4 : 2);                                       \
    (void)as;                                                                                  \
    for (int m0 = 0; m0 < M; m0 += RF_QROWS) {                                                 \
        const int m1 = M < m0 + RF_QROWS ? M : m0 + RF_QROWS;                                  \
        for (int nb = nb0; nb < nb1; nb += RF_QNV) {                                           \
            const int nv = nb1 - nb < RF_QNV ? nb1 - nb : RF_QNV;                              \
            int m = m0;                                                                        \
            for (; m + RF_QMR <= m1; m += RF_QMR) {                                            \
                const ATYPE *Am = A + (size_t)m * W->Kp; float *Cm = C + (size_t)m * ldc;      \
                const float *asm_ = as ? as + m : as; (void)asm_;                              \
                switch (nv) {                                                                  \
                case 4: TILE(4, 4, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;           \
                case 3: TILE(4, 3, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;           \
                case 2: TILE(4, 2, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;           \
                default: TILE(4, 1, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;          \
                }                                                                              \
            }                                                                                  \
            for (; m < m1; ++m) {                                                              \
                const ATYPE *Am = A + (size_t)m * W->Kp; float *Cm = C + (size_t)m * ldc;      \
                const float *asm_ = as ? as + m : as; (void)asm_;                              \
                switch (nv) {                                                                  \
                case 4: TILE(1, 4, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;           \
                case 3: TILE(1, 3, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;           \
                case 2: TILE(1, 2, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;           \
                default: TILE(1, 1, W, KG, Am, __VA_ARGS__ nb, Cm, ldc, sgc); break;          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

RF_LOWP_DRIVER(rf_lowp_gemm_vnni, rf_lowp_tile_vnni, uint8_t, RF_T_VNNI, asm_,)
RF_LOWP_DRIVER(rf_lowp_gemm_bf16, rf_lowp_tile_bf16, uint16_t, RF_T_BF16,)
#endif

#if RF_LOWP_HAVE_AMX
/* AMX: tiles 0-3 hold a 32 x 32 block of C (2 x 2 tiles of 16 rows x 16 int32/fp32), 4-5
 * two 16-row slices of A (64 bytes of k each), 6-7 two column blocks of W: a packed block's
 * 16 k-groups of 64 bytes are exactly a B tile. The sums go through a 16 x 16 buffer to
 * the epilogue of the AVX-512 kernels. Rows past the last multiple of 16, and an odd
 * last column block, are left to the caller (the AVX-512 kernels). */
/* Products of fewer rows than this go to the AVX-512 kernels: under 16 rows an AMX
 * product is bound by loading its B tiles, and for int8 one or two rows of vpdpbusd
 * beat that; AVX512-BF16 never does (commit 79bad65; figures in docs/performance.md,
 * "Frozen layers"). */
#ifndef RF_AMX_MIN_ROWS_INT8
#define RF_AMX_MIN_ROWS_INT8 3
#endif
#define RF_AMX_MIN_ROWS_BF16 1
#define RF_T_AMX __attribute__((target("amx-tile,amx-int8,amx-bf16,avx512f,avx512bw,avx512vnni")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} rf_tilecfg_t;

static inline RF_T_AMX void rf_amx_store(const rf_qmat_t *W, int32_t *buf, int nb, int m, int rows,
                                          const float *as, float *C, int ldc, int sgc) {
    unsigned mask;
    float *dst = rf_lowp_dst(W, nb, C, sgc, &mask);
    if (!mask) return;
    if (W->prec == RF_INT8) {
        __m512i comp = _mm512_loadu_si512((const void *)(W->comp + (size_t)nb * RF_QB));
        __m512 ws = _mm512_loadu_ps(W->scale + (size_t)nb * RF_QB);
        for (int r = 0; r < rows; ++r) {
            __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_loadu_si512((const void *)(buf + r * 16)), comp));
            f = _mm512_mul_ps(f, _mm512_mul_ps(ws, _mm512_set1_ps(as[m + r])));
            _mm512_mask_storeu_ps(dst + (size_t)(m + r) * ldc, (__mmask16)mask, f);
        }
    } else {
        for (int r = 0; r < rows; ++r)
            _mm512_mask_storeu_ps(dst + (size_t)(m + r) * ldc, (__mmask16)mask,
                                  _mm512_loadu_ps((const float *)(buf + r * 16)));
    }
}

/* The rows of the tile configuration this thread has loaded (0: none). A configuration
 * stays loaded across products (a layer's step makes one per gate) until
 * rf_lowp_release, which every caller of rf_lowp_gemm runs when it is done. */
static __thread int rf_amx_cur = 0;

/* Tiles of `rows` rows for C (0-3) and A (4-5); B (6-7) always 16 rows of 64 bytes. */
static inline RF_T_AMX void rf_amx_config(int rows) {
    if (rf_amx_cur == rows) return;
    rf_amx_cur = rows;
    rf_tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = (uint8_t)(i < 6 ? rows : 16); }
    _tile_loadconfig(&cfg);
}

/* Rows [m, m + rows) (two tile rows when `two`) by column blocks [nb0, nb0 + 2*npairs). */
static inline __attribute__((always_inline)) RF_T_AMX
void rf_amx_rows(const rf_qmat_t *W, const int8_t *A, size_t lda, const float *as, int m, int rows, int two,
                 int nb0, int npairs, float *C, int ldc, int sgc, int32_t *buf) {
    const int KB = (int)(lda / 64);                                 /* 64-byte steps of k */
    const size_t bs = lda * RF_QB;                                  /* bytes of a packed block */
    const int8_t *Wb = (const int8_t *)W->w;
    const int bf = W->prec != RF_INT8;
    for (int p = 0; p < npairs; ++p) {
        const int nb = nb0 + 2 * p;
        const int8_t *b0 = Wb + (size_t)nb * bs, *b1 = b0 + bs;
        const int8_t *a0 = A + (size_t)m * lda, *a1 = a0 + 16 * lda;
        _tile_zero(0); _tile_zero(1);
        if (two) { _tile_zero(2); _tile_zero(3); }
        for (int kb = 0; kb < KB; ++kb) {
            _tile_loadd(6, b0 + (size_t)kb * 1024, 64);
            _tile_loadd(7, b1 + (size_t)kb * 1024, 64);
            _tile_loadd(4, a0 + (size_t)kb * 64, lda);
            if (bf) { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); }
            else { _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); }
            if (two) {
                _tile_loadd(5, a1 + (size_t)kb * 64, lda);
                if (bf) { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
                else { _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7); }
            }
        }
        _tile_stored(0, buf, 64); rf_amx_store(W, buf, nb, m, rows, as, C, ldc, sgc);
        _tile_stored(1, buf, 64); rf_amx_store(W, buf, nb + 1, m, rows, as, C, ldc, sgc);
        if (two) {
            _tile_stored(2, buf, 64); rf_amx_store(W, buf, nb, m + 16, 16, as, C, ldc, sgc);
            _tile_stored(3, buf, 64); rf_amx_store(W, buf, nb + 1, m + 16, 16, as, C, ldc, sgc);
        }
    }
}

/* Rows [0, M) by column blocks [nb0, nb0 + 2*npairs): 32 rows at a time, then 16, then the
 * last M % 16 with tiles of that many rows (under 16 rows the B tiles' loads bound the
 * kernel: see RF_AMX_MIN_ROWS_INT8). An odd last column block is left to the caller (the
 * AVX-512 kernels). */
static RF_T_AMX void rf_lowp_gemm_amx(const rf_qmat_t *W, int M, const void *Av, const float *as,
                                      int nb0, int npairs, float *C, int ldc, int sgc) {
    const int8_t *A = (const int8_t *)Av;
    const size_t lda = (size_t)W->Kp * rf_lowp_esize(W->prec);    /* bytes of a row */
    int32_t buf[16 * 16] __attribute__((aligned(64)));
    const int M16 = M & ~15;
    if (M16) {
        rf_amx_config(16);
        int m = 0;
        for (; m + 32 <= M16; m += 32) rf_amx_rows(W, A, lda, as, m, 16, 1, nb0, npairs, C, ldc, sgc, buf);
        if (m < M16) rf_amx_rows(W, A, lda, as, m, 16, 0, nb0, npairs, C, ldc, sgc, buf);
    }
    if (M16 < M) {
        rf_amx_config(M - M16);
        rf_amx_rows(W, A, lda, as, M16, M - M16, 0, nb0, npairs, C, ldc, sgc, buf);
    }
}

static RF_T_AMX void rf_amx_release(void) {
    _tile_release();
    rf_amx_cur = 0;
}
#endif

/* Give back this thread's tile state (AMX), after its last rf_lowp_gemm of a call. */
static inline void rf_lowp_release(void) {
#if RF_LOWP_HAVE_AMX
    if (rf_amx_cur) rf_amx_release();
#endif
}

/* C[m, dst(n)] = the product of rows [0, M) of the prepared activations A (rf_lowp_prep,
 * rows of Kp) with packed column blocks [nb0, nb1) of W, rescaled to fp32. */
static void rf_lowp_gemm(int isa, const rf_qmat_t *W, int M, const void *A, const float *as,
                         int nb0, int nb1, float *C, int ldc, int sgc) {
    if (M <= 0 || nb1 <= nb0) return;
#if RF_LOWP_HAVE_AMX
    if (isa == RF_LOWP_AMX && nb1 - nb0 >= 2
            && M >= (W->prec == RF_INT8 ? RF_AMX_MIN_ROWS_INT8 : RF_AMX_MIN_ROWS_BF16)) {
        const int npairs = (nb1 - nb0) / 2;
        rf_lowp_gemm_amx(W, M, A, as, nb0, npairs, C, ldc, sgc);
        if (nb0 + 2 * npairs < nb1)       /* an odd last block: every row */
            rf_lowp_gemm(RF_LOWP_AVX512, W, M, A, as, nb0 + 2 * npairs, nb1, C, ldc, sgc);
        return;
    }
    if (isa == RF_LOWP_AMX) isa = RF_LOWP_AVX512;
#endif
#if RF_LOWP_X86
    if (isa == RF_LOWP_AVX512) {
        if (W->prec == RF_INT8) rf_lowp_gemm_vnni(W, M, A, as, nb0, nb1, C, ldc, sgc);
        else rf_lowp_gemm_bf16(W, M, A, as, nb0, nb1, C, ldc, sgc);
        return;
    }
#endif
    rf_lowp_gemm_portable(W, M, A, as, nb0, nb1, C, ldc, sgc);
}

#endif /* RF_LOWP_GEMM_H */
