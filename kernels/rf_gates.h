/* Fused per-step gate math of every cell, for float (suffix _f) and double (_d).
 *
 * The equations are those of rnnfast/cells.py (the one definition of each cell); the
 * Numba backend (kernels/numba_rnn.py) follows the same module. Each function updates
 * rows [0, n) and hidden units [u0, u1) of one direction for one step:
 *   xg:  input projections of this step,  row stride ldx (= G*H), no bias yet
 *   hg:  recurrent projections,           row stride ldg, gate stride sg (H, or the
 *        panel width UP when hg is the micro-kernel's tile, rf_fused.h), no bias yet
 *   bx, bh: the input and recurrent biases (G*H each; zeros when the layer has none)
 * Loops are written for `#pragma omp simd`; in float, exp and tanh are the inline
 * rf_expf and rf_tanhf below, in double glibc's vector variants (libmvec, declared here),
 * so that they vectorise without -ffast-math.
 * rf_barrier() is an orphaned OpenMP barrier: called from inside a parallel region it
 * synchronises that region's team; without OpenMP it does nothing. rf_team_size() is
 * the size of the team OpenMP actually gave a region (fewer threads than asked for under
 * OMP_THREAD_LIMIT or inside another parallel region): work is split by it.
 */
#ifndef RF_GATES_H
#define RF_GATES_H
#include "rf_cells.h"

#include <math.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sched.h>
#define RF_YIELD() sched_yield()
#else
#define RF_YIELD() ((void)0)
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
extern double exp(double) __attribute__((__simd__("notinbranch")));
extern double tanh(double) __attribute__((__simd__("notinbranch")));
#endif

#if defined(_OPENMP)
#define RF_SIMD _Pragma("omp simd")
static inline void rf_barrier(void) { _Pragma("omp barrier") }
static inline int rf_have_openmp(void) { return 1; }
static inline int rf_team_size(void) { return omp_get_num_threads(); }
#else
#if defined(__GNUC__)
#define RF_SIMD _Pragma("GCC ivdep")
#else
#define RF_SIMD
#endif
static inline void rf_barrier(void) {}
static inline int rf_have_openmp(void) { return 0; }
static inline int rf_team_size(void) { return 1; }
#endif

/* rf_sync: the per-step barrier of a team of threads. Each thread counts the barriers
 * it has reached in a cache line of its own and waits until every other thread's count
 * has reached its own: a crossing costs one line transfer each way, in parallel. It
 * replaced a centralised barrier (one counter that every thread incremented, then a
 * generation flag: two transfers in a row), which had replaced GOMP's barrier as the
 * cheaper crossing once per step of a batch-1 layer (commits 7806a27 and 122a3a2;
 * figures in docs/performance.md).
 * Initialise it before the parallel region with the team size asked for; a team of
 * another size (OpenMP gave fewer threads), or more than RF_SYNC_MAX threads, takes the
 * OpenMP barrier instead. A waiter spins with pause (4096 rounds), then yields its core
 * (an oversubscribed machine: another process's threads get the CPU).
 * Measured and dropped: blocking on a futex after the spin. Two virtual CPUs woken after
 * an idle pause seem to share a host core for a while; waiters that slept there made
 * every step pay a wake-up, and with two processes of 2-thread calls on 2 cores a longer
 * spin before the futex made calls far slower than spinning and yielding (commit
 * d32bc62; figures in docs/performance.md). */
#define RF_SYNC_MAX 32
typedef struct { unsigned count; char pad[60]; } __attribute__((aligned(64))) rf_sync_slot_t;
/* `stop`: set once by rf_sync_stop (a Ctrl-C, rf_interrupt.h); from then on every
 * rf_sync returns at once and the kernels' step loops end at their next step, so that no
 * thread waits for one that has left. Only a team of the size asked for uses it (the
 * OpenMP barrier cannot be left): rf_sync_stoppable says whether this team can. */
typedef struct { int n; int stop; rf_sync_slot_t slot[RF_SYNC_MAX]; } __attribute__((aligned(64))) rf_sync_t;

static inline void rf_sync_init(rf_sync_t *b, int n) {
    b->n = n;
    b->stop = 0;
    for (int i = 0; i < n && i < RF_SYNC_MAX; ++i) b->slot[i].count = 0;
}

