/* The training kernels' gate math of the cell variants (rnnfast.cells.Variant: other
 * activations, peepholes, clip, coupled input-forget gate), for one element type:
 * included by rf_train.h through rf_each_type.h (RF_T, RF_FN). The activations are those
 * of rf_gates_var_tmpl.h (rf_act, rf_vclip); their derivatives are here.
 *
 * Each rft_*_v function has the arguments of its rf_train.h twin, after the variant `v`,
 * the direction's peepholes `ph` ((3H,), i, f, o; read by the LSTM only) and `dv`, the
 * rows (stride lddv) of the gates' derivatives: the forward saves there, beside the
 * post-activation gates, each gate's activation derivative at its clipped
 * pre-activation times the clip's (the gate alone does not give it for every
 * activation); the backward reads them. With v == NULL each is its twin. The equations
 * are the reference's (rnnfast/reference/backward.py, _variant_forward/_variant_backward);
 * a row's units are taken RF_VCH at a time into arrays on the stack, each activation
 * over a whole array in one vectorised loop. */
#define RF_VCH 64

/* x := the derivative of activation `which` at x (the reference's activation_grad) */
static inline void RF_FN(rft_dact)(const rf_var_t *v, int which, RF_T *x, int m) {
    const RF_T a = (RF_T)v->alpha[which], b = (RF_T)v->beta[which];
    switch (v->act[which]) {
    case RF_ACT_SIGMOID:
        RF_SIMD for (int q = 0; q < m; ++q) { RF_T s = (RF_T)1 / ((RF_T)1 + RF_VEXP(-x[q])); x[q] = s * ((RF_T)1 - s); }
        break;
    case RF_ACT_TANH:
        RF_SIMD for (int q = 0; q < m; ++q) { RF_T t = RF_VTANH(x[q]); x[q] = (RF_T)1 - t * t; }
        break;
    case RF_ACT_RELU:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] > (RF_T)0 ? (RF_T)1 : (RF_T)0;
        break;
    case RF_ACT_AFFINE:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = a;
        break;
    case RF_ACT_LEAKY_RELU:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] >= (RF_T)0 ? (RF_T)1 : a;
        break;
    case RF_ACT_THRESHOLDED_RELU:
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = x[q] > a ? (RF_T)1 : (RF_T)0;
        break;
    case RF_ACT_SCALED_TANH:
        RF_SIMD for (int q = 0; q < m; ++q) { RF_T t = RF_VTANH(b * x[q]); x[q] = a * b * ((RF_T)1 - t * t); }
        break;
    case RF_ACT_HARD_SIGMOID:
        RF_SIMD for (int q = 0; q < m; ++q) { RF_T t = a * x[q] + b; x[q] = (t > (RF_T)0 && t < (RF_T)1) ? a : (RF_T)0; }
        break;
    case RF_ACT_ELU:
        RF_SIMD for (int q = 0; q < m; ++q) {
            RF_T neg = x[q] < (RF_T)0 ? x[q] : (RF_T)0;
            x[q] = x[q] >= (RF_T)0 ? (RF_T)1 : a * RF_VEXP(neg);
        }
        break;
    case RF_ACT_SOFTSIGN:
        RF_SIMD for (int q = 0; q < m; ++q) { RF_T d = (RF_T)1 + (x[q] < (RF_T)0 ? -x[q] : x[q]); x[q] = (RF_T)1 / (d * d); }
        break;
    default:    /* RF_ACT_SOFTPLUS: the logistic function */
        RF_SIMD for (int q = 0; q < m; ++q) x[q] = (RF_T)1 / ((RF_T)1 + RF_VEXP(-x[q]));
    }
}

/* y := act(clip(a)), dy := act'(clip(a)) * clip'(a) (1 inside [-clip, clip], as
 * torch.clamp; a product, so NaN stays NaN as in the reference) */
