#define _GNU_SOURCE     /* sched_getcpu, CPU_SET (rf_pool.h); Python.h defines it for the Cython modules */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#include "rf_fused.h"
#include "rf_pool.h"
/* Two halves of one call (each rf_rowdot1 over m/2 weight rows of K, reversed every other
 * call, as a served token): in an OpenMP parallel region per call, handed to rf_pool's
 * helper thread, or both on one thread. */
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static float *W, *x, *C; static int M, K, rev;
static void half(void *arg, int tid){ (void)arg; int m2=M/2; rf_rowdot1_f(m2,K,x,W+(size_t)tid*m2*K,K,C+tid*m2,rev); }
int main(int argc,char**argv){
  M=atoi(argv[1]); K=atoi(argv[2]);
  W=aligned_alloc(64,4L*M*K); x=aligned_alloc(64,4L*K); C=aligned_alloc(64,4L*M);
  for(long i=0;i<(long)M*K;i++)W[i]=1e-3f*(i%13); for(int i=0;i<K;i++)x[i]=1;
  const char *names[3]={"OpenMP region","rf_pool","one thread"};
  for(int mode=0;mode<3;mode++){ double best=1e9; int pooled=0;
    for(int r=0;r<7;r++){ int reps=20000; double t=now();
      for(int i=0;i<reps;i++){ rev=i&1;
        if(mode==0){
#pragma omp parallel num_threads(2)
          half(NULL, omp_get_thread_num());
        } else if(mode==1){ pooled+=rf_pool_run(half, NULL); }
        else { half(NULL,0); half(NULL,1); }
      }
      t=(now()-t)/reps; if(t<best)best=t; }
    printf("m=%d K=%d %-14s %.2f us a call%s\n",M,K,names[mode],best*1e6,mode==1&&pooled==0?" (pool unavailable)":"");}
}
