/* Body of rf_fused.h for one element type: included once per type with
 * RF_T (element type), RF_VT (vector type), RF_VL (lanes) and RF_FN(name) (suffixed name). */

/* One vector from an aligned tile to aligned dst, bypassing the caches. */
static inline void RF_FN(rf_stream)(RF_T *dst, const RF_T *src) {
#if RF_HAVE_STREAM
    if (sizeof(RF_T) == 4) _mm512_stream_ps((float *)dst, _mm512_load_ps((const float *)src));
    else _mm512_stream_pd((double *)dst, _mm512_load_pd((const double *)src));
#else
    memcpy(dst, src, RF_VBYTES);
#endif
}

/* Transpose RF_VL vectors in place: v[i][l] becomes v[l][i] (log2(RF_VL) stages of
 * two-input shuffles, RF_VL per stage). */
static inline __attribute__((always_inline)) void RF_FN(rf_transpose)(RF_VT *v) {
#define RF_TSTAGE(B, ...) do {                                                          \
        for (int i = 0; i < RF_VL; ++i) {                                               \
            if (i & (B)) continue;                                                      \
            RF_VT a = v[i], b = v[i + (B)];                                             \
            v[i] = __builtin_shufflevector(a, b, RF_TLO##B);                            \
            v[i + (B)] = __builtin_shufflevector(a, b, RF_THI##B);                      \
        }                                                                               \
    } while (0)
#if RF_VL == 16
#define RF_TLO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define RF_THI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define RF_TLO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define RF_THI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define RF_TLO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define RF_THI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define RF_TLO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define RF_THI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
    RF_TSTAGE(1); RF_TSTAGE(2); RF_TSTAGE(4); RF_TSTAGE(8);
#elif RF_VL == 8
#define RF_TLO1 0, 8, 2, 10, 4, 12, 6, 14
#define RF_THI1 1, 9, 3, 11, 5, 13, 7, 15
#define RF_TLO2 0, 1, 8, 9, 4, 5, 12, 13
#define RF_THI2 2, 3, 10, 11, 6, 7, 14, 15
#define RF_TLO4 0, 1, 2, 3, 8, 9, 10, 11
#define RF_THI4 4, 5, 6, 7, 12, 13, 14, 15
    RF_TSTAGE(1); RF_TSTAGE(2); RF_TSTAGE(4);
#elif RF_VL == 4
#define RF_TLO1 0, 4, 2, 6
#define RF_THI1 1, 5, 3, 7
#define RF_TLO2 0, 1, 4, 5
#define RF_THI2 2, 3, 6, 7
    RF_TSTAGE(1); RF_TSTAGE(2);
#elif RF_VL == 2
#define RF_TLO1 0, 2
#define RF_THI1 1, 3
    RF_TSTAGE(1);
#else
#error "rf_transpose: unexpected vector width"
#endif
#undef RF_TLO1
#undef RF_THI1
#undef RF_TLO2
#undef RF_THI2
#undef RF_TLO4
#undef RF_THI4
#undef RF_TLO8
#undef RF_THI8
#undef RF_TSTAGE
}

/* dst[k * ldd + v] = src[v * lds + k] for k < K, v < RF_VL, rows v >= nv of src read as
 * zeros: RF_VL rows transposed into K rows of one vector, RF_VL x RF_VL tiles in registers. */
static inline void RF_FN(rf_pack_cols)(int nv, int K, const RF_T *src, size_t lds, RF_T *dst, size_t ldd) {
    const int Kv = K - K % RF_VL;
    for (int k = 0; k < Kv; k += RF_VL) {
        RF_VT t[RF_VL];
        for (int i = 0; i < RF_VL; ++i) {
            if (i < nv) memcpy(&t[i], src + (size_t)i * lds + k, sizeof(RF_VT));
            else t[i] = (RF_VT){0};
        }
        RF_FN(rf_transpose)(t);
        for (int j = 0; j < RF_VL; ++j) memcpy(dst + (size_t)(k + j) * ldd, &t[j], sizeof(RF_VT));
    }
    for (int k = Kv; k < K; ++k)
        for (int v = 0; v < RF_VL; ++v)
            dst[(size_t)k * ldd + v] = v < nv ? src[(size_t)v * lds + k] : (RF_T)0;
}

/* Pack panels [p0, p1) of W (G*H x K, gate-major rows) as P[p][k][g*UP + v] (units past
 * H are zeros). */
static inline void RF_FN(rf_pack)(int G, int H, int K, int p0, int p1, const RF_T *W, RF_T *P) {
    const int UP = rf_panel_units(G, sizeof(RF_T) == 8), PW = G * UP;
    for (int p = p0; p < p1; ++p) {
        RF_T *dst = P + (size_t)p * K * PW;
        for (int g = 0; g < G; ++g) {
            for (int v0 = 0; v0 < UP; v0 += RF_VL) {
                const int u0 = p * UP + v0;
                const int nv = H - u0 < RF_VL ? (H - u0 > 0 ? H - u0 : 0) : RF_VL;
                RF_FN(rf_pack_cols)(nv, K, W + (size_t)(g * H + u0) * K, K, dst + g * UP + v0, PW);
            }
        }
    }
}

/* out[r][0:NV_*VL] (row stride RF_MAXNV*VL) = A[r, :K] @ panel for r < MR_. While it
 * runs, the first npf cache lines at pf are prefetched into L2, one per k. */
static inline __attribute__((always_inline)) void RF_FN(rf_mk_body)(const int MR_, const int NV_,
        int K, const RF_T *A, int lda, const RF_T *P, RF_T *out, const RF_T *pf, int npf) {
    typedef RF_VT rf_acc_t;
    RF_R8(RF_ACC_DECL)
    int k = 0;
    if (npf > K) npf = K;
#define RF_AVAL(r) A[(size_t)(r) * lda + k]
#define RF_MK_ITER { RF_LOAD_W(P + (size_t)k * NV_ * RF_VL, RF_VL) RF_R8(RF_ACC_FMA) }
    for (; k < npf; ++k) {
        __builtin_prefetch(pf + (size_t)k * (64 / sizeof(RF_T)), 0, 2);
        RF_MK_ITER
    }
    for (; k < K; ++k) RF_MK_ITER
#undef RF_MK_ITER
#undef RF_AVAL
#define RF_PUT(r, v, acc) memcpy(out + (r) * RF_MAXNV * RF_VL + (v) * RF_VL, &(acc), sizeof(RF_VT))
    RF_R8(RF_ACC_PUT)
#undef RF_PUT
}

/* One out-of-line function per block shape, each with a register allocation of its own
 * (see rf_gemm_tmpl.h). */
#define RF_MK_SPEC(MR_, NV_)                                                                    \
static __attribute__((noinline)) void RF_FN(rf_mk_##MR_##_##NV_)(int K, const RF_T *A, int lda, \
        const RF_T *P, RF_T *out, const RF_T *pf, int npf) {                                    \
    RF_FN(rf_mk_body)(RF_CMR(MR_), NV_, K, A, lda, P, out, pf, npf);                            \
}
RF_MK_SPEC(1, 3) RF_MK_SPEC(2, 3) RF_MK_SPEC(3, 3) RF_MK_SPEC(4, 3) RF_MK_SPEC(5, 3) RF_MK_SPEC(6, 3)
RF_MK_SPEC(1, 4) RF_MK_SPEC(2, 4) RF_MK_SPEC(3, 4) RF_MK_SPEC(4, 4) RF_MK_SPEC(5, 4) RF_MK_SPEC(6, 4)
#undef RF_MK_SPEC

/* out[r][0:nv*VL] (row stride RF_MAXNV*VL) = A[r, :K] @ panel, r < mr <= RF_MR. */
static inline void RF_FN(rf_mk)(int mr, int nv, int K, const RF_T *A, int lda, const RF_T *P, RF_T *out,
                                const RF_T *pf, int npf) {
#define RF_MK_CASES(NV)                                                                 \
    switch (mr < RF_MR ? mr : RF_MR) {                                                  \
    case 1: RF_FN(rf_mk_1_##NV)(K, A, lda, P, out, pf, npf); break;                     \
    case 2: RF_FN(rf_mk_2_##NV)(K, A, lda, P, out, pf, npf); break;                     \
    case 3: RF_FN(rf_mk_3_##NV)(K, A, lda, P, out, pf, npf); break;                     \
    case 4: RF_FN(rf_mk_4_##NV)(K, A, lda, P, out, pf, npf); break;                     \
    case 5: RF_FN(rf_mk_5_##NV)(K, A, lda, P, out, pf, npf); break;                     \
    default: RF_FN(rf_mk_6_##NV)(K, A, lda, P, out, pf, npf); break;                    \
    }
    if (nv == 4) { RF_MK_CASES(4) } else { RF_MK_CASES(3) }
#undef RF_MK_CASES
}

/* Vectors v0 .. v0+NVH_-1 of a panel of NV vectors: out[r][v0*VL : (v0+NVH_)*VL] (row
 * stride RF_MAXNV*VL) = A[r, :K] @ those vectors, for r < MR_ <= RF_MRH, NVH_ <= 3:
 * 7-8 rows in one block (each weight line read once per step; 2 x 8 or 3 x 8
 * accumulators) where rf_mk's row blocks take 5 + 2 or 6 + 2. While it runs, the first
 * npf cache lines at pf (at most K: one per k, as rf_mk) are prefetched into L2; all of
 * a GRU or LSTM panel's lines, two or three per k, made steps slower (commit c847a15;
 * figures in docs/performance.md). */
static inline __attribute__((always_inline)) void RF_FN(rf_mkh_body)(const int MR_, const int NVH_,
        int NV, int v0, int K, const RF_T *A, int lda, const RF_T *P, RF_T *out, const RF_T *pf, int npf) {
    const int NV_ = NVH_;
    typedef RF_VT rf_acc_t;
    RF_R8(RF_ACC_DECL)
    const RF_T *Pv = P + v0 * RF_VL;
    int k = 0;
    if (npf > K) npf = K;
#define RF_AVAL(r) A[(size_t)(r) * lda + k]
#define RF_MKH_ITER { RF_LOAD_W(Pv + (size_t)k * NV * RF_VL, RF_VL) RF_R8(RF_ACC_FMA) }
    for (; k < npf; ++k) {
        __builtin_prefetch(pf + (size_t)k * (64 / sizeof(RF_T)), 0, 2);
        RF_MKH_ITER
    }
    for (; k < K; ++k) RF_MKH_ITER
#undef RF_MKH_ITER
#undef RF_AVAL
#define RF_PUT(r, v, acc) memcpy(out + (r) * RF_MAXNV * RF_VL + (v0 + (v)) * RF_VL, &(acc), sizeof(RF_VT))
    RF_R8(RF_ACC_PUT)
#undef RF_PUT
}

#define RF_MKH_SPEC(MR_, NVH_, NV_)                                                             \
static __attribute__((noinline)) void RF_FN(rf_mkh_##MR_##_##NVH_)(int v0, int K, const RF_T *A, \
        int lda, const RF_T *P, RF_T *out, const RF_T *pf, int npf) {                            \
    RF_FN(rf_mkh_body)(MR_, NVH_, NV_, v0, K, A, lda, P, out, pf, npf);                          \
}
#if RF_HALF_PANELS
RF_MKH_SPEC(7, 2, 4) RF_MKH_SPEC(8, 2, 4) RF_MKH_SPEC(7, 3, 3) RF_MKH_SPEC(8, 3, 3)
#endif
#undef RF_MKH_SPEC

/* Rows [0, mr) (7 or 8) of a whole panel into the tile: a panel of 4 vectors in two
 * halves (the first prefetching from the npf1 lines at pf, the second from the npf - npf1
 * after them), of 3 in one pass (from the npf lines at pf). */
static inline __attribute__((always_inline)) void RF_FN(rf_mkh)(int mr, int NV, int K, const RF_T *A, int lda, const RF_T *P, RF_T *out,
                                 const RF_T *pf, int npf1, int npf) {
#if RF_HALF_PANELS
#define RF_MKH_HALVES(MR)                                                               \
    if (NV == 4) {                                                                      \
        RF_FN(rf_mkh_##MR##_2)(0, K, A, lda, P, out, pf, npf1);                         \
        RF_FN(rf_mkh_##MR##_2)(2, K, A, lda, P, out, pf + (size_t)npf1 * (64 / sizeof(RF_T)), \
                               npf - npf1);                                             \
    } else {                                                                            \
        RF_FN(rf_mkh_##MR##_3)(0, K, A, lda, P, out, pf, npf);                          \
    }
    if (mr == 8) { RF_MKH_HALVES(8) } else { RF_MKH_HALVES(7) }
#undef RF_MKH_HALVES
#else
    (void)mr; (void)NV; (void)K; (void)A; (void)lda; (void)P; (void)out; (void)pf; (void)npf1; (void)npf;
#endif
}

/* C[r, g*H + u] = A[r, :K] . W[g*H + u, :K] for rows [0, n) and the units of panels
 * [p0, p1) (W packed by rf_pack): the input projection of many rows at once. Rows go
 * in chunks whose A block stays in L2 while every panel passes over it. */
static inline void RF_FN(rf_gemm_panels)(int G, int H, int K, int n, int p0, int p1,
        const RF_T *A, int lda, const RF_T *P, RF_T *C, int ldc) {
    const int UP = rf_panel_units(G, sizeof(RF_T) == 8), PW = G * UP, NV = PW / RF_VL;
    const int TS = RF_MAXNV * RF_VL;
    RF_T tile[RF_MR * RF_MAXNV * RF_VL] __attribute__((aligned(64)));
    int mc = (int)((1024 * 1024) / ((size_t)(K > 0 ? K : 1) * sizeof(RF_T)));     /* ~1 MB of A rows (measured: 256 KB re-reads the panels too often) */
    mc = mc < RF_MR ? RF_MR : mc - mc % RF_MR;
    /* a large output goes to memory with streaming stores (no read for ownership, and
     * it does not evict the A block and the panels); it needs whole aligned vectors */
    const int nt = RF_HAVE_STREAM && UP * G == NV * RF_VL && UP % RF_VL == 0
        && (size_t)n * ldc * sizeof(RF_T) >= RF_STREAM_MIN_BYTES
        && ((uintptr_t)C % RF_VBYTES) == 0 && ((size_t)ldc * sizeof(RF_T)) % RF_VBYTES == 0
        && ((size_t)H * sizeof(RF_T)) % RF_VBYTES == 0;
    for (int c0 = 0; c0 < n; c0 += mc) {
        int c1 = c0 + mc < n ? c0 + mc : n;
        for (int p = p0; p < p1; ++p) {
            const RF_T *Pp = P + (size_t)p * K * PW;
            int ua = p * UP, nu = (ua + UP < H ? ua + UP : H) - ua;
            for (int r0 = c0; r0 < c1; r0 += RF_MR) {
                int mr = c1 - r0 < RF_MR ? c1 - r0 : RF_MR;
                RF_FN(rf_mk)(mr, NV, K, A + (size_t)r0 * lda, lda, Pp, tile, NULL, 0);
                if (nt && nu == UP) {
                    for (int r = 0; r < mr; ++r)
                        for (int g = 0; g < G; ++g)
                            for (int v = 0; v < UP; v += RF_VL)
                                RF_FN(rf_stream)(C + (size_t)(r0 + r) * ldc + g * H + ua + v,
                                                 tile + r * TS + g * UP + v);
                    continue;
                }
                if (nu == UP) {     /* whole vectors (a runtime-size memcpy is a scalar loop) */
                    for (int r = 0; r < mr; ++r)
                        for (int g = 0; g < G; ++g)
                            for (int v = 0; v < UP; v += RF_VL)
                                memcpy(C + (size_t)(r0 + r) * ldc + g * H + ua + v, tile + r * TS + g * UP + v,
                                       sizeof(RF_VT));
                } else {
                    for (int r = 0; r < mr; ++r)
                        for (int g = 0; g < G; ++g)
                            memcpy(C + (size_t)(r0 + r) * ldc + g * H + ua, tile + r * TS + g * UP,
                                   sizeof(RF_T) * (size_t)nu);
                }
            }
        }
    }
#if RF_HAVE_STREAM
    if (nt) _mm_sfence();     /* order the streaming stores before whatever reads C next */
#endif
}

/* One step for panels [p0, p1) and rows [0, n): recurrent product + gates.
 * code: 0/1 LSTM (h written to h1 (ld1) and h2 (ld2, may be NULL)), 2 GRU (lbr),
 * 4/5 RNN tanh/relu. xg: this step's input projections (row stride ldx = G*H);
 * hp: previous h (ldp), also the GEMM input (K = its width); c: cell state (ldc).
 * While a panel is used, the next one (after the last: the slice's first, for the next
 * step) is prefetched into L2, so weights that do not stay in L2 arrive on time.
 * xn (or NULL): the next step's input projections (same layout as xg), of nn rows; the
 * lines of its rows and this item's units are prefetched into L2 after each block. A projection buffer of 16 MB
 * or more is written with streaming stores (rf_gemm_panels), so without it each step's
 * gate math waited on DRAM for scattered lines; a smaller buffer, still in L3, gains
 * nothing from it (commit 6129ca5; figures in docs/performance.md). */
static inline void RF_FN(rf_fused_step_v)(const rf_var_t *v, const RF_T *ph, int code, int G, int H, int K,
        int n, int p0, int p1,
        const RF_T *P, const RF_T *xg, int ldx, const RF_T *xn, int nn, const RF_T *bx, const RF_T *bh,
        const RF_T *hp, int ldp, RF_T *c, int ldc, RF_T *h1, int ld1, RF_T *h2, int ld2) {
    const int UP = rf_panel_units(G, sizeof(RF_T) == 8), PW = G * UP, NV = PW / RF_VL;
    RF_T tile[RF_MRH * RF_MAXNV * RF_VL] __attribute__((aligned(64)));
    const int TS = RF_MAXNV * RF_VL;
    /* 7-8 float rows: one block of rows (rf_mkh: 4-vector panels in two halves) */
    const int half = RF_HALF_PANELS && sizeof(RF_T) == 4 && n >= RF_MRH - 1 && n <= RF_MRH;
    const int nblk = half ? 1 : (n + RF_MR - 1) / RF_MR;
    const size_t lines = ((size_t)K * PW * sizeof(RF_T)) / 64;
    /* prefetch only when this slice of the weights cannot stay in L2 between steps */
    const int pfon = (size_t)(p1 - p0) * K * PW * sizeof(RF_T) > RF_L2_KEEP_BYTES;
    for (int p = p0; p < p1; ++p) {
        const RF_T *Pp = P + (size_t)p * K * PW;
        const RF_T *nxt = P + (size_t)(p + 1 < p1 ? p + 1 : p0) * K * PW;
        int ua = p * UP, ub = ua + UP < H ? ua + UP : H;
        for (int b = 0; b < nblk; ++b) {
            int r0 = half ? 0 : rf_row_block(n, b), r1 = half ? n : rf_row_block(n, b + 1);
            if (half) {
                RF_FN(rf_mkh)(n, NV, K, hp, ldp, Pp, tile, nxt, pfon ? (int)(lines / 2) : 0,
                              pfon ? (int)lines : 0);
            } else {
                const size_t l0 = lines * b / nblk, l1 = lines * (b + 1) / nblk;
                RF_FN(rf_mk)(r1 - r0, NV, K, hp + (size_t)r0 * ldp, ldp, Pp, tile,
                             nxt + l0 * (64 / sizeof(RF_T)), pfon ? (int)(l1 - l0) : 0);
            }
            if (xn) {   /* the next step's projections of these rows (the last block: also
                         * the rows past n that a growing batch adds) and units, into L2 */
                const int ra = r0, rb = b == nblk - 1 ? (nn > r1 ? nn : r1) : (nn < r1 ? nn : r1);
                for (int r = ra; r < rb; ++r)
                    for (int g = 0; g < G; ++g) {
                        const char *a = (const char *)(xn + (size_t)r * ldx + (size_t)g * H + ua);
                        const char *e = a + (size_t)(ub - ua) * sizeof(RF_T) - 1;
                        for (; a < e; a += 64) __builtin_prefetch(a, 0, 2);
                        __builtin_prefetch(e, 0, 2);
                    }
            }
            {   /* gate math of rf_gates.h on the tile: gate stride UP, row stride TS */
                const RF_T *t = tile - ua;
                const RF_T *xr = xg + (size_t)r0 * ldx;
                RF_T *o1 = h1 + (size_t)r0 * ld1, *o2 = h2 ? h2 + (size_t)r0 * ld2 : NULL;
                if (code <= RF_LSTM_PROJ)
                    RF_FN(rf_lstm_gates_v)(v, ph, r1 - r0, H, ua, ub, xr, ldx, t, TS, UP, bx, bh,
                                           c + (size_t)r0 * ldc, ldc, o1, ld1, o2, ld2);
                else if (code == RF_GRU_LBR)
                    RF_FN(rf_gru_gates_v)(v, r1 - r0, H, ua, ub, xr, ldx, t, TS, UP, bx, bh,
                                          hp + (size_t)r0 * ldp, ldp, o1, ld1, o2, ld2);
                else
                    RF_FN(rf_rnn_gates_v)(v, r1 - r0, code == RF_RNN_RELU, ua, ub, xr, ldx, t, TS, bx, bh,
                                          o1, ld1, o2, ld2);
            }
        }
    }
}

/* rf_fused_step_v of the standard cells (v == NULL folds the variant branches away) */
static inline void RF_FN(rf_fused_step)(int code, int G, int H, int K, int n, int p0, int p1,
        const RF_T *P, const RF_T *xg, int ldx, const RF_T *xn, int nn, const RF_T *bx, const RF_T *bh,
        const RF_T *hp, int ldp, RF_T *c, int ldc, RF_T *h1, int ld1, RF_T *h2, int ld2) {
    RF_FN(rf_fused_step_v)(NULL, NULL, code, G, H, K, n, p0, p1, P, xg, ldx, xn, nn, bx, bh, hp, ldp,
                           c, ldc, h1, ld1, h2, ld2);
}

/* Stage s of the lane-sum tree (rf_reduce_lanes, rf_rowdot1): two vectors of partial
 * sums into one, each lane the sum of a pair of adjacent blocks of VL >> s lanes. */
#if RF_VL == 16
static inline RF_VT RF_FN(rf_red1)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
         + __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline RF_VT RF_FN(rf_red2)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
         + __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
static inline RF_VT RF_FN(rf_red3)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
         + __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
static inline RF_VT RF_FN(rf_red4)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#elif RF_VL == 8
static inline RF_VT RF_FN(rf_red1)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
static inline RF_VT RF_FN(rf_red2)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13)
         + __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
}
static inline RF_VT RF_FN(rf_red3)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14)
         + __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
}
#elif RF_VL == 4
static inline RF_VT RF_FN(rf_red1)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 1, 4, 5)
         + __builtin_shufflevector(a, b, 2, 3, 6, 7);
}
static inline RF_VT RF_FN(rf_red2)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6)
         + __builtin_shufflevector(a, b, 1, 3, 5, 7);
}
#elif RF_VL == 2
static inline RF_VT RF_FN(rf_red1)(RF_VT a, RF_VT b) {
    return __builtin_shufflevector(a, b, 0, 2)
         + __builtin_shufflevector(a, b, 1, 3);
}
#endif

/* (stages a narrower vector does not have: never called, defined so that code written
 * for every width compiles) */
#if RF_VL < 4
static inline RF_VT RF_FN(rf_red2)(RF_VT a, RF_VT b) { return a + b; }
#endif
#if RF_VL < 8
static inline RF_VT RF_FN(rf_red3)(RF_VT a, RF_VT b) { return a + b; }
#endif
#if RF_VL < 16
static inline RF_VT RF_FN(rf_red4)(RF_VT a, RF_VT b) { return a + b; }
#endif

/* Sum of each of RF_VL vectors: lane l of the result = sum of the lanes of v[l]
 * (a transposing tree of shuffles and adds: RF_VL - 1 of each for RF_VL sums). */
static inline RF_VT RF_FN(rf_reduce_lanes)(RF_VT *v) {
    for (int i = 0; i < RF_VL / 2; ++i) v[i] = RF_FN(rf_red1)(v[2 * i], v[2 * i + 1]);
#if RF_VL >= 4
    for (int i = 0; i < RF_VL / 4; ++i) v[i] = RF_FN(rf_red2)(v[2 * i], v[2 * i + 1]);
#endif
#if RF_VL >= 8
    for (int i = 0; i < RF_VL / 8; ++i) v[i] = RF_FN(rf_red3)(v[2 * i], v[2 * i + 1]);
#endif
#if RF_VL >= 16
    v[0] = RF_FN(rf_red4)(v[0], v[1]);
#endif
    return v[0];
}

#if defined(__AVX2__) && !defined(__AVX512F__) && RF_VBYTES == 32
/* AVX2's lane mask of the first n elements (all bits set in lanes < n) */
static inline __m256i RF_FN(rf_head_mask)(int n) {
#ifdef RF_FLOAT_BODY
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#else
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
#endif
}
#endif

/* The first n < RF_VL elements at p, zeros after them (nothing past p + n is read):
 * masked loads where the ISA has them (a memcpy of n elements is a library call, around
 * which every live vector register is saved to the stack). */
static inline RF_VT RF_FN(rf_load_head)(const RF_T *p, int n) {
#if defined(__AVX512F__) && defined(RF_FLOAT_BODY)
    return (RF_VT)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#elif defined(__AVX512F__)
    return (RF_VT)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1u), p);
