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
#if defined(__AVX512F__)
#include <immintrin.h>
#define RF_HAVE_STREAM 1
#else
#define RF_HAVE_STREAM 0
#endif

#define RF_VBYTES 64
typedef float rf_vf __attribute__((vector_size(RF_VBYTES)));
typedef double rf_vd __attribute__((vector_size(RF_VBYTES)));
#define RF_MR 6          /* rows per micro-kernel block */
#define RF_MAXNV 4       /* vectors per panel row */
#define RF_MRH 8         /* rows of the half-panel micro-kernel (rf_mkh) */
#ifndef RF_HALF_PANELS
#define RF_HALF_PANELS 1 /* 7-8 float rows take rf_mkh (0: rf_mk's row blocks) */
#endif
#define RF_STREAM_MIN_BYTES (16u << 20)  /* projections this large are stored streaming */
#define RF_L2_KEEP_BYTES (1u << 20)      /* a thread's weight slice above this is prefetched */

/* Units per panel: a panel row holds G*UP values in NV = G*UP/VL vectors (NV = 3 or 4). */
static inline int rf_panel_units(int G, int is_double) {
    int vl = is_double ? RF_VBYTES / 8 : RF_VBYTES / 4;
    return G == 1 ? 4 * vl : (G == 2 ? 2 * vl : vl);
}

/* Start of row block b of a step's n rows, cut into ceil(n / RF_MR) blocks: whole
 * RF_MR-row blocks first, except that a remainder of 1 or 4 rows takes one row from the
 * block before it (5 + 2, 5 + 5). Measured per block on a Zen 5 core (K = 256, 512 KB of
 * weights from L2): 1-6 rows take 2.08, 2.49, 3.80, 4.94, 4.89, 5.79 us; a 2-row block
 * is bound by L2 bandwidth (one 256-byte panel row per k), 6 rows by the FMA units, and
 * the 4-row form runs no faster than the 5-row one, so equal blocks (4 + 4 for 8 rows:
 * 9.9 us) lose to 6 + 2 (8.3 us). 7 or 8 float rows take neither: rf_mkh runs them as
 * one block, over half a 4-vector panel (LSTM, RNN) at a time (2 x 8 accumulators) or a
 * whole 3-vector one (GRU, 3 x 8), so each weight line is read once: 7.36 -> 6.92 us for
 * 7 rows and 8.31 -> 7.88 for 8 (4 vectors), 5.60 -> 5.14 and 6.20 -> 5.78 (3 vectors); one
 * LSTM H=256 step of 8 rows over all panels 21.2 -> 19.4 us (tools/kernel_harness/
 * step_proj, built with -DRF_HALF_PANELS=0 and 1). */
static inline int rf_row_block(int n, int b) {
    const int nblk = (n + RF_MR - 1) / RF_MR, rem = n % RF_MR;
    if (b >= nblk) return n;
    if (nblk >= 2 && (rem == 1 || rem == 4) && b == nblk - 1) return RF_MR * b - 1;
    return RF_MR * b;
}

#define RF_TMPL "rf_fused_tmpl.h"
#include "rf_each_type.h"
#undef RF_TMPL

#endif /* RF_FUSED_H */
