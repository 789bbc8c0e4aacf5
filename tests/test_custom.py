"""rnnfast.CustomRNN: traced user cells, compiled forward and derived backward (issue 19).

Oracles: the built-in layers (an LSTM, GRU and RNN written as custom cells must match
them) and PyTorch autograd of the same equations written with torch ops.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import rnnfast
from rnnfast import ops
from rnnfast.ops import TraceError

from conftest import require_oracle


# ------------------------------------------------------------------ cells, written once for any namespace
def make_seed(F):
    def seed_cell(xp, h, rec):
        i = F.sigmoid(xp[0] + rec(h, 0))
        f = F.sigmoid(xp[1] + rec(h, 1))
        o = F.sigmoid(xp[2] + rec(h, 2))
        c = F.tanh(xp[3] + rec(f * h, 3))
        h_new = o * F.tanh(h) + i * c
        return h_new, h_new
    return seed_cell


def make_lstm(F):
    def lstm_cell(xp, state, rec):
        h, c = state
        i = F.sigmoid(xp[0] + rec(h, 0))
        f = F.sigmoid(xp[1] + rec(h, 1))
        g = F.tanh(xp[2] + rec(h, 2))
        o = F.sigmoid(xp[3] + rec(h, 3))
        c2 = f * c + i * g
        h2 = o * F.tanh(c2)
        return (h2, c2), h2
    return lstm_cell


def make_gru(F):
    def gru_cell(xp, h, rec):
        r = F.sigmoid(xp[0] + rec(h, 0))
        z = F.sigmoid(xp[1] + rec(h, 1))
        n = F.tanh(xp[2] + r * rec(h, 2))
        h2 = (1 - z) * n + z * h
        return h2, h2
    return gru_cell


def make_rnn(F):
    def rnn_cell(xp, h, rec):
        h2 = F.tanh(xp[0] + rec(h, 0))
        return h2, h2
    return rnn_cell


def make_exotic(F):
    def exotic_cell(xp, h, rec):
        a = xp[0] + rec(h, 0)
        b = xp[1] + rec(F.relu(h), 1)
        u = F.softplus(3.0 * a) - F.abs(b) + F.hard_sigmoid(4.0 * a) * F.minimum(a, b) + F.maximum(b, 0.1)
        e = F.exp(-F.abs(a)) + F.log(1.0 + F.sigmoid(b))
        h2 = F.tanh(F.where(a > b, u, e) / (2.0 + F.abs(h)))
        return h2, h2 - 0.5 * h
    return exotic_cell


class TorchOps:
    """The ops namespace for torch tensors (the oracle's equations)."""

    def __init__(self, torch):
        self.t = torch

    def sigmoid(self, x):
        return self.t.sigmoid(x)

    def tanh(self, x):
        return self.t.tanh(x)

    def relu(self, x):
        return self.t.relu(x)

    def exp(self, x):
        return self.t.exp(x)

    def log(self, x):
        return self.t.log(x)

    def abs(self, x):
        return self.t.abs(x)

    def softplus(self, x):
        return self.t.nn.functional.softplus(x)

    def hard_sigmoid(self, x):
        return self.t.clamp(0.2 * x + 0.5, 0.0, 1.0)

    def minimum(self, a, b):
        return self.t.minimum(a, self.t.as_tensor(b, dtype=a.dtype))

    def maximum(self, a, b):
        return self.t.maximum(a, self.t.as_tensor(b, dtype=a.dtype))

    def where(self, c, a, b):
        return self.t.where(c, a, b)


# ------------------------------------------------------------------ torch oracle
def torch_stack(torch, cell, params, x, G, H, L, D, nS, h0=None, lengths=None):
    """Run a torch cell as CustomRNN does (time-major; packed-sequence semantics)."""
    T, B, _ = x.shape
    lens = torch.full((B,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths)
    tt = torch.arange(T)[:, None]
    valid = tt < lens[None, :]                                   # (T, B)
    rev_idx = torch.where(valid, lens[None, :] - 1 - tt, tt)     # reverse each valid prefix
    inp = x
    finals = [[None] * (L * D) for _ in range(nS)]
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            sfx = f"l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = params[f"weight_ih_{sfx}"], params[f"weight_hh_{sfx}"]
            b_ih, b_hh = params[f"bias_ih_{sfx}"], params[f"bias_hh_{sfx}"]
            xin = inp if d == 0 else torch.gather(inp, 0, rev_idx[:, :, None].expand(-1, -1, inp.shape[2]))
            st = [torch.zeros(B, H, dtype=x.dtype) if h0 is None else h0[q][k] for q in range(nS)]
            ys = []
            for t in range(T):
                xp_all = xin[t] @ w_ih.T + b_ih
                xp = [xp_all[:, g * H:(g + 1) * H] for g in range(G)]

                def rec(v, g, w_hh=w_hh, b_hh=b_hh):
                    return v @ w_hh[g * H:(g + 1) * H].T + b_hh[g * H:(g + 1) * H]
                new, out = cell(xp, st[0] if nS == 1 else tuple(st), rec)
                new = [new] if nS == 1 else list(new)
                m = valid[t][:, None]
                st = [torch.where(m, n, s) for n, s in zip(new, st)]
                ys.append(torch.where(m, out, torch.zeros_like(out)))
            y = torch.stack(ys)
            if d == 1:
                y = torch.gather(y, 0, rev_idx[:, :, None].expand(-1, -1, H)) * valid[:, :, None]
            outs.append(y)
            for q in range(nS):
                finals[q][k] = st[q]
        inp = torch.cat(outs, -1)
    return inp, [torch.stack(f) for f in finals]


def _check_against_torch(make, G, nS, *, L, D, lengths, with_hx, tol, seed=0, T=7, B=4, I=5, H=6):
    torch = require_oracle("torch")
    rng = np.random.default_rng(seed)
    layer = rnnfast.CustomRNN(I, H, cell=make(ops), gates=G, num_layers=L, bidirectional=D == 2,
                              dtype=np.float64, seed=seed)
    x = rng.standard_normal((T, B, I))
    h0 = [rng.standard_normal((L * D, B, H)) * 0.5 for _ in range(nS)] if with_hx else None
    hx = None if h0 is None else (h0[0] if nS == 1 else tuple(h0))
    y, hn = layer.forward(x, hx, lengths, train=True)
    dy = rng.standard_normal(y.shape)
    dhn = [rng.standard_normal((L * D, B, H)) for _ in range(nS)]
    dx, dh0 = layer.backward(dy, dhn[0] if nS == 1 else tuple(dhn))

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in layer.state_dict().items()}
    tx = torch.tensor(x, requires_grad=True)
    th0 = None if h0 is None else [torch.tensor(a, requires_grad=True) for a in h0]
    ty, thn = torch_stack(torch, make(TorchOps(torch)), tp, tx, G, H, L, D, nS, th0, lengths)
    loss = (ty * torch.tensor(dy)).sum() + sum((a * torch.tensor(b)).sum() for a, b in zip(thn, dhn))
    loss.backward()
    hn_l = [hn] if nS == 1 else list(hn)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    for q in range(nS):
        np.testing.assert_allclose(hn_l[q], thn[q].detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    for k, v in tp.items():
        np.testing.assert_allclose(layer.grads[k], v.grad.numpy(), err_msg=k, **tol)
    if th0 is not None:
        dh0_l = [dh0] if nS == 1 else list(dh0)
        for q in range(nS):
            np.testing.assert_allclose(dh0_l[q], th0[q].grad.numpy(), **tol)
    if lengths is not None:
        for b, n in enumerate(lengths):
            assert np.all(y[n:, b] == 0)
    return layer


TOL8 = dict(rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ the seed cell against torch
def test_seed_cell_schedule_two_passes():
    layer = rnnfast.CustomRNN(3, 4, cell=make_seed(ops), gates=4)
    g = layer.graph
    assert g.final == 2
    assert [(lev, [r.arg for r in recs]) for lev, _, recs in g.groups] == [(0, [0, 1, 2]), (1, [3])]


@pytest.mark.parametrize("L,D,lengths,with_hx", [
    (1, 1, None, False),
    (2, 2, [7, 3, 0, 5], True),
])
def test_seed_cell_matches_torch_autograd(L, D, lengths, with_hx):
    _check_against_torch(make_seed, 4, 1, L=L, D=D, lengths=lengths, with_hx=with_hx, tol=TOL8)


def test_all_ops_match_torch_autograd():
    _check_against_torch(make_exotic, 2, 1, L=1, D=2, lengths=[7, 2, 5, 1], with_hx=True, tol=TOL8, seed=3)


# ------------------------------------------------------------------ built-in cells written as custom cells
BUILTIN = {"lstm": (make_lstm, 4, 2, rnnfast.LSTM), "gru": (make_gru, 3, 1, rnnfast.GRU),
           "rnn": (make_rnn, 1, 1, rnnfast.RNN)}


@pytest.mark.parametrize("kind,dtype", [("lstm", np.float64), ("gru", np.float64), ("rnn", np.float64),
                                        ("lstm", np.float32), ("gru", np.float32)])
def test_builtin_cells_as_custom_match(kind, dtype):
    make, G, nS, cls = BUILTIN[kind]
    T, B, I, H, L = 6, 3, 4, 5, 2
    ref = cls(I, H, num_layers=L, bidirectional=True, dtype=dtype, seed=11)
    layer = rnnfast.CustomRNN(I, H, cell=make(ops), gates=G, num_layers=L, bidirectional=True,
                              dtype=dtype, seed=11)
    # same initialisation order as the built-in layers
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[k], v)
    layer.load_state_dict(ref.state_dict())
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    lengths = np.array([6, 2, 4])
    hx = tuple(rng.standard_normal((L * 2, B, H)).astype(dtype) * 0.5 for _ in range(nS))
    hx = hx if nS > 1 else hx[0]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    y0, hn0 = ref.forward(x, hx, lengths, train=True)
    y1, hn1 = layer.forward(x, hx, lengths, train=True)
    np.testing.assert_allclose(y1, y0, **tol)
    for a, b in zip(np.atleast_1d(hn1) if nS == 1 else hn1, np.atleast_1d(hn0) if nS == 1 else hn0):
        np.testing.assert_allclose(a, b, **tol)
    dy = rng.standard_normal(y0.shape).astype(dtype)
    dhn = tuple(rng.standard_normal((L * 2, B, H)).astype(dtype) for _ in range(nS))
    dhn = dhn if nS > 1 else dhn[0]
    dx0, dh0 = ref.backward(dy, dhn)
    dx1, dh1 = layer.backward(dy, dhn)
    np.testing.assert_allclose(dx1, dx0, **tol)
    for a, b in zip(dh1 if nS > 1 else (dh1,), dh0 if nS > 1 else (dh0,)):
        np.testing.assert_allclose(a, b, **tol)
    assert set(layer.grads) == set(ref.grads)
    for k in ref.grads:
        np.testing.assert_allclose(layer.grads[k], ref.grads[k], err_msg=k, **tol)
    # inference equals the training forward; batch_first and unbatched layouts
    y2, _ = layer(x, hx, lengths)
    np.testing.assert_allclose(y2, y1, **tol)


def test_layouts_unbatched_batch_first_no_bias():
    rng = np.random.default_rng(2)
    layer = rnnfast.CustomRNN(3, 4, cell=make_rnn(ops), gates=1, batch_first=True, bias=False,
                              dtype=np.float64, seed=1)
    ref = rnnfast.RNN(3, 4, batch_first=True, bias=False, dtype=np.float64, seed=1)
    assert set(layer.parameters()) == {"weight_ih_l0", "weight_hh_l0"}
    x = rng.standard_normal((2, 5, 3))
    y, _ = layer.forward(x, train=True)
    y0, _ = ref.forward(x, train=True)
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    dx, _ = layer.backward(np.ones_like(y))
    dx0, _ = ref.backward(np.ones_like(y0))
    np.testing.assert_allclose(dx, dx0, rtol=1e-12, atol=1e-12)
    yu, hu = layer(x[0])
    assert yu.shape == (5, 4) and hu.shape == (1, 4)
    np.testing.assert_allclose(yu, y[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ errors
def _line_of(fn, text: str) -> int:
    import inspect
    src, first = inspect.getsourcelines(fn)
    return first + next(i for i, s in enumerate(src) if text in s)


def test_if_on_traced_value_names_the_line():
    def bad(xp, h, rec):
        a = xp[0] + rec(h, 0)
        if a > 0:
            a = -a
        return a, a
    with pytest.raises(TraceError, match=rf"line {_line_of(bad, 'if a > 0')}.*if a > 0") as e:
        rnnfast.CustomRNN(2, 3, cell=bad, gates=1)
    assert "where" in str(e.value)


def test_unsupported_ops_name_the_line():
    def np_sin(xp, h, rec):
        a = np.sin(xp[0] + rec(h, 0))
        return a, a

    def math_exp(xp, h, rec):
        a = math.exp(xp[0] + rec(h, 0))
        return a, a

    def bad_block(xp, h, rec):
        a = xp[0] + rec(h, 3)
        return a, a

    def bad_return(xp, h, rec):
        a = ops.tanh(xp[0] + rec(h, 0))
        return a

    for fn, text, msg in [(np_sin, "np.sin", "sin"), (math_exp, "math.exp", "rnnfast.ops"),
                          (bad_block, "rec(h, 3)", "block index"), (bad_return, "return a", "must return")]:
        with pytest.raises(TraceError, match=msg) as e:
            rnnfast.CustomRNN(2, 3, cell=fn, gates=1)
        assert f"line {_line_of(fn, text)}" in str(e.value), str(e.value)


def test_failed_calls_leave_the_layer_intact():
    rng = np.random.default_rng(0)
    layer = rnnfast.CustomRNN(3, 4, cell=make_gru(ops), gates=3, dtype=np.float64, seed=0)
    with pytest.raises(RuntimeError):
        layer.backward(np.zeros((2, 1, 4)))
    before = layer.state_dict()
    x = rng.standard_normal((5, 2, 3))
    y, _ = layer.forward(x, train=True)
    dx, _ = layer.backward(np.ones_like(y))
    grads = {k: v.copy() for k, v in layer.grads.items()}
    with pytest.raises(ValueError, match="x"):
        layer.forward(rng.standard_normal((5, 2, 4)), train=True)
    with pytest.raises(ValueError, match="lengths"):
        layer.forward(x, lengths=[9, 1], train=True)
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.ones((5, 2, 3)))
    for k, v in before.items():
        np.testing.assert_array_equal(layer.parameters()[k], v)
    for k, v in grads.items():
        np.testing.assert_array_equal(layer.grads[k], v)
    dx2, _ = layer.backward(np.ones_like(y))          # the earlier training forward still holds
    np.testing.assert_array_equal(dx2, dx)


def test_ops_compute_on_arrays():
    a = np.array([-30.0, -1.0, 0.0, 2.0, 30.0])
    np.testing.assert_allclose(ops.sigmoid(a), 1 / (1 + np.exp(-a)))
    np.testing.assert_allclose(ops.softplus(a), np.where(a > 20, a, np.log1p(np.exp(np.minimum(a, 20)))))
    np.testing.assert_allclose(ops.hard_sigmoid(a), np.clip(0.2 * a + 0.5, 0, 1))
    np.testing.assert_array_equal(ops.relu(a), np.maximum(a, 0))
    np.testing.assert_array_equal(ops.where(a > 0, a, -a), np.abs(a))


# ------------------------------------------------------------------ rows on threads
def test_row_chunks_balance_the_work():
    from rnnfast.custom import _row_chunks
    assert _row_chunks(np.full(64, 100), 2) == [(0, 32), (32, 64)]
    assert _row_chunks(np.full(3, 100), 2) == [(0, 3)]           # 2 rows a thread at least
    assert _row_chunks(np.array([100, 10, 10, 10, 10, 10, 10, 10, 10, 10]), 2) == [(0, 1), (1, 10)]
    assert _row_chunks(np.zeros(8, np.int64), 2) == [(0, 8)]
    got = _row_chunks(np.array([9, 9, 8, 5, 5, 3, 1, 0, 0]), 3)
    assert got[0][0] == 0 and got[-1][1] == 9 and all(a < b for a, b in got)
    assert all(got[i][1] == got[i + 1][0] for i in range(len(got) - 1))


@pytest.mark.parametrize("nthreads", [2, 3])
def test_rows_on_threads_match_one_thread(nthreads):
    """The recurrence runs on several threads, each a range of the length-sorted rows:
    outputs, states and every gradient equal one thread's (sequences of different lengths,
    empty ones, both directions, two layers, initial states)."""
    rng = np.random.default_rng(5)
    T, B, I, H = 9, 11, 5, 7
    layer = rnnfast.CustomRNN(I, H, cell=make_seed(ops), gates=4, num_layers=2, bidirectional=True,
                              dtype=np.float64, seed=4)
    x = rng.standard_normal((T, B, I))
    ln = rng.integers(0, T + 1, B)
    ln[3], ln[7] = 0, T
    hx = rng.standard_normal((4, B, H))
    res = []
    before = rnnfast.get_num_threads()
    try:
        for n in (1, nthreads):
            rnnfast.set_num_threads(n)
            y, hn = layer.forward(x, hx, ln, train=True)
            dx, dh0 = layer.backward(np.cos(y), np.sin(hn))
            res.append((y, hn, dx, dh0, {k: v.copy() for k, v in layer.grads.items()}))
    finally:
        rnnfast.set_num_threads(before)
    for a, b in zip(res[0][:4], res[1][:4]):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13)
    for k, v in res[0][4].items():
        np.testing.assert_allclose(res[1][4][k], v, rtol=1e-12, atol=1e-13, err_msg=k)