#elif defined(__AVX2__) && RF_VBYTES == 32 && defined(RF_FLOAT_BODY)
    return (RF_VT)_mm256_maskload_ps(p, RF_FN(rf_head_mask)(n));
#elif defined(__AVX2__) && RF_VBYTES == 32
    return (RF_VT)_mm256_maskload_pd(p, RF_FN(rf_head_mask)(n));
#else
    RF_VT v = {0};
    for (int i = 0; i < n; ++i) v[i] = p[i];
    return v;
#endif
}

/* Store the first n <= RF_VL lanes of v at p (nothing past p + n is written). */
static inline void RF_FN(rf_store_head)(RF_T *p, RF_VT v, int n) {
#if defined(__AVX512F__) && defined(RF_FLOAT_BODY)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#elif defined(__AVX512F__)
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1u), (__m512d)v);
#elif defined(__AVX2__) && RF_VBYTES == 32 && defined(RF_FLOAT_BODY)
    _mm256_maskstore_ps(p, RF_FN(rf_head_mask)(n), (__m256)v);
#elif defined(__AVX2__) && RF_VBYTES == 32
    _mm256_maskstore_pd(p, RF_FN(rf_head_mask)(n), (__m256d)v);
#else
    for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}

/* NJ input rows x NR weight rows of rf_rowdot, K in steps of NC vectors
 * (NJ * NR * NC <= RF_VL accumulators; the sums of the NC chunks enter one tree). */
