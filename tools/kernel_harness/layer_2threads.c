#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>
#include "rf_fused.h"
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static float* rnd(size_t n){float*p=aligned_alloc(64,((n*4+63)/64)*64);for(size_t i=0;i<n;i++)p[i]=(rand()/(float)RAND_MAX-0.5f)*0.1f;return p;}
int main(int argc,char**argv){
  int H=atoi(argv[1]), B=atoi(argv[2]), T=atoi(argv[3]), nth=atoi(argv[4]); int G=4,K=H,I=atoi(argv[5]),GH=G*H,N=T*B;
  int UP=rf_panel_units(G,0), npan=(H+UP-1)/UP; size_t npk=(size_t)npan*K*G*UP, npi=(size_t)npan*I*G*UP;
  float *Wih=rnd((size_t)GH*I), *Whh=rnd((size_t)GH*K), *P=rnd(npk+npi), *x=rnd((size_t)N*I), *xg=rnd((size_t)N*GH), *y=rnd((size_t)N*H);
  float *hb=rnd(2*(size_t)B*H), *c=rnd((size_t)B*H), *bx=rnd(GH), *bh=rnd(GH);
  const int nopf=getenv("NOPF")!=NULL;
  for(int rep=0;rep<6;rep++){
    double tp=0, ts=0, t0=now();
    #pragma omp parallel num_threads(nth)
    {
      int tid=omp_get_thread_num(); int p0=npan*tid/nth, p1=npan*(tid+1)/nth;
      double a=now();
      rf_pack_f(G,H,K,p0,p1,Whh,P); rf_pack_f(G,H,I,p0,p1,Wih,P+npk);
      rf_gemm_panels_f(G,H,I,N,p0,p1,x,I,P+npk,xg,GH);
      #pragma omp barrier
      double b=now();
      for(int s=0;s<T;s++){
        float *hr=hb+(s%2)*B*H, *hw=hb+((s+1)%2)*B*H;
        rf_fused_step_f(0,G,H,K,B,p0,p1,P,xg+(size_t)s*B*GH,GH,nopf||s+1==T?NULL:xg+(size_t)(s+1)*B*GH,B,bx,bh,hr,H,c,H,hw,H,y+(size_t)s*B*H,H);
        #pragma omp barrier
      }
      double e=now();
      if(tid==0){tp=b-a; ts=e-b;}
    }
    double tt=now()-t0;
    printf("threads %d: pack+proj %.0f us  steps %.0f us (%.1f us/step)  total %.0f us\n",nth,tp*1e6,ts*1e6,ts*1e6/T,tt*1e6);
  }
  double s=0; for(int i=0;i<N*H;i+=7)s+=y[i]; printf("chk %g\n",s);
}