static inline void RF_FN(rft_act_d)(const rf_var_t *v, int which, const RF_T *a, RF_T *y, RF_T *dy, int m) {
    memcpy(y, a, sizeof(RF_T) * (size_t)m);
    RF_FN(rf_vclip)(v, y, m);
    if (v->act[which] == RF_ACT_SIGMOID || v->act[which] == RF_ACT_TANH) {
        /* the derivative from the activation itself: no second exp/tanh */
        RF_FN(rf_act)(v, which, y, m);
        if (v->act[which] == RF_ACT_SIGMOID) {
            RF_SIMD for (int q = 0; q < m; ++q) dy[q] = y[q] * ((RF_T)1 - y[q]);
        } else {
            RF_SIMD for (int q = 0; q < m; ++q) dy[q] = (RF_T)1 - y[q] * y[q];
        }
    } else {
        memcpy(dy, y, sizeof(RF_T) * (size_t)m);
        RF_FN(rf_act)(v, which, y, m);
        RF_FN(rft_dact)(v, which, dy, m);
    }
    if (v->clip < __builtin_inf()) {
        const RF_T c = (RF_T)v->clip;
        RF_SIMD for (int q = 0; q < m; ++q) dy[q] *= (a[q] >= -c && a[q] <= c) ? (RF_T)1 : (RF_T)0;
    }
}

/* ---------------------------------------------------------------- forward, saving */
static __attribute__((noinline)) void RF_FN(rft_lstm_fwd_v)(const rf_var_t *v, const RF_T *ph, RF_T *dv,
        int lddv, int j0, int j1, int H, int u0, int u1, RF_T *xg, int ldx, const RF_T *hg, int ldg,
        const RF_T *bx, const RF_T *bh, const RF_T *cp, int ldcp, RF_T *c, int ldc, RF_T *h, int ldh) {
    if (!v) {
        RF_FN(rft_lstm_fwd)(j0, j1, H, u0, u1, xg, ldx, hg, ldg, bx, bh, cp, ldcp, c, ldc, h, ldh);
        return;
    }
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1;
    RF_T ai[RF_VCH], af[RF_VCH], ag[RF_VCH], ao[RF_VCH], gi[RF_VCH], gf[RF_VCH], gg[RF_VCH], go[RF_VCH];
    RF_T di[RF_VCH], df[RF_VCH], dg[RF_VCH], dov[RF_VCH], cn[RF_VCH], ho[RF_VCH];
    for (int j = j0; j < j1; ++j) {
        RF_T *xr = xg + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv;
        const RF_T *gr = hg + (size_t)j * ldg, *cpr = cp + (size_t)j * ldcp;
        RF_T *cr = c + (size_t)j * ldc, *hr = h + (size_t)j * ldh;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const size_t u = (size_t)ub;
            const RF_T *cpu = cpr + u;
            RF_SIMD for (int q = 0; q < m; ++q) {
                ai[q] = xr[u + q] + gr[u + q] + bx[u + q] + bh[u + q];
                af[q] = xr[H1 + u + q] + gr[H1 + u + q] + bx[H1 + u + q] + bh[H1 + u + q];
                ag[q] = xr[H2 + u + q] + gr[H2 + u + q] + bx[H2 + u + q] + bh[H2 + u + q];
                ao[q] = xr[H3 + u + q] + gr[H3 + u + q] + bx[H3 + u + q] + bh[H3 + u + q];
            }
            if (v->peephole) {
                RF_SIMD for (int q = 0; q < m; ++q) { ai[q] += ph[u + q] * cpu[q]; af[q] += ph[H1 + u + q] * cpu[q]; }
            }
            RF_FN(rft_act_d)(v, 0, ai, gi, di, m);
            if (v->input_forget) {
                RF_SIMD for (int q = 0; q < m; ++q) { gf[q] = (RF_T)1 - gi[q]; df[q] = (RF_T)0; }
            } else {
                RF_FN(rft_act_d)(v, 0, af, gf, df, m);
            }
            RF_FN(rft_act_d)(v, 1, ag, gg, dg, m);
            RF_SIMD for (int q = 0; q < m; ++q) { cn[q] = gf[q] * cpu[q] + gi[q] * gg[q]; ho[q] = cn[q]; }
            if (v->peephole) {
                RF_SIMD for (int q = 0; q < m; ++q) ao[q] += ph[H2 + u + q] * cn[q];
            }
            RF_FN(rft_act_d)(v, 0, ao, go, dov, m);
            RF_FN(rf_act)(v, 2, ho, m);          /* the output activation of c (no clip) */
            RF_SIMD for (int q = 0; q < m; ++q) {
                xr[u + q] = gi[q]; xr[H1 + u + q] = gf[q]; xr[H2 + u + q] = gg[q]; xr[H3 + u + q] = go[q];
                dvr[u + q] = di[q]; dvr[H1 + u + q] = df[q]; dvr[H2 + u + q] = dg[q]; dvr[H3 + u + q] = dov[q];
                cr[u + q] = cn[q];
                hr[u + q] = go[q] * ho[q];
            }
        }
    }
}

