/* Body of rf_gemm.h for one element type: included once per type with RF_T, RF_VT,
 * RF_VL and RF_FN(name) as for rf_fused_tmpl.h. */

#define RF_GNR (RF_MAXNV * RF_VL)      /* columns of a packed B panel */

/* Pack the kc x nc block of op(B) at B (tb: B stored as N x K, so element (k, j) is
 * B[j * ldb + k]) as panels P[jp][k][0:RF_GNR], columns past nc zero. */
static void RF_FN(rf_gemm_packb)(int tb, int kc, int nc, const RF_T *B, int ldb, RF_T *P) {
    const int np = (nc + RF_GNR - 1) / RF_GNR;
    for (int jp = 0; jp < np; ++jp) {
        RF_T *dst = P + (size_t)jp * kc * RF_GNR;
        const int j0 = jp * RF_GNR, nj = nc - j0 < RF_GNR ? nc - j0 : RF_GNR;
        if (!tb) {
            for (int k = 0; k < kc; ++k) {
                const RF_T *s = B + (size_t)k * ldb + j0;
                RF_T *d = dst + (size_t)k * RF_GNR;
                if (nj == RF_GNR) {
                    for (int v = 0; v < RF_MAXNV; ++v) memcpy(d + v * RF_VL, s + v * RF_VL, sizeof(RF_VT));
                } else {
                    memcpy(d, s, sizeof(RF_T) * (size_t)nj);
                    memset(d + nj, 0, sizeof(RF_T) * (size_t)(RF_GNR - nj));
                }
            }
            continue;
        }
        for (int c0 = 0; c0 < RF_GNR; c0 += RF_VL) {     /* B stored N x K: transposed tiles */
            const int nv = nj - c0 >= RF_VL ? RF_VL : (nj - c0 > 0 ? nj - c0 : 0);
            RF_FN(rf_pack_cols)(nv, kc, B + (size_t)(j0 + c0) * ldb, ldb, dst + c0, RF_GNR);
        }
    }
}

/* C[0:MR_, 0:nj] (mode 0: =, 1: = beta * C +, 2: +=) the product of MR_ rows of A
 * (TA: element (r, k) at A[k * lda + r], else A[r * lda + k]) with one packed panel. */
static inline __attribute__((always_inline)) void RF_FN(rf_gemm_blk)(const int MR_, const int TA, int kc,
        const RF_T *A, int lda, const RF_T *P, RF_T *C, int ldc, int nj, int mode, RF_T beta) {
    const int NV_ = RF_MAXNV;
    typedef RF_VT rf_acc_t;
    RF_R8(RF_ACC_DECL)
#define RF_AVAL(r) (TA ? A[(size_t)k * lda + (r)] : A[(size_t)(r) * lda + k])
    for (int k = 0; k < kc; ++k) {
        RF_LOAD_W(P + (size_t)k * RF_GNR, RF_VL)
        RF_R8(RF_ACC_FMA)
    }
#undef RF_AVAL
    if (nj == RF_GNR) {
#define RF_PUT(r, v, acc) do {                                                               \
            RF_T *cp = C + (size_t)(r) * ldc + (v) * RF_VL;                                  \
            RF_VT c_ = (acc);                                                                \
            if (mode != 0) {                                                                 \
                RF_VT old;                                                                   \
                memcpy(&old, cp, sizeof(RF_VT));                                             \
                c_ += mode == 1 ? beta * old : old;                                          \
            }                                                                                \
            memcpy(cp, &c_, sizeof(RF_VT));                                                  \
        } while (0)
        RF_R8(RF_ACC_PUT)
#undef RF_PUT
        return;
    }
    RF_T tile[RF_MR * RF_GNR] __attribute__((aligned(64)));
#define RF_PUT(r, v, acc) memcpy(tile + (r) * RF_GNR + (v) * RF_VL, &(acc), sizeof(RF_VT))
    RF_R8(RF_ACC_PUT)
