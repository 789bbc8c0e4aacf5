"""ONNX out: :func:`to_onnx` (also ``layer.to_onnx`` and ``frozen.to_onnx``).

A layer of ``num_layers`` layers becomes one ONNX ``LSTM``, ``GRU`` or ``RNN`` node per
layer, with the glue that gives the graph the layer's own interface:

==========  =====================================  =======================================
name        shape                                  when
==========  =====================================  =======================================
X           (T, B, I), or (B, T, I) if batch_first  always (input)
lengths     (B,) int64                             ``lengths=True`` (input)
h0, c0      (L*D, B, H) (c0: LSTM only)             ``initial_state=True`` (inputs)
Y           (T, B, D*H), or (B, T, D*H)             always (output)
h_n, c_n    (L*D, B, H) (c_n: LSTM only)            always (outputs)
==========  =====================================  =======================================

T and B are symbolic (``dim_param``), so one model serves any sequence length and
batch. The weights are stored in ONNX's layout: gate rows permuted (LSTM i,f,g,o ->
ONNX i,o,f,c; GRU r,z,n -> ONNX z,r,h), the two biases concatenated ``[Wb, Rb]``, the
directions stacked on a leading axis; peephole weights (rnnfast i,f,o) as ONNX's
``P`` (i,o,f). ONNX's ``sequence_lens`` has the semantics of rnnfast's ``lengths``
(PyTorch's packed sequences: outputs zero past each length, a reverse direction starting
from each sequence's last valid step), so ``lengths`` is only cast to int32; one
difference remains: for a sequence of length 0 ONNX Runtime returns a zero final state
where the layer returns its initial state, so a model with both ``lengths`` and
``initial_state`` selects h0 (c0) for those rows (Equal / Unsqueeze / Where).

Cell variants carry over as the operators' attributes: ``reverse=True`` as
``direction="reverse"``, the activations as ``activations`` / ``activation_alpha`` /
``activation_beta`` (alpha and beta listed, in activation order, only for the
activations that take them, as ONNX Runtime reads them), ``clip``, ``input_forget``,
and peepholes as the input ``P``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:        # the onnx package is imported only when a model is written
    import onnx

__all__ = ["to_onnx", "OPSET"]

# Opset 17: every operator used here is stable since opset 14 (RNN ops' ``layout``),
# 13 (Squeeze's axes as an input) or earlier; 17 is widely run (ONNX Runtime >= 1.12).
OPSET = 17
# IR version 8: the lowest that opset 17 allows (onnx.helper.find_min_ir_version_for), so
# older runtimes load the model too (onnx's own default would be newer).
IR_VERSION = 8

_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}

# Each cell's activations in ONNX order (LSTM f, g, h; GRU f, g; RNN f) and their
# defaults: the ``activations`` attribute is written only when a layer departs from them.
_DEFAULT_ACTS = {"lstm": ("Sigmoid", "Tanh", "Tanh"), "gru": ("Sigmoid", "Tanh"), "rnn": ("Tanh",)}

# How many of (alpha, beta) each ONNX activation takes. ONNX Runtime consumes
# ``activation_alpha`` / ``activation_beta`` in the order of the activations, one value
# per activation that takes the parameter (onnxruntime rnn_helpers.cc), so the lists hold
# values only for those.
_TAKES = {"Relu": (0, 0), "Tanh": (0, 0), "Sigmoid": (0, 0), "Softsign": (0, 0), "Softplus": (0, 0),
          "Affine": (1, 1), "LeakyRelu": (1, 0), "ThresholdedRelu": (1, 0), "ScaledTanh": (1, 1),
          "HardSigmoid": (1, 1), "Elu": (1, 0)}
# ONNX's default (alpha, beta), used where an activation object leaves them unset.
_DEFAULT_AB = {"Affine": (1.0, 0.0), "LeakyRelu": (0.01, 0.0), "ThresholdedRelu": (1.0, 0.0),
               "ScaledTanh": (1.0, 1.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, 0.0)}


# ---------------------------------------------------------------------------------- checks
def _exportable(obj) -> Any:
    """The plain LSTM / GRU / RNN layer whose weights `obj` (a layer or frozen layer) carries.

    Raises
    ------
    ValueError
        A frozen layer of precision "bf16" or "int8" (ONNX's recurrent operators take
        float weights only; export the layer, or a frozen "fp32" / "fp64" copy).
    NotImplementedError
        A layer with no ONNX operator: MinGRU / MinLSTM, LSTM with ``proj_size > 0``,
        custom cells.
    TypeError
        Anything that is not an rnnfast layer.
    """
    from ..frozen import _FrozenBase
    from ..layers import _PickledAsParameters, _RNNBase
    from ..minrnn import _MinRNNBase

    layer = obj
    if isinstance(obj, _FrozenBase):
        if obj.precision not in ("fp32", "fp64"):
            raise ValueError(
                f"to_onnx: a frozen layer of precision {obj.precision!r} cannot be written as ONNX "
                "(ONNX's LSTM/GRU/RNN operators take float weights, not bfloat16 or int8 ones); "
                "export the layer itself, or layer.freeze('fp32') / freeze('fp64')")
        layer = obj._layer
    if isinstance(layer, _MinRNNBase):
        raise NotImplementedError(
            f"to_onnx: {type(layer).__name__} has no ONNX operator (ONNX defines LSTM, GRU and RNN "
            "only); a MinGRU/MinLSTM cannot be exported")
    if not isinstance(layer, _RNNBase) or layer._kind not in _OP:
        if isinstance(layer, _PickledAsParameters):      # an rnnfast layer of another cell
            raise NotImplementedError(
                f"to_onnx: {type(layer).__name__} has no ONNX operator (ONNX defines LSTM, GRU and RNN only)")
        raise TypeError(f"to_onnx: expected an rnnfast LSTM, GRU or RNN layer (or a frozen one), "
                        f"got {type(obj).__name__}")
    if getattr(layer, "proj_size", 0):
        raise NotImplementedError(
            f"to_onnx: LSTM with proj_size={layer.proj_size} has no ONNX operator "
            "(ONNX's LSTM has no projection of h); export a layer with proj_size=0")
    return layer


def _check_flag(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"to_onnx: {name}: expected a bool, got {type(v).__name__} {v!r}")
    return bool(v)


# ------------------------------------------------------------------------------ activations
def _onnx_names() -> dict[str, str]:
    """rnnfast activation name -> ONNX name (the inverse of ``cells.ONNX_ACTIVATIONS``)."""
    from ..cells import ONNX_ACTIVATIONS
    return {v: k for k, v in ONNX_ACTIVATIONS.items()}


def _activation(act) -> tuple[str, float | None, float | None]:
    """(ONNX name, alpha, beta) of an activation: a ``cells.Activation`` (name, alpha,
    beta) or a plain name such as RNN's ``nonlinearity="tanh"``."""
    if isinstance(act, str):
        name, alpha, beta = act, None, None
    else:
        name, alpha, beta = act.name, getattr(act, "alpha", None), getattr(act, "beta", None)
    names = _onnx_names()
    if name not in names:
        raise NotImplementedError(f"to_onnx: activation {name!r} has no ONNX equivalent "
                                  f"(ONNX's recurrent operators know {sorted(names)})")
    return names[name], alpha, beta