static inline RF_VT RF_FN(rf_ldv)(const RF_T *p) {
    RF_VT v;
    memcpy(&v, p, sizeof(RF_VT));
    return v;
}

static inline __attribute__((always_inline)) void RF_FN(rf_rowdot_blk)(const int NJ, const int NR, const int NC,
        int nj, int nr, int K, const RF_T *A, int lda, const RF_T *W, int ldw, RF_T *C, int ldc) {
    const int KS = NC * RF_VL, Kv = K - K % KS, NL = NJ * NR * NC;
    const RF_T *a[4], *w[RF_VL];
    for (int q = 0; q < NJ; ++q) a[q] = A + (size_t)(q < nj ? q : 0) * lda;     /* pad: repeat row 0 */
    for (int i = 0; i < NR; ++i) w[i] = W + (size_t)(i < nr ? i : 0) * ldw;
    /* accumulator l (named: see RF_ACC_DECL) sums input row q = l / (NR*NC) times weight
     * row i = l / NC % NR over chunk c = l % NC of each step of KS */
#define RF_RD_DECL(l) RF_VT acc##l __attribute__((unused)) = {0};
#define RF_RD_Q(l) ((l) / (NR * NC))
#define RF_RD_I(l) ((l) / NC % NR)
#define RF_RD_C(l) ((l) % NC)
#define RF_RD16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
    RF_RD16(RF_RD_DECL)
#define RF_RD_FMA(l) if ((l) < NL) acc##l += RF_FN(rf_ldv)(a[RF_RD_Q(l)] + k + RF_RD_C(l) * RF_VL) \
                                          * RF_FN(rf_ldv)(w[RF_RD_I(l)] + k + RF_RD_C(l) * RF_VL);
    for (int k = 0; k < Kv; k += KS) { RF_RD16(RF_RD_FMA) }
#undef RF_RD_FMA
    int kt = Kv;       /* whole vectors left over (K below NC vectors, or not a multiple of them) */
#define RF_RD_FMA1(l) if ((l) < NL && RF_RD_C(l) == 0)                                        \
        acc##l += RF_FN(rf_ldv)(a[RF_RD_Q(l)] + kt) * RF_FN(rf_ldv)(w[RF_RD_I(l)] + kt);
    for (; kt + RF_VL <= K; kt += RF_VL) { RF_RD16(RF_RD_FMA1) }
#undef RF_RD_FMA1
    if (kt < K) {      /* the last K % RF_VL elements, as one vector padded with zeros */
#define RF_RD_FMAT(l) if ((l) < NL && RF_RD_C(l) == 0)                                        \
        acc##l += RF_FN(rf_load_head)(a[RF_RD_Q(l)] + kt, K - kt) * RF_FN(rf_load_head)(w[RF_RD_I(l)] + kt, K - kt);
        RF_RD16(RF_RD_FMAT)
#undef RF_RD_FMAT
    }
    RF_VT red[RF_VL];
    for (int l = 0; l < RF_VL; ++l) red[l] = (RF_VT){0};
#define RF_RD_RED(l) if ((l) < NL && (l) / NC < RF_VL) {                                      \
        if (RF_RD_C(l) == 0) red[(l) / NC] = acc##l; else red[(l) / NC] += acc##l; }
    RF_RD16(RF_RD_RED)
#undef RF_RD_RED
#undef RF_RD_DECL
#undef RF_RD_Q
#undef RF_RD_I
#undef RF_RD_C
#undef RF_RD16
    RF_VT s = RF_FN(rf_reduce_lanes)(red);
    RF_T out[RF_VL];
    memcpy(out, &s, sizeof(RF_VT));
    for (int q = 0; q < nj; ++q)
        for (int i = 0; i < nr; ++i) C[(size_t)q * ldc + i] = out[q * NR + i];
}

