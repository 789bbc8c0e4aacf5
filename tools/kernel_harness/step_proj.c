#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "rf_fused.h"
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static float* rnd(size_t n){float*p=aligned_alloc(64,((n*4+63)/64)*64);for(size_t i=0;i<n;i++)p[i]=(rand()/(float)RAND_MAX-0.5f)*0.1f;return p;}
int main(int argc,char**argv){
  int H=atoi(argv[1]), n=atoi(argv[2]), N=atoi(argv[3]); int G=4, K=H, GH=G*H;
  int UP=rf_panel_units(G,0), npan=(H+UP-1)/UP;
  float *W=rnd((size_t)GH*K), *P=rnd((size_t)npan*K*G*UP), *A=rnd((size_t)N*K), *C=rnd((size_t)N*GH);
  float *hp=rnd((size_t)n*K), *xg=rnd((size_t)n*GH), *bx=rnd(GH), *bh=rnd(GH), *c=rnd((size_t)n*H), *h1=rnd((size_t)n*H), *h2=rnd((size_t)n*H);
  double best=1e9, t;
  for(int r=0;r<5;r++){t=now(); rf_pack_f(G,H,K,0,npan,W,P); t=now()-t; if(t<best)best=t;}
  printf("pack %.1f us (%.1f us/MB)\n",best*1e6,best*1e6/(GH*K*4/1e6));
  best=1e9;
  for(int r=0;r<5;r++){t=now(); rf_gemm_panels_f(G,H,K,N,0,npan,A,K,P,C,GH); t=now()-t; if(t<best)best=t;}
  printf("proj N=%d: %.2f ms %.1f GF/s\n",N,best*1e3,2.0*N*GH*K/best/1e9);
  best=1e9; int steps=50;
  for(int r=0;r<5;r++){t=now(); for(int s=0;s<steps;s++){rf_fused_step_f(0,G,H,K,n,0,npan,P,xg,GH,NULL,0,bx,bh,hp,K,c,H,h1,H,h2,H);} t=(now()-t)/steps; if(t<best)best=t;}
  printf("step n=%d: %.1f us %.1f GF/s\n",n,best*1e6,2.0*n*GH*K/best/1e9);
  double s=0; for(int i=0;i<n*H;i++) s+=h1[i]+c[i]; for(size_t i=0;i<(size_t)N*GH;i+=97) s+=C[i];
  printf("chk %g\n",s);
}
