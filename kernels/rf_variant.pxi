# A cell variant as the kernels take it (rf_cells.h's rf_var_t), read from the float64
# vector of rnnfast.cells.variant_vector: included by the Cython modules whose kernels
# take variants (cy_rnn through rf_fused_decl.pxi, cy_train).
cdef extern from "rf_cells.h" nogil:
    ctypedef struct rf_var_t:
        int act[3]
        double alpha[3]
        double beta[3]
        double clip
        int input_forget
        int peephole

# the layout of a cell variant's vector (one definition: rnnfast/cells.py, variant_vector)
from rnnfast.cells import (VARIANT_CLIP, VARIANT_FLAG, VARIANT_GATE, VARIANT_INPUT_FORGET, VARIANT_LEN,
                           VARIANT_PEEPHOLE)
cdef int _VARIANT_FLAG = VARIANT_FLAG, _VARIANT_GATE = VARIANT_GATE, _VARIANT_CLIP = VARIANT_CLIP
cdef int _VARIANT_INPUT_FORGET = VARIANT_INPUT_FORGET, _VARIANT_PEEPHOLE = VARIANT_PEEPHOLE, _VARIANT_LEN = VARIANT_LEN


cdef bint _read_variant(const double[::1] vp, rf_var_t *var):
    """Fill `var` from the variant vector `vp`; False for the standard cell (None, or a
    vector whose flag is 0)."""
    cdef int a
    if vp is None or vp.shape[0] < _VARIANT_LEN or vp[_VARIANT_FLAG] == 0:
        return False
    for a in range(3):      # (gate, candidate, output): (code, alpha, beta) each
        var.act[a] = <int>vp[_VARIANT_GATE + 3 * a]
        var.alpha[a] = vp[_VARIANT_GATE + 3 * a + 1]
        var.beta[a] = vp[_VARIANT_GATE + 3 * a + 2]
    var.clip = vp[_VARIANT_CLIP]
    var.input_forget = vp[_VARIANT_INPUT_FORGET] != 0
    var.peephole = vp[_VARIANT_PEEPHOLE] != 0
    return True