def _layer_activations(layer) -> list[tuple[str, float | None, float | None]]:
    """The layer's activations in ONNX order (LSTM f, g, h; GRU f, g; RNN f)."""
    kind = layer._kind
    if kind == "rnn":
        return [_activation(layer.nonlinearity)]
    attrs = (("gate_activation", "candidate_activation", "output_activation") if kind == "lstm"
             else ("gate_activation", "candidate_activation"))
    # A layer pickled before the cell variants existed has no such attribute: the defaults.
    return [_activation(getattr(layer, a)) if hasattr(layer, a) else (d, None, None)
            for a, d in zip(attrs, _DEFAULT_ACTS[kind])]


def _activation_attrs(layer, num_directions: int) -> dict[str, list]:
    """``activations`` / ``activation_alpha`` / ``activation_beta``, or {} for the defaults."""
    acts = _layer_activations(layer)
    names = [a[0] for a in acts]
    # An activation that takes parameters is never a default one, so equal names mean
    # the operator's own defaults apply and no attribute needs writing.
    if tuple(names) == _DEFAULT_ACTS[layer._kind]:
        return {}
    alphas, betas = [], []
    for name, alpha, beta in acts:
        takes_a, takes_b = _TAKES[name]
        da, db = _DEFAULT_AB.get(name, (0.0, 0.0))
        if takes_a:
            alphas.append(float(da if alpha is None else alpha))
        if takes_b:
            betas.append(float(db if beta is None else beta))
    # Both directions of an rnnfast layer use the same activations.
    out: dict[str, list] = {"activations": names * num_directions}
    if alphas:
        out["activation_alpha"] = alphas * num_directions
    if betas:
        out["activation_beta"] = betas * num_directions
    return out


