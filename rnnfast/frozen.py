"""Frozen layers (``layer.freeze(precision)``) and streams (``layer.stream(batch)``).

A frozen layer is inference-only and holds its own copies of the weights, converted once
to the precision asked for: "fp32"/"fp64" keep the floats (the layer's dtype; "fp32" of
a float64 layer computes in float32), "bf16" rounds them to bfloat16 and "int8" quantizes
them per output row (kernels/rf_lowp.h describes both). Later changes to the layer do
not reach it.

A stream carries the state of a batch of sequences from one call to the next, for
serving one step (or a few) at a time; ``reset(rows)`` starts some rows afresh.
"""
from __future__ import annotations

import copy
import threading

import numpy as np

from . import _engine, _lowp, backends, threads
from ._validation import check_input, to_numpy
from .cells import CELLS
from .memory import scratch

__all__ = ["FrozenRNN", "FrozenMinRNN", "Stream", "freeze"]


def _check_precision(precision, layer_dtype: np.dtype) -> str:
    if precision is None:
        return "fp64" if layer_dtype == np.float64 else "fp32"
    if not isinstance(precision, str) or precision not in _lowp.PRECISIONS:
        raise ValueError(f"precision: expected one of {list(_lowp.PRECISIONS)}, got {precision!r}")
    return precision


def _readonly_copy(a: np.ndarray, dtype) -> np.ndarray:
    c = _engine.aligned_copy(a, dtype)
    c.flags.writeable = False
    return c


def _check_finite(layer, precision: str) -> None:
    for name, p in layer.parameters().items():
        if not np.isfinite(p).all():
            raise ValueError(f"freeze: {name} holds inf or NaN, which {precision} weights cannot represent "
                             "(freeze with precision='fp32' to keep them)")


def freeze(layer, precision=None):
    """``layer.freeze(precision)``: a FrozenRNN or FrozenMinRNN (see the module docstring)."""
    from .minrnn import _MinRNNBase
    if isinstance(layer, _MinRNNBase):
        return FrozenMinRNN(layer, precision)
    return FrozenRNN(layer, precision)


def _refreeze(layer, precision, num_threads):
    """Unpickle a frozen layer: freeze the travelled copy again (the packed or quantized
    weights are rebuilt from it once, in the receiving process, rather than carried a
    second time in the pickle)."""
    frozen = freeze(layer, precision)
    frozen.num_threads = num_threads
    return frozen


