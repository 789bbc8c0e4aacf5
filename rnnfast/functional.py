"""Functional API: one layer, one direction (SPEC "Functional API")."""
from __future__ import annotations

from . import _engine
from ._validation import as_compute, check_float, check_input, check_lengths, check_state, to_numpy, weight_dtype
from .cells import CELLS, activation, cell_code, make_variant


def _weights(kind: str, x, w_ih, w_hh, b_ih, b_hh, w_hr):
    """Convert and shape-check one direction's weights; returns (DirWeights, dtype, H, Hout, I)."""
    G = CELLS[kind].num_gates
    arrs = {n: (None if a is None else check_float(to_numpy(a, n), n))
            for n, a in (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr))}
    dtype = weight_dtype(arrs["w_ih"], arrs["w_hh"])
    wi, wh = arrs["w_ih"], arrs["w_hh"]
    if wi.ndim != 2:
        raise ValueError(f"w_ih: expected a 2-D ({G}*H, I) array, got shape {wi.shape}")
    if wi.shape[0] == 0 or wi.shape[0] % G:
        raise ValueError(f"w_ih: expected {G}*H rows for {kind} (H >= 1), got {wi.shape[0]}")
    H, I = wi.shape[0] // G, wi.shape[1]
    if I == 0:      # as the layers (input_size >= 1) and PyTorch's
        raise ValueError(f"w_ih: expected an input size of at least 1, got shape {wi.shape}")
    Hout = H
    if arrs["w_hr"] is not None:
        if kind != "lstm":
            raise ValueError("w_hr: projection weights exist only for lstm")
        wr = arrs["w_hr"]
        if wr.ndim != 2 or wr.shape[1] != H or wr.shape[0] < 1:
            raise ValueError(f"w_hr: expected shape (P, {H}), got {wr.shape}")
        Hout = wr.shape[0]
    if wh.shape != (G * H, Hout):
        raise ValueError(f"w_hh: expected shape ({G * H}, {Hout}), got {wh.shape}")
    dw = _engine.DirWeights(
        as_compute(wi, "w_ih", dtype), as_compute(wh, "w_hh", dtype),
        None if b_ih is None else as_compute(arrs["b_ih"], "b_ih", dtype, (G * H,)),
        None if b_hh is None else as_compute(arrs["b_hh"], "b_hh", dtype, (G * H,)),
        None if w_hr is None else as_compute(arrs["w_hr"], "w_hr", dtype))
    return dw, dtype, H, Hout, I


def _run(kind, code, x, dw, dtype, H, Hout, I, h0, c0, lengths, reverse, batch_first, variant=None):
    xs, unbatched = check_input(x, "x", dtype, I, batch_first)
    T, B, _ = xs.shape
    h = check_state(h0, "h0", dtype, (B, Hout), unbatched)        # (B, H_out), or (H_out,) unbatched
    c = check_state(c0, "c0", dtype, (B, H), unbatched) if kind == "lstm" else None
    h = None if h is None else h[None]                               # one layer-direction: (1, B, .)
    c = None if c is None else c[None]
    ln = check_lengths(lengths, T, B, unbatched)
    y, hn, cn = _engine.run_stack(kind, code, xs, [[dw]], h, c, ln, rev0=bool(reverse), variant=variant)
    hn, cn = hn[0], (None if cn is None else cn[0])
    if unbatched:
        return y[:, 0], hn[0], (None if cn is None else cn[0])
    if batch_first:
        y = y.transpose(1, 0, 2)
    return y, hn, cn


def with_peepholes(dw, w_ph, dtype, H: int):
    """`dw` (:class:`rnnfast._engine.DirWeights`) with the peepholes `w_ph` ((3H,), checked
    and in the compute dtype), or `dw` itself when there are none."""
    if w_ph is None:
        return dw
    return _engine.DirWeights(dw.w_ih, dw.w_hh, dw.b_ih, dw.b_hh, dw.w_hr,
                              as_compute(check_float(to_numpy(w_ph, "w_ph"), "w_ph"), "w_ph", dtype, (3 * H,)))


