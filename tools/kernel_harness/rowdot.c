#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <math.h>
#include "rf_fused.h"
/* One input row against m weight rows of K (the serving path's products): rf_rowdot1
 * (one sequential stream of rows, the input in registers) reading forward on every call
 * or alternating forward and reverse (L2 reuse when the weights outgrow L2), against the
 * eight interleaved row streams of rf_rowdot_blk that it replaced. */
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void blk(int m, int K, const float *A, const float *W, float *C) {
    for (int r0 = 0; r0 < m; r0 += 8) {
        int nr = m - r0 < 8 ? m - r0 : 8;
        rf_rowdot_blk_f(1, 8, 2, 1, nr, K, A, K, W + (size_t)r0 * K, K, C + r0, m);
    }
}
int main(int argc,char**argv){
  int m=atoi(argv[1]), K=atoi(argv[2]);
  float *A=aligned_alloc(64,4*K+64), *W=aligned_alloc(64,4L*m*K+4096), *C=aligned_alloc(64,4L*m+64);
  for(int i=0;i<K;i++)A[i]=rand()/(float)RAND_MAX-0.5f;
  for(long i=0;i<(long)m*K;i++)W[i]=rand()/(float)RAND_MAX-0.5f;
  const char *names[3]={"rf_rowdot_blk (8 streams)","rf_rowdot1 forward","rf_rowdot1 alternating"};
  for(int v=0;v<3;v++){
    double best=1e9,t; int reps=400;
    for(int r=0;r<7;r++){t=now();for(int i=0;i<reps;i++){ if(v==0) blk(m,K,A,W,C); else rf_rowdot1_f(m,K,A,W,K,C,v==2&&(i&1)); }
      t=(now()-t)/reps;if(t<best)best=t;}
    double e=0; for(int r=0;r<m;r++){double s=0;for(int k=0;k<K;k++)s+=(double)A[k]*W[(long)r*K+k]; if(fabs(s-C[r])>e)e=fabs(s-C[r]);}
    printf("m=%d K=%d %-26s %.2f us %.1f GB/s err %.1e\n",m,K,names[v],best*1e6,4.0*m*K/best/1e9,e);
  }
}
