/* rf_lowp.h: bf16 and int8 inference of the recurrent cells (frozen layers, issue 14).
 *
 * Precisions (rnnfast/frozen.py packs the weights once, at freeze time):
 *   RF_BF16: weights and the GEMMs' activations rounded to bfloat16 (nearest even),
 *            products summed in fp32 (vdpbf16ps: pairs of k).
 *   RF_INT8: weights int8 with one symmetric scale per output row; activations quantized
 *            per row of each product (the input projection once per call, the recurrent
 *            product at every step), symmetric, stored +128 as uint8 for vpdpbusd (u8 x s8,
 *            groups of 4 k); the int32 sums are exact, the +128 is taken back with each
 *            column's weight sum (`comp`), and the result is rescaled to fp32.
 * Gates and states stay fp32 (the gate math of rf_gates.h).
 *
 * Packed weights (rf_qmat_t): the N = G*Hp output columns (each gate padded to Hp, a
 * multiple of 16) in blocks of 16 columns; block nb holds Kp/grp groups of 64 bytes, each
 * the 16 columns' grp consecutive k (grp = 4 int8 or 2 bf16): [N/16][Kp/grp][16][grp].
 * That is both the layout vpdpbusd/vdpbf16ps broadcast against and the B tile of AMX.
 * Kp (K padded with zero weights) makes a row of activations a multiple of 64 bytes.
 *
 * Instruction sets (rf_lowp_isa, chosen by the caller from rf_lowp_cpu): the AVX-512
 * kernels are compiled with function target attributes, so every ISA level of the module
 * holds them and the CPU decides at run time; RF_LOWP_PORTABLE is plain C computing the
 * same sums (exactly the same for int8; for bf16 the same products summed in another
 * order), for CPUs without AVX512-VNNI / AVX512-BF16 and as the tests' twin.
 */
#ifndef RF_LOWP_H
#define RF_LOWP_H

#include "rf_lowp_gemm.h"
#include "rf_gates.h"
#include "rf_cells.h"
#include "rf_interrupt.h"

/* ------------------------------------------------------------------ one layer direction */
/* The configuration of one direction of one layer over packed rows (the layout of
 * kernels/cy_rnn.pyx run_layer: step t holds rows [off_t, off_t + bsz[t]), bsz
 * non-increasing; hbuf's two halves hold h0 at the start; rows that are not live keep
 * their state; reverse directions run t = T-1 .. 0). */
typedef struct {
    int code, G, In, H, Hout, T, N, B, rev, isa;   /* (`I` is taken: complex.h) */
    const int64_t *bsz;
    const float *x;             /* (N, I) */
    const rf_qmat_t *wih, *whh, *whr;
    const float *bx, *bh;       /* (G*H) each */
    float *xg;                  /* (N, G*H) input projections */
    float *hbuf;                /* (2, B, Hout) */
    float *c;                   /* (B, H): LSTM c0 in, c_n out */
    float *y; int ldy;          /* this direction's first output column, row stride */
    float *hg;                  /* (B, G*H) recurrent products */
    float *s2;                  /* (B, H): LSTM h before its projection; GRU r*h */
    void *qx; float *sx;        /* prepared inputs (N rows of wih->Kp), their scales (N) */
    void *qh; float *sh;        /* per thread: prepared states (B rows of the larger Kp), scales (B) */
    size_t qh_stride;           /* bytes of one thread's qh */
    rf_sync_t *bar;
    rf_intr_t *intr;
} rf_lowp_layer_t;

/* Units [u0, u1) of this thread: whole blocks of RF_QB, split evenly. */
static inline void rf_lowp_split(int width, int tid, int nthr, int *b0, int *b1) {
    int nbk = (width + RF_QB - 1) / RF_QB;
    *b0 = (int)((long)nbk * tid / nthr);
    *b1 = (int)((long)nbk * (tid + 1) / nthr);
}

/* Gate blocks [b0, b1) of every gate g in `gmask` of W. */
static inline void rf_lowp_gates_gemm(const rf_lowp_layer_t *L, const rf_qmat_t *W, unsigned gmask, int M,
                                      const void *A, const float *as, int b0, int b1, float *C, int ldc, int sgc) {
    const int bpg = W->Hp / RF_QB;
    for (int g = 0; g < W->G; ++g)
        if (gmask >> g & 1u) rf_lowp_gemm(L->isa, W, M, A, as, g * bpg + b0, g * bpg + b1, C, ldc, sgc);
}