/* r, z of a GRU row's units [u, u+m) (pre-activations from the input projection xr,
 * the recurrent product gr and the biases) with their derivatives */
static inline void RF_FN(rft_rz_v)(const rf_var_t *v, const RF_T *xr, const RF_T *gr, const RF_T *bx,
        const RF_T *bh, size_t H1, size_t u, int m, RF_T *r, RF_T *z, RF_T *dr, RF_T *dz) {
    RF_T ar[RF_VCH], az[RF_VCH];
    RF_SIMD for (int q = 0; q < m; ++q) {
        ar[q] = xr[u + q] + gr[u + q] + bx[u + q] + bh[u + q];
        az[q] = xr[H1 + u + q] + gr[H1 + u + q] + bx[H1 + u + q] + bh[H1 + u + q];
    }
    RF_FN(rft_act_d)(v, 0, ar, r, dr, m);
    RF_FN(rft_act_d)(v, 0, az, z, dz, m);
}

static __attribute__((noinline)) void RF_FN(rft_gru_fwd_v)(const rf_var_t *v, const RF_T *ph, RF_T *dv,
        int lddv, int j0, int j1, int H, int u0, int u1, RF_T *xg, int ldx, const RF_T *hg, int ldg,
        const RF_T *bx, const RF_T *bh, const RF_T *hp, int ldp, RF_T *h, int ldh) {
    (void)ph;
    if (!v) {
        RF_FN(rft_gru_fwd)(j0, j1, H, u0, u1, xg, ldx, hg, ldg, bx, bh, hp, ldp, h, ldh);
        return;
    }
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1;
    RF_T an[RF_VCH], r[RF_VCH], z[RF_VCH], nn[RF_VCH], hn[RF_VCH], dr[RF_VCH], dz[RF_VCH], dn[RF_VCH];
    for (int j = j0; j < j1; ++j) {
        RF_T *xr = xg + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *hr = h + (size_t)j * ldh;
        const RF_T *gr = hg + (size_t)j * ldg, *pr = hp + (size_t)j * ldp;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const size_t u = (size_t)ub;
            RF_FN(rft_rz_v)(v, xr, gr, bx, bh, H1, u, m, r, z, dr, dz);
            RF_SIMD for (int q = 0; q < m; ++q) hn[q] = gr[H2 + u + q] + bh[H2 + u + q];
            RF_SIMD for (int q = 0; q < m; ++q) an[q] = xr[H2 + u + q] + bx[H2 + u + q] + r[q] * hn[q];
            RF_FN(rft_act_d)(v, 1, an, nn, dn, m);
            RF_SIMD for (int q = 0; q < m; ++q) {
                xr[u + q] = r[q]; xr[H1 + u + q] = z[q]; xr[H2 + u + q] = nn[q]; xr[H3 + u + q] = hn[q];
                dvr[u + q] = dr[q]; dvr[H1 + u + q] = dz[q]; dvr[H2 + u + q] = dn[q];
                hr[u + q] = ((RF_T)1 - z[q]) * nn[q] + z[q] * pr[u + q];
            }
        }
    }
}

/* GRU no-lbr, phase 1: r, z (and their derivatives) saved; r*h_prev into rh */
static __attribute__((noinline)) void RF_FN(rft_gru_rz_fwd_v)(const rf_var_t *v, const RF_T *ph, RF_T *dv,
        int lddv, int j0, int j1, int H, int u0, int u1, RF_T *xg, int ldx, const RF_T *hg, int ldg,
        const RF_T *bx, const RF_T *bh, const RF_T *hp, int ldp, RF_T *rh, int ldr) {
    (void)ph;
    if (!v) {
        RF_FN(rft_gru_rz_fwd)(j0, j1, H, u0, u1, xg, ldx, hg, ldg, bx, bh, hp, ldp, rh, ldr);
        return;
    }
    const size_t H1 = (size_t)H;
    RF_T r[RF_VCH], z[RF_VCH], dr[RF_VCH], dz[RF_VCH];
    for (int j = j0; j < j1; ++j) {
        RF_T *xr = xg + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *rr = rh + (size_t)j * ldr;
        const RF_T *gr = hg + (size_t)j * ldg, *pr = hp + (size_t)j * ldp;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const size_t u = (size_t)ub;
            RF_FN(rft_rz_v)(v, xr, gr, bx, bh, H1, u, m, r, z, dr, dz);
            RF_SIMD for (int q = 0; q < m; ++q) {
                xr[u + q] = r[q]; xr[H1 + u + q] = z[q];
                dvr[u + q] = dr[q]; dvr[H1 + u + q] = dz[q];
                rr[u + q] = r[q] * pr[u + q];
            }
        }
    }
}

