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
 * The code is in rf_fused_tmpl.h, included once per element type.
 */
#ifndef RF_FUSED_H
#define RF_FUSED_H

#include <stdint.h>
#include <string.h>
#include "rf_gates.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define RF_HAVE_STREAM 1
#else
#define RF_HAVE_STREAM 0
#endif

/* The ISA level's vector width and register blocking (one table: the only place these
 * values are set). Each level's register file holds every accumulator block below with
 * room for its weight vectors and the broadcast row value, so no accumulator lives in
 * memory; tools/spill_check proves it for each -march target. AVX-512: 32 registers
 * (6 x 4 accumulators + 4 weights + 1; rf_mkh's 8 x 3 + 3 + 1). AVX2 and SSE2: 16
 * (3 x 4 + 1 weight at a time + 3 row values; rf_mkh is off). */
#if defined(__AVX512F__)
#define RF_VBYTES 64
#define RF_MR 6          /* rows per micro-kernel block */
#define RF_HALF_PANELS_ISA 1
#define RF_R1_MAXV 16    /* rf_rowdot1: vectors of the input row held in registers */
#elif defined(__AVX__)
#define RF_VBYTES 32
#define RF_MR 3
#define RF_HALF_PANELS_ISA 0
#define RF_R1_MAXV 4
#else
#define RF_VBYTES 16
#define RF_MR 3
#define RF_HALF_PANELS_ISA 0
#define RF_R1_MAXV 4
#endif
typedef float rf_vf __attribute__((vector_size(RF_VBYTES)));
typedef double rf_vd __attribute__((vector_size(RF_VBYTES)));
#define RF_CMR(x) ((x) < RF_MR ? (x) : RF_MR)   /* a row count of a switch, capped at RF_MR */
#define RF_MAXNV 4       /* vectors per panel row */
#define RF_MRH 8         /* rows of the half-panel micro-kernel (rf_mkh) */
#ifndef RF_HALF_PANELS
#define RF_HALF_PANELS RF_HALF_PANELS_ISA /* 7-8 float rows take rf_mkh (0: rf_mk's row blocks) */
#endif
#define RF_STREAM_MIN_BYTES (16u << 20)  /* projections this large are stored streaming */
#define RF_L2_KEEP_BYTES (1u << 20)      /* a thread's weight slice above this is prefetched */

/* Named accumulators: a block of up to 8 rows x 4 vectors as separate variables
 * c<r>_<v>, never an array, so that the optimiser has nothing to demote to memory (GCC
 * kept `acc[RF_MR][RF_MAXNV]` on the stack under -march=rocketlake tuning: commit
 * 64283eb, docs/performance.md). Rows and vectors past the block's constant MR_ / NV_
 * are dead code. The kernel declares rf_acc_t (its vector type); RF_ACC_FMA needs
 * RF_AVAL(r) (row r's value at this k) and w0..w3. */
#define RF_R8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define RF_ACC_DECL(r) rf_acc_t c##r##_0 __attribute__((unused)) = {0}, c##r##_1 __attribute__((unused)) = {0}, \
                             c##r##_2 __attribute__((unused)) = {0}, c##r##_3 __attribute__((unused)) = {0};
#define RF_ACC_FMA(r)                                                                       \
    if ((r) < MR_) {                                                                        \
        const rf_acc_t a_ = RF_AVAL(r) - (rf_acc_t){0};   /* splat (x - 0 == x) */               \
        if (NV_ > 0) c##r##_0 += a_ * w0;                                                   \
        if (NV_ > 1) c##r##_1 += a_ * w1;                                                   \
        if (NV_ > 2) c##r##_2 += a_ * w2;                                                   \
        if (NV_ > 3) c##r##_3 += a_ * w3;                                                   \
    }
/* RF_ACC_PUT(r) calls RF_PUT(r, v, acc) for each live vector v of row r. */
#define RF_ACC_PUT(r)                                                                       \
    if ((r) < MR_) {                                                                        \
        if (NV_ > 0) RF_PUT(r, 0, c##r##_0);                                                \
        if (NV_ > 1) RF_PUT(r, 1, c##r##_1);                                                \
        if (NV_ > 2) RF_PUT(r, 2, c##r##_2);                                                \
        if (NV_ > 3) RF_PUT(r, 3, c##r##_3);                                                \
    }
/* w0..w(NV_-1) = the NV_ vectors at p (element stride between vectors: vs). */
#define RF_LOAD_W(p, vs)                                                                    \
    rf_acc_t w0 __attribute__((unused)) = {0}, w1 __attribute__((unused)) = {0},               \
          w2 __attribute__((unused)) = {0}, w3 __attribute__((unused)) = {0};               \
    if (NV_ > 0) memcpy(&w0, (p), sizeof(rf_acc_t));                                           \
    if (NV_ > 1) memcpy(&w1, (p) + (vs), sizeof(rf_acc_t));                                    \
    if (NV_ > 2) memcpy(&w2, (p) + 2 * (vs), sizeof(rf_acc_t));                                \
    if (NV_ > 3) memcpy(&w3, (p) + 3 * (vs), sizeof(rf_acc_t));

/* Units per panel: a panel row holds G*UP values in NV = G*UP/VL vectors (NV = 3 or 4). */
static inline int rf_panel_units(int G, int is_double) {
    int vl = is_double ? RF_VBYTES / 8 : RF_VBYTES / 4;
    return G == 1 ? 4 * vl : (G == 2 ? 2 * vl : vl);
}

/* Start of row block b of a step's n rows, cut into ceil(n / RF_MR) blocks: whole
 * RF_MR-row blocks first, except that a remainder of 1 or 4 rows takes one row from the
 * block before it (5 + 2, 5 + 5). With the weights read from L2, a 2-row block is bound
 * by L2 bandwidth (one 256-byte panel row per k), a 6-row one by the FMA units, and the
 * 4-row form runs no faster than the 5-row one, so equal blocks (4 + 4 for 8 rows) lose
 * to 6 + 2 (commit 48267e2; figures in docs/performance.md). 7 or 8 float rows take
 * neither: rf_mkh runs them as one block, over half a 4-vector panel (LSTM, RNN) at a
 * time (2 x 8 accumulators) or a whole 3-vector one (GRU, 3 x 8), so each weight line is
 * read once a step rather than once per block (commit cbc6c65; figures in
 * docs/performance.md). */
static inline int rf_row_block(int n, int b) {
    const int nblk = (n + RF_MR - 1) / RF_MR, rem = n % RF_MR;
    if (b >= nblk) return n;
    if (nblk >= 2 && (rem == 1 || rem == 4) && b == nblk - 1) return RF_MR * b - 1;
    return RF_MR * b;
}

#define RF_TMPL "rf_gates_var_tmpl.h"  /* the cell variants' gate math (rf_fused_step_v calls it) */
#include "rf_each_type.h"
#undef RF_TMPL
#define RF_TMPL "rf_fused_tmpl.h"
#include "rf_each_type.h"
#undef RF_TMPL

#endif /* RF_FUSED_H */
