"""Training: forward passes that keep what backward needs, and backpropagation through time.

Layers call :func:`stack_forward_train` from ``forward(..., train=True)`` and
:func:`layer_backward` from ``backward``; the functional counterparts for one layer and
one direction are :func:`lstm_forward_train` / :func:`lstm_backward`,
:func:`gru_forward_train` / :func:`gru_backward` and :func:`rnn_forward_train` /
:func:`rnn_backward`. Gradients are those of ``sum(y * dy) + sum(h_n * dh_n)
(+ sum(c_n * dc_n))``, the same as PyTorch's autograd.

What a training forward keeps (per layer and direction, on the fast backends):

- LSTM: the post-activation gates i, f, g, o (written over the input projection, so
  no extra buffer) and the cell states c_t;
- GRU: r, z, n and, with ``linear_before_reset=True``, W_hn h + b_hn;
- RNN: nothing beyond the layer's output;
- every layer's output (it is the next layer's input and the recurrent input of the
  weight gradient), the first layer's (packed) input, and one byte per element for
  each inter-layer dropout mask.

Backward recomputes everything else (tanh(c), the dropped-out inputs, r * h). Per
step it runs the fused gate gradients and the recurrent GEMM dh_prev = dG W_hh;
the weight gradients are large GEMMs over all T*B rows afterwards
(dW_ih = dG^T X, dW_hh = dG^T H_prev, dx = dG W_ih), never per step; the bias
gradients are the column sums of dG, accumulated (in float64) by the Cython kernel.

Backends: "cython" (kernels/cy_train.pyx, kernels/rf_train.h) and "numba"
(kernels/numba_train.py) run the packed-rows layout of :mod:`rnnfast._engine` (padded
steps cost nothing); "reference" is plain float64 NumPy
(:mod:`rnnfast.reference.backward`), the test oracle. Dropout masks are drawn in the
(T, B, features) layout from the layer's generator before the backend is chosen, so
every backend sees the same masks for the same seed.

Threads: the Cython backend runs everything, its large GEMMs included
(``cy_train.pgemm``), on OpenMP threads that each call single-threaded BLAS. A threaded
BLAS between the recurrence kernels would leave its idle threads spinning on the cores
that the kernels' threads need next, which slows the steps (commit b34bc51; figures in
docs/performance.md). The Numba backend
keeps BLAS single-threaded inside its kernels and NumPy's threaded BLAS for the large
GEMMs. Small steps (see ``_train_fast._PAR_MIN_WORK``) run on one thread.

Scratch: large buffers that never reach the caller (the saved gates and cell states,
the gate gradients, the packed weights) come from the bounded pool of
``rnnfast.memory`` and go back to it when their context dies or the backward ends: a
training loop then reuses the same memory at every step instead of page-faulting tens of
MB, a visible share of a step (commit b34bc51; figures in docs/performance.md).
``rnnfast.release_memory()`` empties it.

A context supports any number of backward calls (each recomputes from the saved state).

Backward uses the weights as they are when it runs (the layer's live parameters; for
the functional API the arrays passed to the forward). Inputs are kept by reference:
modifying ``x`` in place between forward and backward changes the weight gradients.
On the fast backends the output ``y`` of a training forward without ``lengths`` is the
saved output itself, returned read-only (no copy); copy it to modify it.
"""
from __future__ import annotations

import numpy as np

from . import backends, threads
from ._train_fast import _draw_masks, _dropout, _fast_backward, _fast_forward, _train_kernels
from ._validation import check_float, check_input, check_lengths, check_state, to_numpy
from .cells import CELLS, LSTM_PROJ, activation, cell_code, make_variant
from .reference import backward as _rb


class TrainContext:
    """What a training forward of a stack of layers keeps for its backward (opaque).

    Attributes are private to :mod:`rnnfast.training`; a context may be used by several
    backward calls (each gives the same result for the same weights and gradients).
    """

    def __repr__(self) -> str:
        return (f"TrainContext(backend={self.backend!r}, kind={self.kind!r}, T={self.T}, B={self.B}, "
                f"layers={self.L}, directions={self.D})")