/* GRU no-lbr, phase 2: hg's n slot holds (r*h) W_hn^T */
static __attribute__((noinline)) void RF_FN(rft_gru_n_fwd_v)(const rf_var_t *v, const RF_T *ph, RF_T *dv,
        int lddv, int j0, int j1, int H, int u0, int u1, RF_T *xg, int ldx, const RF_T *hg, int ldg,
        const RF_T *bx, const RF_T *bh, const RF_T *hp, int ldp, RF_T *h, int ldh) {
    (void)ph;
    if (!v) {
        RF_FN(rft_gru_n_fwd)(j0, j1, H, u0, u1, xg, ldx, hg, ldg, bx, bh, hp, ldp, h, ldh);
        return;
    }
    const size_t H1 = (size_t)H, H2 = 2 * H1;
    RF_T an[RF_VCH], nn[RF_VCH], dn[RF_VCH];
    for (int j = j0; j < j1; ++j) {
        RF_T *xr = xg + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *hr = h + (size_t)j * ldh;
        const RF_T *gr = hg + (size_t)j * ldg, *pr = hp + (size_t)j * ldp;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const size_t u = (size_t)ub;
            RF_SIMD for (int q = 0; q < m; ++q)
                an[q] = xr[H2 + u + q] + bx[H2 + u + q] + gr[H2 + u + q] + bh[H2 + u + q];
            RF_FN(rft_act_d)(v, 1, an, nn, dn, m);
            RF_SIMD for (int q = 0; q < m; ++q) {
                const RF_T z = xr[H1 + u + q];
                xr[H2 + u + q] = nn[q];
                dvr[H2 + u + q] = dn[q];
                hr[u + q] = ((RF_T)1 - z) * nn[q] + z * pr[u + q];
            }
        }
    }
}

/* Elman RNN: the candidate activation is its nonlinearity */
static __attribute__((noinline)) void RF_FN(rft_rnn_fwd_v)(const rf_var_t *v, const RF_T *ph, RF_T *dv,
        int lddv, int j0, int j1, int relu, int u0, int u1, const RF_T *xg, int ldx, const RF_T *hg, int ldg,
        const RF_T *bx, const RF_T *bh, RF_T *h, int ldh) {
    (void)ph;
    if (!v) {
        RF_FN(rft_rnn_fwd)(j0, j1, relu, u0, u1, xg, ldx, hg, ldg, bx, bh, h, ldh);
        return;
    }
    RF_T a[RF_VCH], y[RF_VCH], d[RF_VCH];
    for (int j = j0; j < j1; ++j) {
        const RF_T *xr = xg + (size_t)j * ldx, *gr = hg + (size_t)j * ldg;
        RF_T *dvr = dv + (size_t)j * lddv, *hr = h + (size_t)j * ldh;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const size_t u = (size_t)ub;
            RF_SIMD for (int q = 0; q < m; ++q) a[q] = xr[u + q] + gr[u + q] + bx[u + q] + bh[u + q];
            RF_FN(rft_act_d)(v, 1, a, y, d, m);
            RF_SIMD for (int q = 0; q < m; ++q) { hr[u + q] = y[q]; dvr[u + q] = d[q]; }
        }
    }
}