static inline int rf_sync_stoppable(const rf_sync_t *b, int team) {
    return team <= 1 || (team == b->n && team <= RF_SYNC_MAX);
}

static inline void rf_sync_stop(rf_sync_t *b) { __atomic_store_n(&b->stop, 1, __ATOMIC_RELEASE); }

static inline int rf_sync_stopped(const rf_sync_t *b) { return __atomic_load_n(&b->stop, __ATOMIC_ACQUIRE); }

static inline void rf_sync(rf_sync_t *b, int team) {
#if defined(_OPENMP)
    if (team != b->n || team > RF_SYNC_MAX) { rf_barrier(); return; }
    if (team <= 1) return;
    const int me = omp_get_thread_num();
    const unsigned c = b->slot[me].count + 1u;  /* only this thread writes its slot */
    __atomic_store_n(&b->slot[me].count, c, __ATOMIC_RELEASE);
    unsigned spins = 0;
    for (int j = 0; j < team; ++j) {
        if (j == me) continue;
        /* (a thread that went on to the next barrier has counted one more: >= holds) */
        while ((int)(__atomic_load_n(&b->slot[j].count, __ATOMIC_ACQUIRE) - c) < 0) {
            if (__atomic_load_n(&b->stop, __ATOMIC_RELAXED)) return;
            if (spins++ < 4096u) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            } else {
                RF_YIELD();
            }
        }
    }
#else
    (void)b; (void)team;
#endif
}

/* expf for the float gate math, written so that `omp simd` loops vectorise it inline:
 * exp(x) = 2^n * p(r) with x = n*ln2 + r, |r| <= ln2/2 (ln2 in two parts) and Cephes'
 * degree-6 polynomial for p. Max relative error 6.6e-8 (1 ulp) against exp in float64
 * over [-4, 4]; on a Zen 5 core 6.7 cycles per 16 values against 16 for glibc's libmvec
 * expf (its AVX-512 variant), which made the sigmoids most of the gate math. x is
 * clamped to [-87.3, 88.3] so that 2^n stays a normal float (e^-87.3 ~ 1.2e-38 where expf
 * would go subnormal: the gates only take 1 / (1 + e), which that does not change); above
 * 88.3 the result is +inf (expf overflows at 88.72), so that sigmoid(-inf) is exactly 0 as
 * in PyTorch and 0 * inf gives NaN downstream as there (issue 17 #17). NaN propagates
 * (every comparison is false, and p is NaN).
 * always_inline (also rf_tanhf, rf_sigmoid_*): where GCC declined to inline it into a grown
 * caller (rf_fused_step_v), each `omp simd` loop became a scalar loop of calls (commit
 * 6ea1db3; figures in docs/performance.md). tests/test_cy_kernel.py reads the built modules
 * and tools/spill_check every -march target's code for such a call. */
static inline __attribute__((always_inline)) float rf_expf(float x0) {
    float x = x0 < -87.3f ? -87.3f : x0;
    x = x > 88.3f ? 88.3f : x;
    const float shift = 12582912.0f;        /* 1.5 * 2^23: x + shift - shift rounds to an integer */
    float n = (x * 1.44269504088896341f + shift) - shift;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int bits = ((int)n + 127) << 23;        /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x0 > 88.3f ? __builtin_inff() : p * scale;
}

/* tanhf for the float gate math, inline and vectorisable like rf_expf (it replaced
 * libmvec's tanhf: around each call of that, GCC spilled and reloaded the loop's live
 * vectors, which made the fused LSTM panel kernel's steps slower; commit 45f9d12;
 * figures in docs/performance.md). Cephes' tanhf:
 * an odd polynomial for |x| < 0.625 and 1 - 2 / (e^(2|x|) + 1) beyond, both computed and
 * one selected (no branch), on |x| with x's sign put back (so -0 stays -0); tanh(+-inf) =
 * +-1 (rf_expf clamps) and NaN propagates. Max error 1.33 ulp (7.9e-8 absolute) against
 * tanh in float64 over [-20, 20] (glibc's scalar tanhf: 2.19 ulp). */
static inline __attribute__((always_inline)) float rf_tanhf(float x) {
    const float a = fabsf(x);
    const float big = 1.0f - 2.0f / (rf_expf(a + a) + 1.0f);
    const float z = a * a;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = p * z * a + a;
    return copysignf(a < 0.625f ? small : big, x);
}

