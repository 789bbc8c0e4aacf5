"""ONNX in: :func:`load` runs an ONNX model, rnnfast executing its recurrent nodes.

The graph runs on ``onnx.reference.ReferenceEvaluator``; every ``LSTM``, ``GRU`` and
``RNN`` node is handed to rnnfast through the evaluator's ``new_ops`` hook (custom
``OpRun`` classes of those names), so rnnfast interprets nothing but the recurrent
nodes themselves. :func:`layer_from_node` is the rnnfast layer equivalent to one node.

Layout conversions (ONNX -> rnnfast, which keeps PyTorch's conventions):

- gate rows: LSTM i, o, f, c -> i, f, g, o; GRU z, r, h -> r, z, n; peepholes P
  i, o, f -> i, f, o; B = [Wb, Rb] -> ``bias_ih``, ``bias_hh``;
- Y: rnnfast's y (T, B, D*H) viewed as (T, D, B, H) (layout 0) or (B, T, D, H)
  (layout 1, a ``batch_first`` layer); Y_h / Y_c: h_n (D, B, H), or (B, D, H) for
  layout 1. All of these are views, not copies;
- ``sequence_lens``: rnnfast's ``lengths`` (PyTorch's packed-sequence semantics, those
  of ONNX Runtime: outputs past a sequence's length are 0, a reverse direction starts
  at each sequence's last valid step).

Activation parameters (``activation_alpha`` / ``activation_beta``) are consumed in the
order of the activations, one per activation that takes the parameter, as ONNX
Runtime's LSTM and GRU do. An RNN whose lists have one value per activation reads them
positionally (ONNX Runtime's RNN and ``onnx.reference`` do so). Values left unset take
the defaults of the ONNX operator of the same name (LeakyRelu 0.01, ThresholdedRelu
1.0, HardSigmoid 0.2 / 0.5, Elu 1.0, Affine 1.0 / 0.0, ScaledTanh 1.0 / 1.0); ONNX
Runtime uses 0 where no such operator default exists (Affine, ThresholdedRelu,
ScaledTanh) and, for RNN, 0 for every unset value.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OnnxSession", "layer_from_node", "load"]

_KINDS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
_NUM_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_NUM_ACTS = {"lstm": 3, "gru": 2, "rnn": 1}
_DEFAULT_ACTS = {"lstm": ("Sigmoid", "Tanh", "Tanh"), "gru": ("Sigmoid", "Tanh"), "rnn": ("Tanh",)}
_DIRECTIONS = ("forward", "reverse", "bidirectional")
# Every attribute of the operators in opsets 1-22. ``output_sequence`` (opsets 1-6)
# only said whether Y is wanted, which the output's name already says: it is ignored.
_COMMON_ATTRS = {"activation_alpha", "activation_beta", "activations", "clip", "direction",
                 "hidden_size", "layout", "output_sequence"}
_ATTRS = {"lstm": _COMMON_ATTRS | {"input_forget"},
          "gru": _COMMON_ATTRS | {"linear_before_reset"},
          "rnn": _COMMON_ATTRS}
# Node inputs by position: X, W, R, B, sequence_lens, initial_h (+ initial_c, P for LSTM)
_INPUTS = {"lstm": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
           "gru": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
           "rnn": ("X", "W", "R", "B", "sequence_lens", "initial_h")}
_OUTPUTS = {"lstm": ("Y", "Y_h", "Y_c"), "gru": ("Y", "Y_h"), "rnn": ("Y", "Y_h")}
_WEIGHT_SLOTS = (1, 2, 3, 7)   # W, R, B, P: what a layer is built from


# ============================================================================ node attributes
@dataclass(frozen=True)
class _Spec:
    """What a node's attributes and input names say (everything but the weights)."""

    label: str                      # "LSTM node 'name'", for messages
    kind: str                       # "lstm", "gru", "rnn"
    direction: str
    layout: int
    hidden_size: int | None
    linear_before_reset: bool
    clip: float | None
    input_forget: bool
    acts: tuple[tuple, ...]         # per direction: rnnfast activation specs (f, g, h order)
    inputs: tuple[str, ...]         # padded with "" to the operator's input count
    outputs: tuple[str, ...]        # padded with "" to the operator's output count

    @property
    def num_directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1


def _label(node) -> str:
    if node.name:
        return f"{node.op_type} node {node.name!r}"
    return f"{node.op_type} node with outputs {[o for o in node.output if o]}"