/* ---------------------------------------------------------------- backward */
/* LSTM: as rft_lstm_bwd; dv the saved derivatives of i, f, g, o */
static __attribute__((noinline)) void RF_FN(rft_lstm_bwd_v)(const rf_var_t *v, const RF_T *ph, const RF_T *dv,
        int lddv, int j0, int j1, int H, int u0, int u1, const RF_T *gt, int ldx, const RF_T *c, int ldc,
        const RF_T *cp, int ldcp, const RF_T *dh, int lddh, RF_T *dc, int lddc, RF_T *dg, int ldg,
        RF_T *m_, int ldm) {
    if (!v) {
        RF_FN(rft_lstm_bwd)(j0, j1, H, u0, u1, gt, ldx, c, ldc, cp, ldcp, dh, lddh, dc, lddc, dg, ldg, m_, ldm);
        return;
    }
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1;
    const int peep = v->peephole, cifg = v->input_forget;
    RF_T ho[RF_VCH], dho[RF_VCH];
    for (int j = j0; j < j1; ++j) {
        const RF_T *xr = gt + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *cr = c + (size_t)j * ldc;
        const RF_T *cpr = cp + (size_t)j * ldcp, *dhr = dh + (size_t)j * lddh;
        RF_T *dcr = dc + (size_t)j * lddc, *dgr = dg + (size_t)j * ldg;
        RF_T *mr = m_ ? m_ + (size_t)j * ldm : NULL;
        for (int ub = u0; ub < u1; ub += RF_VCH) {
            const int m = u1 - ub < RF_VCH ? u1 - ub : RF_VCH;
            const size_t u = (size_t)ub;
            memcpy(ho, cr + u, sizeof(RF_T) * (size_t)m);
            if (v->act[2] == RF_ACT_TANH) {     /* tanh' from tanh: one transcendental */
                RF_FN(rf_act)(v, 2, ho, m);
                RF_SIMD for (int q = 0; q < m; ++q) dho[q] = (RF_T)1 - ho[q] * ho[q];
            } else {
                memcpy(dho, cr + u, sizeof(RF_T) * (size_t)m);
                RF_FN(rf_act)(v, 2, ho, m);
                RF_FN(rft_dact)(v, 2, dho, m);
            }
            RF_SIMD for (int q = 0; q < m; ++q) {
                const RF_T i = xr[u + q], f = xr[H1 + u + q], g = xr[H2 + u + q], o = xr[H3 + u + q];
                const RF_T d = dhr[u + q], cpq = cpr[u + q];
                const RF_T dao = d * ho[q] * dvr[H3 + u + q];
                RF_T dct = dcr[u + q] + d * o * dho[q];
                if (peep) dct += dao * ph[H2 + u + q];
                RF_T di = dct * g, df = dct * cpq;
                if (cifg) { di -= df; df = (RF_T)0; }
                const RF_T dai = di * dvr[u + q], daf = df * dvr[H1 + u + q];
                dgr[u + q] = dai; dgr[H1 + u + q] = daf; dgr[H2 + u + q] = dct * i * dvr[H2 + u + q];
                dgr[H3 + u + q] = dao;
                RF_T dcp = dct * f;
                if (peep) dcp += dai * ph[u + q] + daf * ph[H1 + u + q];
                dcr[u + q] = dcp;
            }
            if (mr) {
                RF_SIMD for (int q = 0; q < m; ++q) mr[u + q] = xr[H3 + u + q] * ho[q];
            }
        }
    }
}

/* GRU lbr: dh in = total gradient of h_t, out = its direct part dh*z */
static __attribute__((noinline)) void RF_FN(rft_gru_bwd_v)(const rf_var_t *v, const RF_T *ph, const RF_T *dv,
        int lddv, int j0, int j1, int H, int u0, int u1, const RF_T *gt, int ldx, const RF_T *hp, int ldp,
        RF_T *dh, int lddh, RF_T *dg, int ldg) {
    (void)ph;
    if (!v) {
        RF_FN(rft_gru_bwd)(j0, j1, H, u0, u1, gt, ldx, hp, ldp, dh, lddh, dg, ldg);
        return;
    }
    const size_t H1 = (size_t)H, H2 = 2 * H1, H3 = 3 * H1;
    for (int j = j0; j < j1; ++j) {
        const RF_T *xr = gt + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *pr = hp + (size_t)j * ldp;
        RF_T *dhr = dh + (size_t)j * lddh, *dgr = dg + (size_t)j * ldg;
        RF_SIMD for (size_t u = (size_t)u0; u < (size_t)u1; ++u) {
            const RF_T r = xr[u], z = xr[H1 + u], n = xr[H2 + u], hn = xr[H3 + u], d = dhr[u];
            const RF_T dan = d * ((RF_T)1 - z) * dvr[H2 + u];
            const RF_T daz = d * (pr[u] - n) * dvr[H1 + u];
            dgr[u] = dan * hn * dvr[u]; dgr[H1 + u] = daz; dgr[H2 + u] = dan; dgr[H3 + u] = dan * r;
            dhr[u] = d * z;
        }
    }
}

