/* One fused LSTM step (H=256, B rows) on two threads, each on half the panels, timed in
 * parts: the first panel of the step (it also fetches the other thread's half of h), the
 * other panels, and the wait at the barrier (rf_sync); xg stays hot (no projection).
 * Usage `step_panels B`; the second of two runs counts (the first carries the warm-up).
 * To compare two builds of the kernels, compile it against each kernels/ directory. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#include "rf_fused.h"
static inline double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static float* rnd(size_t n){float*p=aligned_alloc(64,((n*4+63)/64)*64);for(size_t i=0;i<n;i++)p[i]=(rand()/(float)RAND_MAX-0.5f)*0.1f;return p;}
int main(int argc,char**argv){
  int H=256,B=argc>1?atoi(argv[1]):8,G=4,K=H,GH=G*H,S=2000; int UP=rf_panel_units(G,0), npan=H/UP;
  float *P=rnd((size_t)npan*K*G*UP), *xg=rnd((size_t)B*GH), *hb=rnd(2*(size_t)B*H), *c=rnd((size_t)B*H), *bx=rnd(GH), *bh=rnd(GH);
  rf_sync_t bar; double tf[2]={0},tr[2]={0},tw[2]={0};
  for(int rep=0;rep<2;rep++){ rf_sync_init(&bar,2); tf[0]=tf[1]=tr[0]=tr[1]=tw[0]=tw[1]=0;
  #pragma omp parallel num_threads(2)
  { int me=omp_get_thread_num(); int p0=npan*me/2,p1=npan*(me+1)/2;
    for(int s=0;s<S;s++){ float*hr=hb+(s%2)*B*H,*hw=hb+((s+1)%2)*B*H; double a=now();
      rf_fused_step_f(0,G,H,K,B,p0,p0+1,P,xg,GH,NULL,0,bx,bh,hr,H,c,H,hw,H,NULL,H);
      double b=now();
      rf_fused_step_f(0,G,H,K,B,p0+1,p1,P,xg,GH,NULL,0,bx,bh,hr,H,c,H,hw,H,NULL,H);
      double e=now(); rf_sync(&bar,2); double f=now(); tf[me]+=b-a; tr[me]+=e-b; tw[me]+=f-e; } }
  printf("B=%d: first panel %.2f us, other %d panels %.2f us (%.2f each), wait %.2f us per step (thread 0); thread 1: %.2f %.2f %.2f\n",B,tf[0]/S*1e6,npan/2-1,tr[0]/S*1e6,tr[0]/S*1e6/(npan/2-1),tw[0]/S*1e6,tf[1]/S*1e6,tr[1]/S*1e6,tw[1]/S*1e6); }
}