static void rf_lowp_worker(const rf_lowp_layer_t *L, int tid, int nthr) {
    const int G = L->G, H = L->H, Hout = L->Hout, B = L->B, T = L->T, GH = G * H;
    const int prec = L->wih->prec, code = L->code;
    const int es = rf_lowp_esize(prec);
    int b0, b1, p0, p1;
    rf_lowp_split(H, tid, nthr, &b0, &b1);
    const int u0 = b0 * RF_QB < H ? b0 * RF_QB : H, u1 = b1 * RF_QB < H ? b1 * RF_QB : H;
    rf_lowp_split(Hout, tid, nthr, &p0, &p1);
    const int q0 = p0 * RF_QB < Hout ? p0 * RF_QB : Hout, q1 = p1 * RF_QB < Hout ? p1 * RF_QB : Hout;
    void *qh = (char *)L->qh + (size_t)tid * L->qh_stride;
    float *sh = L->sh + (size_t)tid * B;
    const int Kx = L->wih->Kp, Kh = L->whh->Kp;

    /* 1. the inputs prepared (rows split), then each thread projects its own units */
    {
        int r0 = (int)((long)L->N * tid / nthr), r1 = (int)((long)L->N * (tid + 1) / nthr);
        rf_lowp_prep(prec, r1 - r0, L->In, Kx, L->x + (size_t)r0 * L->In, L->In,
                     (char *)L->qx + (size_t)r0 * Kx * es, L->sx + r0);
        rf_sync(L->bar, nthr);
        rf_lowp_gates_gemm(L, L->wih, 0xffu, L->N, L->qx, L->sx, b0, b1, L->xg, GH, H);
    }
    /* 2. the steps */
    int off = L->rev ? L->N - (int)L->bsz[T - 1] : 0;
    for (int s = 0; s < T; ++s) {
        const int t = L->rev ? T - 1 - s : s;
        const int n = (int)L->bsz[t];
        if (tid == 0 && rf_intr_poll(L->intr, L->bar, nthr)) { /* Ctrl-C: every thread stops below */ }
        if (rf_sync_stopped(L->bar)) break;
        const float *hr = L->hbuf + (size_t)(s & 1) * B * Hout;
        float *hw = L->hbuf + (size_t)((s + 1) & 1) * B * Hout;
        const float *xgt = L->xg + (size_t)off * GH;
        float *yt = L->y + (size_t)off * L->ldy;
        rf_lowp_prep(prec, n, Hout, Kh, hr, Hout, qh, sh);
        if (code == RF_GRU_NOLBR) {
            rf_lowp_gates_gemm(L, L->whh, 0x3u, n, qh, sh, b0, b1, L->hg, GH, H);
            rf_gru_rz_f(n, H, u0, u1, xgt, GH, L->hg, GH, L->bx, L->bh, hr, Hout, L->s2, H);
            rf_sync(L->bar, nthr);
            rf_lowp_prep(prec, n, H, Kh, L->s2, H, qh, sh);
            rf_lowp_gates_gemm(L, L->whh, 0x4u, n, qh, sh, b0, b1, L->hg, GH, H);
            rf_gru_n_f(n, H, u0, u1, xgt, GH, L->hg, GH, L->bx, L->bh, hr, Hout, hw, Hout, yt, L->ldy);
        } else {
            rf_lowp_gates_gemm(L, L->whh, 0xffu, n, qh, sh, b0, b1, L->hg, GH, H);
            if (code == RF_LSTM) {
                rf_lstm_gates_f(n, H, u0, u1, xgt, GH, L->hg, GH, H, L->bx, L->bh, L->c, H, hw, Hout, yt, L->ldy);
            } else if (code == RF_LSTM_PROJ) {
                rf_lstm_gates_f(n, H, u0, u1, xgt, GH, L->hg, GH, H, L->bx, L->bh, L->c, H, L->s2, H, NULL, 0);
                rf_sync(L->bar, nthr);
                rf_lowp_prep(prec, n, H, L->whr->Kp, L->s2, H, qh, sh);
                rf_lowp_gemm(L->isa, L->whr, n, qh, sh, p0, p1, hw, Hout, 0);
                rf_copy_cols_f(n, q0, q1, hw, Hout, yt, L->ldy);
            } else if (code == RF_GRU_LBR) {
                rf_gru_gates_f(n, H, u0, u1, xgt, GH, L->hg, GH, H, L->bx, L->bh, hr, Hout, hw, Hout, yt, L->ldy);
            } else {
                rf_rnn_gates_f(n, code == RF_RNN_RELU, u0, u1, xgt, GH, L->hg, GH, L->bx, L->bh, hw, Hout,
                               yt, L->ldy);
            }
        }
        rf_sync(L->bar, nthr);    /* every unit of h_t written before the next step reads it */
        if (L->rev) {
            if (s + 1 < T) off -= (int)L->bsz[T - 2 - s];
        } else {
            off += n;
        }
    }
    rf_lowp_release();
}

#endif /* RF_LOWP_H */
