/* Per-step compute and barrier-wait times of a two-thread LSTM recurrence (rf_fused_step
 * on each thread's half of the panels, rf_sync between steps) right after an idle pause
 * of 0.25 s, as the referee's rounds start, in windows of 200 steps: usage `after_pause B`.
 * On the project's host both threads' compute per step ran 50-70 % slower for the first
 * ~3-5 ms after each pause (B=8: 15-17 us per step against 10 in steady state) while the
 * barrier waits stayed ~0.1-0.6 us: the cores themselves are slow (clock ramp), not the
 * synchronisation. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <omp.h>
#include "rf_fused.h"
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static float* rnd(size_t n){float*p=aligned_alloc(64,((n*4+63)/64)*64);for(size_t i=0;i<n;i++)p[i]=(rand()/(float)RAND_MAX-0.5f)*0.1f;return p;}
#define S 1000
double comp[2][S], wait[2][S];
int main(int argc,char**argv){
  int H=256,B=argc>1?atoi(argv[1]):8,G=4,K=H,GH=G*H; int UP=rf_panel_units(G,0), npan=H/UP;
  float *P=rnd((size_t)npan*K*G*UP), *xg=rnd((size_t)B*GH), *hb=rnd(2*(size_t)B*H), *c=rnd((size_t)B*H), *bx=rnd(GH), *bh=rnd(GH);
  rf_sync_t bar;
  for(int rep=0;rep<5;rep++){
    if(rep) usleep(250000);
    rf_sync_init(&bar,2);
    double t0=now();
    #pragma omp parallel num_threads(2)
    { int me=omp_get_thread_num(); int p0=npan*me/2,p1=npan*(me+1)/2;
      for(int s=0;s<S;s++){ float*hr=hb+(s%2)*B*H,*hw=hb+((s+1)%2)*B*H; double a=now();
        rf_fused_step_f(0,G,H,K,B,p0,p1,P,xg,GH,NULL,0,bx,bh,hr,H,c,H,hw,H,NULL,H);
        double b=now(); rf_sync(&bar,2); double e=now(); comp[me][s]=b-a; wait[me][s]=e-b; } }
    double tot=now()-t0;
    if(rep==0) continue;    /* warm-up: no pause before it */
    printf("rep %d total %.2f ms (%.1f us/step)\n",rep,tot*1e3,tot*1e6/S);
    for(int w=0;w<S;w+=200){ double cs[2]={0,0},ws[2]={0,0},wm[2]={0,0};
      for(int s=w;s<w+200;s++) for(int t=0;t<2;t++){cs[t]+=comp[t][s];ws[t]+=wait[t][s]; if(wait[t][s]>wm[t])wm[t]=wait[t][s];}
      printf("  steps %4d-%4d: comp us/step %.2f %.2f  wait us/step %.2f %.2f  max wait us %.0f %.0f\n",w,w+199,cs[0]/200*1e6,cs[1]/200*1e6,ws[0]/200*1e6,ws[1]/200*1e6,wm[0]*1e6,wm[1]*1e6);}
  }
}
