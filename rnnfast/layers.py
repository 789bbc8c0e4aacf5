"""Layers ``LSTM``, ``GRU`` and ``RNN`` with PyTorch's parameter names and semantics."""
from __future__ import annotations

import numbers

import numpy as np

from . import _engine, backends, threads
from ._validation import check_input, check_lengths, check_state, load_params
from .cells import CELLS, activation, cell_code, make_variant


def _plain(a, dtype: np.dtype, shape: tuple) -> bool:
    """A C-contiguous ndarray of exactly `dtype` and `shape` (the lean path's states)."""
    return type(a) is np.ndarray and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {v}")
    return int(v)


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}") from None
    if dt.kind == "f" and dt.byteorder not in "=|":
        dt = dt.newbyteorder("=")       # '>f8' computes as float64 (the layer's arrays are native)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


class _PickledAsParameters:
    """The base of every layer: ``freeze`` and ``stream`` (rnnfast/frozen.py), and pickling.

    Layers pickle as their configuration and parameters only. What a call builds is
    rebuilt on first use after unpickling: the serving plan (its call counter is written
    by the kernel, so it must be this process's own array, never a buffer a deserialiser
    mapped read-only), the grouped weights, and the training context and gradients (a
    pickle after a training step would otherwise carry every saved activation)."""

    _TRANSIENT = ("_splan", "_wcache", "_ctx", "grads")
    _nthreads: int | None = None      # class default: pickles made before num_threads existed

    @property
    def num_threads(self) -> int | None:
        """The most threads one call of this object uses (None: the process-wide count,
        :func:`rnnfast.get_num_threads`). The bound applies as ``min(num_threads,
        get_num_threads())`` to the calls of this object only and changes no process
        setting; it travels with a pickle."""
        return self._nthreads

    @num_threads.setter
    def num_threads(self, n: int | None) -> None:
        self._nthreads = threads.check_num_threads(n)

    def forward(self, x, hx=None, lengths=None, train: bool = False):
        """See the subclass's ``_forward``."""
        n = self._nthreads
        if n is not None:
            return threads.call_limited(n, self._forward, x, hx, lengths, train)
        return self._forward(x, hx, lengths, train)

    __call__ = forward

    def backward(self, dy, dhx_n=None):
        """See the subclass's ``_backward``."""
        n = self._nthreads
        if n is not None:
            return threads.call_limited(n, self._backward, dy, dhx_n)
        return self._backward(dy, dhx_n)

    def load_state_dict(self, mapping) -> None:
        """Load parameters (strict). Values may be any array-like (torch tensors, read-only
        arrays, ``np.memmap``), copied once into the live arrays.

        Raises ``ValueError`` naming every missing, unexpected or mis-shaped key, and
        ``TypeError`` for a non-numeric value; on error nothing is changed. Parameters
        that are read-only (a layer unpickled from an object store's buffers) are first
        replaced by writeable copies of their own, and what was built on them dropped.
        """
        if any(not v.flags.writeable for v in self._params.values()):
            # checked on scratch arrays first, so that an error changes nothing
            load_params({k: np.empty(v.shape, v.dtype) for k, v in self._params.items()}, self._shapes, mapping)
            self._params = {k: (v if v.flags.writeable else _engine.aligned_copy(v, v.dtype))
                            for k, v in self._params.items()}
            for k in ("_splan", "_wcache"):
                self.__dict__.pop(k, None)
        load_params(self._params, self._shapes, mapping)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        state["_ctx"] = None
        state["grads"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def freeze(self, precision: str | None = None):
        """An inference-only copy of this layer with its weights packed once.

        Parameters
        ----------
        precision : "fp32", "fp64", "bf16" or "int8" (default: the layer's dtype).
            "bf16" rounds the weights to bfloat16 and "int8" quantizes them per output row
            (fp32 gates and states); see ``rnnfast.frozen``.

        Returns
        -------
        A frozen layer with this layer's forward semantics. It holds copies: later changes
        to this layer do not reach it.
        """
        from .frozen import freeze
        return freeze(self, precision)

    def to_onnx(self, path, lengths: bool = False, initial_state: bool = False):
        """Write this layer as an ONNX model (one recurrent node per layer); see
        :func:`rnnfast.onnx.to_onnx`."""
        from .onnx import to_onnx
        return to_onnx(self, path, lengths=lengths, initial_state=initial_state)

    def stream(self, batch: int):
        """A :class:`rnnfast.frozen.Stream` of `batch` sequences through this layer (its
        current weights at each call), carrying the state between calls."""
        from .frozen import Stream
        return Stream(self, batch)


class _RNNBase(_PickledAsParameters):
    """Shared machinery of the multi-layer, optionally bidirectional recurrent layers."""

    _kind = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, dtype=np.float32, seed=None, *, _code: int | None = None,
                 reverse: bool = False, _variant=None, num_threads: int | None = None):
        self.num_threads = num_threads
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.proj_size = _check_int("proj_size", proj_size, 0)
        if self.proj_size and self._kind != "lstm":
            raise ValueError(f"proj_size: only LSTM supports a projection, got {proj_size}")
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size: expected 0 <= proj_size < hidden_size ({hidden_size}), got {proj_size}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.reverse = bool(reverse)
        if self.reverse and self.bidirectional:
            raise ValueError("reverse: a bidirectional layer already runs both ways (reverse=True is for "
                             "one direction run from the end)")
        self._variant = _variant
        self.dtype = _check_dtype(dtype)
        self.seed = seed
        self._code = _code
        self._rng = np.random.default_rng(seed)
        self.grads: dict[str, np.ndarray] = {}
        self._ctx = None
        G, H, D = CELLS[self._kind].num_gates, self.hidden_size, self.num_directions
        k = 1.0 / np.sqrt(H)
        self._params: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple] = {}
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.output_size * D
            for d in range(D):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                shapes = {f"weight_ih_{sfx}": (G * H, in_size), f"weight_hh_{sfx}": (G * H, self.output_size)}
                if self.bias:
                    shapes[f"bias_ih_{sfx}"] = (G * H,)
                    shapes[f"bias_hh_{sfx}"] = (G * H,)
                if self.proj_size:
                    shapes[f"weight_hr_{sfx}"] = (self.proj_size, H)
                if _variant is not None and _variant.peephole:
                    shapes[f"weight_ph_{sfx}"] = (3 * H,)
                for name, shape in shapes.items():
                    self._shapes[name] = shape
                    self._params[name] = _engine.aligned_copy(self._rng.uniform(-k, k, shape), self.dtype)

    def _set_variant_attrs(self, v, kind: str) -> None:
        """The variant options as attributes (Activation objects, compare equal to names)."""
        d = v if v is not None else make_variant(kind, clip=1.0)      # the defaults, any clip
        self.gate_activation, self.candidate_activation = d.gate, d.candidate
        if kind == "lstm":
            self.output_activation, self.peephole, self.input_forget = d.output, d.peephole, d.input_forget
        self.clip = v.clip if v is not None else None

    # ------------------------------------------------------------------ properties
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Width of h (proj_size when projecting, else hidden_size)."""
        return self.proj_size or self.hidden_size

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, np.ndarray]:
        """The live parameter arrays (PyTorch names); in-place updates are seen by the next call."""
        return dict(self._params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters, keyed by PyTorch's names."""
        return {k: v.copy() for k, v in self._params.items()}

    def _weights(self) -> list[list[_engine.DirWeights]]:
        """The parameters grouped per layer and direction (built once: the arrays in
        ``_params`` are never replaced, load_state_dict copies into them)."""
        cached = self.__dict__.get("_wcache")
        if cached is not None:
            return cached
        out = []
        for layer in range(self.num_layers):
            dirs = []
            for d in range(self.num_directions):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                p = self._params
                dirs.append(_engine.DirWeights(
                    p[f"weight_ih_{sfx}"], p[f"weight_hh_{sfx}"], p.get(f"bias_ih_{sfx}"),
                    p.get(f"bias_hh_{sfx}"), p.get(f"weight_hr_{sfx}"), p.get(f"weight_ph_{sfx}")))
            out.append(dirs)
        self._wcache = out
        return out

    # ------------------------------------------------------------------ forward
    def _prepare(self, x, hx, lengths):
        xs, unbatched = check_input(x, "x", self.dtype, self.input_size, self.batch_first)
        T, B, _ = xs.shape
        LD = self.num_layers * self.num_directions
        h0 = c0 = None
        if hx is not None:
            if self._kind == "lstm":
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise ValueError("hx: expected a tuple (h0, c0) for LSTM")
                h0 = check_state(hx[0], "hx[0] (h0)", self.dtype, (LD, B, self.output_size), unbatched)
                c0 = check_state(hx[1], "hx[1] (c0)", self.dtype, (LD, B, self.hidden_size), unbatched)
            else:
                h0 = check_state(hx, "hx", self.dtype, (LD, B, self.hidden_size), unbatched)
        ln = check_lengths(lengths, T, B, unbatched)
        return xs, unbatched, h0, c0, ln

    def _finish(self, y, hn, cn, unbatched):
        if unbatched:
            y, hn, cn = y[:, 0], hn[:, 0], (None if cn is None else cn[:, 0])
        elif self.batch_first:
            y = y.transpose(1, 0, 2)
        return y, ((hn, cn) if self._kind == "lstm" else hn)

    def _forward(self, x, hx=None, lengths=None, train: bool = False):
        """Run the layer (``forward`` / ``__call__``, under the layer's ``num_threads``).

        Parameters
        ----------
        x : array_like (T, B, I), (B, T, I) with batch_first, or unbatched (T, I).
        hx : initial state; LSTM ``(h0, c0)`` with h0 (L*D, B, H_out), c0 (L*D, B, H);
            GRU/RNN h0 (L*D, B, H). Zeros when None.
        lengths : int array_like (B,), optional.
        train : keep what :meth:`backward` needs (and apply dropout between layers).

        Returns
        -------
        y, hx_n : outputs (T, B, D*H_out) and final states shaped like hx.
        """
        if not train and lengths is None:
            out = self._forward_small(x, hx)
            if out is not None:
                return out
        xs, unbatched, h0, c0, ln = self._prepare(x, hx, lengths)
        if train:
            from . import training
            self._ctx = None          # drop the previous saved state before building a new one
            y, hn, cn, ctx = training.stack_forward_train(
                self._kind, self._code, xs, self._weights(), h0, c0, ln,
                dropout=self.dropout, rng=self._rng, rev0=self.reverse, variant=self._variant)
            self._ctx = (ctx, unbatched, self.batch_first)
        else:
            y, hn, cn = _engine.run_stack(self._kind, self._code, xs, self._weights(), h0, c0, ln,
                                          rev0=self.reverse, variant=self._variant)
        return self._finish(y, hn, cn, unbatched)

    @property
    def _small_ok(self) -> bool:
        """Whether this layer's shape suits the lean serving path (one layer, one direction,
        no projection, time-major input)."""
        return (self.num_layers == 1 and not self.bidirectional and not self.proj_size and not self.batch_first
                and not self.reverse and self._variant is None)

    def _forward_small(self, x, hx):
        """The lean path for a few steps of a plain single-layer call (serving): None unless
        `x` and `hx` are plain C-contiguous arrays of the compute dtype and the right shapes
        and the Cython backend is in force, so that anything else goes through the general
        path, its checks and its errors. Every test here is a cheap attribute read: this
        runs once per served token."""
        if type(x) is not np.ndarray or backends.resolve_fast() != "cython":
            return None
        plan = self.__dict__.get("_splan")
        if plan is None:
            plan = self._splan = (_engine.small_plan(self._kind, self._code, self._weights()[0][0],
                                                     self.hidden_size, self.hidden_size)
                                  if self._small_ok else False)
        if plan is False or self.batch_first:
            return None
        shape = x.shape
        if len(shape) == 3:
            T, B, F = shape
            unbatched = False
        elif len(shape) == 2:
            T, F = shape
            B = 1
            unbatched = True
        else:
            return None
        if (F != plan.I or not 0 < T <= _engine.SMALL_MAX_T or B == 0 or x.dtype != plan.dtype
                or not x.flags.c_contiguous):
            return None
        h0 = c0 = None
        if hx is not None:
            want = (1, plan.H) if unbatched else (1, B, plan.H)
            if plan.kind == "lstm":
                if type(hx) is not tuple or len(hx) != 2:
                    return None
                h0, c0 = hx
                if not (_plain(h0, plan.dtype, want) and _plain(c0, plan.dtype, want)):
                    return None
            elif not _plain(hx, plan.dtype, want):
                return None
            else:
                h0 = hx
        y, hn, cn = _engine.run_small(plan, x, B, h0, c0)
        return y, ((hn, cn) if cn is not None else hn)

    def _backward(self, dy, dhx_n=None):
        """Gradients of sum(y*dy) + sum(hx_n*dhx_n) after a ``forward(..., train=True)``.

        Returns ``(dx, dhx)`` shaped like x and hx; fills :attr:`grads`.
        """
        if self._ctx is None:
            raise RuntimeError("backward() needs a forward(..., train=True) call first")
        from . import training
        ctx, unbatched, batch_first = self._ctx
        dx, dhx, grads = training.layer_backward(self, ctx, dy, dhx_n, unbatched, batch_first)
        self.grads = grads
        return dx, dhx

    def __repr__(self) -> str:
        extra = f", proj_size={self.proj_size}" if self.proj_size else ""
        if self.reverse:
            extra += ", reverse=True"
        if self._variant is not None:
            extra += ", " + self._variant.describe()
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, "
                f"dtype={self.dtype.name}{extra})")


