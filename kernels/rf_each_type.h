/* Include the template RF_TMPL (a quoted file name) once per element type, with
 * RF_T (element type), RF_VT (vector type), RF_VL (lanes), RF_FN(name) (suffixed name:
 * _f or _d), RF_VEXP / RF_VTANH (its exp and tanh) and, for float only, RF_FLOAT_BODY
 * defined. No include guard: each header
 * that instantiates a template includes this once. Needs rf_vf / rf_vd and RF_VBYTES
 * (rf_fused.h). */
#define RF_T float
#define RF_VT rf_vf
#define RF_VL (RF_VBYTES / 4)
#define RF_FN(name) name##_f
#define RF_FLOAT_BODY
#define RF_VEXP rf_expf         /* exp and tanh of the element type (rf_gates.h's in float) */
#define RF_VTANH rf_tanhf
#include RF_TMPL
#undef RF_VEXP
#undef RF_VTANH
#undef RF_FLOAT_BODY
#undef RF_T
#undef RF_VT
#undef RF_VL
#undef RF_FN

#define RF_T double
#define RF_VT rf_vd
#define RF_VL (RF_VBYTES / 8)
#define RF_FN(name) name##_d
#define RF_VEXP exp
#define RF_VTANH tanh
#include RF_TMPL
#undef RF_VEXP
#undef RF_VTANH
#undef RF_T
#undef RF_VT
#undef RF_VL
#undef RF_FN
