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

#endif