/* One weight row of rf_rowdot1: the vector of partial sums of a[:K] . w[:K] (two
 * chains s0, s1 added at the end), `a` in registers (xv, NKV >= 0) or read from memory. */
static inline __attribute__((always_inline)) RF_VT RF_FN(rf_rowdot1_row)(const int NKV, int K, int kt,
        const RF_VT *xv, RF_VT xt, const RF_T *a, const RF_T *w) {
    const int KS = 2 * RF_VL;
    RF_VT s0 = {0}, s1 = {0};
    if (NKV >= 0) {
        for (int c = 0; c < NKV; c += 2) {
            s0 += xv[c] * RF_FN(rf_ldv)(w + c * RF_VL);
            if (c + 1 < NKV) s1 += xv[c + 1] * RF_FN(rf_ldv)(w + (c + 1) * RF_VL);
        }
    } else {
        const int Kv = K - K % KS;
        for (int k = 0; k < Kv; k += KS) {
            s0 += RF_FN(rf_ldv)(a + k) * RF_FN(rf_ldv)(w + k);
            s1 += RF_FN(rf_ldv)(a + k + RF_VL) * RF_FN(rf_ldv)(w + k + RF_VL);
        }
        if (Kv < kt) s0 += RF_FN(rf_ldv)(a + Kv) * RF_FN(rf_ldv)(w + Kv);
    }
    if (kt < K) s0 += xt * RF_FN(rf_load_head)(w + kt, K - kt);
    return s0 + s1;
}