def lstm(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, c0=None, w_hr=None, lengths=None,
         reverse: bool = False, batch_first: bool = False, w_ph=None, gate_activation="sigmoid",
         candidate_activation="tanh", output_activation="tanh", clip: float | None = None,
         input_forget: bool = False):
    """LSTM over a sequence, one layer and one direction.

    Parameters
    ----------
    x : array_like, (T, B, I), (B, T, I) with ``batch_first``, or unbatched (T, I).
    w_ih : array_like (4H, I);  w_hh : array_like (4H, H_out); gates i, f, g, o.
    b_ih, b_hh : array_like (4H,), optional (zero when missing).
    h0 : (B, H_out), optional.  c0 : (B, H), optional.
    w_hr : array_like (P, H), optional projection: h' = (o*tanh(c')) W_hr^T, H_out = P.
    lengths : int array_like (B,), optional, each in [0, T]; outputs past them are 0.
    reverse : run from the last valid step of each sequence down to step 0.
    w_ph, gate_activation, candidate_activation, output_activation, clip, input_forget :
        a cell variant (see the layers' docstring): peepholes (3H,) ordered i, f, o, the
        activations (a name or ``(name, alpha[, beta])``), the clip of the
        pre-activations, the coupled input-forget gate (:func:`rnnfast.lstm_forward_train`
        takes them too).

    Returns
    -------
    y : (T, B, H_out) (or batch-first / unbatched);  (h_n (B, H_out), c_n (B, H)).
    """
    v = make_variant("lstm", gate=gate_activation, candidate=candidate_activation, output=output_activation,
                     peephole=w_ph is not None, clip=clip, input_forget=input_forget)
    dw, dtype, H, Hout, I = _weights("lstm", x, w_ih, w_hh, b_ih, b_hh, w_hr)
    dw = with_peepholes(dw, w_ph, dtype, H)
    y, hn, cn = _run("lstm", cell_code("lstm", proj=w_hr is not None), x, dw, dtype, H, Hout, I,
                     h0, c0, lengths, reverse, batch_first, v)
    return y, (hn, cn)


def gru(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, lengths=None, reverse: bool = False,
        batch_first: bool = False, linear_before_reset: bool = True, gate_activation="sigmoid",
        candidate_activation="tanh", clip: float | None = None):
    """GRU over a sequence, one layer and one direction (gates r, z, n).

    ``linear_before_reset=True`` is PyTorch's form (n = tanh(W_in x + b_in + r*(W_hn h + b_hn)));
    False is ONNX's default / Cho et al. (n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)).
    Shapes as :func:`lstm` with 3H gate rows; the variant options as there. Returns ``(y, h_n)``.
    """
    v = make_variant("gru", gate=gate_activation, candidate=candidate_activation, clip=clip)
    dw, dtype, H, Hout, I = _weights("gru", x, w_ih, w_hh, b_ih, b_hh, None)
    code = cell_code("gru", linear_before_reset=bool(linear_before_reset))
    y, hn, _ = _run("gru", code, x, dw, dtype, H, Hout, I, h0, None, lengths, reverse, batch_first, v)
    return y, hn


def rnn(x, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, lengths=None, reverse: bool = False,
        batch_first: bool = False, nonlinearity="tanh", clip: float | None = None):
    """Elman RNN over a sequence: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh or relu
    (PyTorch's), or any activation of the cell variants (see :func:`lstm`).

    Shapes as :func:`lstm` with H gate rows. Returns ``(y, h_n)``.
    """
    act = activation(nonlinearity, "nonlinearity")
    v = make_variant("rnn", candidate=act, clip=clip)
    dw, dtype, H, Hout, I = _weights("rnn", x, w_ih, w_hh, b_ih, b_hh, None)
    code = cell_code("rnn", nonlinearity=act.name)
    y, hn, _ = _run("rnn", code, x, dw, dtype, H, Hout, I, h0, None, lengths, reverse, batch_first, v)
    return y, hn