/* GRU no-lbr, phase 1: dz, dn into dg, r*h_prev into rh, dh := dh*z */
static __attribute__((noinline)) void RF_FN(rft_gru_nolbr_bwd1_v)(const rf_var_t *v, const RF_T *ph,
        const RF_T *dv, int lddv, int j0, int j1, int H, int u0, int u1, const RF_T *gt, int ldx, const RF_T *hp,
        int ldp, RF_T *dh, int lddh, RF_T *dg, int ldg, RF_T *rh, int ldr) {
    (void)ph;
    if (!v) {
        RF_FN(rft_gru_nolbr_bwd1)(j0, j1, H, u0, u1, gt, ldx, hp, ldp, dh, lddh, dg, ldg, rh, ldr);
        return;
    }
    const size_t H1 = (size_t)H, H2 = 2 * H1;
    for (int j = j0; j < j1; ++j) {
        const RF_T *xr = gt + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *pr = hp + (size_t)j * ldp;
        RF_T *dhr = dh + (size_t)j * lddh, *dgr = dg + (size_t)j * ldg, *rr = rh + (size_t)j * ldr;
        RF_SIMD for (size_t u = (size_t)u0; u < (size_t)u1; ++u) {
            const RF_T r = xr[u], z = xr[H1 + u], n = xr[H2 + u], d = dhr[u];
            dgr[H1 + u] = d * (pr[u] - n) * dvr[H1 + u];
            dgr[H2 + u] = d * ((RF_T)1 - z) * dvr[H2 + u];
            rr[u] = r * pr[u];
            dhr[u] = d * z;
        }
    }
}

/* GRU no-lbr, phase 2: q = d(r*h) = dn W_hn; dr and dh += q*r */
static __attribute__((noinline)) void RF_FN(rft_gru_nolbr_bwd2_v)(const rf_var_t *v, const RF_T *ph,
        const RF_T *dv, int lddv, int j0, int j1, int u0, int u1, const RF_T *gt, int ldx, const RF_T *hp, int ldp,
        const RF_T *q, int ldq, RF_T *dh, int lddh, RF_T *dg, int ldg) {
    (void)ph;
    if (!v) {
        RF_FN(rft_gru_nolbr_bwd2)(j0, j1, u0, u1, gt, ldx, hp, ldp, q, ldq, dh, lddh, dg, ldg);
        return;
    }
    for (int j = j0; j < j1; ++j) {
        const RF_T *xr = gt + (size_t)j * ldx, *dvr = dv + (size_t)j * lddv, *pr = hp + (size_t)j * ldp;
        const RF_T *qr = q + (size_t)j * ldq;
        RF_T *dhr = dh + (size_t)j * lddh, *dgr = dg + (size_t)j * ldg;
        RF_SIMD for (size_t u = (size_t)u0; u < (size_t)u1; ++u) {
            dgr[u] = qr[u] * pr[u] * dvr[u];
            dhr[u] += qr[u] * xr[u];
        }
    }
}

/* Elman RNN: dG = dh times the saved derivative */
static __attribute__((noinline)) void RF_FN(rft_rnn_bwd_v)(const rf_var_t *v, const RF_T *ph, const RF_T *dv,
        int lddv, int j0, int j1, int relu, int u0, int u1, const RF_T *h, int ldh, const RF_T *dh, int lddh,
        RF_T *dg, int ldg) {
    (void)ph;
    if (!v) {
        RF_FN(rft_rnn_bwd)(j0, j1, relu, u0, u1, h, ldh, dh, lddh, dg, ldg);
        return;
    }
    for (int j = j0; j < j1; ++j) {
        const RF_T *dvr = dv + (size_t)j * lddv, *dhr = dh + (size_t)j * lddh;
        RF_T *dgr = dg + (size_t)j * ldg;
        RF_SIMD for (size_t u = (size_t)u0; u < (size_t)u1; ++u) dgr[u] = dhr[u] * dvr[u];
    }
}

#undef RF_VCH