/* rf_rowdot1_segs' body: NKV (a constant, <= 16) whole vectors of `a` held in
 * registers, or NKV < 0: `a` read from memory with each row (any K). */
static inline __attribute__((always_inline)) void RF_FN(rf_rowdot1_body)(const int NKV, int nseg, int m, int K,
        const RF_T *a, const RF_T *W0, int ldw, size_t wseg, RF_T *C0, size_t cseg, int rev) {
    const int ng = (m + RF_VL - 1) / RF_VL;
    const int kt = (NKV >= 0 ? NKV : K / RF_VL) * RF_VL;    /* the masked tail starts here */
    RF_VT xv[16], xt = {0};
    for (int c = 0; c < NKV; ++c) memcpy(&xv[c], a + c * RF_VL, sizeof(RF_VT));
    if (kt < K) xt = RF_FN(rf_load_head)(a + kt, K - kt);
    for (int gi = 0; gi < ng * nseg; ++gi) {
        const int q = rev ? ng * nseg - 1 - gi : gi, sg = q / ng, g = q % ng, r0 = g * RF_VL;
        const RF_T *W = W0 + (size_t)sg * wseg;
        RF_T *C = C0 + (size_t)sg * cseg;
        const int nr = m - r0 < RF_VL ? m - r0 : RF_VL;
        /* the lane-sum tree of rf_reduce_lanes, fed one row at a time: a pending partial
         * sum per stage (q1..q4) instead of RF_VL rows kept for the end (the same sums in
         * the same order; held in an array, they went through the stack) */
        RF_VT q1 = {0}, q2 __attribute__((unused)) = {0}, q3 __attribute__((unused)) = {0},
              q4 __attribute__((unused)) = {0}, s = {0};
#define RF_R1_PUSH                                                                     \
            if (!(r & 1)) { q1 = x; continue; }                                        \
            x = RF_FN(rf_red1)(q1, x);                                                 \
            if (RF_VL >= 4) {                                                          \
                if (!(r & 2)) { q2 = x; continue; }                                    \
                x = RF_FN(rf_red2)(q2, x);                                             \
            }                                                                          \
            if (RF_VL >= 8) {                                                          \
                if (!(r & 4)) { q3 = x; continue; }                                    \
                x = RF_FN(rf_red3)(q3, x);                                             \
            }                                                                          \
            if (RF_VL >= 16) {                                                         \
                if (!(r & 8)) { q4 = x; continue; }                                    \
                x = RF_FN(rf_red4)(q4, x);                                             \
            }                                                                          \
            s = x;
        if (nr == RF_VL) {      /* whole groups: unrolled, the tree's branches resolved */
#pragma GCC unroll 16
            for (int r = 0; r < RF_VL; ++r) {
                RF_VT x = RF_FN(rf_rowdot1_row)(NKV, K, kt, xv, xt, a, W + (size_t)(r0 + r) * ldw);
                RF_R1_PUSH
            }
        } else {
#pragma GCC unroll 2
            for (int r = 0; r < RF_VL; ++r) {
                RF_VT x = {0};
                if (r < nr) x = RF_FN(rf_rowdot1_row)(NKV, K, kt, xv, xt, a, W + (size_t)(r0 + r) * ldw);
                RF_R1_PUSH
            }
        }
#undef RF_R1_PUSH
        if (nr == RF_VL) memcpy(C + r0, &s, sizeof(RF_VT));
        else RF_FN(rf_store_head)(C + r0, s, nr);
    }
}