# ============================================================================ stack entry points
def stack_forward_train(kind: str, code: int, xs: np.ndarray, weights, h0, c0, lengths, *,
                        dropout: float = 0.0, rng=None, rev0: bool = False, variant=None):
    """Forward of a stack of layers that keeps what :func:`stack_backward` needs.

    Parameters
    ----------
    kind, code : cell family and code (:mod:`rnnfast.cells`).
    xs : (T, B, I) time-major input, already in the compute dtype.
    weights : list (layers) of list (directions) of :class:`rnnfast._engine.DirWeights`.
    h0 : (L*D, B, H_out) or None;  c0 : (L*D, B, H) or None (LSTM).
    lengths : (B,) int64 or None.
    dropout : inter-layer dropout probability (applied to every layer's output but the
        last; inverted scaling; masks drawn from `rng`).
    rev0 : direction 0 runs in reverse (the functional API's ``reverse=True``).
    variant : a cell variant (:class:`rnnfast.cells.Variant`): trained by the backends
        whose kernels take variants (see :func:`_variant_training_backend`).

    Returns
    -------
    y, h_n, c_n, ctx : exactly as :func:`rnnfast._engine.run_stack` plus the context.
    """
    T, B, I = xs.shape
    L, D = len(weights), len(weights[0])
    G = CELLS[kind].num_gates
    H = weights[0][0].w_hh.shape[0] // G
    Hout = weights[0][0].w_hr.shape[0] if code == LSTM_PROJ else H
    dtype = xs.dtype
    ctx = TrainContext()
    ctx.kind, ctx.code, ctx.T, ctx.B, ctx.I, ctx.L, ctx.D = kind, code, T, B, I, L, D
    ctx.H, ctx.Hout, ctx.dtype, ctx.rev0, ctx.lengths = H, Hout, dtype, bool(rev0), lengths
    ctx.p = float(dropout)
    ctx.h0_given = h0 is not None
    if h0 is None:
        h0 = np.zeros((L * D, B, Hout), dtype)
    if kind == "lstm" and c0 is None:
        c0 = np.zeros((L * D, B, H), dtype)
    ctx.masks = _draw_masks(rng, ctx.p, L, (T, B, D * Hout))
    name = backends.resolve(kind, B, H, dtype, threads.get_num_threads())
    name = backends.fit_sizes(name, T, B, I, H, Hout, G, D)
    if variant is not None:
        name = _variant_training_backend(name, variant)
    ctx.variant = variant
    ctx.backend = name
    if name == "reference":
        y, hn, cn = _ref_forward(ctx, xs, weights, h0, c0)
    else:
        y, hn, cn = threads.call_with_threads(_fast_forward, ctx, _train_kernels(name), xs, weights, h0, c0)
    return y, hn, cn, ctx


def stack_backward(ctx: TrainContext, dy: np.ndarray, dhn, dcn, weights):
    """Backward of :func:`stack_forward_train`.

    Parameters
    ----------
    ctx : the forward's context.  dy : (T, B, D*H_out) in the compute dtype.
    dhn : (L*D, B, H_out) or None;  dcn : (L*D, B, H) or None (zeros).
    weights : the weights to differentiate with (list of list of DirWeights).

    Returns
    -------
    dx (T, B, I), dh0 (L*D, B, H_out), dc0 (L*D, B, H) or None, grads : list (layers) of
    list (directions) of dicts with keys w_ih, w_hh, b_ih, b_hh (when the layer has
    biases), w_hr (projection), all in the compute dtype.
    """
    if ctx.backend == "reference":
        return _ref_backward(ctx, dy, dhn, dcn, weights)
    return threads.call_with_threads(_fast_backward, ctx, _train_kernels(ctx.backend), dy, dhn, dcn, weights)