#undef RF_PUT
    for (int r = 0; r < MR_; ++r) {
        RF_T *cr = C + (size_t)r * ldc;
        const RF_T *tr = tile + r * RF_GNR;
        for (int j = 0; j < nj; ++j)
            cr[j] = mode == 0 ? tr[j] : (mode == 1 ? tr[j] + beta * cr[j] : tr[j] + cr[j]);
    }
}

/* One out-of-line function per block shape: each gets a register allocation of its own
 * (inlined together into one function, GCC spilled accumulators of even the small
 * blocks under some -march tunings). */
#define RF_GEMM_SPEC(MR_, TA_)                                                                 \
static __attribute__((noinline)) void RF_FN(rf_gemm_blk_##MR_##_##TA_)(int kc, const RF_T *A, \
        int lda, const RF_T *P, RF_T *C, int ldc, int nj, int mode, RF_T beta) {              \
    RF_FN(rf_gemm_blk)(RF_CMR(MR_), TA_, kc, A, lda, P, C, ldc, nj, mode, beta);               \
}
RF_GEMM_SPEC(1, 0) RF_GEMM_SPEC(2, 0) RF_GEMM_SPEC(3, 0) RF_GEMM_SPEC(4, 0) RF_GEMM_SPEC(5, 0) RF_GEMM_SPEC(6, 0)
RF_GEMM_SPEC(1, 1) RF_GEMM_SPEC(2, 1) RF_GEMM_SPEC(3, 1) RF_GEMM_SPEC(4, 1) RF_GEMM_SPEC(5, 1) RF_GEMM_SPEC(6, 1)
#undef RF_GEMM_SPEC

