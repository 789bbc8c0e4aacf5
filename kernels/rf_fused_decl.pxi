# Declarations of kernels/rf_fused.h (packed panels, micro-kernel, fused step, rf_rowdot),
# included by the Cython modules that call them (cy_rnn, cy_scan).
include "rf_variant.pxi"

cdef extern from "rf_fused.h" nogil:
    int rf_panel_units(int G, int is_double)
    void rf_pack_f(int G, int H, int K, int p0, int p1, const float *W, float *P)
    void rf_pack_d(int G, int H, int K, int p0, int p1, const double *W, double *P)
    void rf_gemm_panels_f(int G, int H, int K, int n, int p0, int p1, const float *A, int lda, const float *P,
                          float *C, int ldc)
    void rf_gemm_panels_d(int G, int H, int K, int n, int p0, int p1, const double *A, int lda, const double *P,
                          double *C, int ldc)
    void rf_fused_step_f(int code, int G, int H, int K, int n, int p0, int p1, const float *P,
                         const float *xg, int ldx, const float *xn, int nn, const float *bx, const float *bh,
                         const float *hp, int ldp,
                         float *c, int ldc, float *h1, int ld1, float *h2, int ld2)
    void rf_fused_step_d(int code, int G, int H, int K, int n, int p0, int p1, const double *P,
                         const double *xg, int ldx, const double *xn, int nn, const double *bx,
                         const double *bh,
                         const double *hp, int ldp,
                         double *c, int ldc, double *h1, int ld1, double *h2, int ld2)
    void rf_fused_step_v_f(const rf_var_t *v, const float *ph, int code, int G, int H, int K, int n, int p0,
                           int p1, const float *P,
                           const float *xg, int ldx, const float *xn, int nn, const float *bx, const float *bh,
                           const float *hp, int ldp,
                           float *c, int ldc, float *h1, int ld1, float *h2, int ld2)
    void rf_fused_step_v_d(const rf_var_t *v, const double *ph, int code, int G, int H, int K, int n, int p0,
                           int p1, const double *P,
                           const double *xg, int ldx, const double *xn, int nn, const double *bx,
                           const double *bh,
                           const double *hp, int ldp,
                           double *c, int ldc, double *h1, int ld1, double *h2, int ld2)
    # the cell variants' gate math (rf_gates_var_tmpl.h): v == NULL is the standard cell's
    void rf_lstm_gates_v_f(const rf_var_t *v, const float *ph, int n, int H, int u0, int u1, const float *xg,
                           int ldx, const float *hg, int ldg, int sg, const float *bx, const float *bh, float *c,
                           int ldc, float *h1, int ld1, float *h2, int ld2)
    void rf_lstm_gates_v_d(const rf_var_t *v, const double *ph, int n, int H, int u0, int u1, const double *xg,
                           int ldx, const double *hg, int ldg, int sg, const double *bx, const double *bh,
                           double *c, int ldc, double *h1, int ld1, double *h2, int ld2)
    void rf_gru_gates_v_f(const rf_var_t *v, int n, int H, int u0, int u1, const float *xg, int ldx,
                          const float *hg, int ldg, int sg, const float *bx, const float *bh, const float *hp,
                          int ldp, float *h1, int ld1, float *h2, int ld2)
    void rf_gru_gates_v_d(const rf_var_t *v, int n, int H, int u0, int u1, const double *xg, int ldx,
                          const double *hg, int ldg, int sg, const double *bx, const double *bh, const double *hp,
                          int ldp, double *h1, int ld1, double *h2, int ld2)
    void rf_gru_rz_v_f(const rf_var_t *v, int n, int H, int u0, int u1, const float *xg, int ldx, float *hg,
                       int ldg, const float *bx, const float *bh, const float *hp, int ldp, float *rh, int ldr)
    void rf_gru_rz_v_d(const rf_var_t *v, int n, int H, int u0, int u1, const double *xg, int ldx, double *hg,
                       int ldg, const double *bx, const double *bh, const double *hp, int ldp, double *rh, int ldr)
    void rf_gru_n_v_f(const rf_var_t *v, int n, int H, int u0, int u1, const float *xg, int ldx, const float *hg,
                      int ldg, const float *bx, const float *bh, const float *hp, int ldp, float *h1, int ld1,
                      float *h2, int ld2)
    void rf_gru_n_v_d(const rf_var_t *v, int n, int H, int u0, int u1, const double *xg, int ldx,
                      const double *hg, int ldg, const double *bx, const double *bh, const double *hp, int ldp,
                      double *h1, int ld1, double *h2, int ld2)
    void rf_rnn_gates_v_f(const rf_var_t *v, int n, int relu, int u0, int u1, const float *xg, int ldx,
                          const float *hg, int ldg, const float *bx, const float *bh, float *h1, int ld1, float *h2,
                          int ld2)
    void rf_rnn_gates_v_d(const rf_var_t *v, int n, int relu, int u0, int u1, const double *xg, int ldx,
                          const double *hg, int ldg, const double *bx, const double *bh, double *h1, int ld1,
                          double *h2, int ld2)
    void rf_rowdot_f(int n, int m, int K, const float *A, int lda, const float *W, int ldw, float *C, int ldc)
    void rf_rowdot_d(int n, int m, int K, const double *A, int lda, const double *W, int ldw, double *C, int ldc)
    void rf_rowdot1_segs_f(int nseg, int m, int K, const float *a, const float *W, int ldw, size_t wseg,
                           float *C, size_t cseg, int rev)
    void rf_rowdot1_segs_d(int nseg, int m, int K, const double *a, const double *W, int ldw, size_t wseg,
                           double *C, size_t cseg, int rev)