/* C[r] = a[:K] . W[r, :K] for r < m, one input row. The weight rows are read one after
 * another: a single sequential stream, which the prefetchers follow, against the eight
 * interleaved row streams of rf_rowdot_blk. Each row's two partial sums stay in a
 * vector; RF_VL rows are reduced by one tree: the same sums, in the same order, as
 * rf_rowdot_blk(1, ., 2). `a` stays in registers for up to 16 whole vectors (an even
 * count), else it is read with each row.
 * `rev` takes the groups of RF_VL rows from the last to the first. A caller that reads
 * more than its L2 holds and takes every other call in reverse finds the lines it read
 * last still cached, where LRU would otherwise evict each line just before it is read
 * again. The single stream beats rf_rowdot_blk's eight, and alternating beats forward,
 * both for weights within L2 and past it (commit a8335f0; figures in docs/performance.md).
 * rf_rowdot1_segs: nseg such products of m rows each, segment s at W + s * wseg and
 * C + s * cseg (the gates of a slice of units), in one pass with `a` loaded once; rev
 * takes the segments last to first too. */
/* one out-of-line function per register-held length (see rf_gemm_tmpl.h) */
#define RF_R1_SPEC(N)                                                                           \
static __attribute__((noinline)) void RF_FN(rf_rowdot1_##N)(int nseg, int m, int K, const RF_T *a, \
        const RF_T *W, int ldw, size_t wseg, RF_T *C, size_t cseg, int rev) {                   \
    RF_FN(rf_rowdot1_body)((N) <= RF_R1_MAXV ? (N) : -1, nseg, m, K, a, W, ldw, wseg, C, cseg, rev); \
}
RF_R1_SPEC(2) RF_R1_SPEC(4) RF_R1_SPEC(6) RF_R1_SPEC(8) RF_R1_SPEC(10) RF_R1_SPEC(12) RF_R1_SPEC(14)
RF_R1_SPEC(16)
static __attribute__((noinline)) void RF_FN(rf_rowdot1_any)(int nseg, int m, int K, const RF_T *a,
        const RF_T *W, int ldw, size_t wseg, RF_T *C, size_t cseg, int rev) {
    RF_FN(rf_rowdot1_body)(-1, nseg, m, K, a, W, ldw, wseg, C, cseg, rev);
}
#undef RF_R1_SPEC