def _attr_value(node, att, label: str):
    from onnx import AttributeProto, helper
    if att.ref_attr_name:
        # a function's attribute reference: its value changes per call, and the layer is
        # built once per node
        raise NotImplementedError(f"{label}: attribute {att.name!r} refers to the function attribute "
                                  f"{att.ref_attr_name!r}; rnnfast needs literal attribute values")
    want = {"activation_alpha": AttributeProto.FLOATS, "activation_beta": AttributeProto.FLOATS,
            "activations": AttributeProto.STRINGS, "clip": AttributeProto.FLOAT,
            "direction": AttributeProto.STRING}.get(att.name, AttributeProto.INT)
    if att.type != want:
        raise ValueError(f"{label}: attribute {att.name!r} must be of type {AttributeProto.AttributeType.Name(want)}, "
                         f"got {AttributeProto.AttributeType.Name(att.type)}")
    v = helper.get_attribute_value(att)
    if att.type == AttributeProto.STRING:
        return v.decode()
    if att.type == AttributeProto.STRINGS:
        return [s.decode() for s in v]
    return list(v) if att.type == AttributeProto.FLOATS else v


def _activation_specs(label: str, kind: str, names: list[str] | None, alphas: list[float],
                      betas: list[float], D: int) -> tuple[tuple, ...]:
    """The rnnfast activation spec of each activation, grouped per direction."""
    from ..cells import ACTIVATIONS, ONNX_ACTIVATIONS
    lookup = {k.lower(): v for k, v in ONNX_ACTIVATIONS.items()}
    n = _NUM_ACTS[kind]
    if not names:
        names = list(_DEFAULT_ACTS[kind]) * D
    elif kind == "rnn" and D == 1 and len(names) == 2:
        # RNN-1's schema defaulted activations to ["Tanh", "Tanh"] whatever the direction;
        # a forward or reverse node uses the first (as ONNX Runtime does)
        names = names[:1]
    if len(names) != n * D:
        raise ValueError(f"{label}: attribute 'activations' must list {n * D} functions "
                         f"({n} per direction, {D} direction{'s' * (D > 1)}), got {len(names)}: {names}")
    positional = kind == "rnn" and len(alphas) in (0, len(names)) and len(betas) in (0, len(names))
    ia = ib = 0
    specs = []
    for k, onnx_name in enumerate(names):
        name = lookup.get(onnx_name.lower())
        if name is None:
            raise NotImplementedError(f"{label}: activation {onnx_name!r} (attribute 'activations') is not "
                                      f"supported; expected one of {sorted(ONNX_ACTIVATIONS)}")
        a_default, b_default = ACTIVATIONS[name]
        alpha = beta = None
        if a_default is not None:
            if positional:
                alpha = alphas[k] if alphas else None
            elif ia < len(alphas):
                alpha, ia = alphas[ia], ia + 1
        if b_default is not None:
            if positional:
                beta = betas[k] if betas else None
            elif ib < len(betas):
                beta, ib = betas[ib], ib + 1
        # plain names for parameterless functions, so that standard cells stay standard
        specs.append(name if a_default is None and b_default is None else (name, alpha, beta))
    return tuple(tuple(specs[d * n:(d + 1) * n]) for d in range(D))


def _parse(node) -> _Spec:
    """Validate a node's attributes and inputs (everything but the weights' values)."""
    label = _label(node)
    kind = _KINDS.get(node.op_type)
    if kind is None or node.domain not in ("", "ai.onnx"):
        raise ValueError(f"{label}: expected an LSTM, GRU or RNN node of the ONNX domain, "
                         f"got {node.domain or 'ai.onnx'}.{node.op_type}")
    attrs = {}
    for att in node.attribute:
        if att.name not in _ATTRS[kind]:
            raise NotImplementedError(f"{label}: unknown attribute {att.name!r} for {node.op_type}; "
                                      f"expected some of {sorted(_ATTRS[kind] - {'output_sequence'})}")
        attrs[att.name] = _attr_value(node, att, label)
    direction = attrs.get("direction", "forward")
    if direction not in _DIRECTIONS:
        raise ValueError(f"{label}: attribute 'direction' must be one of {list(_DIRECTIONS)}, got {direction!r}")
    layout = attrs.get("layout", 0)
    if layout not in (0, 1):
        raise ValueError(f"{label}: attribute 'layout' must be 0 or 1, got {layout}")
    hidden = attrs.get("hidden_size")
    if hidden is not None and hidden < 1:
        raise ValueError(f"{label}: attribute 'hidden_size' must be >= 1, got {hidden}")
    flags = {}
    for name in ("linear_before_reset", "input_forget"):
        v = attrs.get(name, 0)
        if v not in (0, 1):
            raise ValueError(f"{label}: attribute {name!r} must be 0 or 1, got {v}")
        flags[name] = bool(v)
    clip = attrs.get("clip")
    if clip is not None and not (0 < clip < float("inf")):
        raise ValueError(f"{label}: attribute 'clip' must be a finite number > 0, got {clip}")
    D = 2 if direction == "bidirectional" else 1
    acts = _activation_specs(label, kind, attrs.get("activations"), attrs.get("activation_alpha", []),
                             attrs.get("activation_beta", []), D)
    n_in, n_out = len(_INPUTS[kind]), len(_OUTPUTS[kind])
    if len(node.input) > n_in or len(node.output) > n_out:
        raise ValueError(f"{label}: {node.op_type} takes at most {n_in} inputs and {n_out} outputs, "
                         f"got {len(node.input)} and {len(node.output)}")
    inputs = (*node.input, *[""] * (n_in - len(node.input)))
    for k, what in ((0, "X (the input sequence)"), (1, "W (input weights)"), (2, "R (recurrence weights)")):
        if not inputs[k]:
            raise ValueError(f"{label}: input {what} is missing")
    return _Spec(label, kind, direction, layout, hidden, flags["linear_before_reset"], clip,
                 flags["input_forget"], acts, inputs, (*node.output, *[""] * (n_out - len(node.output))))


