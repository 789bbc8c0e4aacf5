/* The gate math of the cell variants (rnnfast.cells.Variant: other activations,
 * peepholes, clip, coupled input-forget gate), for one element type: included by
 * rf_fused.h through rf_each_type.h (RF_T, RF_FN; RF_FLOAT_BODY for float).
 *
 * Each rf_*_gates_v function has the arguments of its rf_gates.h twin plus the variant
 * `v` and the direction's peepholes `ph` ((3H,), i, f, o); with v == NULL it is that
 * twin. A row's units are taken RF_VCH at a time: the pre-activations into arrays on the
 * stack, then each activation over a whole array in one vectorised loop (the switch on
 * its code outside the loop), in ONNX Runtime's order: peephole terms, clip, activation.
 * RF_VEXP / RF_VTANH: the element type's exp and tanh (rf_each_type.h). */

static inline void RF_FN(rf_act)(const rf_var_t *v, int which, RF_T *x, int m) {
    const RF_T a = (RF_T)v->alpha[which], b = (RF_T)v->beta[which];
    switch (v->act[which]) {
    case RF_ACT_SIGMOID:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = (RF_T)1 / ((RF_T)1 + RF_VEXP(-x[q]));
        break;
    case RF_ACT_TANH:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = RF_VTANH(x[q]);
        break;
    case RF_ACT_RELU:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] < (RF_T)0 ? (RF_T)0 : x[q];
        break;
    case RF_ACT_AFFINE:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = a * x[q] + b;
        break;
    case RF_ACT_LEAKY_RELU:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] >= (RF_T)0 ? x[q] : a * x[q];
        break;
    case RF_ACT_THRESHOLDED_RELU:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] > a ? x[q] : (RF_T)0;
        break;
    case RF_ACT_SCALED_TANH:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = a * RF_VTANH(b * x[q]);
        break;
    case RF_ACT_HARD_SIGMOID:
        RF_SIMD for (int q = 0; q < m; ++q) {
            RF_T t = a * x[q] + b;
            t = t < (RF_T)0 ? (RF_T)0 : t;
            x[q] = t > (RF_T)1 ? (RF_T)1 : t;
        }
        break;
    case RF_ACT_ELU:
        RF_SIMD for (int q = 0; q < m; ++q) {
            RF_T neg = x[q] < (RF_T)0 ? x[q] : (RF_T)0;
            x[q] = x[q] >= (RF_T)0 ? x[q] : a * (RF_VEXP(neg) - (RF_T)1);
        }
        break;
    case RF_ACT_SOFTSIGN:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] / ((RF_T)1 + (x[q] < (RF_T)0 ? -x[q] : x[q]));
        break;
    default:    /* RF_ACT_SOFTPLUS: max(x, 0) + log(1 + e^-|x|), no overflow */
        for (int q = 0; q < m; ++q) {
            RF_T ax = x[q] < (RF_T)0 ? -x[q] : x[q];
            x[q] = (x[q] > (RF_T)0 ? x[q] : (RF_T)0) + (RF_T)log1p((double)RF_VEXP(-ax));
        }
    }
}

/* clamp to [-clip, clip] (NaN passes); clip = +inf: nothing to do */
static inline void RF_FN(rf_vclip)(const rf_var_t *v, RF_T *x, int m) {
    if (!(v->clip < __builtin_inf())) return;
    const RF_T c = (RF_T)v->clip;
    RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] > c ? c : (x[q] < -c ? -c : x[q]);
}

static inline void RF_FN(rf_act_clip)(const rf_var_t *v, int which, RF_T *x, int m) {
    RF_FN(rf_vclip)(v, x, m);
    RF_FN(rf_act)(v, which, x, m);
}

#define RF_VCH 64