static inline void RF_FN(rf_rowdot1_segs)(int nseg, int m, int K, const RF_T *a, const RF_T *W, int ldw,
                                          size_t wseg, RF_T *C, size_t cseg, int rev) {
    switch (K / RF_VL) {
#define RF_R1(N) case N: RF_FN(rf_rowdot1_##N)(nseg, m, K, a, W, ldw, wseg, C, cseg, rev); break;
    RF_R1(2) RF_R1(4) RF_R1(6) RF_R1(8) RF_R1(10) RF_R1(12) RF_R1(14) RF_R1(16)
#undef RF_R1
    default: RF_FN(rf_rowdot1_any)(nseg, m, K, a, W, ldw, wseg, C, cseg, rev);
    }
}

static inline void RF_FN(rf_rowdot1)(int m, int K, const RF_T *a, const RF_T *W, int ldw, RF_T *C, int rev) {
    RF_FN(rf_rowdot1_segs)(1, m, K, a, W, ldw, 0, C, 0, rev);
}

/* rf_rowdot's blocks of 2 and 4 input rows, out of line (see rf_gemm_tmpl.h) */
#if RF_VL == 16
#define RF_RD2 2, 4, 2
#define RF_RD4 4, 4, 1
#elif RF_VL == 8
#define RF_RD2 2, 4, 1
#define RF_RD4 4, 2, 1
#else
#define RF_RD2 2, RF_VL / 2, 1
#define RF_RD4 2, RF_VL / 2, 1
#endif
static __attribute__((noinline)) void RF_FN(rf_rowdot_blk2)(int nj, int nr, int K, const RF_T *A, int lda,
        const RF_T *W, int ldw, RF_T *C, int ldc) {
    RF_FN(rf_rowdot_blk)(RF_RD2, nj, nr, K, A, lda, W, ldw, C, ldc);
}
static __attribute__((noinline)) void RF_FN(rf_rowdot_blk4)(int nj, int nr, int K, const RF_T *A, int lda,
        const RF_T *W, int ldw, RF_T *C, int ldc) {
    RF_FN(rf_rowdot_blk)(RF_RD4, nj, nr, K, A, lda, W, ldw, C, ldc);
}
#undef RF_RD2
#undef RF_RD4