def _variant_training_backend(name: str, variant) -> str:
    """The backend that trains a cell variant: `name` when its training kernels take
    variants (KernelSet.variant_training); under "auto" the first compiled backend that
    does, else the reference; a compiled backend named without them raises."""
    if name == "reference" or backends.kernel_set(name).variant_training:
        return name
    if backends.get_backend() == "auto":
        for other in backends.available_backends():
            if other != "reference" and backends.kernel_set(other).variant_training:
                return other
        return "reference"
    raise NotImplementedError(f"the {name!r} training kernels have the standard cells only: a cell with "
                              f"{variant.describe()} trains on the 'numba' or 'reference' backend for now "
                              "(backend 'auto' picks one)")


# ============================================================================ reference backend
def _ref_forward(ctx, xs, weights, h0, c0):
    inp = np.asarray(xs, np.float64)
    L, D = ctx.L, ctx.D
    hn = np.empty(h0.shape)
    cn = None if c0 is None else np.empty(c0.shape)
    saved = []
    out = inp
    for layer, dirs in enumerate(weights):
        ys, svs = [], []
        for d, w in enumerate(dirs):
            k = layer * D + d
            y, h, c, sv = _rb.forward_direction(
                ctx.kind, ctx.code, inp, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, h0=h0[k],
                c0=None if c0 is None else c0[k], lengths=ctx.lengths,
                reverse=ctx.rev0 if d == 0 else True, variant=ctx.variant, w_ph=w.w_ph)
            ys.append(y)
            svs.append(sv)
            hn[k] = h
            if cn is not None:
                cn[k] = c
        out = np.concatenate(ys, axis=-1) if D > 1 else ys[0]
        saved.append(svs)
        if layer < L - 1:
            inp = _dropout(ctx, layer, out, ctx.masks)
    ctx.saved = saved
    dt = ctx.dtype
    return out.astype(dt), hn.astype(dt), (None if cn is None else cn.astype(dt))


def _ref_backward(ctx, dy, dhn, dcn, weights):
    L, D, Hout = ctx.L, ctx.D, ctx.Hout
    dout = np.asarray(dy, np.float64)
    dh0 = np.zeros((L * D, ctx.B, Hout))
    dc0 = np.zeros((L * D, ctx.B, ctx.H)) if ctx.kind == "lstm" else None
    grads = [[None] * D for _ in range(L)]
    dinp = None
    for layer in range(L - 1, -1, -1):
        dinp = None
        for d, w in enumerate(weights[layer]):
            k = layer * D + d
            dx, dh, dc, g = _rb.backward_direction(
                ctx.saved[layer][d], dout[..., d * Hout:(d + 1) * Hout],
                None if dhn is None else dhn[k], None if dcn is None else dcn[k],
                weights=(w.w_ih, w.w_hh, w.w_hr), w_ph=w.w_ph)
            dinp = dx if dinp is None else dinp + dx
            dh0[k] = dh
            if dc0 is not None:
                dc0[k] = dc
            if w.b_ih is None:
                g.pop("b_ih")
            if w.b_hh is None:
                g.pop("b_hh")
            grads[layer][d] = {n: a.astype(ctx.dtype) for n, a in g.items()}
        if layer > 0:
            dout = _dropout(ctx, layer - 1, dinp, ctx.masks)
    dt = ctx.dtype
    return dinp.astype(dt), dh0.astype(dt), (None if dc0 is None else dc0.astype(dt)), grads