static inline void RF_FN(rf_lstm_gates_v)(const rf_var_t *v, const RF_T *ph, int n, int H, int u0, int u1,
        const RF_T *xg, int ldx, const RF_T *hg, int ldg, int sg, const RF_T *bx, const RF_T *bh,
        RF_T *c, int ldc, RF_T *h1, int ld1, RF_T *h2, int ld2) {
    if (!v) {
        RF_FN(rf_lstm_gates)(n, H, u0, u1, xg, ldx, hg, ldg, sg, bx, bh, c, ldc, h1, ld1, h2, ld2);
        return;
    }
    RF_T gi[RF_VCH], gf[RF_VCH], gg[RF_VCH], go[RF_VCH];
    for (int j = 0; j < n; ++j) {
        const RF_T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;
        RF_T *cr = c + (size_t)j * ldc, *o1 = h1 + (size_t)j * ld1;
        RF_T *o2 = h2 ? h2 + (size_t)j * ld2 : o1;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const RF_T *x0 = xr + ub, *x1 = x0 + H, *x2 = x0 + 2 * (size_t)H, *x3 = x0 + 3 * (size_t)H;
            const RF_T *g0 = gr + ub, *g1 = g0 + sg, *g2 = g0 + 2 * (size_t)sg, *g3 = g0 + 3 * (size_t)sg;
            const RF_T *a0 = bx + ub, *a1 = a0 + H, *a2 = a0 + 2 * (size_t)H, *a3 = a0 + 3 * (size_t)H;
            const RF_T *b0 = bh + ub, *b1 = b0 + H, *b2 = b0 + 2 * (size_t)H, *b3 = b0 + 3 * (size_t)H;
            RF_T *cu = cr + ub;
            RF_SIMD for (int q = 0; q < m; ++q) {
                gi[q] = x0[q] + g0[q] + a0[q] + b0[q];
                gf[q] = x1[q] + g1[q] + a1[q] + b1[q];
                gg[q] = x2[q] + g2[q] + a2[q] + b2[q];
                go[q] = x3[q] + g3[q] + a3[q] + b3[q];
            }
            if (v->peephole) {
                const RF_T *pi = ph + ub, *pf = pi + H;
                RF_SIMD for (int q = 0; q < m; ++q) { gi[q] += pi[q] * cu[q]; gf[q] += pf[q] * cu[q]; }
            }
            RF_FN(rf_act_clip)(v, 0, gi, m);
            if (v->input_forget) {
                RF_SIMD for (int q = 0; q < m; ++q) gf[q] = (RF_T)1 - gi[q];
            } else {
                RF_FN(rf_act_clip)(v, 0, gf, m);
            }
            RF_FN(rf_act_clip)(v, 1, gg, m);
            RF_SIMD for (int q = 0; q < m; ++q) { cu[q] = gf[q] * cu[q] + gi[q] * gg[q]; gf[q] = cu[q]; }
            if (v->peephole) {
                const RF_T *po = ph + 2 * (size_t)H + ub;
                RF_SIMD for (int q = 0; q < m; ++q) go[q] += po[q] * cu[q];
            }
            RF_FN(rf_act_clip)(v, 0, go, m);
            RF_FN(rf_act)(v, 2, gf, m);          /* output activation of c' (no clip: ONNX's h()) */
            RF_T *p1 = o1 + ub, *p2 = o2 + ub;
            RF_SIMD for (int q = 0; q < m; ++q) { RF_T hn = go[q] * gf[q]; p1[q] = hn; p2[q] = hn; }
        }
    }
}

/* GRU, linear_before_reset=True */
static inline void RF_FN(rf_gru_gates_v)(const rf_var_t *v, int n, int H, int u0, int u1,
        const RF_T *xg, int ldx, const RF_T *hg, int ldg, int sg, const RF_T *bx, const RF_T *bh,
        const RF_T *hp, int ldp, RF_T *h1, int ld1, RF_T *h2, int ld2) {
    if (!v) {
        RF_FN(rf_gru_gates)(n, H, u0, u1, xg, ldx, hg, ldg, sg, bx, bh, hp, ldp, h1, ld1, h2, ld2);
        return;
    }
    RF_T r[RF_VCH], z[RF_VCH], nn[RF_VCH];
    for (int j = 0; j < n; ++j) {
        const RF_T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg, *pr = hp + (size_t)j * ldp;
        RF_T *o1 = h1 + (size_t)j * ld1, *o2 = h2 + (size_t)j * ld2;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const RF_T *x0 = xr + ub, *x1 = x0 + H, *x2 = x0 + 2 * (size_t)H;
            const RF_T *g0 = gr + ub, *g1 = g0 + sg, *g2 = g0 + 2 * (size_t)sg;
            const RF_T *a0 = bx + ub, *a1 = a0 + H, *a2 = a0 + 2 * (size_t)H;
            const RF_T *b0 = bh + ub, *b1 = b0 + H, *b2 = b0 + 2 * (size_t)H;
            RF_SIMD for (int q = 0; q < m; ++q) { r[q] = x0[q] + g0[q] + a0[q] + b0[q]; z[q] = x1[q] + g1[q] + a1[q] + b1[q]; }
            RF_FN(rf_act_clip)(v, 0, r, m);
            RF_FN(rf_act_clip)(v, 0, z, m);
            RF_SIMD for (int q = 0; q < m; ++q) nn[q] = x2[q] + a2[q] + r[q] * (g2[q] + b2[q]);
            RF_FN(rf_act_clip)(v, 1, nn, m);
            const RF_T *pu = pr + ub;
            RF_T *p1 = o1 + ub, *p2 = o2 + ub;
            RF_SIMD for (int q = 0; q < m; ++q) { RF_T hn = nn[q] + z[q] * (pu[q] - nn[q]); p1[q] = hn; p2[q] = hn; }
        }
    }
}