# ---------------------------------------------------------------------------------- weights
def _gate_perm(kind: str, a: np.ndarray, H: int) -> np.ndarray:
    """Rows of `a` (gate blocks of H in rnnfast's order) in ONNX's gate order."""
    if kind == "lstm":       # i, f, g, o -> i, o, f, c
        return np.concatenate([a[0:H], a[3 * H:4 * H], a[H:2 * H], a[2 * H:3 * H]])
    if kind == "gru":        # r, z, n -> z, r, h
        return np.concatenate([a[H:2 * H], a[0:H], a[2 * H:3 * H]])
    return a


def _node_weights(layer, k: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """ONNX inputs W, R, B (when biased) and P (peephole LSTM) of layer `k`."""
    kind, H = layer._kind, layer.hidden_size
    p = layer.parameters()
    sfxs = [f"l{k}", f"l{k}_reverse"][:layer.num_directions]
    out = {"W": np.stack([_gate_perm(kind, np.asarray(p[f"weight_ih_{s}"]), H) for s in sfxs]),
           "R": np.stack([_gate_perm(kind, np.asarray(p[f"weight_hh_{s}"]), H) for s in sfxs])}
    if layer.bias:
        out["B"] = np.stack([np.concatenate([_gate_perm(kind, np.asarray(p[f"bias_ih_{s}"]), H),
                                             _gate_perm(kind, np.asarray(p[f"bias_hh_{s}"]), H)])
                             for s in sfxs])
    if kind == "lstm" and getattr(layer, "peephole", False):
        # rnnfast's peepholes are ordered i, f, o; ONNX's P is i, o, f
        ph = [np.asarray(p[f"weight_ph_{s}"]) for s in sfxs]
        out["P"] = np.stack([np.concatenate([v[0:H], v[2 * H:3 * H], v[H:2 * H]]) for v in ph])
    return {n: np.ascontiguousarray(a, dtype=dtype) for n, a in out.items()}


def _node_attrs(layer, activations: dict[str, list]) -> dict[str, Any]:
    """The recurrent node's attributes (defaults left out)."""
    reverse = bool(getattr(layer, "reverse", False))
    direction = "bidirectional" if layer.bidirectional else ("reverse" if reverse else "forward")
    attrs: dict[str, Any] = {"hidden_size": layer.hidden_size, "direction": direction}
    if layer._kind == "gru":
        attrs["linear_before_reset"] = int(layer.linear_before_reset)
    clip = getattr(layer, "clip", None)
    if clip is not None:
        attrs["clip"] = float(clip)
    if layer._kind == "lstm" and getattr(layer, "input_forget", False):
        attrs["input_forget"] = 1
    attrs.update(activations)
    return attrs


# ------------------------------------------------------------------------------------ graph
class _Graph:
    """Nodes, initializers and fresh names of the graph being built."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, a: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(np.asarray(a), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs) -> None:
        inputs = list(inputs)
        while inputs and inputs[-1] == "":       # trailing optional inputs are left out
            inputs.pop()
        self.nodes.append(self.helper.make_node(op, inputs, list(outputs), name=name, **attrs))


def _dir_major(g: _Graph, y: str, out: str, D: int, H: int, batch_first: bool, tag: str) -> None:
    """ONNX's Y (T, D, B, H) as rnnfast's (T, B, D*H) (or (B, T, D*H) when batch_first).

    The directions go next to the features so that a bidirectional output reads
    [forward, reverse] along the last axis, as the layer concatenates them."""
    if D == 1:
        # a lone direction: dropping its axis is all it takes
        squeezed = f"{y}_sq" if batch_first else out
        g.node("Squeeze", [y, "axes_1"], [squeezed], name=f"squeeze_{tag}")
        if batch_first:
            g.node("Transpose", [squeezed], [out], name=f"to_batch_first_{tag}", perm=[1, 0, 2])
        return
    perm = [2, 0, 1, 3] if batch_first else [0, 2, 1, 3]
    g.node("Transpose", [y], [f"{y}_t"], name=f"transpose_{tag}", perm=perm)
    # 0 keeps the input's (symbolic) T and B; D*H is known, so no -1 is needed (which
    # would be ambiguous for an empty batch)
    g.node("Reshape", [f"{y}_t", f"shape_{D * H}"], [out], name=f"reshape_{tag}")


def to_onnx(obj, path: str | os.PathLike | None, lengths: bool = False,
            initial_state: bool = False) -> onnx.ModelProto:
    """Write an rnnfast LSTM / GRU / RNN layer (or a frozen fp32 / fp64 one) as an ONNX model.

    The model has one ONNX ``LSTM``, ``GRU`` or ``RNN`` node per layer of the stack
    (opset 17), joined by Transpose / Reshape / Squeeze / Slice / Concat / Cast (and,
    with both ``lengths`` and ``initial_state``, Equal / Unsqueeze / Where) nodes, and
    runs to the layer's own outputs in ONNX Runtime. Dropout is left out (it only acts
    in training). Cell variants (``reverse``, activations, ``peephole``, ``clip``,
    ``input_forget``) become the operators' attributes and ``P`` input.

    Parameters
    ----------
    obj : LSTM, GRU, RNN or a frozen layer of precision "fp32" or "fp64"
        The weights written are those the layer holds now (a frozen layer's copies).
    path : str, os.PathLike, binary file object or None
        Where the model is saved (``onnx.save_model``); None only builds it.
    lengths : bool, default False
        Give the model an input ``lengths`` (int64, (B,)): each sequence's length, with the
        semantics of the layer's ``lengths`` argument.
    initial_state : bool, default False
        Give the model inputs ``h0`` (and ``c0`` for LSTM), shaped as the layer's hx
        (num_layers*D, B, H). Without them the initial state is zero.

    Returns
    -------
    onnx.ModelProto
        The model written. Inputs: ``X`` in the layer's layout ((T, B, I), or (B, T, I)
        when ``batch_first``), then ``lengths``, ``h0``, ``c0`` when asked for. Outputs:
        ``Y`` ((T, B, D*H) or (B, T, D*H)), ``h_n`` and for LSTM ``c_n`` ((L*D, B, H)),
        as the layer returns them. T and B are symbolic dimensions. The tensors are
        FLOAT for float32 weights and DOUBLE for float64 ones (ONNX Runtime's CPU
        recurrent kernels run float32 only). The model is batched: feed an unbatched
        (T, I) sequence as a batch of one.

    Raises
    ------
    ValueError
        For a frozen layer of precision "bf16" or "int8" (ONNX takes float weights).
    NotImplementedError
        For layers with no ONNX operator: MinGRU, MinLSTM, LSTM with ``proj_size > 0``.
    TypeError
        For anything else that is not an rnnfast layer, or non-bool flags.
    """
    layer = _exportable(obj)
    lengths = _check_flag("lengths", lengths)
    initial_state = _check_flag("initial_state", initial_state)
    import onnx
    from onnx import TensorProto, helper

    from .. import __version__

    kind = layer._kind
    L, D, H, I = layer.num_layers, layer.num_directions, layer.hidden_size, layer.input_size
    dtype = np.dtype(layer.dtype)
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    bf = layer.batch_first
    tb = ["B", "T"] if bf else ["T", "B"]
    lstm = kind == "lstm"

    g = _Graph()
    g.const("axes_1", np.array([1], np.int64))
    if D == 2:
        g.const(f"shape_{D * H}", np.array([0, 0, D * H], np.int64))

    # ---- inputs
    graph_in = [helper.make_tensor_value_info("X", elem, [*tb, I])]
    graph_in[0].doc_string = "(B, T, I), batch first" if bf else "(T, B, I), time major"
    x = "X"
    if bf:                                   # ONNX Runtime's recurrent kernels are time major only
        g.node("Transpose", ["X"], ["X_time_major"], name="to_time_major", perm=[1, 0, 2])
        x = "X_time_major"
    seq = ""
    if lengths:
        graph_in.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]))
        graph_in[-1].doc_string = "each sequence's length, in [0, T]"
        # sequence_lens is int32 in ONNX; int64 lengths are the NumPy and PyTorch habit
        g.node("Cast", ["lengths"], ["sequence_lens"], name="lengths_to_int32", to=TensorProto.INT32)
        seq = "sequence_lens"
    states = ["h0", "c0"] if lstm else ["h0"]
    if initial_state:
        for s in states:
            graph_in.append(helper.make_tensor_value_info(s, elem, [L * D, "B", H]))
            graph_in[-1].doc_string = ("initial state, rows layer-major then direction "
                                       "(forward, reverse), as the layer's hx")

    # ---- one recurrent node per layer
    activations = _activation_attrs(layer, D)
    finals: dict[str, list[str]] = {"h0": [], "c0": []}
    # ONNX Runtime returns a zero final state for a sequence of length 0, where the layer
    # returns its initial state (zero too, unless initial_state): a Where puts h0/c0 back
    zero_len_fix = lengths and initial_state
    stacked = {s: (f"{s[0]}_n_stacked" if zero_len_fix else f"{s[0]}_n") for s in states}
    y = ""
    for k in range(L):
        w = _node_weights(layer, k, dtype)
        names = {n: g.const(f"{n}_l{k}", a) for n, a in w.items()}
        init = dict.fromkeys(states, "")
        if initial_state:
            if L == 1:
                init = {s: s for s in states}
            else:
                # this layer's D rows of the stacked state
                g.const(f"start_l{k}", np.array([k * D], np.int64))
                g.const(f"end_l{k}", np.array([(k + 1) * D], np.int64))
                for s in states:
                    g.node("Slice", [s, f"start_l{k}", f"end_l{k}", "axes_0"], [f"{s}_l{k}"],
                           name=f"slice_{s}_l{k}")
                    init[s] = f"{s}_l{k}"
        inputs = [x, names["W"], names["R"], names.get("B", ""), seq, init["h0"]]
        if lstm:
            inputs += [init["c0"], names.get("P", "")]
        # a one-layer model's final states are the stacked ones themselves
        outs = [f"Y_l{k}"] + [stacked[s] if L == 1 else f"{stacked[s]}_l{k}" for s in states]
        g.node(_OP[kind], inputs, outs, name=f"{kind}_l{k}", **_node_attrs(layer, activations))
        for s, o in zip(states, outs[1:]):
            finals[s].append(o)
        y = f"Y_l{k}"
        if k < L - 1:
            # the next layer reads (T, B, D*H), time major whatever the layout
            _dir_major(g, y, f"X_l{k + 1}", D, H, False, f"l{k}")
            x = f"X_l{k + 1}"
    if initial_state and L > 1:
        g.const("axes_0", np.array([0], np.int64))

    # ---- outputs
    _dir_major(g, y, "Y", D, H, bf, "out")
    if L > 1:
        for s in states:
            g.node("Concat", finals[s], [stacked[s]], name=f"concat_{s[0]}_n", axis=0)
    if zero_len_fix:
        g.const("zero", np.array(0, np.int64))
        g.const("axes_0_2", np.array([0, 2], np.int64))
        g.node("Equal", ["lengths", "zero"], ["empty"], name="empty_sequences")
        # (B,) -> (1, B, 1): broadcasts over the L*D rows and the H features
        g.node("Unsqueeze", ["empty", "axes_0_2"], ["empty_rows"], name="empty_rows")
        for s in states:
            g.node("Where", ["empty_rows", s, stacked[s]], [f"{s[0]}_n"], name=f"{s[0]}_n_of_empty")
    graph_out = [helper.make_tensor_value_info("Y", elem, [*tb, D * H]),
                 helper.make_tensor_value_info("h_n", elem, [L * D, "B", H])]
    if lstm:
        graph_out.append(helper.make_tensor_value_info("c_n", elem, [L * D, "B", H]))

    # unused constants (axes_1 when every squeeze was a reshape) are dropped: the
    # checker accepts them, but a model should carry nothing it does not read
    used = {i for n in g.nodes for i in n.input}
    inits = [t for t in g.inits if t.name in used]
    graph = helper.make_graph(g.nodes, f"rnnfast_{kind}", graph_in, graph_out, inits,
                              doc_string=repr(layer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="rnnfast", producer_version=__version__,
                              doc_string=f"rnnfast {layer!r} (weights at export time)")
    model.ir_version = IR_VERSION
    if path is not None:
        onnx.save_model(model, path)
    return model