_VARIANT_DOC = """
    Cell variants (ONNX's and Keras's; keyword-only):

    - ``reverse``: the one direction of a unidirectional layer runs from each sequence's
      last valid step down to step 0 (ONNX ``direction="reverse"``; outputs stay at
      their input positions).
    - ``gate_activation`` (i, f, o; r, z), ``candidate_activation`` (g; n; an RNN's
      ``nonlinearity``), ``output_activation`` (LSTM: h' = o * act(c')): a name of
      :data:`rnnfast.cells.ACTIVATIONS` or a tuple ``(name, alpha[, beta])``, e.g.
      ``("hard_sigmoid", 0.2, 0.5)``.
    - ``peephole`` (LSTM): parameters ``weight_ph_l{k}`` (3*H,), ordered i, f, o.
    - ``clip``: pre-activations clamped to [-clip, clip] before their activations.
    - ``input_forget`` (LSTM): the forget gate is 1 - i.
    - ``num_threads``: the most threads one call of this layer uses (None: the process-wide
      :func:`rnnfast.get_num_threads`); an attribute, settable.

    Inference of every variant runs in the compiled kernels (Cython and Numba) and the
    reference. Training a variant runs on the NumPy reference for now (backend "auto"
    takes it there; naming a compiled backend for it raises NotImplementedError).
"""