class _FrozenBase:
    _nthreads: int | None = None

    @property
    def num_threads(self) -> int | None:
        """The most threads one call of this frozen layer (or of its streams) uses (None:
        the process-wide :func:`rnnfast.get_num_threads`); settable, the layer's value
        at freeze time to begin with."""
        return self._nthreads

    @num_threads.setter
    def num_threads(self, n: int | None) -> None:
        self._nthreads = threads.check_num_threads(n)

    def forward(self, x, hx=None, lengths=None, train: bool = False):
        """Run the frozen layer: the layer's ``forward(x, hx, lengths)`` (see its docstring)."""
        n = self._nthreads
        if n is not None:
            return threads.call_limited(n, self._forward, x, hx, lengths, train)
        return self._forward(x, hx, lengths, train)

    __call__ = forward

    def _copy(self, layer, precision) -> bool:
        """Set precision and ``_layer``, a private copy of `layer` in the compute dtype (its
        own read-only arrays, no training state); True for bf16 / int8."""
        self.precision = _check_precision(precision, layer.dtype)
        lowp = self.precision in ("bf16", "int8")
        if lowp:
            _check_finite(layer, self.precision)
        dtype = np.dtype(np.float64 if self.precision == "fp64" else np.float32)
        lay = copy.copy(layer)
        lay.__dict__ = {k: v for k, v in layer.__dict__.items() if k not in layer._TRANSIENT}
        lay._ctx, lay.grads, lay._rng = None, {}, None
        self._nthreads = layer.num_threads
        lay._nthreads = None        # the frozen layer's own bound applies to its calls
        lay.dtype = dtype
        lay._params = {k: _readonly_copy(v, dtype) for k, v in layer._params.items()}
        self._layer = lay
        return lowp

    def __getattr__(self, name):
        # the layer's configuration (input_size, hidden_size, ...): read from the copy
        if name.startswith("_") or name in ("forward", "backward", "grads", "num_threads"):
            raise AttributeError(name)
        return getattr(self.__dict__["_layer"], name)

    def _forward(self, x, hx=None, lengths=None, train: bool = False):
        raise NotImplementedError

    def backward(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is inference-only: train the layer, then freeze it again")

    def to_onnx(self, path, lengths: bool = False, initial_state: bool = False):
        """Write the weights of this frozen fp32 / fp64 layer as an ONNX model; see
        :func:`rnnfast.onnx.to_onnx`."""
        from .onnx import to_onnx
        return to_onnx(self, path, lengths=lengths, initial_state=initial_state)

    def stream(self, batch: int) -> Stream:
        """A :class:`Stream` of `batch` sequences through this frozen layer."""
        return Stream(self, batch)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the weights this frozen layer was made from (before any rounding)."""
        return self._layer.state_dict()

    @property
    def nbytes(self) -> int:
        """Bytes of the weights this frozen layer computes with."""
        raise NotImplementedError

    def __reduce__(self):
        return (_refreeze, (self._layer, self.precision, self._nthreads))

    def __repr__(self) -> str:
        return (f"Frozen{self._layer!r}[precision={self.precision!r}, kernel={self.kernel!r}; "
                "a copy: later changes to the layer do not reach it]")


class FrozenRNN(_FrozenBase):
    """An inference-only LSTM / GRU / RNN with packed copies of a layer's weights.

    ``frozen(x, hx=None, lengths=None)`` has the layer's forward semantics (layouts,
    unbatched input, lengths, multi-layer, bidirectional, projection); ``train=True``
    raises. Made by ``layer.freeze(precision)``.
    """

    def __init__(self, layer, precision=None):
        v = getattr(layer, "_variant", None)
        if v is not None and precision in ("bf16", "int8"):
            raise NotImplementedError(f"freeze({precision!r}): the bf16 / int8 kernels have the standard cells "
                                      f"only, not a cell with {v.describe()}; freeze('fp32') runs it")
        if getattr(layer, "reverse", False) and precision in ("bf16", "int8"):
            raise NotImplementedError(f"freeze({precision!r}) of a layer with reverse=True is not implemented "
                                      "yet; freeze('fp32') runs it")
        lowp = self._copy(layer, precision)
        lay = self._layer
        self._kind, self._code = lay._kind, lay._code
        self._q = None
        self._packed = None
        if not lowp:
            self._packed = _engine.pack_layer_weights(self._kind, self._code, lay._weights())
        if not lowp:
            self.kernel = (f"{self.precision} kernels of the layer"
                           + (", weights packed once" if self._packed is not None else ""))
        if lowp:
            self._q = self._pack_lowp()
            self._isa, self.kernel = _lowp.isa(self.precision)

    def _pack_lowp(self):
        lay = self._layer
        G = CELLS[self._kind].num_gates
        out = []
        for dirs in lay._weights():
            row = []
            for w in dirs:
                zb = np.zeros(G * lay.hidden_size, np.float32)
                row.append((_lowp.pack(self.precision, w.w_ih, G), _lowp.pack(self.precision, w.w_hh, G),
                            None if w.w_hr is None else _lowp.pack(self.precision, w.w_hr, 1),
                            zb if w.b_ih is None else w.b_ih, zb if w.b_hh is None else w.b_hh))
            out.append(row)
        return out

    @property
    def nbytes(self) -> int:
        if self._q is None:
            return (sum(p.nbytes for p in self._layer._params.values())
                    + sum(a.nbytes for a in self._packed or ()))
        n = 0
        for row in self._q:
            for wih, whh, whr, bx, bh in row:
                n += wih.nbytes + whh.nbytes + (whr.nbytes if whr is not None else 0) + bx.nbytes + bh.nbytes
        return n

    def _forward(self, x, hx=None, lengths=None, train: bool = False):
        if train:
            raise TypeError("a frozen layer is inference-only: train the layer, then freeze it again")
        lay = self._layer
        if self._q is None:
            if lengths is None:
                out = lay._forward_small(x, hx)      # a few steps: the serving path, nothing packed
                if out is not None:
                    return out
            xs, unbatched, h0, c0, ln = lay._prepare(x, hx, lengths)
            y, hn, cn = _engine.run_stack(self._kind, self._code, xs, lay._weights(), h0, c0, ln,
                                          packed=self._packed, rev0=lay.reverse, variant=lay._variant)
            return lay._finish(y, hn, cn, unbatched)
        xs, unbatched, h0, c0, ln = lay._prepare(x, hx, lengths)
        y, hn, cn = self._run_lowp(xs, h0, c0, ln)
        return lay._finish(y, hn, cn, unbatched)

    def _run_time_major(self, xs, h0, c0):
        """(y, h_n, c_n) of time-major `xs` (T, B, I) in the compute dtype (streams)."""
        if self._q is None:
            return _engine.run_stack(self._kind, self._code, xs, self._layer._weights(), h0, c0, None,
                                     packed=self._packed, variant=self._layer._variant)
        return self._run_lowp(xs, h0, c0, None)

    def _run_lowp(self, xs, h0, c0, lengths):
        lay = self._layer
        B = xs.shape[1]
        L, D, H, Hout = lay.num_layers, lay.num_directions, lay.hidden_size, lay.output_size
        if h0 is None:
            h0 = np.zeros((L * D, B, Hout), np.float32)
        if self._kind == "lstm" and c0 is None:
            c0 = np.zeros((L * D, B, H), np.float32)
        return threads.call_with_threads(self._run_lowp_n, xs, h0, c0, lengths)

    def _run_lowp_n(self, xs, h0, c0, lengths, nthreads):
        lay = self._layer
        mod = _lowp.kernels()
        T, B, I = xs.shape
        L, D, H, Hout = lay.num_layers, lay.num_directions, lay.hidden_size, lay.output_size
        G = CELLS[self._kind].num_gates
        pk = _engine.make_packing(T, B, lengths)
        N = T * B if pk.perm is None else int(pk.bsz.sum())
        if N == 0:
            return (np.zeros((T, B, D * Hout), np.float32), h0.copy(), None if c0 is None else c0.copy())
        if pk.perm is None:
            inp = np.ascontiguousarray(xs.reshape(T * B, I), np.float32)
            h0s, c0s = h0, c0
        else:
            inp = np.ascontiguousarray(xs[pk.rows_t, pk.rows_b], np.float32)
            h0s = h0[:, pk.perm]
            c0s = None if c0 is None else c0[:, pk.perm]
        hn_s = np.empty((L * D, B, Hout), np.float32)
        cn_s = np.empty((L * D, B, H), np.float32) if c0 is not None else None
        es = 1 if self.precision == "int8" else 2
        xg = scratch("lp_xg", (N, G * H), np.float32)
        hg = scratch("lp_hg", (B, G * H), np.float32)
        s2 = scratch("lp_s2", (B, H), np.float32)
        sx = scratch("lp_sx", (N,), np.float32)
        sh = scratch("lp_sh", (nthreads * B,), np.float32)
        hbuf = scratch("lp_hbuf", (2, B, Hout), np.float32)
        dummy_c = np.zeros((1, 1), np.float32)
        Tn = int(pk.bsz.shape[0])
        for layer in range(L):
            last = layer == L - 1
            y = (np.empty((N, D * Hout), np.float32) if last and pk.perm is None
                 else scratch(f"lp_y{layer % 2}", (N, D * Hout), np.float32))
            for d in range(D):
                wih, whh, whr, bx, bh = self._q[layer][d]
                k = layer * D + d
                kq = max(whh.Kp, whr.Kp if whr is not None else 0)
                qx = scratch("lp_qx", (N * wih.Kp * es,), np.uint8)
                qh = scratch("lp_qh", (nthreads * B * kq * es,), np.uint8)
                hbuf[...] = h0s[k]
                if cn_s is not None:
                    c = cn_s[k]
                    c[...] = c0s[k]
                else:
                    c = dummy_c
                rev = d == 1
                mod.run_direction(self._code, self._isa, inp, pk.bsz, wih, whh, whr, bx, bh, xg, hbuf, c, y,
                                  d * Hout, hg, s2, qx, sx, qh, sh, rev, nthreads)
                if pk.perm is None or rev:
                    hn_s[k] = hbuf[Tn % 2]
                else:
                    hn_s[k] = hbuf[pk.lengths_sorted % 2, np.arange(B)]
            inp = y
        if pk.perm is None:
            return inp.reshape(T, B, D * Hout), hn_s, cn_s
        return _engine.unpack(pk, inp, hn_s, cn_s, T, B)


class FrozenMinRNN(_FrozenBase):
    """An inference-only MinGRU / MinLSTM with copies of a layer's weights; with "bf16" or
    "int8" its projection runs in that precision (the scan stays fp32/fp64)."""

    def __init__(self, layer, precision=None):
        lowp = self._copy(layer, precision)
        lay = self._layer
        self.kernel = "the layer's scan kernels"
        self._q = None
        if lowp:
            p = lay._params
            wcat = np.concatenate([p[f"weight_{g}"] for g in lay._gates])
            self._q = _lowp.pack(self.precision, wcat, len(lay._gates))
            self._isa, name = _lowp.isa(self.precision)
            self.kernel = f"{name} projection, the layer's scan kernels"

    @property
    def nbytes(self) -> int:
        if self._q is None:
            return sum(p.nbytes for p in self._layer._params.values())
        return self._q.nbytes + sum(v.nbytes for k, v in self._layer._params.items() if k.startswith("bias"))

    def _project(self, x2: np.ndarray, out: np.ndarray) -> None:
        """out = x2 @ wcat^T in the frozen precision (the scan's projection hook)."""
        mod = _lowp.kernels()
        es = 1 if self.precision == "int8" else 2
        M = x2.shape[0]
        qa = scratch("lp_qa", (max(1, M * self._q.Kp * es),), np.uint8)
        sa = scratch("lp_sa", (max(1, M),), np.float32)
        mod.gemm(self._q, np.ascontiguousarray(x2, np.float32), out, qa, sa, self._isa)

    def _forward(self, x, hx=None, lengths=None, train: bool = False):
        if train:
            raise TypeError("a frozen layer is inference-only: train the layer, then freeze it again")
        if self._q is None:
            return self._layer._forward(x, hx, lengths)
        from . import scan
        lay = self._layer
        prep = lay._prepare(x, hx, lengths)
        prep.project = self._project
        y2, hn, _ = scan._forward(prep, name=_fast_scan())
        hn = hn.astype(np.float32)
        return scan._user_layout(y2, prep), (hn[0] if prep.unbatched else hn)

    def _run_time_major(self, xs, h0, c0):
        y, hn = self.forward(xs, None if h0 is None else h0[0]) if not self._layer.batch_first else \
            self.forward(xs.transpose(1, 0, 2), None if h0 is None else h0[0])
        if self._layer.batch_first:
            y = y.transpose(1, 0, 2)
        return y, hn[None], None


class Stream:
    """The state of `batch` sequences carried between calls (serving a step at a time).

    ``y_t = stream(x_t)`` with x_t (B, I) returns (B, H_out); x_t (T, B, I) (time-major,
    whatever the layer's batch_first) returns (T, B, H_out). ``stream.state`` is the
    state as the layer returns it (h, or (h, c) for LSTM; copies), ``stream.reset(rows)``
    zeroes the state of some rows (all when None). Its outputs equal one call over the
    whole sequence, however the steps are split across calls. One stream serves one
    thread at a time (use one stream per thread).
    """

    def __init__(self, model, batch: int):
        from .layers import _check_int
        self._model = model
        self.batch = _check_int("batch", batch, 1)
        lay = model._layer if isinstance(model, _FrozenBase) else model
        if getattr(lay, "bidirectional", False) or getattr(lay, "reverse", False):
            raise ValueError("stream: a bidirectional or reverse layer needs the whole sequence (its reverse "
                             "direction starts at the end); call the layer on the full sequence instead")
        self._lay = lay
        self._min = not hasattr(lay, "num_layers")
        self._dtype = (np.dtype(np.float32) if isinstance(model, _FrozenBase) and model.precision in ("bf16", "int8")
                       else lay.dtype)
        LD = 1 if self._min else lay.num_layers
        hsize = lay.hidden_size if self._min else lay.output_size
        self._h = np.zeros((LD, self.batch, hsize), self._dtype)
        self._c = (np.zeros((LD, self.batch, lay.hidden_size), self._dtype)
                   if not self._min and lay._kind == "lstm" else None)
        self._lock = threading.Lock()
        # one step of one plain layer (or frozen fp32/fp64 one): straight to the serving
        # kernel (_engine.run_small) when x_t is a plain array of the compute dtype
        self._plan = None
        plain = (not isinstance(model, _FrozenBase) or model._q is None) and not self._min
        if (plain and lay.num_layers == 1 and not lay.proj_size and lay._variant is None
                and "cython" in backends.available_backends()):
            w = lay._weights()[0][0]
            self._plan = _engine.small_plan(lay._kind, lay._code, w, lay.hidden_size, lay.hidden_size)
        self._xshape = (self.batch, lay.input_size)
        # a frozen bf16/int8 stack, one direction: each layer's step set up once (cy_lowp.StepPlan);
        # its state lives in the plans' buffers (h: half 0 of each hbuf; c: views of self._c)
        self._plans = None
        if isinstance(model, _FrozenBase) and model._q is not None and not self._min:
            self._plans, self._hb, self._most = self._lowp_plans(model)

    def _lowp_plans(self, model):
        mod = _lowp.kernels()
        lay, B = model._layer, self.batch
        G, H, Hout = CELLS[lay._kind].num_gates, lay.hidden_size, lay.output_size
        nmax = threads.get_num_threads()
        es = 1 if model.precision == "int8" else 2
        plans, hbs, wbytes = [], [], 0
        for li, row in enumerate(model._q):
            wih, whh, whr, bx, bh = row[0]
            kq = max(whh.Kp, whr.Kp if whr is not None else 0)
            hb = np.zeros((2, B, Hout), np.float32)
            c = self._c[li] if self._c is not None else np.zeros((1, 1), np.float32)
            plan = mod.StepPlan(lay._code, model._isa, wih, whh, whr, bx, bh,
                                np.empty((B, G * H), np.float32), hb, c, np.empty((B, G * H), np.float32),
                                np.empty((B, H), np.float32), np.empty(B * wih.Kp * es, np.uint8),
                                np.empty(B, np.float32), np.empty(nmax * B * kq * es, np.uint8),
                                np.empty(nmax * B, np.float32), nmax)
            plans.append((plan, Hout))
            hbs.append(hb)
            wbytes = max(wbytes, wih.nbytes + whh.nbytes + (whr.nbytes if whr is not None else 0))
        # weights one core's L2 holds, a few rows: one thread (as the fp32 serving path)
        most = 1 if wbytes <= _engine._SMALL_1T_WBYTES and B <= _engine._SMALL_1T_ROWS else 0
        return plans, hbs, most

    def _get_h(self) -> np.ndarray:
        return np.stack([hb[0] for hb in self._hb]) if self._plans is not None else self._h

    def _set_h(self, h) -> None:
        if self._plans is not None:
            for li, hb in enumerate(self._hb):
                hb[0] = h[li]
        else:
            self._h = h

    @property
    def state(self):
        if self._plans is not None:
            h = self._get_h()
            return (h, self._c.copy()) if self._c is not None else h
        h = self._h[0].copy() if self._min else self._h.copy()
        return (h, self._c.copy()) if self._c is not None else h

    def reset(self, rows=None) -> None:
        """Zero the state of `rows` (int indices or a boolean mask of the batch; all when None)."""
        if rows is None:
            idx = slice(None)
        else:
            r = to_numpy(rows, "rows")
            if r.dtype == bool:
                if r.shape != (self.batch,):
                    raise ValueError(f"rows: a boolean mask must have shape ({self.batch},), got {r.shape}")
                idx = r
            elif r.dtype.kind in "iu":
                idx = r.reshape(-1).astype(np.int64)
                if idx.size and (idx.min() < -self.batch or idx.max() >= self.batch):
                    raise IndexError(f"rows: indices must be in [0, {self.batch}), got {r.tolist()}")
            else:
                raise TypeError(f"rows: expected int indices or a boolean mask, got dtype {r.dtype}")
        self._enter()
        try:
            if self._plans is not None:
                for hb in self._hb:
                    hb[0][idx] = 0
            else:
                self._h[:, idx] = 0
            if self._c is not None:
                self._c[:, idx] = 0
        finally:
            self._lock.release()

    def _enter(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("stream: used from two threads at once (use one stream per thread)")

    def __call__(self, x_t):
        n = self._model._nthreads
        if n is not None:
            return threads.call_limited(n, self._call, x_t)
        return self._call(x_t)

    def _call(self, x_t):
        plans = self._plans
        if (plans is not None and type(x_t) is np.ndarray and x_t.dtype == np.float32
                and x_t.shape == self._xshape and x_t.flags.c_contiguous):
            if not self._lock.acquire(blocking=False):
                raise RuntimeError("stream: used from two threads at once (use one stream per thread)")
            n = threads.enter_call(self._most)
            try:
                inp = x_t
                for step, hout in plans:
                    y = np.empty((self.batch, hout), np.float32)
                    step.run(inp, y, n)
                    inp = y
            finally:
                threads.leave_call(n, n > 1)
                self._lock.release()
            return inp
        plan = self._plan
        if (plan is not None and type(x_t) is np.ndarray and x_t.dtype == plan.dtype
                and x_t.shape == self._xshape and x_t.flags.c_contiguous
                and backends.resolve_fast() == "cython"):
            if not self._lock.acquire(blocking=False):
                raise RuntimeError("stream: used from two threads at once (use one stream per thread)")
            try:
                y, self._h, cn = _engine.run_small(plan, x_t[None], self.batch, self._h, self._c)
                if cn is not None:
                    self._c = cn
            finally:
                self._lock.release()
            return y[0]
        lay = self._lay
        xa = to_numpy(x_t, "x_t")
        if xa.ndim not in (2, 3):
            raise ValueError(f"x_t: expected (B, I) or (T, B, I), got shape {xa.shape}")
        one = xa.ndim == 2
        x3 = xa[None] if one else xa
        if x3.shape[1] != self.batch:
            raise ValueError(f"x_t: expected a batch of {self.batch} rows (the stream's batch), got shape {xa.shape}")
        xs, _ = check_input(x3, "x_t", self._dtype, lay.input_size, False)
        self._enter()
        try:
            y, hn, cn = self._step(xs)
            self._set_h(hn)
            if cn is not None:
                if self._plans is not None:
                    self._c[...] = cn      # the plans hold views of it
                else:
                    self._c = cn
        finally:
            self._lock.release()
        return y[0] if one else y

    def _step(self, xs):
        model = self._model
        if self._min:
            y, hn, _ = model._run_time_major(xs, self._h, None) if isinstance(model, _FrozenBase) else \
                _min_time_major(model, xs, self._h)
            return y, hn, None
        frozen = isinstance(model, _FrozenBase)
        lay = model._layer if frozen else model
        # a few steps of a plain layer (or a frozen fp32/fp64 one): the lean serving path
        if ((not frozen or model._q is None) and lay._small_ok and xs.flags.c_contiguous
                and xs.shape[0] <= _engine.SMALL_MAX_T):
            hx = (self._h, self._c) if self._c is not None else self._h
            out = lay._forward_small(xs, hx)
            if out is not None:
                y, st = out
                return (y, st[0], st[1]) if self._c is not None else (y, st, None)
        if frozen:
            return model._run_time_major(xs, self._get_h(), self._c)
        return _engine.run_stack(lay._kind, lay._code, xs, lay._weights(), self._h, self._c, None,
                                 variant=lay._variant)


def _fast_scan() -> str:
    """The scan backend of a frozen bf16/int8 MinGRU/MinLSTM (its projection hook runs on
    the fast paths only)."""
    have = backends.available_backends()
    for name in ("cython", "numba"):
        if name in have:
            return name
    raise RuntimeError("a bf16/int8 frozen MinGRU/MinLSTM needs the cython or numba backend")


def _min_time_major(layer, xs, h):
    """A MinGRU / MinLSTM layer on time-major `xs` (T, B, I) from state h (1, B, H)."""
    if layer.batch_first:
        y, hn = layer.forward(xs.transpose(1, 0, 2), h[0])
        y = y.transpose(1, 0, 2)
    else:
        y, hn = layer.forward(xs, h[0])
    return y, hn[None], None

