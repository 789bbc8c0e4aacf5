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


# ============================================================================ cell variants
# The variants ONNX and Keras models use (ONNX's LSTM/GRU/RNN attributes): other
# activations, peepholes, a clip of the pre-activations, a coupled input-forget gate.
# Each activation's parameters and their defaults (those of the ONNX operator of that
# name; None: the function has no such parameter).
ACTIVATIONS: dict[str, tuple[float | None, float | None]] = {
    "sigmoid": (None, None),
    "tanh": (None, None),
    "relu": (None, None),
    "affine": (1.0, 0.0),               # alpha * x + beta
    "leaky_relu": (0.01, None),         # x if x >= 0 else alpha * x
    "thresholded_relu": (1.0, None),    # x if x > alpha else 0
    "scaled_tanh": (1.0, 1.0),          # alpha * tanh(beta * x)
    "hard_sigmoid": (0.2, 0.5),         # max(0, min(1, alpha * x + beta))
    "elu": (1.0, None),                 # x if x >= 0 else alpha * (exp(x) - 1)
    "softsign": (None, None),           # x / (1 + |x|)
    "softplus": (None, None),           # log(1 + exp(x))
}

# the kernels' activation codes: the position in ACTIVATIONS
ACTIVATION_CODES: dict[str, int] = {name: k for k, name in enumerate(ACTIVATIONS)}

# ONNX's activation names (the ``activations`` attribute of LSTM, GRU, RNN) -> rnnfast's
ONNX_ACTIVATIONS: dict[str, str] = {
    "Sigmoid": "sigmoid", "Tanh": "tanh", "Relu": "relu", "Affine": "affine", "LeakyRelu": "leaky_relu",
    "ThresholdedRelu": "thresholded_relu", "ScaledTanh": "scaled_tanh", "HardSigmoid": "hard_sigmoid",
    "Elu": "elu", "Softsign": "softsign", "Softplus": "softplus",
}


@dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise activation of a cell: a name of :data:`ACTIVATIONS` and its
    parameters. Equal to its name (a str) when its parameters are the defaults."""

    name: str
    alpha: float | None = None
    beta: float | None = None

    def _key(self) -> tuple:
        return (self.name, self.alpha, self.beta)

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return self.name == other and self._key() == activation(other)._key()
        if isinstance(other, Activation):
            return self._key() == other._key()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        params = [p for p in (self.alpha, self.beta) if p is not None]
        if self == self.name:
            return self.name
        return f"{self.name}({', '.join(repr(p) for p in params)})"

    __repr__ = __str__


def activation(spec, what: str = "activation") -> Activation:
    """An :class:`Activation` from a spec: a name, a tuple ``(name, alpha)`` or
    ``(name, alpha, beta)``, or an Activation. Parameters a function does not have must
    be left out (or None); the ones left out take their defaults."""
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        name, params = spec, ()
    elif isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str) and len(spec) <= 3:
        name, params = spec[0], tuple(spec[1:])
    else:
        raise TypeError(f"{what}: expected a name or a tuple (name, alpha[, beta]), got {spec!r}")
    if name not in ACTIVATIONS:
        raise ValueError(f"{what}: unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    defaults = ACTIVATIONS[name]
    vals = []
    for k, default in enumerate(defaults):
        v = params[k] if k < len(params) else None
        if v is None:
            vals.append(default)
            continue
        if default is None:
            raise ValueError(f"{what}: {name} takes no {('alpha', 'beta')[k]} (got {v!r})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
            raise ValueError(f"{what}: {name}'s {('alpha', 'beta')[k]} must be a finite number, got {v!r}")
        vals.append(float(v))
    return Activation(name, *vals)


@dataclass(frozen=True)
class Variant:
    """What sets a cell apart from its standard form (None stands for the standard cell).

    LSTM: i, f, o = gate(pre + peepholes), g = candidate(pre), c' = f*c + i*g,
    h' = o * output(c'); with peepholes the pre-activations of i and f add p_i*c and p_f*c,
    that of o adds p_o*c' (weights ``weight_ph_l{k}``, (3*H,) in the order i, f, o);
    ``input_forget``: f = 1 - i. GRU: r, z = gate(...), n = candidate(...). RNN:
    h' = candidate(...). ``clip``: every pre-activation (peephole terms included) is
    clamped to [-clip, clip] before its activation (ONNX Runtime's order)."""

    gate: Activation
    candidate: Activation
    output: Activation
    peephole: bool = False
    clip: float | None = None
    input_forget: bool = False

    def describe(self) -> str:
        """The non-standard parts, for messages."""
        parts = []
        if self.gate != "sigmoid":
            parts.append(f"gate_activation={self.gate}")
        if self.candidate != "tanh":
            parts.append(f"candidate_activation={self.candidate}")
        if self.output != "tanh":
            parts.append(f"output_activation={self.output}")
        if self.peephole:
            parts.append("peephole=True")
        if self.clip is not None:
            parts.append(f"clip={self.clip}")
        if self.input_forget:
            parts.append("input_forget=True")
        return ", ".join(parts)


def make_variant(kind: str, *, gate="sigmoid", candidate="tanh", output="tanh", peephole=False,
                 clip=None, input_forget=False) -> Variant | None:
    """The validated :class:`Variant` of these options, or None for the standard cell (RNN
    relu included: it has its own kernel code)."""
    v = Variant(activation(gate, "gate_activation"), activation(candidate, "candidate_activation"),
                activation(output, "output_activation"), bool(peephole), _check_clip(clip), bool(input_forget))
    if kind != "lstm" and (v.peephole or v.input_forget or v.output != "tanh"):
        raise ValueError(f"{kind}: peephole, input_forget and output_activation are LSTM options")
    if kind == "rnn" and v.gate != "sigmoid":
        raise ValueError("rnn: the activation of an RNN is its nonlinearity")
    standard = (v.gate == "sigmoid" and v.output == "tanh" and not v.peephole and v.clip is None
                and not v.input_forget)
    if standard and (v.candidate == "tanh" or (kind == "rnn" and v.candidate == "relu")):
        return None
    return v


def _check_clip(clip) -> float | None:
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 or clip == float("inf"):
        raise ValueError(f"clip: expected None or a finite number > 0, got {clip!r}")
    return float(clip)


# The kernels' view of a variant (kernels/numba_rnn.py): float64 values at these offsets;
# a vector of zeros (flag 0) is the standard cell.
VARIANT_FLAG, VARIANT_GATE, VARIANT_CANDIDATE, VARIANT_OUTPUT = 0, 1, 4, 7     # (code, alpha, beta) each
VARIANT_CLIP, VARIANT_INPUT_FORGET, VARIANT_PEEPHOLE, VARIANT_LEN = 10, 11, 12, 13


def variant_vector(v: Variant | None):
    """The float64 vector the kernels read a variant from (zeros: the standard cell)."""
    import numpy as np
    out = np.zeros(VARIANT_LEN)
    if v is None:
        return out
    out[VARIANT_FLAG] = 1.0
    for at, act in ((VARIANT_GATE, v.gate), (VARIANT_CANDIDATE, v.candidate), (VARIANT_OUTPUT, v.output)):
        out[at] = ACTIVATION_CODES[act.name]
        out[at + 1] = 0.0 if act.alpha is None else act.alpha
        out[at + 2] = 0.0 if act.beta is None else act.beta
    out[VARIANT_CLIP] = np.inf if v.clip is None else v.clip
    out[VARIANT_INPUT_FORGET] = float(v.input_forget)
    out[VARIANT_PEEPHOLE] = float(v.peephole)
    return out