/* C[j, r] (row stride ldc) = A[j, :K] . W[r, :K] for j < n, r < m: a product with a
 * few rows straight from row-major weights (no packing, so it suits single steps):
 * blocks of NJ input rows x NR weight rows, one horizontal-sum tree per block. */
static inline void RF_FN(rf_rowdot)(int n, int m, int K, const RF_T *A, int lda,
                                    const RF_T *W, int ldw, RF_T *C, int ldc) {
    if (n == 1) {           /* one row: the sequential stream of rf_rowdot1 */
        RF_FN(rf_rowdot1)(m, K, A, W, ldw, C, 0);
        return;
    }
    /* a block's NJ * NR sums fill at most one vector's lanes */
    const int NJ = n == 2 || RF_VL < 8 ? 2 : 4;
    const int NR = RF_VL == 16 ? 4 : (RF_VL == 8 ? (NJ == 4 ? 2 : 4) : RF_VL / 2);
    for (int j0 = 0; j0 < n; j0 += NJ) {
        int nj = n - j0 < NJ ? n - j0 : NJ;
        for (int r0 = 0; r0 < m; r0 += NR) {
            int nr = m - r0 < NR ? m - r0 : NR;
            const RF_T *Aj = A + (size_t)j0 * lda, *Wr = W + (size_t)r0 * ldw;
            RF_T *Cj = C + (size_t)j0 * ldc + r0;
            if (NJ == 2) RF_FN(rf_rowdot_blk2)(nj, nr, K, Aj, lda, Wr, ldw, Cj, ldc);
            else RF_FN(rf_rowdot_blk4)(nj, nr, K, Aj, lda, Wr, ldw, Cj, ldc);
        }
    }
}
