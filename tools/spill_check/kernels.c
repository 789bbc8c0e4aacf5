/* The micro-kernels of kernels/rf_*.h as out-of-line functions, for tools/spill_check:
 * each hot kernel is instantiated here exactly as the Cython modules call it, so that
 * the code GCC generates for it under each -march target can be inspected. */
#include "rf_fused.h"
#include "rf_gemm.h"
#include "rf_train.h"
#include "rf_lowp_gemm.h"

#define CHK_TYPE(T, S)                                                                         \
void chk_fused_step_##S(int code, int G, int H, int K, int n, int p0, int p1, const T *P,    \
        const T *xg, int ldx, const T *xn, int nn, const T *bx, const T *bh, const T *hp,      \
        int ldp, T *c, int ldc, T *h1, int ld1, T *h2, int ld2) {                             \
    rf_fused_step_##S(code, G, H, K, n, p0, p1, P, xg, ldx, xn, nn, bx, bh, hp, ldp, c, ldc,   \
                      h1, ld1, h2, ld2);                                                       \
}                                                                                              \
/* as cy_rnn calls it: the variant `v` known only at run time (NULL for the plain cells) */   \
void chk_fused_step_v_##S(const rf_var_t *v, const T *ph, int code, int G, int H, int K, int n,\
        int p0, int p1, const T *P, const T *xg, int ldx, const T *xn, int nn, const T *bx,    \
        const T *bh, const T *hp, int ldp, T *c, int ldc, T *h1, int ld1, T *h2, int ld2) {    \
    rf_fused_step_v_##S(v, ph, code, G, H, K, n, p0, p1, P, xg, ldx, xn, nn, bx, bh, hp, ldp,  \
                        c, ldc, h1, ld1, h2, ld2);                                             \
}                                                                                              \
void chk_gemm_panels_##S(int G, int H, int K, int n, int p0, int p1, const T *A, int lda,     \
        const T *P, T *C, int ldc) {                                                           \
    rf_gemm_panels_##S(G, H, K, n, p0, p1, A, lda, P, C, ldc);                                \
}                                                                                              \
void chk_rowdot_##S(int n, int m, int K, const T *A, int lda, const T *W, int ldw, T *C,     \
        int ldc) {                                                                             \
    rf_rowdot_##S(n, m, K, A, lda, W, ldw, C, ldc);                                            \
}                                                                                              \
void chk_rowdot1_segs_##S(int nseg, int m, int K, const T *a, const T *W, int ldw,            \
        size_t wseg, T *C, size_t cseg, int rev) {                                             \
    rf_rowdot1_segs_##S(nseg, m, K, a, W, ldw, wseg, C, cseg, rev);                            \
}                                                                                              \
int chk_gemm_##S(int ta, int tb, int M, int N, int K, const T *A, int lda, const T *B,        \
        int ldb, T beta, T *C, int ldc) {                                                      \
    return rf_gemm_##S(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);                        \
}                                                                                              \
void chk_mm_##S(int n, int K, const T *A, int lda, const T *P, size_t bs, int ncols, T *C,    \
        int ldc, int beta) {                                                                   \
    rft_mm_##S(n, K, A, lda, P, bs, ncols, C, ldc, beta);                                      \
}

CHK_TYPE(float, f)
CHK_TYPE(double, d)

/* The bf16 / int8 products of frozen layers (rf_lowp_gemm.h): the AVX-512 and AMX kernels
 * are out-of-line functions with target attributes, reached through the dispatcher. */
void chk_lowp_gemm(int isa, const rf_qmat_t *W, int M, const void *A, const float *as, int nb0, int nb1,
                   float *C, int ldc, int sgc) {
    rf_lowp_gemm(isa, W, M, A, as, nb0, nb1, C, ldc, sgc);
    rf_lowp_release();
}
