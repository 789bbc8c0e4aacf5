/* rf_cells.h: the cell codes every kernel dispatches on. rnnfast/cells.py defines them
 * (LSTM, LSTM_PROJ, GRU_LBR, GRU_NOLBR, RNN_TANH, RNN_RELU = range(6)); this enum is their
 * one copy for C and Cython (cy_rnn, cy_train), and tests/test_cy_kernel.py checks the
 * two agree through cy_rnn.build_info()["cell_codes"]. */
#ifndef RF_CELLS_H
#define RF_CELLS_H

enum rf_cell {
    RF_LSTM = 0,        /* gates i, f, g, o */
    RF_LSTM_PROJ = 1,   /* LSTM with a projection of h (proj_size) */
    RF_GRU_LBR = 2,     /* GRU, linear_before_reset=True (PyTorch, Keras reset_after) */
    RF_GRU_NOLBR = 3,   /* GRU, linear_before_reset=False (ONNX's default) */
    RF_RNN_TANH = 4,
    RF_RNN_RELU = 5
};

/* Activation codes of the cell variants: rnnfast/cells.py ACTIVATION_CODES (the order
 * of ACTIVATIONS), checked against this enum by tests/test_cy_kernel.py. */
enum rf_act {
    RF_ACT_SIGMOID = 0, RF_ACT_TANH = 1, RF_ACT_RELU = 2, RF_ACT_AFFINE = 3, RF_ACT_LEAKY_RELU = 4,
    RF_ACT_THRESHOLDED_RELU = 5, RF_ACT_SCALED_TANH = 6, RF_ACT_HARD_SIGMOID = 7, RF_ACT_ELU = 8,
    RF_ACT_SOFTSIGN = 9, RF_ACT_SOFTPLUS = 10
};

/* A cell variant (rnnfast.cells.Variant) as the kernels take it: the activations of the
 * gates, of the candidate (an RNN's nonlinearity) and of the LSTM's output, their
 * parameters, the clip of the pre-activations (+inf: none), the coupled input-forget
 * gate and the peepholes (each direction's (3H,) vector is passed beside it). NULL
 * stands for the standard cell. */
typedef struct {
    int act[3];
    double alpha[3], beta[3];
    double clip;
    int input_forget, peephole;
} rf_var_t;

#endif
