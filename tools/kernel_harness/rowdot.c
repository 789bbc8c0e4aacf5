#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <math.h>
#include "rf_fused.h"
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
/* variant B: 16 rows, running pointer + stride, x kept in L1 */
__attribute__((noinline)) void dotB(int m, int K, const float *x, const float *W, float *C, int pfd) {
    for (int r0 = 0; r0 < m; r0 += 16) {
        const float *w = W + (size_t)r0 * K;
        rf_vf acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = (rf_vf){0};
        for (int k = 0; k < K; k += 16) {
            rf_vf a; memcpy(&a, x + k, 64);
            if (pfd) __builtin_prefetch(w + (size_t)16 * K + k * 16, 0, 3);   /* next block, 16 lines per k-step */
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) { rf_vf wv; memcpy(&wv, w + (size_t)i * K + k, 64); acc[i] += a * wv; }
        }
        rf_vf s = rf_reduce_lanes_f(acc);
        memcpy(C + r0, &s, 64);
    }
}
int main(int argc,char**argv){
  int m=atoi(argv[1]), K=atoi(argv[2]);
  float *A=aligned_alloc(64,4*K), *W=aligned_alloc(64,4L*m*K+4096), *C=aligned_alloc(64,4L*m+64);
  for(int i=0;i<K;i++)A[i]=rand()/(float)RAND_MAX-0.5f;
  for(long i=0;i<(long)m*K;i++)W[i]=rand()/(float)RAND_MAX-0.5f;
  for(int pf=0;pf<2;pf++){
  double best=1e9,t; int reps=400;
  for(int r=0;r<7;r++){t=now();for(int i=0;i<reps;i++)dotB(m,K,A,W,C,pf);t=(now()-t)/reps;if(t<best)best=t;}
  double e=0; for(int r=0;r<m;r++){double s=0;for(int k=0;k<K;k++)s+=(double)A[k]*W[(long)r*K+k]; if(fabs(s-C[r])>e)e=fabs(s-C[r]);}
  double b2=1e9; for(int r=0;r<7;r++){t=now();for(int i=0;i<reps;i++)rf_rowdot_f(1,m,K,A,K,W,K,C,m);t=(now()-t)/reps;if(t<b2)b2=t;}
  printf("m=%d K=%d pf=%d dotB %.2f us %.1f GB/s err %.1e | rowdot %.2f us %.1f GB/s\n",m,K,pf,best*1e6,4.0*m*K/best/1e9,e,b2*1e6,4.0*m*K/b2/1e9);}
}