# ============================================================================ layer glue
def _grad_array(a, name: str, dtype, shape: tuple) -> np.ndarray:
    arr = check_float(to_numpy(a, name), name)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (like the forward's output), got {arr.shape}")
    return arr


def _dy_time_major(dy, name, dtype, T, B, F, unbatched, batch_first) -> np.ndarray:
    """dy in the caller's layout -> (T, B, F) C-contiguous in the compute dtype."""
    if unbatched:
        arr = _grad_array(dy, name, dtype, (T, F))[:, None, :]
    elif batch_first:
        arr = _grad_array(dy, name, dtype, (B, T, F)).transpose(1, 0, 2)
    else:
        arr = _grad_array(dy, name, dtype, (T, B, F))
    return np.ascontiguousarray(arr, dtype=dtype)


def _x_layout(a: np.ndarray, unbatched: bool, batch_first: bool) -> np.ndarray:
    if unbatched:
        return a[:, 0]
    if batch_first:
        return a.transpose(1, 0, 2)
    return a


def _state_grads(kind, dstate, name, dtype, LD, B, Hout, H, unbatched):
    """Validate the gradient of the final state(s); returns (dh_n, dc_n), each None = zeros."""
    if kind == "lstm":
        if dstate is None:
            return None, None
        if not isinstance(dstate, (tuple, list)) or len(dstate) != 2:
            raise TypeError(f"{name}: expected a tuple (dh_n, dc_n) for LSTM (entries may be None), "
                            f"got {type(dstate).__name__}")
        dh = check_state(dstate[0], f"{name}[0] (dh_n)", dtype, (LD, B, Hout), unbatched)
        dc = check_state(dstate[1], f"{name}[1] (dc_n)", dtype, (LD, B, H), unbatched)
        return dh, dc
    if isinstance(dstate, (tuple, list)):
        raise TypeError(f"{name}: expected an array (the gradient of h_n) for {kind.upper()}, "
                        f"got a {type(dstate).__name__}")
    return check_state(dstate, name, dtype, (LD, B, Hout), unbatched), None


def layer_backward(layer, ctx: TrainContext, dy, dhx_n, unbatched: bool, batch_first: bool):
    """Backward of a layer's ``forward(..., train=True)``: returns ``(dx, dhx, grads)``.

    `dy` is in the caller's layout (like y); `dhx_n` like hx_n (LSTM: a tuple whose
    entries may be None) or None. `grads` is keyed by the layer's parameter names.
    """
    kind, dtype = ctx.kind, ctx.dtype
    L, D, H, Hout, T, B = ctx.L, ctx.D, ctx.H, ctx.Hout, ctx.T, ctx.B
    dys = _dy_time_major(dy, "dy", dtype, T, B, D * Hout, unbatched, batch_first)
    dhn, dcn = _state_grads(kind, dhx_n, "dhx_n", dtype, L * D, B, Hout, H, unbatched)
    weights = layer._weights()
    dx, dh0, dc0, glist = stack_backward(ctx, dys, dhn, dcn, weights)
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr",
             "w_ph": "weight_ph"}
    params = layer.parameters()
    grads = {}
    for li in range(L):
        for d in range(D):
            sfx = f"_l{li}" + ("_reverse" if d else "")
            for short, g in glist[li][d].items():
                key = names[short] + sfx
                if key in params:
                    grads[key] = np.asarray(g, dtype)
    grads = {k: grads[k] for k in params if k in grads}     # the parameters' order
    dx = _x_layout(dx, unbatched, batch_first)
    if unbatched:
        dh0 = dh0[:, 0]
        dc0 = None if dc0 is None else dc0[:, 0]
    dhx = (dh0, dc0) if kind == "lstm" else dh0
    return dx, dhx, grads


# ============================================================================ functional API
class FunctionalTrainContext:
    """Context of a functional training forward (pass it to the matching ``*_backward``)."""

    __slots__ = ("stack", "kind", "weights", "unbatched", "batch_first", "consumed")

    def __repr__(self) -> str:
        return f"FunctionalTrainContext(kind={self.kind!r}, {self.stack!r})"


