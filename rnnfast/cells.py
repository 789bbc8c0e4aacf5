"""The one definition of every recurrent cell: gate count, gate order, equations.

Both kernel backends and the NumPy reference follow this module. The gate order and
weight layout are PyTorch's, so trained weights carry over unchanged.

============  =====  ==========  =========================================================
cell          code   gates (G)   equations (per step, rows of W grouped by gate)
============  =====  ==========  =========================================================
lstm          0      i, f, g, o  i,f,o = sigmoid(W_i* x + b_i* + W_h* h + b_h*);
                                 g = tanh(...); c' = f*c + i*g; h' = o*tanh(c')
lstm (proj)   1      i, f, g, o  as lstm, then h' = (o*tanh(c')) W_hr^T (h is P wide)
gru           2      r, z, n     r,z = sigmoid(W_i* x + b_i* + W_h* h + b_h*);
                                 n = tanh(W_in x + b_in + r*(W_hn h + b_hn));
                                 h' = (1-z)*n + z*h        (linear_before_reset=True)
gru (no lbr)  3      r, z, n     n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)  (else as gru)
rnn tanh      4      -           h' = tanh(W_ih x + b_ih + W_hh h + b_hh)
rnn relu      5      -           h' = relu(W_ih x + b_ih + W_hh h + b_hh)
============  =====  ==========  =========================================================
"""
from __future__ import annotations

from dataclasses import dataclass

LSTM, LSTM_PROJ, GRU_LBR, GRU_NOLBR, RNN_TANH, RNN_RELU = range(6)


@dataclass(frozen=True)
class Cell:
    """Static description of a cell family."""

    name: str
    gates: tuple[str, ...]

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def has_cell_state(self) -> bool:
        return self.name == "lstm"


CELLS: dict[str, Cell] = {
    "lstm": Cell("lstm", ("i", "f", "g", "o")),
    "gru": Cell("gru", ("r", "z", "n")),
    "rnn": Cell("rnn", ("h",)),
}

NONLINEARITIES = ("tanh", "relu")


def cell_code(kind: str, *, proj: bool = False, linear_before_reset: bool = True,
              nonlinearity: str = "tanh") -> int:
    """Kernel code of a cell variant (see the module table)."""
    if kind == "lstm":
        return LSTM_PROJ if proj else LSTM
    if kind == "gru":
        return GRU_LBR if linear_before_reset else GRU_NOLBR
    if kind == "rnn":
        return RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    raise ValueError(f"unknown cell kind {kind!r}")