# ============================================================================ layers
def _perm_rows(kind: str, a: np.ndarray, H: int) -> np.ndarray:
    """Gate blocks of ONNX's order in rnnfast's (PyTorch's): rows of W, R, Wb, Rb."""
    if kind == "lstm":      # i, o, f, c -> i, f, g(c), o
        return np.concatenate([a[0:H], a[2 * H:3 * H], a[3 * H:4 * H], a[H:2 * H]])
    if kind == "gru":       # z, r, h -> r, z, n
        return np.concatenate([a[H:2 * H], a[0:H], a[2 * H:3 * H]])
    return a


def _float_array(label: str, name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind != "f" and arr.dtype.name not in ("bfloat16",):
        raise TypeError(f"{label}: input {name} must hold floats, got dtype {arr.dtype}")
    return arr


def _check_shape(label: str, name: str, arr: np.ndarray, want: tuple) -> None:
    if arr.shape != want:
        raise ValueError(f"{label}: input {name} must have shape {want}, got {arr.shape}")


@dataclass
class _Built:
    """A node's rnnfast layers: one, or one per direction when the two directions of a
    bidirectional node use different activations (an rnnfast layer has one set)."""

    layers: tuple
    hidden_size: int
    dtype: np.dtype               # the layers' compute dtype
    out_dtype: np.dtype | None    # the node's float type where it differs (float16, bfloat16)


def _build(spec: _Spec, W, R, B=None, P=None) -> _Built:
    """The rnnfast layers of a node from its weight arrays (validated here)."""
    from ..layers import GRU, LSTM, RNN
    label, kind, D, G = spec.label, spec.kind, spec.num_directions, _NUM_GATES[spec.kind]
    W = _float_array(label, "W", W)
    R = _float_array(label, "R", R)
    if R.ndim != 3:
        raise ValueError(f"{label}: input R must be 3-D (num_directions, {G}*hidden_size, hidden_size), "
                         f"got shape {R.shape}")
    H = R.shape[2]
    if spec.hidden_size is not None and spec.hidden_size != H:
        raise ValueError(f"{label}: attribute hidden_size={spec.hidden_size} disagrees with input R of shape "
                         f"{R.shape} (hidden size {H})")
    if W.ndim != 3:
        raise ValueError(f"{label}: input W must be 3-D (num_directions, {G}*hidden_size, input_size), "
                         f"got shape {W.shape}")
    I = W.shape[2]
    _check_shape(label, "W", W, (D, G * H, I))
    _check_shape(label, "R", R, (D, G * H, H))
    if B is not None:
        B = _float_array(label, "B", B)
        _check_shape(label, "B", B, (D, 2 * G * H))
    if P is not None:
        P = _float_array(label, "P", P)
        _check_shape(label, "P", P, (D, 3 * H))
        if not P.any():
            P = None            # zero peepholes: the standard cell, on the compiled kernels
    if H < 1 or I < 1:
        raise ValueError(f"{label}: hidden size and input size must be >= 1, got W {W.shape}, R {R.shape}")
    if W.dtype == np.float64:
        dtype, out_dtype = np.dtype(np.float64), None
    else:
        dtype = np.dtype(np.float32)
        out_dtype = None if W.dtype == np.float32 else W.dtype

    def make(dirs: list[int], acts: tuple, reverse: bool):
        kw = dict(bias=B is not None, batch_first=spec.layout == 1, bidirectional=len(dirs) == 2,
                  dtype=dtype, reverse=reverse, clip=spec.clip)
        if kind == "lstm":
            layer = LSTM(I, H, gate_activation=acts[0], candidate_activation=acts[1], output_activation=acts[2],
                         peephole=P is not None, input_forget=spec.input_forget, **kw)
        elif kind == "gru":
            layer = GRU(I, H, linear_before_reset=spec.linear_before_reset, gate_activation=acts[0],
                        candidate_activation=acts[1], **kw)
        else:
            layer = RNN(I, H, nonlinearity=acts[0], **kw)
        sd = {}
        for k, d in enumerate(dirs):
            sfx = "l0_reverse" if k else "l0"
            sd[f"weight_ih_{sfx}"] = _perm_rows(kind, W[d], H)
            sd[f"weight_hh_{sfx}"] = _perm_rows(kind, R[d], H)
            if B is not None:
                sd[f"bias_ih_{sfx}"] = _perm_rows(kind, B[d, :G * H], H)
                sd[f"bias_hh_{sfx}"] = _perm_rows(kind, B[d, G * H:], H)
            if P is not None:   # i, o, f -> i, f, o
                sd[f"weight_ph_{sfx}"] = np.concatenate([P[d, 0:H], P[d, 2 * H:3 * H], P[d, H:2 * H]])
        if out_dtype is not None:
            sd = {k: v.astype(dtype) for k, v in sd.items()}
        layer.load_state_dict(sd)
        return layer

    if D == 1:
        layers = (make([0], spec.acts[0], spec.direction == "reverse"),)
    elif spec.acts[0] == spec.acts[1]:
        layers = (make([0, 1], spec.acts[0], False),)
    else:
        layers = (make([0], spec.acts[0], False), make([1], spec.acts[1], True))
    return _Built(layers, H, dtype, out_dtype)


def _run_built(spec: _Spec, built: _Built, X, seq, h0, c0) -> tuple:
    """Run a node's layers; the node's outputs (None where the node leaves one unnamed)."""
    X = np.asarray(X)
    if X.ndim != 3:
        raise ValueError(f"{spec.label}: input X must be 3-D, got shape {X.shape}")
    if X.dtype != built.dtype and built.out_dtype is not None:
        X = X.astype(built.dtype)       # float16 / bfloat16 models compute in float32
    layout1 = spec.layout == 1
    if layout1:   # (B, D, H) -> (D, B, H), as views
        h0 = None if h0 is None else np.asarray(h0).transpose(1, 0, 2)
        c0 = None if c0 is None else np.asarray(c0).transpose(1, 0, 2)
    lstm = spec.kind == "lstm"
    # Zero initial states (exporters such as torch.onnx feed them explicitly) take the
    # layers' zero-state path, which skips copying and checking them
    if h0 is not None and not np.any(h0):
        h0 = None
    if c0 is not None and not np.any(c0):
        c0 = None
    if lstm and (h0 is None) != (c0 is None):
        ref = h0 if h0 is not None else c0
        h0 = np.zeros_like(ref) if h0 is None else h0
        c0 = np.zeros_like(ref) if c0 is None else c0
    if len(built.layers) == 1:
        hx = None if h0 is None else ((h0, c0) if lstm else h0)
        y, st = built.layers[0](X, hx, seq)
        hn, cn = st if lstm else (st, None)
    else:   # one layer per direction: run each on its row of the states, join the results
        res = []
        for d, layer in enumerate(built.layers):
            hx = None if h0 is None else ((h0[d:d + 1], c0[d:d + 1]) if lstm else h0[d:d + 1])
            res.append(layer(X, hx, seq))
        y = np.concatenate([r[0] for r in res], axis=-1)
        hn = np.concatenate([r[1][0] if lstm else r[1] for r in res], axis=0)
        cn = np.concatenate([r[1][1] for r in res], axis=0) if lstm else None
    D, H = spec.num_directions, built.hidden_size
    outs = []
    for k, name in enumerate(spec.outputs):
        if not name:
            outs.append(None)
            continue
        if k == 0:
            if layout1:                                   # (B, T, D*H) -> (B, T, D, H)
                v = y.reshape(y.shape[0], y.shape[1], D, H)
            elif D == 1:                                  # (T, B, H) -> (T, 1, B, H)
                v = y[:, None]
            else:                                         # (T, B, D*H) -> (T, D, B, H)
                v = y.reshape(y.shape[0], y.shape[1], D, H).transpose(0, 2, 1, 3)
        else:
            v = hn if k == 1 else cn
            if layout1:
                v = v.transpose(1, 0, 2)
        if built.out_dtype is not None:
            v = v.astype(built.out_dtype)
        outs.append(v)
    return tuple(outs)


def _to_array(value) -> np.ndarray:
    if hasattr(value, "dims") and hasattr(value, "data_type"):      # a TensorProto
        from onnx import numpy_helper
        return numpy_helper.to_array(value)
    return np.asarray(value)


def layer_from_node(node, initializers) -> Any:
    """The rnnfast layer equivalent to one ONNX ``LSTM``, ``GRU`` or ``RNN`` node.

    Parameters
    ----------
    node : onnx.NodeProto
        The node. Its weights W, R (and B, P when present) must be in `initializers`.
    initializers : mapping or sequence
        A dict name -> array (or TensorProto), or a list of ``onnx.TensorProto`` such as
        ``model.graph.initializer``.

    Returns
    -------
    rnnfast.LSTM, rnnfast.GRU or rnnfast.RNN
        One layer, float64 if the weights are, else float32; ``bidirectional`` for a
        bidirectional node, ``reverse=True`` for a reverse one, ``batch_first`` for
        layout 1, with the node's activations, clip, peepholes and input_forget. Called
        as ``layer(x, hx, lengths)`` it gives the node's outputs in rnnfast's layout: y
        (T, B, D*H) (or (B, T, D*H)) and h_n (D, B, H).

    Raises
    ------
    ValueError
        For a missing weight, a weight of the wrong shape, or an invalid attribute value,
        naming the node and the input or attribute.
    NotImplementedError
        For what rnnfast does not support (an unknown activation or attribute, or a
        bidirectional node whose two directions use different activations: a layer has
        one set; :func:`load` runs such nodes as two layers).
    """
    spec = _parse(node)
    if isinstance(initializers, Mapping):
        table = initializers
    else:
        table = {t.name: t for t in initializers}
    arrays = {}
    for slot in _WEIGHT_SLOTS:
        name = spec.inputs[slot] if slot < len(spec.inputs) else ""
        if not name:
            continue
        if name not in table:
            raise ValueError(f"{spec.label}: input {_INPUTS[spec.kind][slot]} ({name!r}) is not among the "
                             "initializers")
        arrays[slot] = _to_array(table[name])
    built = _build(spec, arrays[1], arrays[2], arrays.get(3), arrays.get(7))
    if len(built.layers) != 1:
        raise NotImplementedError(f"{spec.label}: the two directions use different activations "
                                  f"({spec.acts[0]} and {spec.acts[1]}), which one rnnfast layer cannot hold; "
                                  "rnnfast.onnx.load runs such a node as two layers")
    return built.layers[0]


# ============================================================================ the session
class _Context:
    """What the recurrent nodes of one session share: the model's constant tensors, the
    names of initializers a feed may override, and the feeds of the run in progress."""

    def __init__(self, constants: dict, overridable: set, graph_nodes: set, known: set, stripped: dict):
        self.constants = constants          # name -> TensorProto (initializers, Constant values)
        self.stripped = stripped            # see _simplify
        self.overridable = overridable      # initializers that are also graph inputs
        self.graph_nodes = graph_nodes      # keys of the nodes of the graphs (not of functions)
        self.known = known                  # every name a graph defines
        self.local = threading.local()      # .fed: the names fed to the run in progress

    def fed(self) -> frozenset:
        return getattr(self.local, "fed", frozenset())


def _node_key(node) -> tuple:
    return (node.op_type, node.name, tuple(node.input), tuple(node.output))


class _NodeRunner:
    """One recurrent node: its parsed attributes and, when its weights are constants,
    its layers, built once."""

    def __init__(self, node, ctx: _Context):
        self.ctx = ctx
        self.built = None
        self.override = frozenset()
        try:
            self._prepare(node)
        except TypeError as e:
            e._rnnfast_node_error = True      # see OnnxSession.__init__
            raise

    def _prepare(self, node) -> None:
        ctx, key = self.ctx, _node_key(node)
        entry = ctx.stripped.pop(key, None)     # weights moved out of the graph at load
        self.spec = spec = _parse(node if entry is None else entry[0])
        if entry is None and key not in ctx.graph_nodes:
            return      # in a function body: its names are its own, its weights come per call
        for name in node.input:
            if name and name not in ctx.known:
                raise ValueError(f"{spec.label}: input {name!r} is defined by no initializer, graph input or node")
        if entry is not None:
            tensors = entry[1]
        else:
            names = {s: spec.inputs[s] for s in _WEIGHT_SLOTS if s < len(spec.inputs) and spec.inputs[s]}
            if not all(n in ctx.constants for n in names.values()):
                return      # weights the graph computes or takes as inputs: a layer per run
            tensors = {s: ctx.constants[n] for s, n in names.items()}
            self.override = frozenset(n for n in names.values() if n in ctx.overridable)
        arrays = {s: _to_array(t) for s, t in tensors.items()}
        self.built = _build(spec, arrays[1], arrays[2], arrays.get(3), arrays.get(7))

    def __call__(self, X, W=None, R=None, B=None, seq=None, h0=None, c0=None, P=None) -> tuple:
        built = self.built
        if built is None or (self.override and self.override & self.ctx.fed()):
            built = _build(self.spec, W, R, B, P)       # weights computed by the graph, or fed
        return _run_built(self.spec, built, X, seq, h0, c0)


def _op_classes(ctx: _Context) -> list:
    """``OpRun`` classes named LSTM, GRU and RNN (domain "") bound to a session's context."""
    from onnx.reference.op_run import OpRun

    class _RecurrentOp(OpRun):
        op_domain = ""

        def __init__(self, onnx_node, run_params):
            OpRun.__init__(self, onnx_node, run_params)
            self._runner = _NodeRunner(onnx_node, ctx)

        def _run(self, *inputs, **attributes):
            return self._runner(*inputs)

        def run(self, *inputs, **kwargs):
            # OpRun.run refuses None results, but an unnamed optional output ("") must map
            # to None: the evaluator stores each result under its name, and "" is its
            # marker of an omitted optional input (so a value there would reach later
            # nodes' omitted inputs)
            return self._runner(*inputs)

    return [type(op, (_RecurrentOp,), {"__qualname__": op}) for op in _KINDS]


def _walk_graphs(graph):
    """`graph` and every subgraph of its nodes' attributes (If, Loop, Scan bodies)."""
    from onnx import AttributeProto
    yield graph
    for node in graph.node:
        for att in node.attribute:
            if att.type == AttributeProto.GRAPH:
                yield from _walk_graphs(att.g)
            elif att.type == AttributeProto.GRAPHS:
                for g in att.graphs:
                    yield from _walk_graphs(g)


# ============================================================================ load-time graph simplification
# The reference evaluator has a fixed cost per node and run. Exporters surround the
# recurrent nodes with glue that rnnfast does not need: torch.onnx builds zero initial
# states at run time (Shape -> Gather -> Unsqueeze -> Concat -> ConstantOfShape -> Slice),
# eleven nodes around one unidirectional LSTM. These nodes would be a visible share of a
# small layer's run (commit 58dcc21; figures in docs/performance.md), so the graph given
# to the evaluator drops them: Constant nodes become initializers, zero initial states
# become omitted inputs (zeros by the operators' definition), and nodes whose results
# nothing uses any more are removed.

# ops whose output is all zeros when their first input is (the others give shapes, indices)
_ZERO_PRESERVING = {"Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Slice",
                    "Gather", "Expand", "Tile", "Flatten", "Split"}
_FLOAT_TYPES = (1, 10, 11, 16)      # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _constant_tensor(node):
    """The TensorProto of a Constant node's literal value, or None."""
    from onnx import numpy_helper
    if len(node.attribute) != 1 or node.attribute[0].ref_attr_name or len(node.output) != 1:
        return None
    att, out = node.attribute[0], node.output[0]
    if att.name == "value":
        t = type(att.t)()
        t.CopyFrom(att.t)
        t.name = out
        return t
    kinds = {"value_float": (np.float32, lambda a: a.f), "value_floats": (np.float32, lambda a: list(a.floats)),
             "value_int": (np.int64, lambda a: a.i), "value_ints": (np.int64, lambda a: list(a.ints))}
    if att.name in kinds:
        dtype, get = kinds[att.name]
        return numpy_helper.from_array(np.array(get(att), dtype=dtype), out)
    return None


def _names_used_in_subgraphs(graph) -> set:
    """Every name a node of a subgraph of `graph`'s nodes reads (outer-scope values included)."""
    from onnx import AttributeProto
    used = set()
    for node in graph.node:
        for att in node.attribute:
            subs = [att.g] if att.type == AttributeProto.GRAPH else list(att.graphs)
            for g in subs:
                for n in g.node:
                    used.update(n.input)
                used.update(o.name for o in g.output)
                used |= _names_used_in_subgraphs(g)
    return used


def _copy(msg):
    c = type(msg)()
    c.CopyFrom(msg)
    return c


def _simplify(model) -> tuple:
    """A copy of `model` whose main graph has its Constant nodes as initializers, the zero
    initial states of its recurrent nodes omitted, and its dead nodes removed; and the
    constant weights taken out of it.

    Returns
    -------
    (model, stripped): the weights (W, R, B, P) that only one recurrent node reads, and
    that a feed cannot replace, leave the graph: the node's layer holds them, and the
    evaluator need not keep its own copy. `stripped` maps such a node's key (as it now
    reads) to the node as written and its weight tensors by input slot.
    """
    from onnx import numpy_helper
    if not any(n.op_type in _KINDS for n in model.graph.node):
        return model, {}
    out = type(model)()
    out.CopyFrom(model)
    graph = out.graph
    graph_inputs = {i.name for i in graph.input}
    # 1. Constant nodes -> initializers
    keep, inits = [], {t.name: _copy(t) for t in graph.initializer}
    for node in graph.node:
        t = _constant_tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if t is not None:
            inits[t.name] = t
        else:
            keep.append(_copy(node))
    # 2. zero initial states -> omitted (graph inputs may be fed anything: never zero)
    producers = {o: n for n in keep for o in n.output if o}
    memo: dict[str, bool] = {}

    def is_zero(name: str, depth: int = 0) -> bool:
        if name not in memo:
            memo[name] = False          # also ends cycles (none in a valid graph)
            memo[name] = depth < 64 and _is_zero(name, depth)
        return memo[name]

    def _is_zero(name: str, depth: int) -> bool:
        if name in graph_inputs:
            return False
        if name in inits:
            t = inits[name]
            return t.data_type in _FLOAT_TYPES and not np.any(numpy_helper.to_array(t))
        node = producers.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "ConstantOfShape":
            val = [a for a in node.attribute if a.name == "value"]
            return not val or (not val[0].ref_attr_name and not np.any(numpy_helper.to_array(val[0].t)))
        if node.op_type in _ZERO_PRESERVING:
            return bool(node.input) and is_zero(node.input[0], depth + 1)
        if node.op_type == "Concat":
            return all(is_zero(i, depth + 1) for i in node.input)
        return False

    recurrent = [n for n in keep if n.op_type in _KINDS and n.domain in ("", "ai.onnx")]
    for node in recurrent:
        for slot in (5, 6):             # initial_h, initial_c: zeros when omitted
            if slot < len(node.input) and node.input[slot] and is_zero(node.input[slot]):
                node.input[slot] = ""
        while node.input and node.input[-1] == "":
            node.input.pop()
    # 3. dead nodes (ONNX operators have no side effects)
    used_elsewhere = {o.name for o in graph.output} | _names_used_in_subgraphs(graph)
    while True:
        used = set(used_elsewhere)
        for node in keep:
            used.update(node.input)
        # recurrent nodes stay, used or not, so that load checks every one of them
        live = [n for n in keep if n.op_type in _KINDS or any(o in used for o in n.output if o)]
        if len(live) == len(keep):
            break
        keep = live
    # 4. weights read by one recurrent node only -> out of the graph, into `stripped`
    readers: dict[str, int] = {}
    for node in keep:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    stripped = {}
    for node in recurrent:
        slots = {s: node.input[s] for s in _WEIGHT_SLOTS if s < len(node.input) and node.input[s]}
        if not slots or not all(n in inits and n not in graph_inputs and n not in used_elsewhere
                                and readers[n] == 1 for n in slots.values()):
            continue
        written = _copy(node)
        for s in slots:
            node.input[s] = ""
        while node.input and node.input[-1] == "":
            node.input.pop()
        stripped[_node_key(node)] = (written, {s: inits.pop(n) for s, n in slots.items()})
    del graph.node[:]
    graph.node.extend(keep)
    used = used_elsewhere.union(*(n.input for n in keep)) | graph_inputs
    del graph.initializer[:]
    graph.initializer.extend(t for name, t in inits.items() if name in used)
    return out, stripped


class OnnxSession:
    """An ONNX model ready to run, its recurrent nodes on rnnfast (see :func:`load`).

    Attributes
    ----------
    input_names, output_names : list of str
        The graph's inputs (those that are not initializers) and outputs.
    """

    def __init__(self, model):
        import onnx
        from onnx.reference import ReferenceEvaluator
        if isinstance(model, (str, os.PathLike)):
            model = onnx.load(os.fspath(model))
        elif isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        elif not isinstance(model, onnx.ModelProto):
            raise TypeError(f"load: expected a path, bytes or an onnx.ModelProto, got {type(model).__name__}")
        model, stripped = _simplify(model)
        graph = model.graph
        constants, known, graph_nodes = {}, set(), set()
        for g in _walk_graphs(graph):
            known.update(i.name for i in g.input)
            for t in g.initializer:
                constants[t.name] = t
            for node in g.node:
                known.update(node.output)
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    for att in node.attribute:
                        if att.name == "value" and not att.ref_attr_name and node.output:
                            constants[node.output[0]] = att.t
                if node.op_type in _KINDS:
                    graph_nodes.add(_node_key(node))
        known.update(constants)
        graph_inputs = [i.name for i in graph.input]
        overridable = {n for n in graph_inputs if n in constants}
        inits = {t.name for t in graph.initializer}
        self.input_names = [n for n in graph_inputs if n not in inits]
        self.output_names = [o.name for o in graph.output]
        self._all_inputs = frozenset(graph_inputs)
        self._overridable = frozenset(overridable)
        self._ctx = _Context(constants, overridable, graph_nodes, known, stripped)
        ops = _op_classes(self._ctx)
        # Model-local functions get the rnnfast operators too (the evaluator's ModelProto
        # path builds them without new_ops): hand it the graph, its opsets and functions
        opsets = {d.domain: d.version for d in model.opset_import}
        functions = []
        try:
            for f in model.functions:
                functions.append(ReferenceEvaluator(f, functions=list(functions), new_ops=ops))
            self._evaluator = ReferenceEvaluator(graph, opsets=opsets, functions=functions or None, new_ops=ops)
        except TypeError as e:
            # the evaluator wraps any TypeError of an operator's constructor in its own:
            # give the rnnfast one (which names the node) instead
            cause = e.__cause__
            if getattr(cause, "_rnnfast_node_error", False):
                raise cause from None
            raise

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list:
        """Run the model.

        Parameters
        ----------
        output_names : list of str, or None
            The outputs wanted, None for all of them (in the graph's order).
        feeds : dict
            Input name -> array. Initializers that are also graph inputs may be fed too
            (their fed value replaces the initializer for this run).

        Returns
        -------
        list of numpy.ndarray
            One array per output asked for. Outputs may be views of rnnfast's results
            (e.g. Y of a bidirectional node as (T, D, B, H) over a (T, B, D*H) buffer).
        """
        unknown = [k for k in feeds if k not in self._all_inputs]
        if unknown:
            raise ValueError(f"run: {unknown} are not inputs of the model; its inputs are {self.input_names}")
        missing = [k for k in self.input_names if k not in feeds]
        if missing:
            raise ValueError(f"run: inputs {missing} are not fed")
        feeds = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in feeds.items()}
        if not (self._overridable and self._overridable.intersection(feeds)):
            return self._evaluator.run(output_names, feeds)
        local = self._ctx.local
        prev = getattr(local, "fed", frozenset())
        local.fed = frozenset(feeds)
        try:
            return self._evaluator.run(output_names, feeds)
        finally:
            local.fed = prev

    def __repr__(self) -> str:
        return f"OnnxSession(inputs={self.input_names}, outputs={self.output_names})"


def load(model) -> OnnxSession:
    """An ONNX model as a session whose ``LSTM``, ``GRU`` and ``RNN`` nodes run on rnnfast.

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto
        The model, or the path of its file.

    Returns
    -------
    OnnxSession
        ``sess.run(output_names, feeds)`` as ONNX Runtime's and
        ``onnx.reference.ReferenceEvaluator``'s: None for every output, a dict input name
        -> array, a list of arrays back. The graph runs on ``ReferenceEvaluator``; each
        recurrent node on rnnfast layers built once here when its weights (W, R, B, P)
        are initializers or Constant nodes, or at each run when the graph computes them
        or takes them as inputs. Before that, the graph is simplified (the evaluator has
        a fixed cost per node; commit 58dcc21, figures in docs/performance.md): Constant
        nodes become initializers, initial states known to be zeros (such as torch.onnx's
        ConstantOfShape ones) are omitted, nodes nothing uses are removed, and weights
        only a layer needs leave the graph.

    Raises
    ------
    ValueError, NotImplementedError, TypeError
        At load, for a recurrent node rnnfast cannot run as written (see
        :func:`layer_from_node`); the message names the node and the attribute or input.
    """
    return OnnxSession(model)
