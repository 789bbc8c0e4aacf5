"""Plain NumPy backpropagation through time: the training oracle and the "reference" backend.

Float64 throughout, one Python step after another, written to be read rather than to
be fast. The equations are those of :mod:`rnnfast.cells`; the gradients are those of
``sum(y * dy) + sum(h_n * dh_n) + sum(c_n * dc_n)``.

:func:`forward_direction` runs one layer-direction over a time-major batch and keeps,
for every step, the live rows and the values that :func:`backward_direction` needs
(inputs, previous states, post-activation gates). Steps at ``t >= lengths[b]`` are not
run for sequence ``b``: they cost nothing and get zero gradient.
"""
from __future__ import annotations

import numpy as np

from ..cells import CELLS, GRU_NOLBR, LSTM_PROJ, RNN_TANH
from . import activate, sigmoid


def activation_grad(act, x: np.ndarray) -> np.ndarray:
    """The derivative of an activation (:class:`rnnfast.cells.Activation`) at `x`."""
    n, a, b = act.name, act.alpha, act.beta
    if n == "sigmoid":
        s = sigmoid(x)
        return s * (1.0 - s)
    if n == "tanh":
        return 1.0 - np.tanh(x) ** 2
    if n == "relu":
        return (x > 0).astype(np.float64)
    if n == "affine":
        return np.full_like(x, a)
    if n == "leaky_relu":
        return np.where(x >= 0, 1.0, a)
    if n == "thresholded_relu":
        return (x > a).astype(np.float64)
    if n == "scaled_tanh":
        return a * b * (1.0 - np.tanh(b * x) ** 2)
    if n == "hard_sigmoid":
        v = a * x + b
        return np.where((v > 0) & (v < 1), a, 0.0)
    if n == "elu":
        return np.where(x >= 0, 1.0, a * np.exp(np.minimum(x, 0.0)))
    if n == "softsign":
        return 1.0 / (1.0 + np.abs(x)) ** 2
    if n == "softplus":
        return sigmoid(x)
    raise ValueError(f"unknown activation {n!r}")


def _pre(v, a):
    """Clip of a pre-activation, and its derivative (1 inside [-clip, clip], as torch.clamp)."""
    if v.clip is None:
        return a, 1.0
    return np.clip(a, -v.clip, v.clip), ((a >= -v.clip) & (a <= v.clip)).astype(np.float64)


def _variant_forward(kind, code, v, st, gx, hp, cp, w_hh, b_hh, w_hr, w_ph, H):
    """One step of a cell variant keeping what :func:`_variant_backward` needs; (h', c')."""
    def act(which, a):
        pa, dclip = _pre(v, a)
        return activate(which, pa), activation_grad(which, pa) * dclip
    if kind == "lstm":
        a = gx + hp @ w_hh.T + b_hh
        ai, af, ag, ao = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        if v.peephole:
            ai, af = ai + w_ph[:H] * cp, af + w_ph[H:2 * H] * cp
        i, di = act(v.gate, ai)
        if v.input_forget:
            f, df = 1.0 - i, np.zeros_like(i)
        else:
            f, df = act(v.gate, af)
        g, dg = act(v.candidate, ag)
        cn = f * cp + i * g
        if v.peephole:
            ao = ao + w_ph[2 * H:] * cn
        o, do = act(v.gate, ao)
        m = o * activate(v.output, cn)
        hn = m @ w_hr.T if code == LSTM_PROJ else m
        st.update(cp=cp, i=i, f=f, g=g, o=o, c=cn, m=m, di=di, df=df, dg=dg, do=do)
        return hn, cn
    if kind == "gru":
        ghrz = hp @ w_hh[:2 * H].T + b_hh[:2 * H]
        r, dr = act(v.gate, gx[:, :H] + ghrz[:, :H])
        z, dz = act(v.gate, gx[:, H:2 * H] + ghrz[:, H:])
        if code == GRU_NOLBR:
            q = r * hp
            n, dn = act(v.candidate, gx[:, 2 * H:] + q @ w_hh[2 * H:].T + b_hh[2 * H:])
            st.update(q=q)
        else:
            ghn = hp @ w_hh[2 * H:].T + b_hh[2 * H:]
            n, dn = act(v.candidate, gx[:, 2 * H:] + r * ghn)
            st.update(ghn=ghn)
        st.update(r=r, z=z, n=n, dr=dr, dz=dz, dn=dn)
        return (1.0 - z) * n + z * hp, None
    hn, dh = act(v.candidate, gx + hp @ w_hh.T + b_hh)
    st.update(h=hn, dact=dh)
    return hn, None


