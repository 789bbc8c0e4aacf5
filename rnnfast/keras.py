"""Keras 3 recurrent layers and models run on rnnfast layers: :func:`from_keras`.

``rnnfast.from_keras(obj)`` reads a built Keras 3 object and returns a :class:`KerasModel`,
a callable that takes what the Keras object takes and returns what it returns (NumPy
arrays instead of backend tensors), computed by rnnfast layers (``model.layers``).
rnnfast never imports Keras: the object is read through ``type(obj).__name__``,
``get_config()``, ``get_weights()`` and a few attributes (``layers``, ``forward_layer``,
``backward_layer``, ``cell``, ``compute_dtype``).

Supported objects
-----------------
- ``LSTM``, ``GRU`` (``reset_after`` True -> ``rnnfast.GRU(linear_before_reset=True)``,
  False -> ``linear_before_reset=False``), ``SimpleRNN`` (-> ``rnnfast.RNN``), and
  ``RNN`` wrapping one ``LSTMCell``, ``GRUCell`` or ``SimpleRNNCell``;
  with ``use_bias``, ``go_backwards``, ``return_sequences``, ``return_state``,
  ``zero_output_for_mask``; ``dropout`` / ``recurrent_dropout`` and ``unroll`` are
  accepted (they do not change inference outputs).
- ``Bidirectional`` of those, every ``merge_mode`` (``"concat"``, ``"sum"``, ``"mul"``,
  ``"ave"``, ``None``). When both halves have the same configuration (the usual case),
  they become one bidirectional rnnfast layer; otherwise one layer per half.
- ``Sequential`` of those, with ``InputLayer`` and ``Masking`` layers (nested
  ``Sequential`` models are flattened). Only the last layer may return several arrays
  (``return_state`` or ``merge_mode=None``), as in Keras.
- Activations (``activation``, ``recurrent_activation``): ``sigmoid``, ``tanh``,
  ``relu``, ``linear``, ``hard_sigmoid`` (Keras 3's ``relu6(x + 3) / 6``, i.e.
  rnnfast's ``("hard_sigmoid", 1/6, 0.5)``), ``elu``, ``softplus``, ``softsign``,
  ``leaky_relu`` (slope 0.2). Any other activation raises ``ValueError``. rnnfast's
  LSTM takes ``gate_activation`` (Keras ``recurrent_activation``) and
  ``candidate_activation`` / ``output_activation`` (both Keras ``activation``), GRU
  ``gate_activation`` / ``candidate_activation``, RNN ``nonlinearity``.
- Weights in float32 or float64 (the rnnfast layers take the weights' dtype); a
  layer computing in another dtype (mixed precision) raises ``ValueError``.
  ``stateful=True`` layers raise ``ValueError`` (rnnfast's ``layer.stream`` carries
  state between calls).

Weight conversion (Keras stores ``x @ kernel``, rnnfast/PyTorch ``W @ x``):
LSTM gates i, f, c, o are rnnfast's i, f, g, o: ``weight_ih = kernel.T``,
``weight_hh = recurrent_kernel.T``, ``bias_ih = bias``, ``bias_hh = 0``. GRU gates
z, r, h are reordered to rnnfast's r, z, n; ``reset_after=True`` has the bias
``[input_bias, recurrent_bias]`` (-> ``bias_ih``, ``bias_hh``), ``reset_after=False`` one
bias (-> ``bias_ih``, ``bias_hh = 0``). SimpleRNN: ``bias_ih = bias``, ``bias_hh = 0``.

Calling
-------
``model(x, mask=None, initial_state=None)``: ``x`` batch-first ``(B, T, F)``;
``mask`` ``(B, T)`` bool (Keras's ``mask=``); ``initial_state`` as the Keras layer takes
it (a list ``[h, c]`` for an LSTM, ``[h]`` or ``h`` for a GRU / SimpleRNN, the forward
states then the backward states for a ``Bidirectional``; not for a ``Sequential``, whose
Keras ``call`` has no such argument). The result has the Keras structure: one array, or
a tuple ``(output, h[, c])`` with ``return_state`` (``Bidirectional``: ``(output,
*forward_states, *backward_states)``, with ``merge_mode=None`` ``(y_forward,
y_backward, *states)``); Keras 3 returns tuples too.

Masks and ``go_backwards``
--------------------------
A mask must be a prefix per row (``True`` for the first ``length`` steps, then
``False``); it becomes rnnfast ``lengths`` (any other mask raises ``ValueError``). A
``Masking`` layer's mask (a step is masked when all its features equal ``mask_value``) is
checked the same way on each call. Keras's generic recurrent loop is then reproduced
exactly from rnnfast's outputs (zeros past each length, a reverse direction starting
from each sequence's last valid step) by NumPy indexing:

- forward direction, ``zero_output_for_mask=False`` (the default of a plain layer):
  a masked step repeats the last valid output (zeros before the first one); the final
  output (``return_sequences=False``) is the output at step ``length - 1``;
- forward direction, ``zero_output_for_mask=True`` (``Bidirectional`` forces it to
  ``return_sequences`` on both halves): masked steps are zeros, and so is the final
  output of a sequence shorter than ``T``;
- ``go_backwards=True``: Keras reverses the whole padded sequence, so its outputs come
  in processing order: zeros for the ``T - length`` padding steps met first, then the
  outputs for steps ``length - 1, ..., 0``; this is rnnfast's reverse direction flipped
  along time, and the final output is the one for step 0 (``Bidirectional`` flips its
  backward half's sequence back to input order);
- the states are those after each sequence's last valid step (the initial state for
  a length-0 sequence), in both directions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._validation import check_float, to_numpy
from .layers import GRU, LSTM, RNN

__all__ = ["KerasModel", "from_keras", "keras_activation", "mask_to_lengths"]

# Keras class name (layer or cell) -> rnnfast cell kind
_KINDS = {"LSTM": "lstm", "LSTMCell": "lstm", "GRU": "gru", "GRUCell": "gru",
          "SimpleRNN": "rnn", "SimpleRNNCell": "rnn"}
_LAYER_CLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_NUM_STATES = {"lstm": 2, "gru": 1, "rnn": 1}

# Keras activation name -> rnnfast activation spec. Parameters are written out where
# rnnfast's (ONNX's) defaults differ from Keras's: ONNX HardSigmoid is 0.2x + 0.5 but
# Keras 3's is relu6(x + 3) / 6 = clip(x / 6 + 0.5, 0, 1) (torch.nn.functional.hardsigmoid
# on the torch backend); ONNX LeakyRelu's slope is 0.01, Keras's 0.2.
_ACTIVATIONS: dict[str, Any] = {
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "relu": "relu",
    "linear": ("affine", 1.0, 0.0),
    "hard_sigmoid": ("hard_sigmoid", 1.0 / 6.0, 0.5),
    "elu": ("elu", 1.0),
    "softplus": "softplus",
    "softsign": "softsign",
    "leaky_relu": ("leaky_relu", 0.2),
}
_MERGE_MODES = ("concat", "sum", "mul", "ave", None)


# ------------------------------------------------------------------------------ helpers
def keras_activation(value, where: str = "activation"):
    """The rnnfast activation spec of a Keras activation as ``get_config()`` gives it.

    Parameters
    ----------
    value : str, dict or None
        A Keras activation identifier: a built-in's name (``"tanh"``), ``None``
        (Keras's ``linear``), or a serialized function dict naming a built-in.
    where : str
        What the value configures, for error messages.

    Returns
    -------
    str or tuple
        A name, or ``(name, alpha[, beta])``.

    Raises
    ------
    ValueError
        An activation rnnfast has no equivalent for (``selu``, ``gelu``, ``swish``,
        custom functions, ...).
    """
    name = value
    if value is None:
        name = "linear"
    elif isinstance(value, dict):
        # A serialized built-in function: {"module": "keras.activations",
        # "class_name": "function", "config": "tanh", ...}. Custom objects keep their
        # own class name and fall through to the error below.
        cfg = value.get("config")
        if value.get("class_name") == "function" and isinstance(cfg, str) \
                and str(value.get("module", "")).startswith("keras"):
            name = cfg
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ValueError(f"from_keras: {where}={value!r} has no rnnfast equivalent; supported: "
                         f"{', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def mask_to_lengths(mask, batch: int, steps: int, source: str = "mask") -> np.ndarray | None:
    """Per-sequence lengths of a Keras ``(B, T)`` mask that is a prefix in every row.

    Parameters
    ----------
    mask : array_like (B, T)
        Boolean (or 0/1) mask, True at valid steps.
    batch, steps : int
        The input's B and T.
    source : str
        Where the mask came from, for error messages.

    Returns
    -------
    numpy.ndarray or None
        int64 lengths (B,), or None when every step is valid (no masking to do).

    Raises
    ------
    ValueError
        A mask of another shape, or one that is not True-then-False in every row
        (rnnfast runs padded sequences by length; Keras's loop would skip masked steps
        anywhere).
    """
    m = to_numpy(mask, source)
    if m.shape != (batch, steps):
        raise ValueError(f"from_keras: {source} must have shape (B, T) = {(batch, steps)}, got {m.shape}")
    m = m.astype(bool)
    lengths = m.sum(axis=1)
    prefix = np.arange(steps)[None, :] < lengths[:, None]
    if not np.array_equal(m, prefix):
        bad = np.flatnonzero((m != prefix).any(axis=1))
        raise ValueError(f"from_keras: {source} is not a valid prefix (True for the first steps of a "
                         f"sequence, then False) in rows {bad[:10].tolist()}; rnnfast runs padded "
                         "sequences by length, so only right-padding masks translate")
    if (lengths == steps).all():
        return None
    return lengths.astype(np.int64)


def _direction_output(y: np.ndarray, lengths: np.ndarray | None, go_backwards: bool,
                      zero_output_for_mask: bool, return_sequences: bool) -> np.ndarray:
    """What one Keras recurrent layer returns as output, from rnnfast's outputs `y`.

    `y` (B, T, H) holds the outputs at their input positions and zeros past each length
    (for a reverse direction too). Keras's loop emits outputs in processing order, and
    at a masked step either zeros (``zero_output_for_mask``) or the previous output.
    """
    if go_backwards:
        # Keras flips the padded sequence: the masked padding comes first (zeros in both
        # modes: there is no previous output yet), then steps length-1 .. 0.
        seq = y[:, ::-1]
    elif lengths is not None and not zero_output_for_mask:
        # A masked step repeats the last valid output: gather step min(t, length-1).
        # Length-0 rows gather step 0, which rnnfast leaves at zero, as Keras does.
        T = y.shape[1]
        idx = np.minimum(np.arange(T)[None, :], np.maximum(lengths - 1, 0)[:, None])
        seq = np.take_along_axis(y, idx[:, :, None], axis=1)
    else:
        seq = y
    return np.ascontiguousarray(seq if return_sequences else seq[:, -1])


def _as_float_array(a, name: str, dtype: np.dtype) -> np.ndarray:
    return np.asarray(check_float(to_numpy(a, name), name), dtype=dtype)


# ------------------------------------------------------------------------ Keras reading
@dataclass
class _RecurrentSpec:
    """One Keras recurrent layer (one direction), read into rnnfast terms."""

    kind: str
    name: str
    units: int
    input_size: int
    use_bias: bool
    dtype: np.dtype
    params: dict[str, np.ndarray]       # rnnfast names without the layer suffix
    options: dict[str, Any]             # rnnfast constructor keywords
    go_backwards: bool
    return_sequences: bool
    return_state: bool
    zero_output_for_mask: bool
    signature: tuple = field(default=())  # what must agree to share one bidirectional layer


def _class_name(obj) -> str:
    return type(obj).__name__


def _read_recurrent(obj) -> _RecurrentSpec:
    """Read a Keras LSTM / GRU / SimpleRNN (or RNN of one such cell) layer."""
    cls = _class_name(obj)
    cfg = obj.get_config()
    name = cfg.get("name", cls)
    if cls == "RNN":
        cell = getattr(obj, "cell", None)
        cell_cls = _class_name(cell)
        if cell_cls not in ("LSTMCell", "GRUCell", "SimpleRNNCell"):
            raise ValueError(f"from_keras: layer {name!r}: RNN of a {cell_cls} is not supported "
                             "(one LSTMCell, GRUCell or SimpleRNNCell only)")
        cell_cfg = cell.get_config()
        kind = _KINDS[cell_cls]
    else:
        cell_cfg = cfg
        kind = _KINDS[cls]
    if cfg.get("stateful"):
        raise ValueError(f"from_keras: layer {name!r} is stateful=True, which carries state between calls; "
                         "not supported (use an rnnfast layer's .stream() for that)")
    compute_dtype = str(getattr(obj, "compute_dtype", "float32"))
    if compute_dtype not in ("float32", "float64"):
        raise ValueError(f"from_keras: layer {name!r} computes in {compute_dtype}; rnnfast takes "
                         "float32 or float64 layers only")

    weights = list(obj.get_weights())
    if not weights:
        raise ValueError(f"from_keras: layer {name!r} has no weights yet: build it (call it once, or give "
                         "the model an input shape) before converting")
    use_bias = bool(cell_cfg.get("use_bias", True))
    if len(weights) != 2 + use_bias:
        raise ValueError(f"from_keras: layer {name!r}: expected {2 + use_bias} weight arrays "
                         f"(kernel, recurrent_kernel{', bias' if use_bias else ''}), got {len(weights)}")
    kernel, rec = weights[0], weights[1]
    dtype = np.dtype(np.float64) if kernel.dtype == np.float64 else np.dtype(np.float32)
    H = int(cell_cfg["units"])
    G = _GATES[kind]
    I = kernel.shape[0]
    if kernel.shape != (I, G * H) or rec.shape != (H, G * H):
        raise ValueError(f"from_keras: layer {name!r}: kernel {kernel.shape} / recurrent_kernel {rec.shape} "
                         f"do not fit {G} gates of {H} units")

    # Columns of Keras's kernels in rnnfast's gate order (rows of weight_ih / weight_hh).
    if kind == "gru":
        perm = np.r_[H:2 * H, 0:H, 2 * H:3 * H]          # Keras z, r, h -> rnnfast r, z, n
    else:
        perm = np.arange(G * H)                          # LSTM i, f, c, o == i, f, g, o
    params = {"weight_ih": kernel[:, perm].T.astype(dtype), "weight_hh": rec[:, perm].T.astype(dtype)}
    reset_after = bool(cell_cfg.get("reset_after", True)) if kind == "gru" else None
    if use_bias:
        bias = np.asarray(weights[2])
        if kind == "gru" and reset_after:
            if bias.shape != (2, G * H):
                raise ValueError(f"from_keras: layer {name!r}: expected a (2, {G * H}) bias, got {bias.shape}")
            b_ih, b_hh = bias[0], bias[1]
        else:
            if bias.shape != (G * H,):
                raise ValueError(f"from_keras: layer {name!r}: expected a ({G * H},) bias, got {bias.shape}")
            # Keras adds one bias (to the input part; for GRU reset_after=False that is
            # inside the candidate's tanh, where ONNX's Wb sits too).
            b_ih, b_hh = bias, np.zeros_like(bias)
        params["bias_ih"] = b_ih[perm].astype(dtype)
        params["bias_hh"] = b_hh[perm].astype(dtype)

    # Activations: only non-default ones are passed, so that the defaults build layers
    # with the plain constructor signature.
    act = keras_activation(cell_cfg.get("activation", "tanh"), f"{name}.activation")
    options: dict[str, Any] = {}
    if kind == "rnn":
        if act != "tanh":
            options["nonlinearity"] = act
        signature = (kind, H, I, use_bias, dtype, act)
    else:
        gate = keras_activation(cell_cfg.get("recurrent_activation", "sigmoid"),
                                f"{name}.recurrent_activation")
        if gate != "sigmoid":
            options["gate_activation"] = gate
        if act != "tanh":
            options["candidate_activation"] = act
            if kind == "lstm":
                options["output_activation"] = act
        if kind == "gru":
            options["linear_before_reset"] = reset_after
        signature = (kind, H, I, use_bias, dtype, act, gate, reset_after)

    return _RecurrentSpec(
        kind=kind, name=name, units=H, input_size=I, use_bias=use_bias, dtype=dtype, params=params,
        options=options, go_backwards=bool(cfg.get("go_backwards", False)),
        return_sequences=bool(cfg.get("return_sequences", False)),
        return_state=bool(cfg.get("return_state", False)),
        zero_output_for_mask=bool(getattr(obj, "zero_output_for_mask", cfg.get("zero_output_for_mask", False))),
        signature=signature)


def _build_layer(fwd: _RecurrentSpec, bwd: _RecurrentSpec | None = None):
    """One rnnfast layer: `fwd` alone (reversed if it goes backwards), or `fwd` and `bwd`
    as the two directions of a bidirectional layer."""
    kw = dict(fwd.options)
    if bwd is None and fwd.go_backwards:
        kw["reverse"] = True
    layer = _LAYER_CLS[fwd.kind](fwd.input_size, fwd.units, bias=fwd.use_bias, batch_first=True,
                                 bidirectional=bwd is not None, dtype=fwd.dtype, **kw)
    sd = {f"{k}_l0": v for k, v in fwd.params.items()}
    if bwd is not None:
        sd.update({f"{k}_l0_reverse": v for k, v in bwd.params.items()})
    layer.load_state_dict(sd)
    return layer


def _initial_states(initial_state, n: int, batch: int, units: int, dtype: np.dtype, where: str):
    """A Keras ``initial_state`` (an array, or a list of `n` arrays (B, H)) as a list."""
    if initial_state is None:
        return None
    states = list(initial_state) if isinstance(initial_state, (list, tuple)) else [initial_state]
    if len(states) != n:
        raise ValueError(f"from_keras: {where} takes initial_state as {n} arrays, got {len(states)}")
    out = []
    for i, s in enumerate(states):
        a = _as_float_array(s, f"initial_state[{i}]", dtype)
        if a.shape != (batch, units):
            raise ValueError(f"from_keras: initial_state[{i}] must have shape {(batch, units)}, got {a.shape}")
        out.append(a)
    return out


def _run_layer(layer, kind: str, x: np.ndarray, lengths, states: list | None):
    """Run an rnnfast layer; return y and, per direction, the Keras state list."""
    hx = None
    if states is not None:
        # states: per direction, [h] or [h, c] -> (D, B, H) arrays
        h = np.stack([s[0] for s in states])
        hx = (h, np.stack([s[1] for s in states])) if kind == "lstm" else h
    y, hn = layer(x, hx=hx, lengths=lengths)
    if kind == "lstm":
        h, c = hn
        per_dir = [[h[d], c[d]] for d in range(h.shape[0])]
    else:
        per_dir = [[hn[d]] for d in range(hn.shape[0])]
    return y, per_dir


# --------------------------------------------------------------------------------- stages
class _Stage:
    """One Keras layer of the model: ``run`` maps (x, lengths, initial_state) to the Keras
    result and the lengths (mask) the next layer gets."""

    layers: list
    multi_output = False        # returns a tuple (only allowed last in a Sequential)
    keras_name = ""

    def run(self, x: np.ndarray, lengths, initial_state):  # pragma: no cover - interface
        raise NotImplementedError


class _MaskingStage(_Stage):
    """Keras ``Masking``: a step is masked when all its features equal ``mask_value``;
    its outputs there are zeros."""

    def __init__(self, mask_value: float, name: str):
        self.mask_value = mask_value
        self.layers = []
        self.keras_name = name

    def run(self, x, lengths, initial_state):
        keep = np.any(x != self.mask_value, axis=-1)
        lengths = mask_to_lengths(keep, x.shape[0], x.shape[1], source=f"the mask of Masking layer "
                                                                        f"{self.keras_name!r}")
        return np.where(keep[..., None], x, np.zeros((), x.dtype)), lengths


class _RecurrentStage(_Stage):
    """A Keras LSTM / GRU / SimpleRNN."""

    def __init__(self, spec: _RecurrentSpec):
        self.spec = spec
        self.layer = _build_layer(spec)
        self.layers = [self.layer]
        self.multi_output = spec.return_state
        self.keras_name = spec.name

    def run(self, x, lengths, initial_state):
        s = self.spec
        states = _initial_states(initial_state, _NUM_STATES[s.kind], x.shape[0], s.units, s.dtype,
                                 f"layer {s.name!r}")
        y, per_dir = _run_layer(self.layer, s.kind, x, lengths, None if states is None else [states])
        out = _direction_output(y, lengths, s.go_backwards, s.zero_output_for_mask, s.return_sequences)
        result = (out, *per_dir[0]) if s.return_state else out
        # Keras's compute_mask: the mask goes on with sequences, and stops otherwise.
        return result, (lengths if s.return_sequences else None)


class _BidirectionalStage(_Stage):
    """A Keras ``Bidirectional``: one bidirectional rnnfast layer when both halves agree
    (forward half reading forwards, backward half backwards, same configuration), else
    one rnnfast layer per half."""

    def __init__(self, obj):
        cfg = obj.get_config()
        self.keras_name = cfg.get("name", "bidirectional")
        self.merge_mode = cfg.get("merge_mode", "concat")
        if self.merge_mode not in _MERGE_MODES:
            raise ValueError(f"from_keras: Bidirectional {self.keras_name!r}: unknown merge_mode "
                             f"{self.merge_mode!r}")
        self.fwd = _read_recurrent(obj.forward_layer)
        self.bwd = _read_recurrent(obj.backward_layer)
        if self.fwd.input_size != self.bwd.input_size:
            raise ValueError(f"from_keras: Bidirectional {self.keras_name!r}: halves take different input sizes")
        self.fused = (self.fwd.signature == self.bwd.signature and not self.fwd.go_backwards
                      and self.bwd.go_backwards)
        if self.fused:
            self.layers = [_build_layer(self.fwd, self.bwd)]
        else:
            self.layers = [_build_layer(self.fwd), _build_layer(self.bwd)]
        self.return_sequences = self.fwd.return_sequences
        self.return_state = self.fwd.return_state
        self.multi_output = self.return_state or self.merge_mode is None

    def run(self, x, lengths, initial_state):
        f, b = self.fwd, self.bwd
        nf, nb = _NUM_STATES[f.kind], _NUM_STATES[b.kind]
        fs = bs = None
        if initial_state is not None:
            st = list(initial_state)
            if len(st) != nf + nb:
                raise ValueError(f"from_keras: Bidirectional {self.keras_name!r} takes initial_state as "
                                 f"{nf + nb} arrays (forward states, then backward states), got {len(st)}")
            where = f"Bidirectional {self.keras_name!r}"
            fs = _initial_states(st[:nf], nf, x.shape[0], f.units, f.dtype, where)
            bs = _initial_states(st[nf:], nb, x.shape[0], b.units, b.dtype, where)
        if self.fused:
            y, per_dir = _run_layer(self.layers[0], f.kind, x, lengths, None if fs is None else [fs, bs])
            y_f, y_b = y[..., :f.units], y[..., f.units:]
            st_f, st_b = per_dir
        else:
            y_f, (st_f,) = _run_layer(self.layers[0], f.kind, x, lengths, None if fs is None else [fs])
            y_b, (st_b,) = _run_layer(self.layers[1], b.kind, x, lengths, None if bs is None else [bs])
        out_f = _direction_output(y_f, lengths, f.go_backwards, f.zero_output_for_mask, f.return_sequences)
        out_b = _direction_output(y_b, lengths, b.go_backwards, b.zero_output_for_mask, b.return_sequences)
        if self.return_sequences:
            # Keras flips the backward half's sequence back to input order.
            out_b = np.ascontiguousarray(out_b[:, ::-1])
        mm = self.merge_mode
        if mm == "concat":
            out: Any = np.concatenate([out_f, out_b], axis=-1)
        elif mm == "sum":
            out = out_f + out_b
        elif mm == "ave":
            out = (out_f + out_b) / out_f.dtype.type(2)
        elif mm == "mul":
            out = out_f * out_b
        else:
            out = (out_f, out_b)
        if self.return_state:
            out = (*out, *st_f, *st_b) if mm is None else (out, *st_f, *st_b)
        return out, (lengths if self.return_sequences else None)


def _stages_of(obj, top: bool) -> list[_Stage]:
    """The stages of a Keras object (a Sequential's layers flattened)."""
    cls = _class_name(obj)
    if cls in ("LSTM", "GRU", "SimpleRNN", "RNN"):
        return [_RecurrentStage(_read_recurrent(obj))]
    if cls == "Bidirectional":
        return [_BidirectionalStage(obj)]
    if cls == "Sequential":
        return [s for sub in obj.layers for s in _stages_of(sub, top=False)]
    if not top:
        if cls == "InputLayer":
            return []
        if cls == "Masking":
            cfg = obj.get_config()
            return [_MaskingStage(float(cfg.get("mask_value", 0.0)), cfg.get("name", "masking"))]
    raise TypeError(f"from_keras: {'a layer of type ' if not top else ''}{cls} is not supported; expected a "
                    "Keras LSTM, GRU, SimpleRNN, RNN (of one such cell), Bidirectional of those, or a "
                    "Sequential of them (with InputLayer / Masking)")


# --------------------------------------------------------------------------------- model
class KerasModel:
    """A Keras recurrent layer or ``Sequential`` model computed by rnnfast layers.

    Built by :func:`from_keras`; holds copies of the Keras weights (later changes to the
    Keras object do not reach it).

    Attributes
    ----------
    layers : list
        The rnnfast layers underneath, in order (a fused ``Bidirectional`` is one
        bidirectional layer; other ``Bidirectional`` objects one layer per half).
    source : str
        The Keras class converted (``"LSTM"``, ``"Bidirectional"``, ``"Sequential"``, ...).
    """

    def __init__(self, stages: list[_Stage], source: str):
        if not any(not isinstance(s, _MaskingStage) for s in stages):
            raise ValueError("from_keras: the model has no recurrent layer")
        for s in stages[:-1]:
            if s.multi_output:
                raise ValueError(f"from_keras: layer {s.keras_name!r} returns several arrays (return_state or "
                                 "merge_mode=None) but is not the last layer")
        self._stages = stages
        self.source = source
        self.layers = [layer for s in stages for layer in s.layers]
        first = next(s for s in stages if not isinstance(s, _MaskingStage))
        spec = first.spec if isinstance(first, _RecurrentStage) else first.fwd
        self.input_size = spec.input_size
        self.dtype = spec.dtype

    def __call__(self, x, mask=None, initial_state=None):
        """Run the model as Keras would (inference: no dropout).

        Parameters
        ----------
        x : array_like (B, T, F)
            Batch-first inputs (NumPy, torch tensors or anything array-like).
        mask : array_like (B, T) of bool, optional
            Keras's ``mask=``: True at valid steps; must be a prefix in every row.
            A leading ``Masking`` layer computes its own mask instead, as in Keras.
        initial_state : array or list of arrays, optional
            As the Keras layer takes it (not for a ``Sequential``).

        Returns
        -------
        numpy.ndarray or tuple of numpy.ndarray
            What the Keras object returns, in the same structure.

        Raises
        ------
        ValueError
            Wrong shapes, or a mask that is not a prefix per row.
        """
        arr = _as_float_array(x, "x", self.dtype)
        if arr.ndim != 3:
            raise ValueError(f"from_keras: x must be batch-first (B, T, F), got shape {arr.shape}")
        if arr.shape[-1] != self.input_size:
            raise ValueError(f"from_keras: x has {arr.shape[-1]} features, the model takes {self.input_size}")
        if initial_state is not None and self.source == "Sequential":
            raise TypeError("from_keras: a Sequential takes no initial_state (as in Keras)")
        lengths = None if mask is None else mask_to_lengths(mask, arr.shape[0], arr.shape[1])
        out: Any = arr
        for s in self._stages:
            out, lengths = s.run(out, lengths, initial_state)
        return out

    def __repr__(self) -> str:
        return f"KerasModel(source={self.source!r}, layers={self.layers!r})"


def from_keras(obj) -> KerasModel:
    """Run a Keras 3 recurrent layer or ``Sequential`` model on rnnfast layers.

    Parameters
    ----------
    obj : keras.layers.LSTM, GRU, SimpleRNN, RNN, Bidirectional, or keras.Sequential
        A built Keras 3 object (see the module docstring for the supported options).

    Returns
    -------
    KerasModel
        ``model(x, mask=None, initial_state=None)`` returns what ``obj(x, mask=...,
        initial_state=...)`` returns, as NumPy arrays; ``model.layers`` are the rnnfast
        layers.

    Raises
    ------
    TypeError
        An unsupported Keras class.
    ValueError
        An unsupported option (activation, stateful, mixed precision) or an unbuilt layer.
    """
    source = _class_name(obj)
    return KerasModel(_stages_of(obj, top=True), source)