/* GRU, linear_before_reset=False, phase 1: z into hg's z slot, r*h into rh */
static inline void RF_FN(rf_gru_rz_v)(const rf_var_t *v, int n, int H, int u0, int u1,
        const RF_T *xg, int ldx, RF_T *hg, int ldg, const RF_T *bx, const RF_T *bh,
        const RF_T *hp, int ldp, RF_T *rh, int ldr) {
    if (!v) {
        RF_FN(rf_gru_rz)(n, H, u0, u1, xg, ldx, hg, ldg, bx, bh, hp, ldp, rh, ldr);
        return;
    }
    RF_T r[RF_VCH], z[RF_VCH];
    for (int j = 0; j < n; ++j) {
        const RF_T *xr = xg + (size_t)j * ldx, *pr = hp + (size_t)j * ldp;
        RF_T *gr = hg + (size_t)j * ldg, *rr = rh + (size_t)j * ldr;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const RF_T *x0 = xr + ub, *x1 = x0 + H, *a0 = bx + ub, *a1 = a0 + H, *b0 = bh + ub, *b1 = b0 + H;
            RF_T *g0 = gr + ub, *g1 = g0 + H;
            RF_SIMD for (int q = 0; q < m; ++q) { r[q] = x0[q] + g0[q] + a0[q] + b0[q]; z[q] = x1[q] + g1[q] + a1[q] + b1[q]; }
            RF_FN(rf_act_clip)(v, 0, r, m);
            RF_FN(rf_act_clip)(v, 0, z, m);
            const RF_T *pu = pr + ub;
            RF_T *ru = rr + ub;
            RF_SIMD for (int q = 0; q < m; ++q) { g1[q] = z[q]; ru[q] = r[q] * pu[q]; }
        }
    }
}

/* GRU, linear_before_reset=False, phase 2: hg's n slot holds (r*h) W_hn^T, its z slot z */
static inline void RF_FN(rf_gru_n_v)(const rf_var_t *v, int n, int H, int u0, int u1,
        const RF_T *xg, int ldx, const RF_T *hg, int ldg, const RF_T *bx, const RF_T *bh,
        const RF_T *hp, int ldp, RF_T *h1, int ld1, RF_T *h2, int ld2) {
    if (!v) {
        RF_FN(rf_gru_n)(n, H, u0, u1, xg, ldx, hg, ldg, bx, bh, hp, ldp, h1, ld1, h2, ld2);
        return;
    }
    RF_T nn[RF_VCH];
    for (int j = 0; j < n; ++j) {
        const RF_T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg, *pr = hp + (size_t)j * ldp;
        RF_T *o1 = h1 + (size_t)j * ld1, *o2 = h2 + (size_t)j * ld2;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const RF_T *z = gr + H + ub, *x2 = xr + 2 * (size_t)H + ub, *g2 = gr + 2 * (size_t)H + ub;
            const RF_T *a2 = bx + 2 * (size_t)H + ub, *b2 = bh + 2 * (size_t)H + ub, *pu = pr + ub;
            RF_SIMD for (int q = 0; q < m; ++q) nn[q] = x2[q] + a2[q] + g2[q] + b2[q];
            RF_FN(rf_act_clip)(v, 1, nn, m);
            RF_T *p1 = o1 + ub, *p2 = o2 + ub;
            RF_SIMD for (int q = 0; q < m; ++q) { RF_T hn = nn[q] + z[q] * (pu[q] - nn[q]); p1[q] = hn; p2[q] = hn; }
        }
    }
}

/* Elman RNN: the candidate activation is its nonlinearity */
static inline void RF_FN(rf_rnn_gates_v)(const rf_var_t *v, int n, int relu, int u0, int u1,
        const RF_T *xg, int ldx, const RF_T *hg, int ldg, const RF_T *bx, const RF_T *bh,
        RF_T *h1, int ld1, RF_T *h2, int ld2) {
    if (!v) {
        RF_FN(rf_rnn_gates)(n, relu, u0, u1, xg, ldx, hg, ldg, bx, bh, h1, ld1, h2, ld2);
        return;
    }
    RF_T a[RF_VCH];
    for (int j = 0; j < n; ++j) {
        const RF_T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;
        RF_T *o1 = h1 + (size_t)j * ld1, *o2 = h2 + (size_t)j * ld2;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const RF_T *x0 = xr + ub, *g0 = gr + ub, *a0 = bx + ub, *b0 = bh + ub;
            RF_SIMD for (int q = 0; q < m; ++q) a[q] = x0[q] + g0[q] + a0[q] + b0[q];
            RF_FN(rf_act_clip)(v, 1, a, m);
            RF_T *p1 = o1 + ub, *p2 = o2 + ub;
            RF_SIMD for (int q = 0; q < m; ++q) { p1[q] = a[q]; p2[q] = a[q]; }
        }
    }
}

#undef RF_VCH