def _variant_backward(code, v, st, dht, dc_next, w_hh, w_hr, w_ph, H, gw_hr, gw_hh, gw_ph):
    """Backward of one step of :func:`_variant_forward`: (dax, dah, dh_prev, dc_prev);
    accumulates the projection, (GRU no-lbr) recurrent and peephole gradients."""
    if "i" in st:       # LSTM
        i, f, g, o, cn, cp, m = st["i"], st["f"], st["g"], st["o"], st["c"], st["cp"], st["m"]
        if code == LSTM_PROJ:
            gw_hr += dht.T @ m
            dm = dht @ w_hr
        else:
            dm = dht
        dao = dm * activate(v.output, cn) * st["do"]
        dct = dc_next + dm * o * activation_grad(v.output, cn)
        if v.peephole:
            dct = dct + dao * w_ph[2 * H:]
        di, df = dct * g, dct * cp
        if v.input_forget:
            di, df = di - df, np.zeros_like(df)
        dai, daf, dag = di * st["di"], df * st["df"], dct * i * st["dg"]
        dc_prev = dct * f
        if v.peephole:
            dc_prev = dc_prev + dai * w_ph[:H] + daf * w_ph[H:2 * H]
            gw_ph[:H] += (dai * cp).sum(axis=0)
            gw_ph[H:2 * H] += (daf * cp).sum(axis=0)
            gw_ph[2 * H:] += (dao * cn).sum(axis=0)
        da = np.concatenate([dai, daf, dag, dao], axis=1)
        return da, da, da @ w_hh, dc_prev
    if "z" in st:       # GRU
        r, z, n, hp = st["r"], st["z"], st["n"], st["hp"]
        dan = dht * (1.0 - z) * st["dn"]
        daz = dht * (hp - n) * st["dz"]
        dhp = dht * z
        if code == GRU_NOLBR:
            dq = dan @ w_hh[2 * H:]
            dar = dq * hp * st["dr"]
            dhp = dhp + dq * r
            gw_hh[2 * H:] += dan.T @ st["q"]
            drz = np.concatenate([dar, daz], axis=1)
            gw_hh[:2 * H] += drz.T @ hp
            dax = np.concatenate([dar, daz, dan], axis=1)
            return dax, None, dhp + drz @ w_hh[:2 * H], None
        dar = dan * st["ghn"] * st["dr"]
        dah = np.concatenate([dar, daz, dan * r], axis=1)
        return np.concatenate([dar, daz, dan], axis=1), dah, dhp + dah @ w_hh, None
    da = dht * st["dact"]
    return da, da, da @ w_hh, None


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def forward_direction(kind: str, code: int, x: np.ndarray, w_ih, w_hh, b_ih=None, b_hh=None,
                      w_hr=None, *, h0=None, c0=None, lengths=None, reverse: bool = False,
                      variant=None, w_ph=None):
    """Forward of one layer and one direction that keeps what the backward pass needs.

    Parameters
    ----------
    kind : "lstm", "gru" or "rnn".  code : the cell code (:mod:`rnnfast.cells`).
    x : (T, B, I) time-major input.
    w_ih, w_hh, b_ih, b_hh, w_hr : the direction's weights (biases/projection may be None).
    h0 : (B, H_out), c0 : (B, H) or None (zeros).
    lengths : (B,) ints or None.  reverse : run each sequence from its last valid step down.
    variant, w_ph : a cell variant (:class:`rnnfast.cells.Variant`) and its peepholes.

    Returns
    -------
    y : (T, B, H_out) float64, h_n : (B, H_out), c_n : (B, H) or None, saved : dict
        (the context of :func:`backward_direction`).
    """
    x = np.asarray(x, np.float64)
    T, B, I = x.shape
    G = CELLS[kind].num_gates
    w_ih, w_hh, w_hr = _f64(w_ih), _f64(w_hh), _f64(w_hr)
    H = w_hh.shape[0] // G
    b_ih = np.zeros(G * H) if b_ih is None else _f64(b_ih)
    b_hh = np.zeros(G * H) if b_hh is None else _f64(b_hh)
    Hout = w_hr.shape[0] if w_hr is not None else H
    h = np.zeros((B, Hout)) if h0 is None else np.array(h0, np.float64)
    c = None
    if kind == "lstm":
        c = np.zeros((B, H)) if c0 is None else np.array(c0, np.float64)
    lengths = np.full(B, T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    y = np.zeros((T, B, Hout))
    steps = []
    tmax = min(T, int(lengths.max())) if B else 0      # steps past every length do nothing
    order = range(tmax - 1, -1, -1) if reverse else range(tmax)
    for t in order:
        live = np.nonzero(lengths > t)[0]
        if live.size == 0:
            continue
        xt, hp = x[t, live], h[live]
        cp = None if c is None else c[live]
        gx = xt @ w_ih.T + b_ih
        st = {"t": t, "live": live, "x": xt, "hp": hp}
        if variant is not None:
            hn, cn = _variant_forward(kind, code, variant, st, gx, hp, cp, w_hh, b_hh, w_hr, _f64(w_ph), H)
            if c is not None:
                c[live] = cn
        elif kind == "lstm":
            a = gx + hp @ w_hh.T + b_hh
            i, f = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H])
            g, o = np.tanh(a[:, 2 * H:3 * H]), sigmoid(a[:, 3 * H:])
            cn = f * cp + i * g
            m = o * np.tanh(cn)
            hn = m @ w_hr.T if code == LSTM_PROJ else m
            st.update(cp=cp, i=i, f=f, g=g, o=o, c=cn, m=m)
            c[live] = cn
        elif kind == "gru":
            ghrz = hp @ w_hh[:2 * H].T + b_hh[:2 * H]
            r = sigmoid(gx[:, :H] + ghrz[:, :H])
            z = sigmoid(gx[:, H:2 * H] + ghrz[:, H:])
            if code == GRU_NOLBR:
                q = r * hp
                n = np.tanh(gx[:, 2 * H:] + q @ w_hh[2 * H:].T + b_hh[2 * H:])
                st.update(q=q)
            else:
                ghn = hp @ w_hh[2 * H:].T + b_hh[2 * H:]
                n = np.tanh(gx[:, 2 * H:] + r * ghn)
                st.update(ghn=ghn)
            hn = (1.0 - z) * n + z * hp
            st.update(r=r, z=z, n=n)
        else:
            a = gx + hp @ w_hh.T + b_hh
            hn = np.tanh(a) if code == RNN_TANH else np.maximum(a, 0.0)
            st.update(h=hn)
        h[live] = hn
        y[t, live] = hn
        steps.append(st)
    saved = {"kind": kind, "code": code, "shape": (T, B, I), "H": H, "Hout": Hout, "steps": steps,
             "w": (w_ih, w_hh, w_hr), "variant": variant, "w_ph": _f64(w_ph)}
    return y, h, c, saved