def _functional_forward(kind, code, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, batch_first,
                        variant=None, w_ph=None):
    from .functional import _weights, with_peepholes
    dw, dtype, H, Hout, I = _weights(kind, x, w_ih, w_hh, b_ih, b_hh, w_hr)
    dw = with_peepholes(dw, w_ph, dtype, H)
    xs, unbatched = check_input(x, "x", dtype, I, batch_first)
    T, B, _ = xs.shape
    h = check_state(h0, "h0", dtype, (B, Hout), unbatched)          # (B, H_out), or (H_out,) unbatched
    c = check_state(c0, "c0", dtype, (B, H), unbatched) if kind == "lstm" else None
    h = None if h is None else h[None]                               # one layer-direction: (1, B, .)
    c = None if c is None else c[None]
    ln = check_lengths(lengths, T, B, unbatched)
    y, hn, cn, sctx = stack_forward_train(kind, code, xs, [[dw]], h, c, ln, rev0=bool(reverse), variant=variant)
    fctx = FunctionalTrainContext()
    fctx.stack, fctx.kind, fctx.weights = sctx, kind, dw
    fctx.unbatched, fctx.batch_first = unbatched, bool(batch_first)
    hn, cn = hn[0], (None if cn is None else cn[0])
    if unbatched:
        y, hn, cn = y[:, 0], hn[0], (None if cn is None else cn[0])
    elif batch_first:
        y = y.transpose(1, 0, 2)
    return y, hn, cn, fctx


def _functional_backward(ctx, kind, dy, dh_n, dc_n):
    if not isinstance(ctx, FunctionalTrainContext):
        raise TypeError(f"ctx: expected the context returned by {kind}_forward_train, got {type(ctx).__name__}")
    if ctx.kind != kind:
        raise ValueError(f"ctx: this context comes from {ctx.kind}_forward_train, not {kind}_forward_train")
    s = ctx.stack
    dys = _dy_time_major(dy, "dy", s.dtype, s.T, s.B, s.Hout, ctx.unbatched, ctx.batch_first)
    dh = check_state(dh_n, "dh_n", s.dtype, (s.B, s.Hout), ctx.unbatched)
    dc = check_state(dc_n, "dc_n", s.dtype, (s.B, s.H), ctx.unbatched) if kind == "lstm" else None
    dh = None if dh is None else dh[None]
    dc = None if dc is None else dc[None]
    dx, dh0, dc0, glist = stack_backward(s, dys, dh, dc, [[ctx.weights]])
    dx = _x_layout(dx, ctx.unbatched, ctx.batch_first)
    dh0 = dh0[0]
    dc0 = None if dc0 is None else dc0[0]
    if ctx.unbatched:
        dh0 = dh0[0]
        dc0 = None if dc0 is None else dc0[0]
    return dx, dh0, dc0, dict(glist[0][0])


def lstm_forward_train(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, c0=None, w_hr=None, lengths=None,
                       reverse: bool = False, batch_first: bool = False, w_ph=None, gate_activation="sigmoid",
                       candidate_activation="tanh", output_activation="tanh", clip: float | None = None,
                       input_forget: bool = False):
    """:func:`rnnfast.lstm` that also returns the context :func:`lstm_backward` needs.

    Parameters
    ----------
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, reverse, batch_first
        As :func:`rnnfast.lstm`.
    w_ph, gate_activation, candidate_activation, output_activation, clip, input_forget
        A cell variant, as :func:`rnnfast.lstm` (the peepholes' gradient is ``w_ph``).

    Returns
    -------
    y : (T, B, H_out), (B, T, H_out) with ``batch_first``, or (T, H_out) unbatched.
    (h_n, c_n) : final states, (B, H_out) and (B, H) (unbatched: (H_out,), (H,)).
    ctx : :class:`FunctionalTrainContext`, to pass to :func:`lstm_backward`.

    Notes
    -----
    The context keeps references to the weights (backward uses them as they are when it
    runs) and to ``x``. It stays valid for several backward calls.
    """
    v = make_variant("lstm", gate=gate_activation, candidate=candidate_activation, output=output_activation,
                     peephole=w_ph is not None, clip=clip, input_forget=input_forget)
    code = cell_code("lstm", proj=w_hr is not None)
    y, hn, cn, ctx = _functional_forward("lstm", code, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths,
                                         reverse, batch_first, v, w_ph)
    return y, (hn, cn), ctx


