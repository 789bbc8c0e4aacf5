/* General matrix product on one thread: C = op(A) @ op(B) + beta * C, row-major, float
 * (_f) and double (_d), with the register-blocked micro-kernel of rf_fused.h's family
 * (RF_MR rows x RF_MAXNV vectors of accumulators).
 *
 * Why not BLAS: the BLAS that NumPy/SciPy ship may run kernels below what the CPU has
 * (OpenBLAS pinned to AVX2 by OPENBLAS_CORETYPE on AVX-512 machines, for instance: about
 * half of the machine's peak), and the training GEMMs are most of a training step.
 *
 * Blocking (GotoBLAS order): B is packed per block of KC x NC into panels of
 * RF_MAXNV * RF_VL columns (k-major, zero-padded); the block (~512 KB) stays in L2 while
 * the slivers of RF_MR rows of A pass over it, each sliver staying in L1 across the
 * panels. A is read in place when it is row-major (ta = 0); a transposed A (stored
 * K x M) is copied per KC x MC block as k-major rows, so that a sliver's RF_MR values
 * of one k are adjacent. The code is in rf_gemm_tmpl.h, included once per element type.
 */
#ifndef RF_GEMM_H
#define RF_GEMM_H

#include <stdlib.h>
#include "rf_fused.h"
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define RF_GEMM_HAVE_PTHREAD 1      /* per-thread scratch freed at thread exit */
#else
#define RF_GEMM_HAVE_PTHREAD 0
#endif

#define RF_GEMM_KC 256          /* k per packed block (a B panel row is 256 bytes)... */
#define RF_GEMM_NP 8            /* ...for blocks of 8 panels: KC x NC = 512 KB */
#define RF_GEMM_BBYTES (512u << 10)   /* narrower blocks take more k, up to this size */
#define RF_GEMM_KCMAX 1024
#define RF_GEMM_MC 96           /* rows per copied block of a transposed A */

#define RF_TMPL "rf_gemm_tmpl.h"
#include "rf_each_type.h"
#undef RF_TMPL

#endif /* RF_GEMM_H */