def backward_direction(saved: dict, dy: np.ndarray, dh_n=None, dc_n=None, weights=None, w_ph=None):
    """Backward of :func:`forward_direction`.

    Parameters
    ----------
    saved : the context returned by :func:`forward_direction`.
    dy : (T, B, H_out) gradient of the outputs (ignored at padded steps).
    dh_n : (B, H_out), dc_n : (B, H) or None (zeros).
    weights : optional ``(w_ih, w_hh, w_hr)`` to use instead of the forward's weights
        (and ``w_ph``, a variant's peepholes).

    Returns
    -------
    dx : (T, B, I), dh0 : (B, H_out), dc0 : (B, H) or None, grads : dict with float64
        ``w_ih, w_hh, b_ih, b_hh`` and ``w_hr`` (projection only).
    """
    kind, code = saved["kind"], saved["code"]
    T, B, I = saved["shape"]
    H, Hout = saved["H"], saved["Hout"]
    w_ih, w_hh, w_hr = saved["w"] if weights is None else tuple(_f64(w) for w in weights)
    G = CELLS[kind].num_gates
    dy = np.asarray(dy, np.float64)
    dh = np.zeros((B, Hout)) if dh_n is None else np.array(dh_n, np.float64)
    dc = None
    if kind == "lstm":
        dc = np.zeros((B, H)) if dc_n is None else np.array(dc_n, np.float64)
    dx = np.zeros((T, B, I))
    gw_ih, gw_hh = np.zeros_like(w_ih), np.zeros_like(w_hh)
    gb_ih, gb_hh = np.zeros(G * H), np.zeros(G * H)
    gw_hr = np.zeros_like(w_hr) if code == LSTM_PROJ else None
    v = saved["variant"]
    w_ph = saved["w_ph"] if w_ph is None else _f64(w_ph)
    gw_ph = np.zeros_like(w_ph) if v is not None and v.peephole else None
    for st in reversed(saved["steps"]):
        t, live = st["t"], st["live"]
        dht = dh[live] + dy[t, live]
        if v is not None:
            dax, dah, dhp, dcp = _variant_backward(code, v, st, dht, None if dc is None else dc[live],
                                                   w_hh, w_hr, w_ph, H, gw_hr, gw_hh, gw_ph)
            if dcp is not None:
                dc[live] = dcp
        elif kind == "lstm":
            i, f, g, o, cn, m = st["i"], st["f"], st["g"], st["o"], st["c"], st["m"]
            if code == LSTM_PROJ:
                gw_hr += dht.T @ m
                dm = dht @ w_hr
            else:
                dm = dht
            tc = np.tanh(cn)
            dct = dc[live] + dm * o * (1.0 - tc * tc)
            da = np.concatenate([dct * g * i * (1.0 - i), dct * st["cp"] * f * (1.0 - f),
                                 dct * i * (1.0 - g * g), dm * tc * o * (1.0 - o)], axis=1)
            dc[live] = dct * f
            dax = dah = da
            dhp = da @ w_hh
        elif kind == "gru":
            r, z, n, hp = st["r"], st["z"], st["n"], st["hp"]
            dan = dht * (1.0 - z) * (1.0 - n * n)
            daz = dht * (hp - n) * z * (1.0 - z)
            dhp = dht * z
            if code == GRU_NOLBR:
                dq = dan @ w_hh[2 * H:]
                dar = dq * hp * r * (1.0 - r)
                dhp = dhp + dq * r
                gw_hh[2 * H:] += dan.T @ st["q"]
                drz = np.concatenate([dar, daz], axis=1)
                gw_hh[:2 * H] += drz.T @ hp
                dhp = dhp + drz @ w_hh[:2 * H]
                dax, dah = np.concatenate([dar, daz, dan], axis=1), None
            else:
                dar = dan * st["ghn"] * r * (1.0 - r)
                dax = np.concatenate([dar, daz, dan], axis=1)
                dah = np.concatenate([dar, daz, dan * r], axis=1)
                dhp = dhp + dah @ w_hh
        else:
            hcur = st["h"]
            da = dht * (1.0 - hcur * hcur) if code == RNN_TANH else dht * (hcur > 0)
            dax = dah = da
            dhp = da @ w_hh
        gw_ih += dax.T @ st["x"]
        gb_ih += dax.sum(axis=0)
        if dah is None:     # GRU no-lbr: the recurrent weights' gradients are in already
            gb_hh += dax.sum(axis=0)
        else:
            gw_hh += dah.T @ st["hp"]
            gb_hh += dah.sum(axis=0)
        dx[t, live] = dax @ w_ih
        dh[live] = dhp
    grads = {"w_ih": gw_ih, "w_hh": gw_hh, "b_ih": gb_ih, "b_hh": gb_hh}
    if gw_hr is not None:
        grads["w_hr"] = gw_hr
    if gw_ph is not None:
        grads["w_ph"] = gw_ph
    return dx, dh, dc, grads


__all__ = ["forward_direction", "backward_direction"]