def lstm_backward(ctx, dy, dh_n=None, dc_n=None):
    """Gradients of ``sum(y*dy) + sum(h_n*dh_n) + sum(c_n*dc_n)`` after :func:`lstm_forward_train`.

    Parameters
    ----------
    ctx : the context returned by :func:`lstm_forward_train`.
    dy : array_like shaped like y (batch-first / unbatched as the forward's input was).
    dh_n : like h_n, optional (zeros).  dc_n : like c_n, optional (zeros).

    Returns
    -------
    dx : shaped like x.
    (dh0, dc0) : shaped like h0 and c0 (also when the forward used zero initial states).
    grads : dict with ``w_ih``, ``w_hh``, plus ``b_ih``, ``b_hh`` and ``w_hr`` for the
        ones the forward was given, in the compute dtype.
    """
    dx, dh0, dc0, g = _functional_backward(ctx, "lstm", dy, dh_n, dc_n)
    return dx, (dh0, dc0), g


def gru_forward_train(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, lengths=None, reverse: bool = False,
                      batch_first: bool = False, linear_before_reset: bool = True, gate_activation="sigmoid",
                      candidate_activation="tanh", clip: float | None = None):
    """:func:`rnnfast.gru` that also returns the context :func:`gru_backward` needs (the
    cell variant's options as there).

    Returns
    -------
    y, h_n, ctx : as :func:`rnnfast.gru`, plus a :class:`FunctionalTrainContext`.
    """
    v = make_variant("gru", gate=gate_activation, candidate=candidate_activation, clip=clip)
    code = cell_code("gru", linear_before_reset=bool(linear_before_reset))
    y, hn, _, ctx = _functional_forward("gru", code, x, w_ih, w_hh, b_ih, b_hh, None, h0, None, lengths,
                                        reverse, batch_first, v)
    return y, hn, ctx


def gru_backward(ctx, dy, dh_n=None):
    """Gradients of ``sum(y*dy) + sum(h_n*dh_n)`` after :func:`gru_forward_train`.

    Returns
    -------
    dx : like x.  dh0 : like h0.  grads : dict ``w_ih``, ``w_hh`` (+ ``b_ih``, ``b_hh`` when given).
    """
    dx, dh0, _, g = _functional_backward(ctx, "gru", dy, dh_n, None)
    return dx, dh0, g


def rnn_forward_train(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, lengths=None, reverse: bool = False,
                      batch_first: bool = False, nonlinearity="tanh", clip: float | None = None):
    """:func:`rnnfast.rnn` that also returns the context :func:`rnn_backward` needs
    (`nonlinearity` any activation of the cell variants, and `clip`, as there).

    Returns
    -------
    y, h_n, ctx : as :func:`rnnfast.rnn`, plus a :class:`FunctionalTrainContext`.
    """
    act = activation(nonlinearity, "nonlinearity")
    v = make_variant("rnn", candidate=act, clip=clip)
    code = cell_code("rnn", nonlinearity=act.name)
    y, hn, _, ctx = _functional_forward("rnn", code, x, w_ih, w_hh, b_ih, b_hh, None, h0, None, lengths,
                                        reverse, batch_first, v)
    return y, hn, ctx


def rnn_backward(ctx, dy, dh_n=None):
    """Gradients of ``sum(y*dy) + sum(h_n*dh_n)`` after :func:`rnn_forward_train`.

    Returns
    -------
    dx : like x.  dh0 : like h0.  grads : dict ``w_ih``, ``w_hh`` (+ ``b_ih``, ``b_hh`` when given).
    """
    dx, dh0, _, g = _functional_backward(ctx, "rnn", dy, dh_n, None)
    return dx, dh0, g


__all__ = ["lstm_forward_train", "lstm_backward", "gru_forward_train", "gru_backward",
           "rnn_forward_train", "rnn_backward", "stack_forward_train", "stack_backward", "layer_backward",
           "TrainContext", "FunctionalTrainContext"]