static void RF_FN(rf_gemm_rows)(int mr, int ta, int kc, const RF_T *A, int lda, const RF_T *P, RF_T *C,
                                int ldc, int nj, int mode, RF_T beta) {
#define RF_GEMM_CASES(TA_)                                                                    \
    switch (mr < RF_MR ? mr : RF_MR) {                                                        \
    case 1: RF_FN(rf_gemm_blk_1_##TA_)(kc, A, lda, P, C, ldc, nj, mode, beta); break;        \
    case 2: RF_FN(rf_gemm_blk_2_##TA_)(kc, A, lda, P, C, ldc, nj, mode, beta); break;        \
    case 3: RF_FN(rf_gemm_blk_3_##TA_)(kc, A, lda, P, C, ldc, nj, mode, beta); break;        \
    case 4: RF_FN(rf_gemm_blk_4_##TA_)(kc, A, lda, P, C, ldc, nj, mode, beta); break;        \
    case 5: RF_FN(rf_gemm_blk_5_##TA_)(kc, A, lda, P, C, ldc, nj, mode, beta); break;        \
    default: RF_FN(rf_gemm_blk_6_##TA_)(kc, A, lda, P, C, ldc, nj, mode, beta); break;       \
    }
    if (ta) { RF_GEMM_CASES(1) } else { RF_GEMM_CASES(0) }
#undef RF_GEMM_CASES
}

#if RF_GEMM_HAVE_PTHREAD
static pthread_key_t RF_FN(rf_gemm_key);
static pthread_once_t RF_FN(rf_gemm_once) = PTHREAD_ONCE_INIT;
static void RF_FN(rf_gemm_make_key)(void) { (void)pthread_key_create(&RF_FN(rf_gemm_key), free); }
#endif

/* This thread's packing scratch (kept between calls, freed when the thread exits; NULL
 * if it cannot be had). */
static RF_T *RF_FN(rf_gemm_scratch)(size_t n) {
    static __thread RF_T *buf = NULL;
    static __thread size_t cap = 0;
    if (n > cap) {
        free(buf);
        size_t bytes = (n * sizeof(RF_T) + 63) / 64 * 64;
        buf = (RF_T *)aligned_alloc(64, bytes);
        cap = buf ? n : 0;
#if RF_GEMM_HAVE_PTHREAD
        (void)pthread_once(&RF_FN(rf_gemm_once), RF_FN(rf_gemm_make_key));
        (void)pthread_setspecific(RF_FN(rf_gemm_key), buf);   /* its destructor frees buf */
#endif
    }
    return buf;
}

/* C[M x N] (row stride ldc) = op(A) @ op(B) + beta * C on the calling thread.
 * ta: A is stored K x M (element (i, k) at A[k * lda + i]), else M x K; tb: B is stored
 * N x K, else K x N. With beta == 0, C is only written (it may hold garbage).
 * Returns 0, or -1 when the packing scratch cannot be allocated (nothing written). */
static int RF_FN(rf_gemm)(int ta, int tb, int M, int N, int K, const RF_T *A, int lda,
                          const RF_T *B, int ldb, RF_T beta, RF_T *C, int ldc) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < N; ++j) C[(size_t)i * ldc + j] = beta == 0 ? (RF_T)0 : beta * C[(size_t)i * ldc + j];
        return 0;
    }
    const int NC = RF_GEMM_NP * RF_GNR, MC = RF_GEMM_MC;
    /* k per block: RF_GEMM_KC, more when the B block is narrower than RF_GEMM_NP panels
     * (up to RF_GEMM_BBYTES of packed B), so that C is revisited fewer times */
    const int npw = ((N < NC ? N : NC) + RF_GNR - 1) / RF_GNR;
    int kcl = (int)(RF_GEMM_BBYTES / ((size_t)npw * RF_GNR * sizeof(RF_T)));
    kcl = kcl < RF_GEMM_KC ? RF_GEMM_KC : (kcl > RF_GEMM_KCMAX ? RF_GEMM_KCMAX : kcl);
    const int nk = (K + kcl - 1) / kcl;
    const int kcmax = (K + nk - 1) / nk;
    RF_T *P = RF_FN(rf_gemm_scratch)((size_t)kcmax * NC + (ta ? (size_t)kcmax * MC : 0));
    if (!P) return -1;
    RF_T *Ap = P + (size_t)kcmax * NC;
    for (int jc = 0; jc < N; jc += NC) {
        const int nc = N - jc < NC ? N - jc : NC;
        const int np = (nc + RF_GNR - 1) / RF_GNR;
        for (int kb = 0; kb < nk; ++kb) {
            const int k0 = (int)((long)K * kb / nk), kc = (int)((long)K * (kb + 1) / nk) - k0;
            RF_FN(rf_gemm_packb)(tb, kc, nc, tb ? B + (size_t)jc * ldb + k0 : B + (size_t)k0 * ldb + jc, ldb, P);
            const int mode = kb > 0 ? 2 : (beta == 0 ? 0 : 1);
            for (int ic = 0; ic < M; ic += MC) {
                const int mc = M - ic < MC ? M - ic : MC;
                const RF_T *Ab;
                int la;
                if (ta) {           /* k-major copy: row k holds the block's mc values of that k */
                    for (int k = 0; k < kc; ++k)
                        memcpy(Ap + (size_t)k * MC, A + (size_t)(k0 + k) * lda + ic, sizeof(RF_T) * (size_t)mc);
                    Ab = Ap;
                    la = MC;
                } else {
                    Ab = A + (size_t)ic * lda + k0;
                    la = lda;
                }
                for (int ir = 0; ir < mc; ir += RF_MR) {
                    const int mr = mc - ir < RF_MR ? mc - ir : RF_MR;
                    const RF_T *As = ta ? Ab + ir : Ab + (size_t)ir * la;
                    RF_T *Cs = C + (size_t)(ic + ir) * ldc + jc;
                    for (int jp = 0; jp < np; ++jp) {
                        const int nj = nc - jp * RF_GNR < RF_GNR ? nc - jp * RF_GNR : RF_GNR;
                        RF_FN(rf_gemm_rows)(mr, ta, kc, As, la, P + (size_t)jp * kc * RF_GNR,
                                            Cs + jp * RF_GNR, ldc, nj, mode, beta);
                    }
                }
            }
        }
    }
    return 0;
}

#undef RF_GNR