class LSTM(_RNNBase):
    """Multi-layer LSTM (gates i, f, g, o; optional projection ``proj_size``), PyTorch-compatible.
    """ + _VARIANT_DOC

    _kind = "lstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, dtype=np.float32, seed=None, *, reverse: bool = False,
                 gate_activation="sigmoid", candidate_activation="tanh", output_activation="tanh",
                 peephole: bool = False, clip: float | None = None, input_forget: bool = False,
                 num_threads: int | None = None):
        v = make_variant("lstm", gate=gate_activation, candidate=candidate_activation, output=output_activation,
                         peephole=peephole, clip=clip, input_forget=input_forget)
        self._set_variant_attrs(v, "lstm")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, dtype, seed, _code=cell_code("lstm", proj=proj_size > 0),
                         reverse=reverse, _variant=v, num_threads=num_threads)


class GRU(_RNNBase):
    """Multi-layer GRU (gates r, z, n), PyTorch-compatible; ``linear_before_reset=False`` is ONNX's default form.
    """ + _VARIANT_DOC

    _kind = "gru"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype=np.float32, seed=None, linear_before_reset: bool = True, *, reverse: bool = False,
                 gate_activation="sigmoid", candidate_activation="tanh", clip: float | None = None,
                 num_threads: int | None = None):
        self.linear_before_reset = bool(linear_before_reset)
        v = make_variant("gru", gate=gate_activation, candidate=candidate_activation, clip=clip)
        self._set_variant_attrs(v, "gru")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, dtype, seed, _code=cell_code("gru", linear_before_reset=self.linear_before_reset),
                         reverse=reverse, _variant=v, num_threads=num_threads)


class RNN(_RNNBase):
    """Multi-layer Elman RNN with ``nonlinearity`` "tanh" or "relu" (PyTorch-compatible), or
    any other activation (a cell variant).
    """ + _VARIANT_DOC

    _kind = "rnn"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype=np.float32, seed=None, nonlinearity="tanh", *, reverse: bool = False,
                 clip: float | None = None, num_threads: int | None = None):
        v = make_variant("rnn", candidate=activation(nonlinearity, "nonlinearity"), clip=clip)
        self.nonlinearity = activation(nonlinearity, "nonlinearity")
        self.clip = v.clip if v is not None else None
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, dtype, seed, _code=cell_code("rnn", nonlinearity=self.nonlinearity.name),
                         reverse=reverse, _variant=v, num_threads=num_threads)