#define RF_DEFINE_GATES(T, SFX, EXP, TANH)                                                   \
static inline __attribute__((always_inline)) T rf_sigmoid_##SFX(T v) { return (T)1 / ((T)1 + EXP(-v)); } \
                                                                                             \
/* LSTM: writes c (row stride ldc) and h = o*tanh(c) into h1 (ld1) and, if h2, h2 (ld2). */  \
static inline void rf_lstm_gates_##SFX(int n, int H, int u0, int u1,                         \
        const T *xg, int ldx, const T *hg, int ldg, int sg, const T *bx, const T *bh,        \
        T *c, int ldc, T *h1, int ld1, T *h2, int ld2) {                                     \
    for (int j = 0; j < n; ++j) {                                                            \
        const T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;                      \
        T *cr = c + (size_t)j * ldc, *o1 = h1 + (size_t)j * ld1;                             \
        T *o2 = h2 ? h2 + (size_t)j * ld2 : o1;                                              \
        /* per-gate base pointers: plain `u` indexing vectorises (int offsets such as H + u \
         * become gathers under -fwrapv, which Python's CFLAGS carry) */                      \
        const T *x1 = xr + H, *x2 = xr + 2 * (size_t)H, *x3 = xr + 3 * (size_t)H;           \
        const T *g1 = gr + sg, *g2 = gr + 2 * (size_t)sg, *g3 = gr + 3 * (size_t)sg;        \
        const T *a1 = bx + H, *a2 = bx + 2 * (size_t)H, *a3 = bx + 3 * (size_t)H;           \
        const T *c1 = bh + H, *c2 = bh + 2 * (size_t)H, *c3 = bh + 3 * (size_t)H;           \
        RF_SIMD                                                                              \
        for (int u = u0; u < u1; ++u) {                                                      \
            T gi = xr[u] + gr[u] + bx[u] + bh[u];                                            \
            T gf = x1[u] + g1[u] + a1[u] + c1[u];                                            \
            T gg = x2[u] + g2[u] + a2[u] + c2[u];                                            \
            T go = x3[u] + g3[u] + a3[u] + c3[u];                                            \
            T i = (T)1 / ((T)1 + EXP(-gi));                                                  \
            T f = (T)1 / ((T)1 + EXP(-gf));                                                  \
            T o = (T)1 / ((T)1 + EXP(-go));                                                  \
            T cn = f * cr[u] + i * TANH(gg);                                                 \
            T hn = o * TANH(cn);                                                             \
            cr[u] = cn; o1[u] = hn; o2[u] = hn;                                              \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU, linear_before_reset=True: hp = previous h (ldp). */                                  \
static inline void rf_gru_gates_##SFX(int n, int H, int u0, int u1,                          \
        const T *xg, int ldx, const T *hg, int ldg, int sg, const T *bx, const T *bh,        \
        const T *hp, int ldp, T *h1, int ld1, T *h2, int ld2) {                              \
    for (int j = 0; j < n; ++j) {                                                            \
        const T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;                      \
        const T *pr = hp + (size_t)j * ldp;                                                  \
        T *o1 = h1 + (size_t)j * ld1, *o2 = h2 + (size_t)j * ld2;                            \
        const T *x1 = xr + H, *x2 = xr + 2 * (size_t)H, *g1 = gr + sg, *g2 = gr + 2 * (size_t)sg; \
        const T *a1 = bx + H, *a2 = bx + 2 * (size_t)H, *c1 = bh + H, *c2 = bh + 2 * (size_t)H; \
        RF_SIMD                                                                              \
        for (int u = u0; u < u1; ++u) {                                                      \
            T r = (T)1 / ((T)1 + EXP(-(xr[u] + gr[u] + bx[u] + bh[u])));                     \
            T z = (T)1 / ((T)1 + EXP(-(x1[u] + g1[u] + a1[u] + c1[u])));                     \
            T nn = TANH(x2[u] + a2[u] + r * (g2[u] + c2[u]));                                \
            T hn = nn + z * (pr[u] - nn);                                                    \
            o1[u] = hn; o2[u] = hn;                                                          \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU, linear_before_reset=False, phase 1: z into hg's z slot, r*h into rh (ldr). */        \
static inline void rf_gru_rz_##SFX(int n, int H, int u0, int u1,                             \
        const T *xg, int ldx, T *hg, int ldg, const T *bx, const T *bh,                      \
        const T *hp, int ldp, T *rh, int ldr) {                                              \
    for (int j = 0; j < n; ++j) {                                                            \
        const T *xr = xg + (size_t)j * ldx; T *gr = hg + (size_t)j * ldg;                    \
        const T *pr = hp + (size_t)j * ldp; T *rr = rh + (size_t)j * ldr;                    \
        /* per-gate base pointers (H + u offsets became gathers, as in the LSTM gates) */    \
        const T *x1 = xr + H, *a1 = bx + H, *c1 = bh + H; T *g1 = gr + H;                    \
        RF_SIMD                                                                              \
        for (int u = u0; u < u1; ++u) {                                                      \
            T r = (T)1 / ((T)1 + EXP(-(xr[u] + gr[u] + bx[u] + bh[u])));                     \
            T z = (T)1 / ((T)1 + EXP(-(x1[u] + g1[u] + a1[u] + c1[u])));                     \
            g1[u] = z; rr[u] = r * pr[u];                                                    \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* GRU, linear_before_reset=False, phase 2: hg's n slot holds (r*h) W_hn^T. */               \
static inline void rf_gru_n_##SFX(int n, int H, int u0, int u1,                              \
        const T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                \
        const T *hp, int ldp, T *h1, int ld1, T *h2, int ld2) {                              \
    for (int j = 0; j < n; ++j) {                                                            \
        const T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;                      \
        const T *pr = hp + (size_t)j * ldp;                                                  \
        T *o1 = h1 + (size_t)j * ld1, *o2 = h2 + (size_t)j * ld2;                            \
        const T *g1 = gr + H, *x2 = xr + 2 * (size_t)H, *g2 = gr + 2 * (size_t)H;           \
        const T *a2 = bx + 2 * (size_t)H, *c2 = bh + 2 * (size_t)H;                         \
        RF_SIMD                                                                              \
        for (int u = u0; u < u1; ++u) {                                                      \
            T z = g1[u];                                                                     \
            T nn = TANH(x2[u] + a2[u] + g2[u] + c2[u]);                                      \
            T hn = nn + z * (pr[u] - nn);                                                    \
            o1[u] = hn; o2[u] = hn;                                                          \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* Elman RNN: relu when relu != 0, else tanh. */                                             \
static inline void rf_rnn_gates_##SFX(int n, int relu, int u0, int u1,                      \
        const T *xg, int ldx, const T *hg, int ldg, const T *bx, const T *bh,                \
        T *h1, int ld1, T *h2, int ld2) {                                                    \
    for (int j = 0; j < n; ++j) {                                                            \
        const T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;                      \
        T *o1 = h1 + (size_t)j * ld1, *o2 = h2 + (size_t)j * ld2;                            \
        if (relu) {                                                                          \
            RF_SIMD                                                                          \
            for (int u = u0; u < u1; ++u) {                                                  \
                T a = xr[u] + gr[u] + bx[u] + bh[u];                                         \
                T hn = a < (T)0 ? (T)0 : a;      /* NaN stays NaN, as np.maximum */  \
                o1[u] = hn; o2[u] = hn;                                                      \
            }                                                                                \
        } else {                                                                             \
            RF_SIMD                                                                          \
            for (int u = u0; u < u1; ++u) {                                                  \
                T hn = TANH(xr[u] + gr[u] + bx[u] + bh[u]);                                  \
                o1[u] = hn; o2[u] = hn;                                                      \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* Copy columns [u0, u1) of n rows. */                                                       \
static inline void rf_copy_cols_##SFX(int n, int u0, int u1, const T *src, int lds,          \
        T *dst, int ldd) {                                                                   \
    for (int j = 0; j < n; ++j)                                                              \
        memcpy(dst + (size_t)j * ldd + u0, src + (size_t)j * lds + u0,                       \
               sizeof(T) * (size_t)(u1 - u0));                                               \
}

RF_DEFINE_GATES(float, f, rf_expf, rf_tanhf)
RF_DEFINE_GATES(double, d, exp, tanh)

#endif /* RF_GATES_H */
